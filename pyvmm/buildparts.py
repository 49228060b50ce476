"""The parts every architecture's builder puts together in the same way: the KVM VM with its RAM, the
console and its panic watcher, the devices through which the guest reports how it ended, the virtio
disks with their ioeventfds and irqfds, and the build report.

Used by pyvmm/builder.py and the machines (pyvmm/arch/*/board.py); nothing here knows an architecture (an
architecture's addresses and interrupt numbers come in as arguments).
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import threading
from collections.abc import Callable

from pyvmm.bus import Bus
from pyvmm.config import CONSOLE_NONE, CONSOLE_STDIO, VmConfig, parse_gdb_address
from pyvmm.console import ConsoleOutput
from pyvmm.devices.guestexit import GuestExit
from pyvmm.devices.pvpanic import PVPANIC_PANICKED, PvPanic, describe
from pyvmm.devices.ratelimit import LogLimiter
from pyvmm.errors import ConfigError
from pyvmm.eventloop import EventLoop
from pyvmm.guestexec import EXEC64_KEY, EXEC_KEY, exec_arg
from pyvmm.interrupt import EventFd, EventFdIrq
from pyvmm.kvm.abi import KVM_CAP_IOEVENTFD
from pyvmm.kvm.system import Kvm
from pyvmm.kvm.vcpu import VcpuFd
from pyvmm.kvm.vm import VmFd
from pyvmm.loader.cmdline import Cmdline
from pyvmm.log import get_logger
from pyvmm.memory import GuestMemory
from pyvmm.record import field, record
from pyvmm.statictypes import TYPE_CHECKING
from pyvmm.status import ExitStatus
from pyvmm.vmm import Vmm

if TYPE_CHECKING:
    from typing import Literal

    from pyvmm.devices.virtio.mmio import VirtioMmioTransport
    from pyvmm.gdb.target import DebugTarget
    from pyvmm.trace import Tracer

    ConsoleFd = int | None | Literal["config"]

log = get_logger(__name__)

# After a panic line on the console (or a pvpanic event): how long the rest of the report may take to
# arrive before the VM is stopped.
PANIC_GRACE_S = 1.0


# drivers/virtio/virtio_mmio.c: the module parameter (<size>@<base>:<irq>[:<id>]) by which a kernel built
# with VIRTIO_MMIO_CMDLINE_DEVICES takes virtio-mmio devices from its command line.
CMDLINE_DEVICES_PARAM = "virtio_mmio.device"


@record(frozen=False)
class BuildReport:
    """What the builder decided, for the user and for tests."""

    kernel_format: str = ""
    cmdline: str = ""
    host: str = ""
    notes: list[str] = field(default_factory=list)

def _console_fd(config: VmConfig, stack: contextlib.ExitStack) -> int | None:
    if config.console == CONSOLE_NONE:
        return None
    if config.console == CONSOLE_STDIO:
        return sys.stdout.fileno()
    path = config.console.removeprefix("file:")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise ConfigError(f"cannot open console file {path}: {err.strerror}") from err
    stack.callback(os.close, fd)
    return fd

def create_vm(ram: list[tuple[int, int]], stack: contextlib.ExitStack,
              check_caps: Callable[[VmFd], None], *, huge_pages: bool = True,
              kvm_device: str | None = None) -> tuple[GuestMemory, Kvm, VmFd]:
    """Guest RAM (on huge pages where the host has them, :mod:`pyvmm.memory`), the KVM system fd and a VM
    with the RAM mapped as memory slots 0, 1, ...  RAM comes first, so it is released last (after the VM
    that maps it)."""
    mem = GuestMemory(ram, huge_pages=huge_pages)
    stack.callback(mem.close)
    kvm = Kvm(kvm_device)
    stack.callback(kvm.close)
    vm = kvm.create_vm()
    stack.callback(vm.close)
    check_caps(vm)
    for slot, region in enumerate(mem.regions):
        vm.set_user_memory_region(slot, region.gpa, region.size, region.host_addr)
    return mem, kvm, vm


def kernel_symbolizer(kernel: str | os.PathLike[str]) -> Callable[[int], str | None]:
    """Address -> "symbol+0xoff" in ``kernel`` (for stop reports); nothing is read, and the symbol reader not
    imported, until the first lookup."""
    lookup: list[Callable[[int], str | None]] = []

    def symbolize(addr: int) -> str | None:
        if not lookup:
            from pyvmm.loader.symbols import KernelSymbols

            lookup.append(KernelSymbols(kernel).lookup)
        return lookup[0](addr)

    return symbolize


def create_vcpus(vm: VmFd, stack: contextlib.ExitStack, count: int,
                 setup: Callable[[VcpuFd], None]) -> list[VcpuFd]:
    """vCPUs 0..count-1, each set up by the architecture's ``setup`` as soon as it exists."""
    vcpus = []
    for index in range(count):
        vcpu = vm.create_vcpu(index)
        stack.callback(vcpu.close)
        setup(vcpu)
        vcpus.append(vcpu)
    return vcpus


class VmLink:
    """How the devices made before the :class:`Vmm` reach it: the builder makes the link first, hands its
    methods to the devices that end the VM or report on it, and attaches the Vmm once it exists.  Until
    then (a device acting during the build) the calls do nothing."""

    def __init__(self) -> None:
        self._vmm: Vmm | None = None

    def attach(self, vmm: Vmm) -> None:
        self._vmm = vmm

    def stop(self, status: ExitStatus, reason: str) -> None:
        if self._vmm is not None:
            self._vmm.request_stop(status, reason)

    def note_panic(self, report: str) -> None:
        if self._vmm is not None:
            self._vmm.note_panic(report)

    def guest_exit(self, status: int) -> None:
        if self._vmm is not None:
            self._vmm.guest_exit(status)

    def panic_line(self) -> str | None:
        """The console's first panic line, if any."""
        return self._vmm.console.panic_line if self._vmm is not None else None


def after_panic_grace(fn: Callable[[], None]) -> None:
    """Call ``fn`` once the rest of a panic report has had PANIC_GRACE_S to reach the console."""
    t = threading.Timer(PANIC_GRACE_S, fn)
    t.daemon = True
    t.start()


# build_vm's console_fd: an fd, None (nowhere), or this: where config.console says
CONSOLE_FROM_CONFIG: Literal["config"] = "config"


def make_console(config: VmConfig, stack: contextlib.ExitStack, console_fd: ConsoleFd,
                 stop: Callable[[ExitStatus, str], None]) -> ConsoleOutput:
    """The guest console sink; with ``panic_exit`` a kernel panic line stops the VM shortly after."""
    fd = _console_fd(config, stack) if console_fd == CONSOLE_FROM_CONFIG else console_fd

    def on_panic(line: str) -> None:
        after_panic_grace(lambda: stop(ExitStatus.GUEST_PANIC, f"guest kernel panic: {line}"))

    return ConsoleOutput(fd, on_panic=on_panic if config.panic_exit else None)


def add_exec_arg(cmdline: Cmdline, cmd: str | None) -> None:
    """``--exec``: the kernel argument the guest's /init runs (pyvmm.guestexec), given once."""
    if cmd is None:
        return
    if cmdline.has(EXEC_KEY) or cmdline.has(EXEC64_KEY):
        raise ConfigError(f"--exec and {EXEC_KEY}= in the command line: give the command once")
    cmdline.add(*exec_arg(cmd))


def make_guest_reports(config: VmConfig, link: VmLink) -> tuple[PvPanic, GuestExit]:
    """The two devices through which the guest itself says how it ended, wired to the VM: pvpanic (a
    panic counts whatever follows; with ``panic_exit`` the VM stops after the grace period that lets
    the panic report reach the console; with ``--no-panic-exit`` only a log line, as the console's panic
    watcher is off then too) and the guest exit device (the VM ends with the guest's status)."""

    reported = LogLimiter()  # a guest may write the pvpanic port in a loop

    def on_pvpanic(events: int) -> None:
        if not config.panic_exit:  # like the console's panic watcher, which is off then too
            if reported.tick():
                log.warning("the guest reported a panic through pvpanic (%s); --no-panic-exit: it keeps running "
                            "(%d reports so far)", describe(events), reported.count)
            return
        report = f"reported by pvpanic ({describe(events)})"
        link.note_panic(report)
        if events & PVPANIC_PANICKED:
            # A crash kernel that was loaded (CRASH_LOADED alone) is left to do its work.
            def stop_after_grace() -> None:
                line = link.panic_line()
                link.stop(ExitStatus.GUEST_PANIC,
                          f"guest kernel panic: {line or 'no panic line on the console'} ({report})")

            after_panic_grace(stop_after_grace)

    return PvPanic(on_pvpanic), GuestExit(link.guest_exit)

def attach_disks(config: VmConfig, vm: VmFd, mem: GuestMemory, mmio: Bus, loop: EventLoop,
                 stack: contextlib.ExitStack, report: BuildReport, *, slot: Callable[[int], tuple[int, int]],
                 window: int, cmdline: Cmdline | None, deferred_irqfds: list[tuple[int, int]] | None = None,
                 stop: Callable[[ExitStatus, str], None] | None = None) -> None:
    """One virtio-mmio transport + virtio-blk per ``--disk``: MMIO window and interrupt from ``slot(index)``
    (the irqfd GSI: an IOAPIC pin on x86, an SPI number on aarch64), an ioeventfd per queue on QueueNotify
    (datamatch = queue index), and, given a ``cmdline``, the ``virtio_mmio.device=`` argument.

    A disk has one request queue per vCPU unless its ``queues=`` says otherwise.  One queue is served on
    the event loop; several are served each on a thread of its own (:class:`QueueWorker`), so that their
    requests are processed at the same time (the disk I/O releases the GIL).  ``stop`` ends the VM when a
    worker fails."""
    if not config.disks:
        return
    # Imported for the runs that have a disk: a diskless boot starts without them.
    from pyvmm.devices.virtio.block import VirtioBlock
    from pyvmm.devices.virtio.mmio import REG_QUEUE_NOTIFY, VirtioMmioTransport
    from pyvmm.trace import EVENT_CLASSES, Tracer

    seen: dict[tuple[int, int], str] = {}
    # Without ioeventfd a QueueNotify write is an MMIO exit the transport serves on the vCPU thread.
    use_ioeventfd = bool(vm.check_extension(KVM_CAP_IOEVENTFD)) and config.debug.ioeventfd
    if config.disks and not use_ioeventfd:
        report.notes.append("ioeventfd unavailable: virtqueue notifications are handled as MMIO exits")
    tracer: Tracer | None = None
    if config.trace and config.disks:  # off by default: then no hook exists at all (zero cost)
        tracer = Tracer.open(config.trace, config.trace_file)
        stack.callback(tracer.close)
        classes = ", ".join(c for c in EVENT_CLASSES if c in config.trace)
        report.notes.append(f"virtio trace ({classes}) to {config.trace_file or 'stderr'}")
    for index, disk_cfg in enumerate(config.disks):
        # A snapshot disk only reads its image (the guest's writes go to a private overlay), so like a
        # read-only one it may share the image with other readers.
        reads_only = disk_cfg.readonly or disk_cfg.snapshot
        try:
            st = os.stat(disk_cfg.path)
            key = (st.st_dev, st.st_ino)
            if key in seen and not (reads_only and seen[key] == "ro"):
                raise ConfigError(f"disk {disk_cfg.path} is given twice; a writable disk can be attached once")
            seen[key] = "ro" if reads_only else "rw"
        except FileNotFoundError:
            pass  # the device reports a missing image in its own words
        try:
            base, irq = slot(index)
        except ValueError as err:
            raise ConfigError(f"too many disks: {err}") from None
        device = VirtioBlock.from_config(disk_cfg, num_queues=disk_cfg.queues or config.cpus)
        stack.callback(device.close)
        name = f"vd{chr(ord('a') + index)}"
        trace = tracer.hook(name, irq=f"irqfd (GSI {irq})") if tracer is not None else None
        transport = VirtioMmioTransport(device, mem, irqfd(vm, stack, irq, deferred_irqfds), trace=trace,
                                        version=config.virtio_mmio_version, ring=disk_cfg.ring)
        mmio.add(base, window, transport, f"virtio-blk{index}")
        for q in range(len(device.queue_max_sizes) if use_ioeventfd else 0):
            efd = EventFd()
            stack.callback(efd.close)
            vm.ioeventfd(efd.fd, base + REG_QUEUE_NOTIFY, 4, datamatch=q)
            if device.num_queues == 1:
                loop.add(efd.fd, _notifier(efd, transport, q))
            else:
                worker = QueueWorker(efd, transport, q, f"{name}.q{q}", stop)
                stack.callback(worker.close)
                worker.start()
        if cmdline is not None:
            cmdline.add(CMDLINE_DEVICES_PARAM, f"{window >> 10}K@{base:#x}:{irq}")
        mode = (" (read-only)" if disk_cfg.readonly
                else " (snapshot: writes go to a temporary overlay, discarded at exit)" if disk_cfg.snapshot else "")
        legacy = " (legacy virtio-mmio version 1)" if transport.legacy else ""
        queues = f", {device.num_queues} queues" if device.num_queues > 1 else ""
        queues += f", {transport.ring} ring" if transport.ring != "auto" else ""
        report.notes.append(f"{name}: {disk_cfg.path}{mode} at {base:#x} irq {irq}{legacy}{queues}")


class QueueWorker:
    """Serves one virtqueue's ioeventfd on a thread of its own, until :meth:`close`."""

    def __init__(self, efd: EventFd, transport: VirtioMmioTransport, queue: int, name: str,
                 stop: Callable[[ExitStatus, str], None] | None) -> None:
        self._efd = efd
        self._transport = transport
        self._queue = queue
        self._stop_vm = stop
        self._quit = EventFd()
        self._thread = threading.Thread(target=self._run, name=f"virtio-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._efd.fd, select.POLLIN)
        poller.register(self._quit.fd, select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _ in poller.poll()}
                if self._quit.fd in ready:
                    return
                self._efd.read()  # reset the counter first: a notification racing with processing is not lost
                self._transport.notify(self._queue, via="ioeventfd")
        except Exception as err:  # a device bug: end the VM with it, as the event loop would
            log.error("%s: %r", self._thread.name, err)
            if self._stop_vm is not None:
                self._stop_vm(ExitStatus.VMM_ERROR, f"{self._thread.name} failed: {err!r}")

    def close(self) -> None:
        self._quit.write(1)
        if self._thread.is_alive():
            self._thread.join(5)
        self._quit.close()


def _notifier(efd: EventFd, transport: VirtioMmioTransport, queue: int) -> Callable[[], None]:
    def on_notify() -> None:
        efd.read()  # reset the counter first: a notification racing with processing is not lost
        transport.notify(queue, via="ioeventfd")

    return on_notify


def irqfd(vm: VmFd, stack: contextlib.ExitStack, gsi: int,
          deferred: list[tuple[int, int]] | None = None) -> EventFdIrq:
    """An eventfd wired to ``gsi`` with KVM_IRQFD.  With ``deferred``, the ``(eventfd, gsi)`` pair is
    appended there instead, for the caller to register later (aarch64: KVM refuses irqfds with EAGAIN until
    the vGIC is initialised, which needs every vCPU first)."""
    efd = EventFd()
    stack.callback(efd.close)
    if deferred is None:
        vm.irqfd(efd.fd, gsi)
    else:
        deferred.append((efd.fd, gsi))
    return EventFdIrq(efd, gsi)


def attach_gdb(config: VmConfig, vmm: Vmm, mem: GuestMemory, make_target: Callable[[], DebugTarget],
               stack: contextlib.ExitStack, report: BuildReport) -> None:
    """``--gdb``: the GDB server on its socket (opened now, before the sandbox refuses new sockets) and
    the all-stop control in the vCPU loop.  Nothing at all without ``--gdb``: not even its imports, which
    every run would pay for at start-up."""
    if config.gdb is None:
        return
    from pyvmm.gdb.control import Debugger
    from pyvmm.gdb.server import GdbServer, is_loopback

    host, port = parse_gdb_address(config.gdb)
    target = make_target()
    debugger = Debugger(vmm.vcpus, mem, target, vmm.loop, kick=vmm.kick_vcpus, stopping=lambda: vmm.stopping,
                        start_paused=config.gdb_wait, on_pause=vmm.flush_output)
    stack.callback(debugger.close)
    try:
        server = GdbServer(debugger, target, vmm.loop, host=host, port=port,
                           kill=lambda why: vmm.request_stop(ExitStatus.STOPPED, f"stopped by gdb: {why}"),
                           exit_code=lambda: vmm.result.exit_code if vmm.result is not None else 0)
    except OSError as err:
        why = os.strerror(err.errno) if err.errno else str(err)
        raise ConfigError(f"--gdb {config.gdb}: cannot listen on {host} port {port}: {why}") from None
    stack.callback(server.close)
    vmm.debug = debugger
    vmm.on_stop.append(server.vm_ended)
    shown_host, shown_port = server.address
    where = f"[{shown_host}]:{shown_port}" if ":" in shown_host else f"{shown_host}:{shown_port}"
    report.notes.append(f"gdb server on {where} (gdb: target remote {where})"
                        + ("; the guest waits for gdb to attach and continue" if config.gdb_wait else ""))
    report.notes.append(f"gdb: {target.describe()}")
    if not is_loopback(shown_host):
        report.notes.append(f"warning: the gdb server listens on {shown_host}, not on loopback: whoever reaches "
                            "that port can read and change the guest's memory and registers")
