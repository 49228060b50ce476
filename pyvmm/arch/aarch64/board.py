"""The aarch64 machine as the one builder (pyvmm/builder.py) assembles it, with the same method names as
the x86_64 machine's (pyvmm/arch/x86_64/board.py), so the builder never branches on the architecture.

What is shared with x86 is shared by import, unchanged: guest RAM, the console, the 16550 model (here on
MMIO instead of port I/O), the virtio-mmio transport and virtio-blk with their ioeventfds and irqfds, the
event loop and the vCPU loop.  What differs lives in ``pyvmm/arch/aarch64``: the memory map, the Image
loader, the device tree that announces every device (there is no ACPI and no ``virtio_mmio.device=`` on
aarch64: a command-line device's IRQ number would not be a GIC interrupt), the vGIC and vCPU init.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from pyvmm.arch.aarch64 import layout, machine
from pyvmm.arch.aarch64.devicetree import build_device_tree
from pyvmm.arch.aarch64.image import load_image, load_initrd_aarch64
from pyvmm.buildparts import BuildReport, VmLink, add_exec_arg, attach_gdb, irqfd, make_guest_reports
from pyvmm.bus import Bus
from pyvmm.coalescing import CoalescedWrites
from pyvmm.config import VmConfig
from pyvmm.console import ConsoleOutput
from pyvmm.devices.boottimer import BootTimer
from pyvmm.devices.guestexit import GUEST_EXIT_SIZE
from pyvmm.devices.pvpanic import PVPANIC_MMIO_SIZE
from pyvmm.devices.serial import Serial16550
from pyvmm.errors import ConfigError
from pyvmm.loader.cmdline import Cmdline
from pyvmm.loader.kernel import LoadedKernel
from pyvmm.statictypes import TYPE_CHECKING
from pyvmm.vmm import ArchExitHandler, Vmm

if TYPE_CHECKING:
    from pyvmm.gdb.target import DebugTarget
    from pyvmm.kvm.system import Kvm
    from pyvmm.kvm.vcpu import VcpuFd
    from pyvmm.kvm.vm import VmFd
    from pyvmm.memory import GuestMemory

CMDLINE_MAX = 2048  # COMMAND_LINE_SIZE on arm64 (arch/arm64/include/uapi/asm/setup.h)
UART_REGS = 8  # the 16550's register file; reg-io-width 1, reg-shift 0


class Aarch64Machine:
    """One aarch64 VM's build steps; made per build with its configuration (which it checks first)."""

    virtio_window = layout.VIRTIO_MMIO_SIZE
    boot_timer: BootTimer | None = None  # no boot timer device here

    def __init__(self, config: VmConfig, report: BuildReport) -> None:
        report.host = "aarch64 KVM"
        if config.cpus > layout.MAX_CPUS:
            raise ConfigError(f"at most {layout.MAX_CPUS} vCPUs on aarch64")
        if config.devices_via == "cmdline":
            raise ConfigError("--devices-via cmdline is x86 only: on aarch64 the device tree announces the devices")
        self.config = config
        self.report = report
        self.fdt_addr = layout.fdt_addr(config.memory)
        # irqfds are registered once the vGIC is initialised (after the vCPUs): KVM refuses them before
        self.deferred_irqfds: list[tuple[int, int]] = []
        self._gic: machine.Vgic | None = None
        self._initrd: tuple[int, int] | None = None

    # -- memory and the VM ----------------------------------------------------------------------------
    def ram_layout(self) -> list[tuple[int, int]]:
        try:
            return layout.ram_layout(self.config.memory)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def check_caps(self, vm: VmFd) -> None:
        machine.check_caps(vm)

    def create_irqchip(self, vm: VmFd, stack: contextlib.ExitStack) -> None:
        """The vGIC exists (with its addresses) before any vCPU; CTRL_INIT comes after them."""
        self._gic = gic = machine.create_vgic(vm)
        stack.callback(gic.close)
        self.report.notes.append(f"vGICv{gic.version}")

    # -- the kernel -----------------------------------------------------------------------------------
    def load_kernel(self, mem: GuestMemory, ram: list[tuple[int, int]]) -> LoadedKernel:
        """The Image, and its initrd below the device tree."""
        kernel = load_image(mem, self.config.kernel)
        if self.config.initrd:
            self._initrd = load_initrd_aarch64(mem, self.config.initrd, kernel.kernel_end, self.fdt_addr)
        return kernel

    def cmdline(self, kernel: LoadedKernel) -> Cmdline:
        cmdline = Cmdline(CMDLINE_MAX - 1)
        cmdline.extend(self.config.cmdline)
        add_exec_arg(cmdline, self.config.exec_cmd)
        return cmdline

    # -- devices --------------------------------------------------------------------------------------
    def add_devices(self, vm: VmFd, stack: contextlib.ExitStack, pio: Bus, mmio: Bus, link: VmLink,
                    console: ConsoleOutput) -> Serial16550:
        """The platform's devices, all on MMIO (aarch64 has no port I/O); returns the console UART."""
        serial = Serial16550(irqfd(vm, stack, layout.UART_SPI, self.deferred_irqfds), console)
        mmio.add(layout.UART_ADDR, UART_REGS, serial, "uart")
        pvpanic, guest_exit = make_guest_reports(self.config, link)
        mmio.add(layout.PVPANIC_ADDR, PVPANIC_MMIO_SIZE, pvpanic, "pvpanic")
        mmio.add(layout.GUEST_EXIT_ADDR, GUEST_EXIT_SIZE, guest_exit, "guest-exit")
        return serial

    def virtio_slot(self, index: int) -> tuple[int, int]:
        return layout.virtio_mmio_slot(index)

    def disk_cmdline(self, cmdline: Cmdline) -> Cmdline | None:
        return None  # the device tree announces them

    # -- boot -----------------------------------------------------------------------------------------
    def configure_boot(self, mem: GuestMemory, ram: list[tuple[int, int]], kernel: LoadedKernel,
                       cmdline: str) -> None:
        """The device tree, at the address the boot vCPU's X0 will hold."""
        assert self._gic is not None, "create_irqchip comes first"
        fdt = build_device_tree(ram=ram, cpus=self.config.cpus, cmdline=cmdline, initrd=self._initrd,
                                gic_version=self._gic.version,
                                virtio=[layout.virtio_mmio_slot(i) for i in range(len(self.config.disks))],
                                rng_seed=os.urandom(64))  # early entropy: the guest's CRNG is ready at once
        if len(fdt) > layout.FDT_MAX_SIZE:
            raise ConfigError(f"device tree of {len(fdt)} bytes exceeds {layout.FDT_MAX_SIZE}")
        mem.write(self.fdt_addr, fdt)

    # -- vCPUs ----------------------------------------------------------------------------------------
    def vcpu_setup(self, kvm: Kvm, vm: VmFd, kernel: LoadedKernel) -> Callable[[VcpuFd], None]:
        target = machine.preferred_target(vm)
        fdt_addr = self.fdt_addr
        return lambda vcpu: machine.setup_vcpu(vcpu, target, entry=kernel.entry, fdt_addr=fdt_addr)

    def after_vcpus(self, vm: VmFd, vcpus: list[VcpuFd]) -> CoalescedWrites | None:
        """The vGIC's CTRL_INIT, then the irqfds it was waiting for.  (No port I/O: nothing to coalesce.)"""
        assert self._gic is not None, "create_irqchip comes first"
        self._gic.finalize()
        for fd, spi in self.deferred_irqfds:
            vm.irqfd(fd, spi)
        return None

    def exit_handler(self, mem: GuestMemory) -> ArchExitHandler:
        return machine.Aarch64ExitHandler()

    def attach_debugger(self, vmm: Vmm, mem: GuestMemory, vm: VmFd, stack: contextlib.ExitStack) -> None:
        attach_gdb(self.config, vmm, mem, lambda: _debug_target(mem, vm, vmm), stack, self.report)


def _debug_target(mem: GuestMemory, vm: VmFd, vmm: Vmm) -> DebugTarget:
    """The gdb server's aarch64 side (imported only for --gdb)."""
    from pyvmm.arch.aarch64.gdbtarget import Aarch64DebugTarget

    return Aarch64DebugTarget(mem, vm, vmm.vcpus[0])
