"""The x86_64 machine (a PC without PCI) as the one builder (pyvmm/builder.py) assembles it: each method
is one step of the build, named as the aarch64 machine's (pyvmm/arch/aarch64/board.py) are, so the
builder never branches on the architecture.

The devices a PC guest expects sit on port I/O (16550 COM1, i8042 for the reset line, CMOS RTC, ACPI
sleep control, pvpanic); the firmware tables are ACPI (with the virtio-mmio devices in the DSDT) and an
MP table, and the kernel takes its boot parameters in the zero page (Documentation/arch/x86/boot.rst).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from pyvmm.arch.x86_64 import hostkvm, layout, machine, mptable
from pyvmm.arch.x86_64.acpi import tables as acpi_tables
from pyvmm.arch.x86_64.bootparams import build_e820, write_boot_params
from pyvmm.arch.x86_64.cpu import get_supported_cpuid
from pyvmm.arch.x86_64.initrd import load_initrd
from pyvmm.arch.x86_64.kernel import load_kernel
from pyvmm.buildparts import BuildReport, VmLink, add_exec_arg, attach_gdb, irqfd, make_guest_reports
from pyvmm.bus import Bus
from pyvmm.coalescing import CoalescedWrites, coalesce_port_writes
from pyvmm.config import VmConfig
from pyvmm.console import ConsoleOutput
from pyvmm.devices.acpi_sleep import AcpiSleep
from pyvmm.devices.boottimer import BOOT_TIMER_SIZE, BootTimer
from pyvmm.devices.guestexit import GUEST_EXIT_SIZE
from pyvmm.devices.i8042 import I8042
from pyvmm.devices.pvpanic import PVPANIC_PORT_SIZE
from pyvmm.devices.rtc import CmosRtc
from pyvmm.devices.serial import Serial16550
from pyvmm.loader.cmdline import Cmdline
from pyvmm.loader.kernel import LoadedKernel
from pyvmm.statictypes import TYPE_CHECKING
from pyvmm.status import ExitStatus
from pyvmm.vmm import ArchExitHandler, Vmm

if TYPE_CHECKING:
    from pyvmm.gdb.target import DebugTarget
    from pyvmm.kvm.system import Kvm
    from pyvmm.kvm.vcpu import VcpuFd
    from pyvmm.kvm.vm import VmFd
    from pyvmm.memory import GuestMemory

# A parameter every x86 kernel with ACPI has built in (drivers/acpi/sysfs.c, always part of CONFIG_ACPI):
# how the builder tells a kernel with ACPI from its __param section.
ACPI_PARAM = "acpi.acpica_version"

# Arguments every boot gets unless the user already gave the key: the serial console is ttyS0,
# reboot through the keyboard controller (the VMM sees it), no PCI bus to probe, and no keyboard behind
# that controller (pyvmm has none: its i8042 is there for the reset line).  Without i8042.nokbd Linux's
# atkbd driver probes for a keyboard with PS/2 commands that each wait for an answer until they time
# out; the probe runs in the background, but mounting the root and rebooting wait for every probe to
# finish (wait_for_device_probe), which cost 0.8-0.9 s per boot in the KVM lab.
DEFAULT_ARGS: tuple[tuple[str, str | None], ...] = (
    ("reboot", "k"), ("pci", "off"), ("8250.nr_uarts", "1"), ("i8042.nokbd", None))


class X86Machine:
    """One x86_64 VM's build steps; made per build with its configuration."""

    virtio_window = layout.VIRTIO_MMIO_SIZE
    deferred_irqfds: list[tuple[int, int]] | None = None  # x86 binds irqfds at once

    def __init__(self, config: VmConfig, report: BuildReport) -> None:
        self.config = config
        self.report = report
        self.host = hostkvm.resolve(config.workarounds)
        report.host = self.host.reason
        self.boot_timer: BootTimer | None = None
        self._initrd: tuple[int, int] | None = None  # (address, size)
        self._devices_via = config.devices_via  # as it applies to the kernel: set by cmdline()

    # -- memory and the VM ----------------------------------------------------------------------------
    def ram_layout(self) -> list[tuple[int, int]]:
        return layout.ram_layout(self.config.memory)  # [(gpa, size)] around the device hole

    def check_caps(self, vm: VmFd) -> None:
        machine.check_caps(vm)

    def create_irqchip(self, vm: VmFd, stack: contextlib.ExitStack) -> None:
        self.report.notes += machine.setup_platform(vm)  # irqchip before any irqfd or vCPU

    # -- the kernel -----------------------------------------------------------------------------------
    def load_kernel(self, mem: GuestMemory, ram: list[tuple[int, int]]) -> LoadedKernel:
        """The kernel and its initrd, placed as the boot protocol asks."""
        kernel = load_kernel(mem, self.config.kernel, boot=self.config.boot)  # type: ignore[arg-type]
        if self.config.initrd:
            self._initrd = load_initrd(mem, self.config.initrd, kernel, ram)
        return kernel

    def cmdline(self, kernel: LoadedKernel) -> Cmdline:
        cmdline = Cmdline(min(layout.CMDLINE_MAX - 1, kernel.cmdline_size))
        cmdline.extend(self.config.cmdline)
        add_exec_arg(cmdline, self.config.exec_cmd)
        for key, value in DEFAULT_ARGS:
            cmdline.add(key, value, if_absent=True)
        for arg in self.host.workaround_args:
            key, _, value = arg.partition("=")
            cmdline.add(key, value or None, if_absent=True)
        self._devices_via = self._devices_via_for(kernel, cmdline)
        return cmdline

    def _devices_via_for(self, kernel: LoadedKernel, cmdline: Cmdline) -> str:
        """``--devices-via`` as it applies to this kernel.  A kernel running with ACPI cannot use the command
        line's devices: with the hardware-reduced FADT it has no legacy PIC, so Linux IRQ numbers are
        allocated as ACPI registers each GSI and a number on the command line names no interrupt (the
        driver's probe fails with -22); and where it also takes them from the command line, it would find
        each twice.  So ``both`` means the DSDT alone for a kernel with ACPI, unless ``acpi=off``."""
        mode = self.config.devices_via
        params = kernel.builtin_params
        if not self.config.disks or params is None or ACPI_PARAM not in params or cmdline.value("acpi") == "off":
            return mode
        if mode == "both":
            self.report.notes.append("virtio disks announced in the ACPI DSDT only: the kernel has ACPI "
                                     "(docs/acpi.md, --devices-via)")
            return "acpi"
        if mode == "cmdline":
            self.report.notes.append("warning: --devices-via cmdline with a kernel that has ACPI: its virtio "
                                     "disks will fail to probe (error -22); add acpi=off to the command line, "
                                     "or use --devices-via both (docs/acpi.md)")
        return mode

    # -- devices --------------------------------------------------------------------------------------
    def add_devices(self, vm: VmFd, stack: contextlib.ExitStack, pio: Bus, mmio: Bus, link: VmLink,
                    console: ConsoleOutput) -> Serial16550:
        """The platform's devices; returns the console UART."""
        stop = link.stop
        serial = Serial16550(irqfd(vm, stack, layout.COM1_IRQ), console)
        pio.add(layout.COM1_PORT, 8, serial, "com1")
        pio.add(layout.I8042_DATA_PORT, 5, I8042(lambda: stop(ExitStatus.OK, "guest reset (i8042)")), "i8042")
        pio.add(0x70, 2, CmosRtc(), "rtc")
        pio.add(layout.ACPI_SLEEP_CONTROL_PORT, 2,
                AcpiSleep(lambda: stop(ExitStatus.OK, "guest powered off (ACPI S5)")), "acpi-sleep")
        self.boot_timer = BootTimer()
        mmio.add(layout.BOOT_TIMER_ADDR, BOOT_TIMER_SIZE, self.boot_timer, "boot-timer")
        pvpanic, guest_exit = make_guest_reports(self.config, link)
        pio.add(layout.PVPANIC_PORT, PVPANIC_PORT_SIZE, pvpanic, "pvpanic")
        mmio.add(layout.GUEST_EXIT_ADDR, GUEST_EXIT_SIZE, guest_exit, "guest-exit")
        return serial

    def virtio_slot(self, index: int) -> tuple[int, int]:
        return layout.virtio_mmio_slot(index)

    def disk_cmdline(self, cmdline: Cmdline) -> Cmdline | None:
        """Where virtio_mmio.device= arguments go: the command line, unless ACPI alone announces them."""
        return cmdline if self._devices_via != "acpi" else None

    # -- boot -----------------------------------------------------------------------------------------
    def configure_boot(self, mem: GuestMemory, ram: list[tuple[int, int]], kernel: LoadedKernel,
                       cmdline: str) -> None:
        """Firmware tables in the BIOS area: the MP table for kernels without ACPI, and the ACPI tables,
        always (a kernel without CONFIG_ACPI ignores them; one with ACPI takes its CPUs and IRQs from the
        MADT).  The DSDT lists the virtio-mmio devices unless they are announced on the command line only
        (``_devices_via_for``).  Then the zero page and the boot page tables."""
        config = self.config
        virtio = [] if self._devices_via == "cmdline" else [
            acpi_tables.VirtioMmioDevice(base, layout.VIRTIO_MMIO_SIZE, irq)
            for base, irq in map(layout.virtio_mmio_slot, range(len(config.disks)))]
        acpi = acpi_tables.write(mem, config.cpus, virtio, pvpanic_port=layout.PVPANIC_PORT)
        mptable.write(mem, config.cpus)
        write_boot_params(mem, kernel, cmdline.encode(), self._initrd, build_e820(ram),
                          acpi_rsdp_addr=acpi.rsdp_addr)
        machine.write_boot_tables(mem)

    # -- vCPUs ----------------------------------------------------------------------------------------
    def vcpu_setup(self, kvm: Kvm, vm: VmFd, kernel: LoadedKernel) -> Callable[[VcpuFd], None]:
        supported = get_supported_cpuid(kvm)
        host, cpus = self.host, self.config.cpus
        return lambda vcpu: machine.setup_vcpu(vcpu, supported, cpus, entry=kernel.entry,
                                               hide_xsave=host.software)

    def after_vcpus(self, vm: VmFd, vcpus: list[VcpuFd]) -> CoalescedWrites | None:
        """The UART's THR writes through KVM's coalesced ring where the host has KVM_CAP_COALESCED_PIO: no
        exit per console byte; exits on the UART's ports replay the ring first where the writes could
        change their outcome (pyvmm/coalescing.py)."""
        coalesced = coalesce_port_writes(vm, vcpus[0], layout.COM1_PORT, 1, device=(layout.COM1_PORT, 8),
                                         enabled=self.config.debug.coalesced_pio)
        if coalesced is not None:
            self.report.notes.append(f"serial THR writes coalesced (KVM_CAP_COALESCED_PIO, "
                                     f"{coalesced.ring.capacity}-entry ring)")
        return coalesced

    def exit_handler(self, mem: GuestMemory) -> ArchExitHandler:
        return machine.X86ExitHandler(mem, assist=self.host.software)

    def attach_debugger(self, vmm: Vmm, mem: GuestMemory, vm: VmFd, stack: contextlib.ExitStack) -> None:
        attach_gdb(self.config, vmm, mem, lambda: _debug_target(mem, vm), stack, self.report)


def _debug_target(mem: GuestMemory, vm: VmFd) -> DebugTarget:
    """The gdb server's x86 side, with what this host's KVM really delivers (imported only for --gdb)."""
    from pyvmm.arch.x86_64 import debugprobe
    from pyvmm.arch.x86_64.gdbtarget import X86DebugTarget

    return X86DebugTarget(mem, vm, debugprobe.probe())
