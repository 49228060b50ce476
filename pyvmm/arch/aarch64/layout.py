"""Every guest-physical address and interrupt number of the aarch64 machine, in one place.

The map follows the shape of QEMU's ``virt`` board (devices in the first GiB, RAM from 1 GiB), which
is what aarch64 Linux is most used to; the numbers are ours.  The guest learns all of them from the
device tree (pyvmm/arch/aarch64/fdt.py), never from a hard-coded platform.

Interrupts: GIC shared peripheral interrupts (SPIs) are numbered here from 0, as in a device tree's
``interrupts = <GIC_SPI n flags>`` cell and as KVM's default irq routing maps an irqfd GSI ``n`` on
aarch64 (Documentation/virt/kvm/api.rst, KVM_IRQ_LINE / KVM_IRQFD: "the GSI is the SPI number").  The
GIC INTID of SPI ``n`` is ``32 + n``.
"""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# --- the GIC (Arm GIC architecture spec IHI 0069, 12.8/12.10: 64 KiB distributor frame, two 64 KiB
# frames (RD_base, SGI_base) per redistributor) -------------------------------------------------------
GIC_DIST_ADDR = 0x0800_0000
GIC_DIST_SIZE = 0x1_0000
GIC_REDIST_ADDR = 0x080A_0000  # GICv3: one 128 KiB redistributor per vCPU, contiguous
GIC_REDIST_SIZE_PER_CPU = 0x2_0000
GIC_CPU_ADDR = 0x0801_0000  # GICv2 fallback: the CPU interface (GICC), 8 KiB used
GIC_CPU_SIZE = 0x2000
MAX_CPUS = 8  # redistributors must fit below UART_ADDR: 0x080A0000 + 8 * 128 KiB = 0x081A0000

# --- platform devices -----------------------------------------------------------------------------
UART_ADDR = 0x0900_0000  # an ns16550a on MMIO, byte registers (reg-shift 0)
UART_SIZE = 0x1000
UART_SPI = 1
# pvpanic (pyvmm/devices/pvpanic.py; bindings/misc/pvpanic-mmio.txt: a 2-byte region) and the guest exit
# device (pyvmm/devices/guestexit.py), a page each after the UART (their sizes are the devices'); no
# interrupts
PVPANIC_ADDR = 0x0900_1000
GUEST_EXIT_ADDR = 0x0900_2000

# virtio-mmio windows: one 4 KiB page each (virtio 1.2 4.2.2: the register block is 0x100 + config)
VIRTIO_MMIO_BASE = 0x0A00_0000
VIRTIO_MMIO_SIZE = 0x1000
VIRTIO_MMIO_MAX = 8
VIRTIO_SPI_BASE = 16  # SPIs 16..23

# --- RAM ------------------------------------------------------------------------------------------
RAM_START = 0x4000_0000
RAM_MAX = 255 * GiB  # what the 40-bit IPA space KVM gives by default leaves above RAM_START
# Documentation/arch/arm64/booting.rst: the Image goes at a 2 MiB aligned base + text_offset; the
# device tree on an 8-byte boundary, at most 2 MiB; we put the tree at the top of RAM below 512 MiB
# (well inside the first memory block) and the initrd just below the tree.
KERNEL_ALIGN = 2 * MiB
FDT_MAX_SIZE = 2 * MiB

# --- architectural timer PPIs (Arm ARM D11.2; the numbers every aarch64 DT uses: the INTID is 16 + n) ---
TIMER_PPI_SECURE_PHYS = 13
TIMER_PPI_NONSECURE_PHYS = 14
TIMER_PPI_VIRT = 11
TIMER_PPI_HYP = 10


def virtio_mmio_slot(index: int) -> tuple[int, int]:
    """Guest-physical base and SPI number of the ``index``-th virtio-mmio device."""
    if not 0 <= index < VIRTIO_MMIO_MAX:
        raise ValueError(f"at most {VIRTIO_MMIO_MAX} virtio-mmio devices")
    return VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SIZE, VIRTIO_SPI_BASE + index


def ram_layout(size: int) -> list[tuple[int, int]]:
    """One contiguous RAM region from RAM_START: ``[(gpa, size)]``."""
    if size > RAM_MAX:
        raise ValueError(f"at most {RAM_MAX // GiB} GiB of RAM on aarch64")
    return [(RAM_START, size)]


def fdt_addr(ram_size: int) -> int:
    """Where the device tree goes: the last FDT_MAX_SIZE of RAM below 512 MiB, 2 MiB aligned."""
    top = RAM_START + min(ram_size, 512 * MiB)
    return (top - FDT_MAX_SIZE) & ~(KERNEL_ALIGN - 1)
