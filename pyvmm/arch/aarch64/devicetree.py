"""The device tree of our aarch64 machine: how the guest kernel learns RAM, CPUs, GIC, timer and devices.

Every address and interrupt number comes from :mod:`pyvmm.arch.aarch64.layout`; this module only says how
each is written down, following the Devicetree Specification v0.4 chapter 3 (base nodes) and the Linux
DT bindings named at each node (Documentation/devicetree/bindings/...).  Linux reads the tree as
Documentation/arch/arm64/booting.rst section 2 asks: a blob in RAM, 8-byte aligned, at most 2 MiB.

Node names follow the bindings where they constrain them (serial/serial.yaml: ``^serial(@.*)?$``;
dt-schema's interrupt-controller.yaml: ``^interrupt-controller(@[0-9a-f,]+)*$``) and the spec's generic
names (2.2.2) elsewhere; unit addresses are the first ``reg`` address in lowercase hex without leading
zeros (spec 2.2.1, which dtc's ``unit_address_format`` check holds).

Interrupt flags.  Our UART and virtio-mmio interrupts are injected with KVM irqfds, which pulse the
line (assert, then deassert), so they are described as edge-triggered SPIs (IRQ_TYPE_EDGE_RISING): a
level-sensitive vGIC input would drop the pulse again before the guest saw it.  The architected timer
PPIs are level-sensitive, active high (IRQ_TYPE_LEVEL_HIGH): KVM drives the vtimer/ptimer input of the
vGIC as a level that follows the timer condition (arch/arm64/kvm/arch_timer.c kvm_timer_update_irq).
The ``0xf08`` (LEVEL_LOW) of many board trees and of arm,arch_timer.yaml's example would work as well:
arm,gic.yaml allows LEVEL_LOW for PPIs, the GIC's configuration register only knows level or edge, and
Linux's timer driver accepts either level (drivers/clocksource/arm_arch_timer.c check_ppi_trigger); we
state the signal KVM actually models, as QEMU's virt board does (hw/arm/virt.c fdt_add_timer_nodes).
"""

from __future__ import annotations

from pyvmm.arch.aarch64 import layout
from pyvmm.arch.aarch64.fdt import FdtWriter
from pyvmm.devices.guestexit import DT_COMPATIBLE as GUEST_EXIT_COMPATIBLE
from pyvmm.devices.guestexit import GUEST_EXIT_SIZE
from pyvmm.devices.pvpanic import DT_COMPATIBLE as PVPANIC_COMPATIBLE
from pyvmm.devices.pvpanic import PVPANIC_MMIO_SIZE

# include/dt-bindings/interrupt-controller/arm-gic.h: interrupt specifier cell 0.
GIC_SPI = 0
GIC_PPI = 1
# include/dt-bindings/interrupt-controller/irq.h: cell 2, bits [3:0].
IRQ_TYPE_EDGE_RISING = 1
IRQ_TYPE_LEVEL_HIGH = 4
# arm,gic.yaml #interrupt-cells: for GICv2, cell 2 bits [15:8] are the CPU mask of a PPI
# (arm-gic.h GIC_CPU_MASK_RAW(x) = x << 8).
GIC_CPU_MASK_SHIFT = 8
GICV2_MAX_CPUS = 8  # arm,gic.yaml: "the 8 possible cpus attached to the GIC"

# serial/8250.yaml: an ns16550a needs no clock, but the usual 1.8432 MHz crystal makes divisor 1 =
# 115200 baud for a driver that computes one.
UART_CLOCK_HZ = 1_843_200

ROOT_COMPATIBLE = "linux,pyvmm"
MODEL = "pyvmm aarch64 KVM virtual machine"


def mpidr_affinity(index: int) -> int:
    """The MPIDR_EL1 affinity fields KVM gives vCPU ``index`` (arch/arm64/kvm/sys_regs.c reset_mpidr:
    Aff0 = id[3:0], Aff1 = id[11:4], Aff2 = id[19:12]); arm/cpus.yaml: a cpu node's ``reg`` is them."""
    return (index & 0xF) | ((index >> 4) & 0xFF) << 8 | ((index >> 12) & 0xFF) << 16


def _unit(name: str, addr: int) -> str:
    return f"{name}@{addr:x}"


def uart_path() -> str:
    """The full path of the UART node (what ``stdout-path`` and ``/aliases/serial0`` name)."""
    return "/" + _unit("serial", layout.UART_ADDR)


def build_device_tree(
    *,
    ram: list[tuple[int, int]],
    cpus: int,
    cmdline: str,
    initrd: tuple[int, int] | None,
    gic_version: int,
    virtio: list[tuple[int, int]],
    uart: bool = True,
    rng_seed: bytes | None = None,
    reports: bool = True,
) -> bytes:
    """The DTB for a machine with ``ram`` regions ``(gpa, size)``, ``cpus`` vCPUs, the GIC of
    ``gic_version`` (3 or 2), the UART if ``uart``, one virtio-mmio device per ``(base, spi)`` and, if
    ``reports``, the pvpanic and guest exit devices.

    ``initrd`` is ``(start, end)``, end exclusive, as Linux reads ``linux,initrd-end``
    (drivers/of/fdt.c early_init_dt_check_for_initrd: size = end - start).  ``rng_seed``, if given,
    goes to ``/chosen/rng-seed`` (early entropy; Linux adds it to the pool and wipes it).
    Raises ValueError for arguments the machine cannot describe.
    """
    if gic_version not in (2, 3):
        raise ValueError(f"gic_version must be 3 or 2, not {gic_version}")
    max_cpus = layout.MAX_CPUS if gic_version == 3 else min(layout.MAX_CPUS, GICV2_MAX_CPUS)
    if not 1 <= cpus <= max_cpus:
        raise ValueError(f"cpus must be 1..{max_cpus} with GICv{gic_version}, not {cpus}")
    if not ram:
        raise ValueError("the device tree needs at least one RAM region (spec 3.1: a /memory node)")
    if len(virtio) > layout.VIRTIO_MMIO_MAX:
        raise ValueError(f"at most {layout.VIRTIO_MMIO_MAX} virtio-mmio devices")
    if "\0" in cmdline:
        raise ValueError("the command line cannot contain NUL")

    w = FdtWriter()
    gic = w.alloc_phandle()

    # Spec 3.2 (root: #address-cells, #size-cells, model, compatible required).  Two cells each: RAM
    # and the redistributor region can lie above 4 GiB.
    w.begin_node("")
    w.property_u32("#address-cells", 2)
    w.property_u32("#size-cells", 2)
    w.property_string("compatible", ROOT_COMPATIBLE)
    w.property_string("model", MODEL)
    w.property_u32("interrupt-parent", gic)  # spec 2.4.1: inherited by every node below

    _chosen(w, cmdline, initrd, uart, rng_seed)
    if uart:
        # Spec 3.3: aliases name full paths; Linux's 8250 OF driver numbers the port from serialN.
        w.begin_node("aliases")
        w.property_string("serial0", uart_path())
        w.end_node()
    for gpa, size in ram:
        # Spec 3.4: device_type "memory" and reg; one node per region.
        w.begin_node(_unit("memory", gpa))
        w.property_string("device_type", "memory")
        w.property_u64("reg", gpa, size)
        w.end_node()
    _cpus(w, cpus)
    _psci(w)
    _timer(w, cpus, gic_version)
    _gic(w, gic, cpus, gic_version)
    if uart:
        _uart(w)
    for base, spi in virtio:
        _virtio(w, base, spi)
    if reports:
        _reg_only(w, "pvpanic-mmio", PVPANIC_COMPATIBLE, layout.PVPANIC_ADDR, PVPANIC_MMIO_SIZE)
        _reg_only(w, "guest-exit", GUEST_EXIT_COMPATIBLE, layout.GUEST_EXIT_ADDR, GUEST_EXIT_SIZE)
    w.end_node()

    blob = w.finish(boot_cpuid=mpidr_affinity(0))
    if len(blob) > layout.FDT_MAX_SIZE:  # booting.rst section 2: "must not exceed 2 megabytes"
        raise ValueError(f"device tree of {len(blob)} bytes exceeds {layout.FDT_MAX_SIZE}")
    return blob


def _chosen(
    w: FdtWriter, cmdline: str, initrd: tuple[int, int] | None, uart: bool, rng_seed: bytes | None
) -> None:
    # Spec 3.6 (/chosen: bootargs, stdout-path); linux,initrd-* are read by drivers/of/fdt.c
    # (early_init_dt_check_for_initrd) with of_read_number(prop, len / 4), so 64-bit values are fine.
    w.begin_node("chosen")
    w.property_string("bootargs", cmdline)
    if uart:
        w.property_string("stdout-path", uart_path())
    if initrd is not None:
        start, end = initrd
        if not 0 <= start <= end:
            raise ValueError(f"bad initrd range {start:#x}..{end:#x}")
        w.property_u64("linux,initrd-start", start)
        w.property_u64("linux,initrd-end", end)
    if rng_seed:
        w.property("rng-seed", rng_seed)
    w.end_node()


def _cpus(w: FdtWriter, cpus: int) -> None:
    # Spec 3.7/3.8 and arm/cpus.yaml: /cpus has #address-cells 1 (MPIDR Aff2..Aff0 fit one cell) and
    # #size-cells 0; each cpu: device_type "cpu", reg = MPIDR affinity, enable-method "psci" (required
    # on aarch64).  "arm,armv8" is the binding's compatible "for s/w models"; KVM presents the host's core.
    w.begin_node("cpus")
    w.property_u32("#address-cells", 1)
    w.property_u32("#size-cells", 0)
    for n in range(cpus):
        mpidr = mpidr_affinity(n)
        w.begin_node(_unit("cpu", mpidr))
        w.property_string("device_type", "cpu")
        w.property_string("compatible", "arm,armv8")
        w.property_u32("reg", mpidr)
        w.property_string("enable-method", "psci")
        w.end_node()
    w.end_node()


def _psci(w: FdtWriter) -> None:
    # arm/psci.yaml: node name "psci"; KVM implements PSCI 1.0 (compatible with 0.2, so no function
    # IDs are needed) and is called with HVC from the guest at EL1.
    w.begin_node("psci")
    w.property_strings("compatible", "arm,psci-1.0", "arm,psci-0.2")
    w.property_string("method", "hvc")
    w.end_node()


def _timer(w: FdtWriter, cpus: int, gic_version: int) -> None:
    # timer/arm,arch_timer.yaml: interrupts in the order secure phys, non-secure phys, virt, hyp;
    # always-on: the counter keeps running (nothing in a VM powers it down).
    flags = IRQ_TYPE_LEVEL_HIGH
    if gic_version == 2:
        flags |= ((1 << cpus) - 1) << GIC_CPU_MASK_SHIFT  # arm-gic.h GIC_CPU_MASK_SIMPLE(cpus)
    ppis = (
        layout.TIMER_PPI_SECURE_PHYS,
        layout.TIMER_PPI_NONSECURE_PHYS,
        layout.TIMER_PPI_VIRT,
        layout.TIMER_PPI_HYP,
    )
    w.begin_node("timer")
    w.property_string("compatible", "arm,armv8-timer")
    w.property_u32("interrupts", *(cell for ppi in ppis for cell in (GIC_PPI, ppi, flags)))
    w.property_empty("always-on")
    w.end_node()


def _gic(w: FdtWriter, phandle: int, cpus: int, gic_version: int) -> None:
    # interrupt-controller/arm,gic-v3.yaml: reg = GICD, then one range per redistributor region (ours is
    # one contiguous region of 128 KiB per vCPU, so #redistributor-regions, default 1, is left out).
    # interrupt-controller/arm,gic.yaml (v2): reg = distributor, CPU interface.  Both: 3 interrupt cells
    # <type number flags>.
    w.begin_node(_unit("interrupt-controller", layout.GIC_DIST_ADDR))
    if gic_version == 3:
        w.property_string("compatible", "arm,gic-v3")
        w.property_u64(
            "reg",
            layout.GIC_DIST_ADDR,
            layout.GIC_DIST_SIZE,
            layout.GIC_REDIST_ADDR,
            layout.GIC_REDIST_SIZE_PER_CPU * cpus,
        )
    else:
        w.property_string("compatible", "arm,cortex-a15-gic")
        w.property_u64(
            "reg", layout.GIC_DIST_ADDR, layout.GIC_DIST_SIZE, layout.GIC_CPU_ADDR, layout.GIC_CPU_SIZE
        )
    w.property_u32("#interrupt-cells", 3)
    # Both bindings allow #address-cells 0..2.  0 says that an interrupt-map entry pointing at the GIC
    # carries no parent unit address (spec 2.4.3, interrupt-map); without it readers assume 2, and dtc warns
    # (interrupt_provider: "Missing #address-cells in interrupt provider").
    w.property_u32("#address-cells", 0)
    w.property_empty("interrupt-controller")
    w.property_u32("phandle", phandle)
    w.end_node()


def _uart(w: FdtWriter) -> None:
    # serial/8250.yaml: compatible "ns16550a", reg, interrupts; reg-shift 0 and reg-io-width 1 = byte
    # registers at consecutive addresses.
    w.begin_node(_unit("serial", layout.UART_ADDR))
    w.property_string("compatible", "ns16550a")
    w.property_u64("reg", layout.UART_ADDR, layout.UART_SIZE)
    w.property_u32("interrupts", GIC_SPI, layout.UART_SPI, IRQ_TYPE_EDGE_RISING)
    w.property_u32("clock-frequency", UART_CLOCK_HZ)
    w.property_u32("reg-shift", 0)
    w.property_u32("reg-io-width", 1)
    w.end_node()


def _reg_only(w: FdtWriter, name: str, compatible: str, base: int, size: int) -> None:
    # A device with one register region and no interrupt: pvpanic-mmio.txt ("qemu,pvpanic-mmio", reg) and
    # our guest exit device (pyvmm/devices/guestexit.py), which no Linux driver binds.
    w.begin_node(_unit(name, base))
    w.property_string("compatible", compatible)
    w.property_u64("reg", base, size)
    w.end_node()


def _virtio(w: FdtWriter, base: int, spi: int) -> None:
    # virtio/mmio.yaml: compatible "virtio,mmio", reg (one window), interrupts (one); dma-coherent: our
    # "DMA" is the VMM reading guest RAM through the same coherent mapping.
    w.begin_node(_unit("virtio_mmio", base))
    w.property_string("compatible", "virtio,mmio")
    w.property_u64("reg", base, layout.VIRTIO_MMIO_SIZE)
    w.property_u32("interrupts", GIC_SPI, spi, IRQ_TYPE_EDGE_RISING)
    w.property_empty("dma-coherent")
    w.end_node()
