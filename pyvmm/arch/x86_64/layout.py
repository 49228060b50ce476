"""Every guest-physical address and IRQ number of the x86_64 machine, in one place.

Low memory follows the conventions of the Linux x86 boot protocol (Documentation/arch/x86/boot.rst)
and of the PC: the first 640 KiB minus the EBDA are usable RAM, 0x9fc00-0xfffff is reserved (EBDA,
VGA hole, BIOS area where old kernels search for the MP table and RSDP).  Nothing else in pyvmm may
hard-code one of these numbers.
"""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# --- low memory (all below the EBDA) -----------------------------------------------------------------
GDT_ADDR = 0x500  # boot GDT: null, code64 (0x10), data (0x18), tss (0x20) - Linux boot.rst 64-bit protocol
IDT_ADDR = 0x520  # empty IDT loaded for the 64-bit entry (the kernel installs its own)
ZERO_PAGE_ADDR = 0x7000  # struct boot_params (arch/x86/include/uapi/asm/bootparam.h), 4 KiB
PML4_ADDR = 0x9000  # identity page tables for the first 4 GiB, built with 2 MiB pages
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000  # four page directories, 0xb000-0xefff
BOOT_STACK_ADDR = 0x8FF0  # initial RSP for the 64-bit entry; grows down below the page tables
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000  # our limit; the kernel's own is setup_header.cmdline_size
EBDA_START = 0x9FC00
BIOS_AREA_START = 0xE0000  # MP table / RSDP live here (legacy search range 0xe0000-0xfffff)
# ACPI tables (RSDP first: ACPI 6.5 5.2.5.1 wants it 16-byte aligned in 0xe0000-0xfffff) and the Intel
# MP table (MP spec 1.4 4.0: the floating pointer in 0xf0000-0xfffff, which is where Linux looks).
ACPI_TABLES_START = 0xE0000
ACPI_TABLES_END = 0xF0000
MPTABLE_START = 0xF0000
BIOS_AREA_END = 0x100000
HIMEM_START = 0x100000  # 1 MiB: where protected-mode kernels go

# --- the 32-bit device hole and RAM above 4 GiB -----------------------------------------------------
MMIO_HOLE_START = 0xC000_0000  # RAM below 4 GiB ends here at the latest; the rest up to 4 GiB is devices
MMIO_HOLE_END = 0x1_0000_0000
HIGH_RAM_START = MMIO_HOLE_END

# virtio-mmio windows: one 4 KiB page each (virtio 1.2 4.2.2: the register block is 0x100 + config)
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_SIZE = 0x1000
VIRTIO_MMIO_MAX = 8
# boot-timing page (pyvmm/devices/boottimer.py): right after the last virtio-mmio slot
BOOT_TIMER_ADDR = VIRTIO_MMIO_BASE + VIRTIO_MMIO_MAX * VIRTIO_MMIO_SIZE
# the guest exit device (pyvmm/devices/guestexit.py), the page after the boot timer
GUEST_EXIT_ADDR = BOOT_TIMER_ADDR + 0x1000

# IOAPIC / LAPIC are at their architectural defaults; KVM's in-kernel irqchip models them there.
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000
IOAPIC_PINS = 24  # KVM_IOAPIC_NUM_PINS

# --- I/O ports and IRQs --------------------------------------------------------------------------------
COM1_PORT = 0x3F8
COM1_IRQ = 4
I8042_DATA_PORT = 0x60
I8042_CMD_PORT = 0x64
DEBUG_EXIT_PORT = 0x501  # firmware test guests write their result here
PVPANIC_PORT = 0x505  # pvpanic (pyvmm/devices/pvpanic.py): QEMU's ISA port, announced in the DSDT
# ACPI hardware-reduced sleep control/status registers (FADT SLEEP_CONTROL_REG / SLEEP_STATUS_REG),
# one byte each; a write of SLP_TYP=5 | SLP_EN powers the VM off.
ACPI_SLEEP_CONTROL_PORT = 0x600
ACPI_SLEEP_STATUS_PORT = 0x601
# ISA IRQs free for virtio-mmio devices: edge-triggered, routed by KVM's default GSI table to both the
# PIC and the IOAPIC.  0 timer, 1 keyboard, 2 cascade, 3/4 serial, 8 RTC, 13 FPU are taken.
VIRTIO_IRQS = (5, 6, 7, 9, 10, 11, 12, 14)

# --- hardware-compatible limits --------------------------------------------------------------------
INITRD_ADDR_MAX_DEFAULT = 0x37FFFFFF  # boot.rst: initrd_addr_max for protocol < 2.03


def virtio_mmio_slot(index: int) -> tuple[int, int]:
    """Guest-physical base and IRQ of the ``index``-th virtio-mmio device."""
    if not 0 <= index < min(VIRTIO_MMIO_MAX, len(VIRTIO_IRQS)):
        raise ValueError(f"at most {min(VIRTIO_MMIO_MAX, len(VIRTIO_IRQS))} virtio-mmio devices")
    return VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SIZE, VIRTIO_IRQS[index]


def ram_layout(size: int) -> list[tuple[int, int]]:
    """Split ``size`` bytes of RAM around the device hole: ``[(gpa, size), ...]``."""
    low = min(size, MMIO_HOLE_START)
    regions = [(0, low)]
    if size > low:
        regions.append((HIGH_RAM_START, size - low))
    return regions
