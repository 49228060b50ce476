"""``build_vm(config) -> Vmm``: the VM for this host's architecture, in one flat, ordered build.

Each architecture is a *machine* (:class:`Machine`: pyvmm/arch/x86_64/board.py, pyvmm/arch/aarch64/board.py)
with the same method names: its memory layout, its interrupt controller, how its kernel is loaded and
told about its command line, its platform devices, its firmware tables and boot state, its vCPU set-up
and its exit handler.  :data:`MACHINES` picks one, once, from the host's architecture; :func:`build`
below is the only build script and never branches on the architecture.  Order matters and is commented
where it does.  Resources go into one ExitStack so a failure half-way releases what was made, in
reverse order.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from pyvmm.buildparts import (
    CONSOLE_FROM_CONFIG,
    BuildReport,
    VmLink,
    attach_disks,
    create_vcpus,
    create_vm,
    kernel_symbolizer,
    make_console,
)
from pyvmm.bus import Bus
from pyvmm.coalescing import CoalescedWrites
from pyvmm.config import VmConfig
from pyvmm.console import ConsoleOutput
from pyvmm.devices.boottimer import BootTimer
from pyvmm.devices.serial import Serial16550
from pyvmm.errors import ConfigError
from pyvmm.eventloop import EventLoop
from pyvmm.kvm.system import Kvm
from pyvmm.kvm.vcpu import VcpuFd
from pyvmm.kvm.vm import VmFd
from pyvmm.loader.cmdline import Cmdline
from pyvmm.loader.kernel import LoadedKernel
from pyvmm.memory import GuestMemory
from pyvmm.statictypes import TYPE_CHECKING, Protocol
from pyvmm.vmm import ArchExitHandler, Vmm

if TYPE_CHECKING:
    from pyvmm.buildparts import ConsoleFd


class Machine(Protocol):
    """One architecture's part of a build, made per VM with its configuration (which it checks)."""

    virtio_window: int  # the size of one virtio-mmio window
    deferred_irqfds: list[tuple[int, int]] | None  # irqfds bound after the vCPUs (None: at once)
    boot_timer: BootTimer | None

    def ram_layout(self) -> list[tuple[int, int]]: ...
    def check_caps(self, vm: VmFd) -> None: ...
    def create_irqchip(self, vm: VmFd, stack: contextlib.ExitStack) -> None: ...
    def load_kernel(self, mem: GuestMemory, ram: list[tuple[int, int]]) -> LoadedKernel: ...
    def cmdline(self, kernel: LoadedKernel) -> Cmdline: ...
    def add_devices(self, vm: VmFd, stack: contextlib.ExitStack, pio: Bus, mmio: Bus, link: VmLink,
                    console: ConsoleOutput) -> Serial16550: ...
    def virtio_slot(self, index: int) -> tuple[int, int]: ...
    def disk_cmdline(self, cmdline: Cmdline) -> Cmdline | None: ...
    def configure_boot(self, mem: GuestMemory, ram: list[tuple[int, int]], kernel: LoadedKernel,
                       cmdline: str) -> None: ...
    def vcpu_setup(self, kvm: Kvm, vm: VmFd, kernel: LoadedKernel) -> Callable[[VcpuFd], None]: ...
    def after_vcpus(self, vm: VmFd, vcpus: list[VcpuFd]) -> CoalescedWrites | None: ...
    def exit_handler(self, mem: GuestMemory) -> ArchExitHandler: ...
    def attach_debugger(self, vmm: Vmm, mem: GuestMemory, vm: VmFd, stack: contextlib.ExitStack) -> None: ...


# The host's architecture (KVM runs guests of its own kind) -> "module:class" of its machine; imported
# only when used, so a host loads one architecture's code.
MACHINES = {"x86_64": "pyvmm.arch.x86_64.board:X86Machine", "aarch64": "pyvmm.arch.aarch64.board:Aarch64Machine"}


def build_vm(config: VmConfig, *, console_fd: ConsoleFd = CONSOLE_FROM_CONFIG) -> tuple[Vmm, BuildReport]:
    """Build (but do not start) the VM ``config`` describes.

    ``console_fd`` overrides where guest console output goes (``None`` = nowhere); by default it
    follows ``config.console``.
    """
    report = BuildReport()
    stack = contextlib.ExitStack()
    try:
        vmm = build(config, stack, report, console_fd)
    except BaseException:
        stack.close()
        raise
    return vmm, report


def host_arch() -> str:
    """The architecture pyvmm builds machines for: the host's own (KVM runs guests of its own kind)."""
    return os.uname().machine


def machine_for(config: VmConfig, report: BuildReport) -> Machine:
    arch = host_arch()
    if arch not in MACHINES:
        raise ConfigError(f"pyvmm builds {' and '.join(MACHINES)} machines; this host is {arch}")
    module, _, name = MACHINES[arch].partition(":")
    # __import__ with a fromlist returns the module itself (importlib's import_module, without importlib)
    machine: Machine = getattr(__import__(module, fromlist=[name]), name)(config, report)
    return machine


def build(config: VmConfig, stack: contextlib.ExitStack, report: BuildReport, console_fd: ConsoleFd) -> Vmm:
    machine = machine_for(config, report)

    ram = machine.ram_layout()  # [(gpa, size)]
    mem, kvm, vm = create_vm(ram, stack, machine.check_caps, huge_pages=config.debug.huge_pages,
                             kvm_device=config.debug.kvm_device)
    machine.create_irqchip(vm, stack)  # before any irqfd or vCPU

    kernel = machine.load_kernel(mem, ram)  # and its initrd
    report.kernel_format = kernel.format
    cmdline = machine.cmdline(kernel)

    # Devices.  The event loop exists first: devices hand it their eventfds.  The devices that end the VM
    # or report on it reach the Vmm, made last, through the link.
    loop = EventLoop()
    stack.callback(loop.close)
    pio = Bus("pio", unclaimed_read=0xFFFFFFFF)  # an empty ISA bus reads as all ones
    mmio = Bus("mmio")
    link = VmLink()
    console = make_console(config, stack, console_fd, link.stop)
    serial = machine.add_devices(vm, stack, pio, mmio, link, console)
    attach_disks(config, vm, mem, mmio, loop, stack, report, slot=machine.virtio_slot,
                 window=machine.virtio_window, cmdline=machine.disk_cmdline(cmdline),
                 deferred_irqfds=machine.deferred_irqfds, stop=link.stop)
    report.cmdline = str(cmdline)  # complete now: the disks may have added to it
    machine.configure_boot(mem, ram, kernel, report.cmdline)

    # vCPUs last: they need the memory, the interrupt controller and the boot state.
    vcpus = create_vcpus(vm, stack, config.cpus, machine.vcpu_setup(kvm, vm, kernel))
    coalesced = machine.after_vcpus(vm, vcpus)

    vmm = Vmm(vcpus, pio, mmio, loop, console, machine.exit_handler(mem), stack, timeout=config.timeout,
              stats=config.stats, coalesced=coalesced, profile=config.debug, serial=serial, mem=mem,
              boot_timer=machine.boot_timer, symbolize=kernel_symbolizer(config.kernel))
    link.attach(vmm)
    machine.attach_debugger(vmm, mem, vm, stack)
    return vmm
