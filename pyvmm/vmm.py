"""The running VM: vCPU threads, the event loop, and the one way to stop.

Each vCPU thread loops on ``KVM_RUN`` and dispatches PIO/MMIO exits through the buses on its own
thread.  That loop is the hot path (a Linux boot makes tens of thousands of exits): it decodes
``kvm_run`` with ``struct`` at offsets derived from the ctypes structs (:mod:`pyvmm.kvm.exits`),
dispatches through tables filled as addresses are first used (address -> device method,
:meth:`pyvmm.bus.Bus.handlers`) and takes no lock and makes no syscall of its own.  It comes in two variants, chosen once at start: the
plain one, and the counting one of ``--stats`` (:mod:`pyvmm.exitstats`), which also times each exit.
Where KVM coalesces the UART's port writes (:mod:`pyvmm.coalescing`), exits on the UART replay KVM's
ring first, except the LSR polls those writes cannot change.  The event loop (the caller's thread) serves ioeventfds, console input and timers.  Every way a
VM ends — guest power-off or reset, a panic on the console, an unhandled exit, a signal, the timeout —
goes through :meth:`Vmm.request_stop`: the first reason wins, the loop wakes, each vCPU gets
``immediate_exit`` and a signal so ``KVM_RUN`` returns ``EINTR``, and resources are released in
reverse order of creation.  A stop from outside (timeout, signal) also reports where each vCPU was
(:mod:`pyvmm.stopreport`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

from pyvmm.bus import Bus, DispatchTable, Reader, Writer
from pyvmm.coalescing import CoalescedWrites
from pyvmm.config import DebugKnobs
from pyvmm.console import ConsoleOutput
from pyvmm.eventloop import EventLoop
from pyvmm.kvm import abi
from pyvmm.kvm import exits as kx
from pyvmm.kvm.stats import StatsFd
from pyvmm.kvm.vcpu import VcpuFd
from pyvmm.log import get_logger
from pyvmm.record import field, record
from pyvmm.statictypes import TYPE_CHECKING, NamedTuple, Protocol
from pyvmm.status import ExitStatus, guest_exit_code
from pyvmm.stopreport import MARK_INTERVAL_S, REPORT_WINDOW_S, ProgressWatch, VcpuProgress, VcpuReport

if TYPE_CHECKING:
    from pyvmm.devices.boottimer import BootTimer
    from pyvmm.devices.serial import Serial16550
    from pyvmm.exitstats import ExitCounter, ExitStats
    from pyvmm.memory import GuestMemory

log = get_logger(__name__)

KICK_SIGNAL = signal.SIGUSR1
# Endings that a kernel panic seen earlier on the console overrides (a VMM error or an emulation failure
# stays what it is: that is pyvmm's or the host's to report).
_AFTER_A_PANIC = frozenset({ExitStatus.OK, ExitStatus.TIMEOUT, ExitStatus.STOPPED})
# The event loop's housekeeping tick: replay the coalesced ring and flush the console buffer.  Short
# enough that a key the guest echoes shows at once; the loop otherwise sleeps in epoll.  A tick that finds
# nothing to do doubles the next one's delay up to HOUSEKEEPING_IDLE_S: each wake-up takes the CPU from a
# vCPU for a moment, which under nested virtualization costs the guest far more than the tick's own work
# (measured in the KVM lab: 0.16 s of a 2.4 s boot at a steady 20 ms), and a booting guest's output is
# replayed by its own exits (its next status-register read) rather than by the tick.  Output found
# waiting, or console input (hurry_housekeeping), brings the tick back to CONSOLE_FLUSH_S.
CONSOLE_FLUSH_S = 0.02
HOUSEKEEPING_IDLE_S = 0.16


@record(frozen=False)
class VmResult:
    status: ExitStatus
    reason: str
    elapsed: float = 0.0
    exits: Counter[str] = field(default_factory=Counter)
    details: list[str] = field(default_factory=list)
    # Where each vCPU was, when the VM was stopped from outside (timeout, signal): pyvmm.stopreport
    vcpu_report: list[VcpuReport] = field(default_factory=list)
    last_console_line: str | None = None
    # Exits by kind and register, and where the time went: only with --stats (Vmm(stats=True))
    stats: ExitStats | None = None
    # The status the guest reported through the guest exit device (0-255), if it ended that way
    guest_status: int | None = None

    @property
    def exit_code(self) -> int:
        """pyvmm's process exit status for this result (pyvmm.status: a guest status N is 32 + N)."""
        if self.status == ExitStatus.OK and self.guest_status is not None:
            return guest_exit_code(self.guest_status)
        return int(self.status)


class _Tables(NamedTuple):
    """The vCPU loop's dispatch tables: address -> the device's read(size) / write(size, value)."""

    pio_r: DispatchTable[Reader]
    pio_w: DispatchTable[Writer]
    mmio_r: DispatchTable[Reader]
    mmio_w: DispatchTable[Writer]


class DebugHooks(Protocol):
    """What a debugger (pyvmm.gdb.control.Debugger) needs from the vCPU loop; None in Vmm.debug costs nothing."""

    def checkpoint(self, vcpu: VcpuFd) -> None:
        """Before the first run and at every KVM_EXIT_INTR: park here while the debugger holds the VM."""

    def debug_exit(self, vcpu: VcpuFd) -> None:
        """KVM_EXIT_DEBUG: a breakpoint, watchpoint or single step."""

    def emulation_failure(self, vcpu: VcpuFd) -> bool:
        """True if an emulation failure was the debugger's breakpoint (then it is handled)."""
        return False

    def after_assist(self, vcpu: VcpuFd) -> None:
        """The emulation assist performed an instruction."""

    def vm_stopping(self) -> None:
        """request_stop was called: release parked vCPUs."""


class ArchExitHandler:
    """What an architecture adds to the generic vCPU loop (x86: the emulation assist)."""

    def internal_error(self, vcpu: VcpuFd) -> tuple[ExitStatus, str] | None:
        """Handle ``KVM_EXIT_INTERNAL_ERROR``; return None to re-enter, or a stop reason."""
        st = vcpu.run_state.exit.internal
        return ExitStatus.VMM_ERROR, f"KVM internal error, suberror {st.suberror}"

    def summary(self) -> list[str]:
        return []

    def program_counter(self, vcpu: VcpuFd) -> int:
        """The guest's current instruction pointer (for the sampling profiler)."""
        return 0


class Vmm:
    def __init__(
        self,
        vcpus: list[VcpuFd],
        pio: Bus,
        mmio: Bus,
        loop: EventLoop,
        console: ConsoleOutput,
        arch: ArchExitHandler,
        cleanup: contextlib.ExitStack,
        *,
        timeout: float | None = None,
        stats: bool = False,
        coalesced: CoalescedWrites | None = None,
        profile: DebugKnobs | None = None,
        serial: Serial16550 | None = None,
        mem: GuestMemory | None = None,
        boot_timer: BootTimer | None = None,
        symbolize: Callable[[int], str | None] | None = None,
    ) -> None:
        self.vcpus = vcpus
        self.pio = pio
        self.mmio = mmio
        self.loop = loop
        self.console = console
        self.arch = arch
        self._cleanup = cleanup
        self.timeout = timeout
        self._result: VmResult | None = None
        self._stop = False  # the vCPU loops' condition: a plain attribute, read once per exit
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.exits: Counter[str] = Counter()
        self.started_at = 0.0
        self.first_run_at = 0.0
        self.on_stop: list[Callable[[], None]] = []
        # Guest sampling profiler (``profile.guest_profile_s``, PYVMM_GUEST_PROFILE=SECONDS): a thread kicks
        # the vCPUs out of KVM_RUN every SECONDS and each records its guest PC.  For finding where an
        # emulated boot spends its time; symbolize with `nm -n vmlinux`.
        self.profile_interval = profile.guest_profile_s if profile else 0.0
        self.profile_out = profile.guest_profile_out if profile else DebugKnobs.guest_profile_out
        self.samples: list[int] = []
        self._sample_due = False
        # For the stop report: per-vCPU exit counters and RIP samples; kernel symbols, read only for a report.
        self.progress = ProgressWatch(v.index for v in vcpus)
        self.symbolize = symbolize
        self.coalesced = coalesced
        self._tables = _Tables(*self.pio.handlers(), *self.mmio.handlers())  # until run() wraps the UART's
        # --stats: the counting loop, chosen here once; each vCPU thread adds its counter at its end
        self.stats = stats
        self._vcpu_loop = self._counting_loop if stats else self._plain_loop
        self._counters: list[ExitCounter] = []
        self._age_at_start: float | None = None  # process age at started_at (for --stats)
        # A panic the guest reported other than on its console (pvpanic): like the console's panic line,
        # it decides the result whatever the guest does next.
        self.panic_report: str | None = None
        self.sandboxed = False  # pyvmm.sandbox's filter is installed: a PermissionError may be its doing
        self.debug: DebugHooks | None = None  # the gdb server's all-stop control (pyvmm.gdb), if any
        # What the builder hands over besides the run itself: the console UART (the runner feeds it stdin),
        # guest RAM and, on x86, the boot timer (tests and benchmarks read them)
        self.serial = serial
        self.mem = mem
        self.boot_timer = boot_timer
        self._perf_at_start = 0.0
        self._tick_s = CONSOLE_FLUSH_S  # the housekeeping tick's next delay
        self._tick_gen = 0  # a scheduled tick runs only if no later schedule replaced it

    # -- stopping --------------------------------------------------------------------------------------
    def request_stop(self, status: ExitStatus, reason: str, *, guest_status: int | None = None) -> None:
        """Thread-safe; the first call decides the result.  Guest writes still in KVM's coalesced ring are
        replayed first, so the devices (the console's panic watcher) have seen all the guest did before."""
        if self.coalesced is not None and self._result is None:
            try:
                self.coalesced.drain()
            except Exception as err:  # a device bug must not prevent the stop
                log.error("replaying the coalesced ring failed: %r", err)
        with self._lock:
            if self._result is not None:
                return
            panic = self.console.panic_line or self.panic_report
            if self.console.panic_line and self.panic_report:
                panic = f"{panic} (also {self.panic_report})"
            if panic is not None and status in _AFTER_A_PANIC:
                # A kernel with panic=-1 or panic=N resets right after its panic report, and a hung one
                # runs into the timeout: the panic is still how the guest ended.
                status, reason = ExitStatus.GUEST_PANIC, f"guest kernel panic: {panic} (then: {reason})"
            elif status == ExitStatus.GUEST_PANIC and self.panic_report and self.panic_report not in reason:
                reason = f"{reason} (also {self.panic_report})"  # the console's line came first: say both
            self._result = VmResult(status, reason, guest_status=guest_status if status == ExitStatus.OK else None)
            self._stop = True
            self.progress.mark_stop(time.monotonic())
        self.kick_vcpus()
        if self.debug is not None:
            self.debug.vm_stopping()
        self.loop.stop()

    def kick_vcpus(self) -> None:
        """Make every vCPU leave KVM_RUN soon (KVM_EXIT_INTR): ``immediate_exit`` and a signal."""
        for vcpu in self.vcpus:
            vcpu.kick()
        self._signal_vcpus()

    def flush_output(self) -> None:
        """Replay the coalesced ring and write out the console buffer (from the event loop's thread)."""
        if self.coalesced is not None:
            self.coalesced.drain()
        self.console.flush()

    def abandon(self) -> None:
        """Release everything without running (the VM was built but will not start)."""
        self._cleanup.close()

    def note_panic(self, report: str) -> None:
        """Record a panic the guest reported through a device (thread-safe; the first report is kept)."""
        with self._lock:
            if self.panic_report is None:
                self.panic_report = report

    def guest_exit(self, guest_status: int) -> None:
        """The guest asked to end the VM with ``guest_status`` (0-255): the guest exit device."""
        self.request_stop(ExitStatus.OK, f"guest exited with status {guest_status} (guest exit device)",
                          guest_status=guest_status)

    def _signal_vcpus(self) -> None:
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
            return  # no handler installed: a signal would kill the process; immediate_exit must do
        for t in self._threads:
            if t.is_alive() and t.ident is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pthread_kill(t.ident, KICK_SIGNAL)

    @property
    def result(self) -> VmResult | None:
        """How the VM ended, once a stop was requested."""
        return self._result

    @property
    def stopping(self) -> bool:
        return self._result is not None

    # -- running ---------------------------------------------------------------------------------------
    def run(self) -> VmResult:
        """Run until the VM ends; always releases every resource.  Call from the main thread to get
        clean signal handling (elsewhere the vCPU kick relies on ``immediate_exit`` alone)."""
        self.started_at = time.monotonic()
        if self.stats:
            from pyvmm.exitstats import process_age_s  # --stats only

            self._perf_at_start, self._age_at_start = time.perf_counter(), process_age_s()
        in_main = threading.current_thread() is threading.main_thread()
        old_handlers: dict[int, object] = {}
        try:
            if in_main:
                old_handlers[KICK_SIGNAL] = signal.signal(KICK_SIGNAL, lambda *_: None)
                for sig, name in ((signal.SIGINT, "SIGINT"), (signal.SIGTERM, "SIGTERM"), (signal.SIGHUP, "SIGHUP")):
                    old_handlers[sig] = signal.signal(
                        sig, lambda *_, n=name: self.request_stop(ExitStatus.STOPPED, f"stopped by {n}")
                    )
            if self.timeout is not None:
                self.loop.call_at(self.started_at + self.timeout, lambda: self.request_stop(
                    ExitStatus.TIMEOUT, f"--timeout of {self.timeout:g} s expired"))
                self.loop.call_at(self.started_at + max(0.0, self.timeout - REPORT_WINDOW_S), self._sample_rips)
            self._open_kernel_stats()
            self._build_tables()
            self._mark_progress()
            self._housekeeping()
            if self.profile_interval > 0 and in_main:
                threading.Thread(target=self._sampler, name="sampler", daemon=True).start()
            self.first_run_at = time.monotonic()
            for vcpu in self.vcpus:
                t = threading.Thread(target=self._vcpu_thread, args=(vcpu,), name=f"vcpu{vcpu.index}", daemon=True)
                self._threads.append(t)
                t.start()
            try:
                self.loop.run()
            except BaseException as err:  # a bug in a loop handler must still stop the vCPUs
                self.request_stop(ExitStatus.VMM_ERROR, f"event loop failed: {err!r}{self._sandbox_hint(err)}")
                raise
            finally:
                self._stop_threads()
                self._final_drain()
                self._stop_report()
                for fn in self.on_stop:
                    try:
                        fn()
                    except Exception as err:  # keep stopping; report
                        log.error("stop hook failed: %s", err)
        finally:
            for signum, handler in old_handlers.items():
                signal.signal(signum, handler)  # type: ignore[arg-type]
            self._cleanup.close()
        assert self._result is not None
        self._result.elapsed = time.monotonic() - self.started_at
        self._result.exits = self.exits
        self._result.details = self.arch.summary()
        if self.stats:
            self._result.stats = self._collect_stats(self._result.elapsed)
        if self.samples:
            path = self.profile_out
            try:
                with open(path, "w") as f:
                    f.writelines(f"{pc:#x}\n" for pc in self.samples)
            except OSError as err:  # the VM has ended as it did: say why the samples are missing
                self._result.details.append(f"guest PC samples not written: {path}: {err.strerror}")
            else:
                self._result.details.append(f"{len(self.samples)} guest PC samples written to {path}")
        return self._result

    def _build_tables(self) -> None:
        """The dispatch tables, once the buses are complete; UART addresses replay the coalesced ring."""
        pio_r, pio_w = self.pio.handlers()
        mmio_r, mmio_w = self.mmio.handlers()
        if self.coalesced is not None:
            self.coalesced.bind(self.pio, self.mmio)
            self.coalesced.wrap(pio_r, pio_w, self.pio)
        self._tables = _Tables(pio_r, pio_w, mmio_r, mmio_w)

    def _housekeeping(self) -> None:
        """On the event loop: replay the coalesced ring, flush the console, schedule the next tick."""
        worked = self.console.pending
        if self.coalesced is not None:
            before = self.coalesced.ring.drained
            self.coalesced.drain()
            worked = worked or self.coalesced.ring.drained != before
        self.console.flush()
        self._tick_s = CONSOLE_FLUSH_S if worked else min(2 * self._tick_s, HOUSEKEEPING_IDLE_S)
        self._schedule_tick()

    def hurry_housekeeping(self) -> None:
        """On the event loop, when console input came: the guest's echo shows within CONSOLE_FLUSH_S."""
        if self._tick_s > CONSOLE_FLUSH_S:
            self._tick_s = CONSOLE_FLUSH_S
            self._schedule_tick()

    def _schedule_tick(self) -> None:
        if self.stopping:
            return
        self._tick_gen += 1
        gen = self._tick_gen

        def tick() -> None:
            if gen == self._tick_gen:  # else replaced by a sooner one
                self._housekeeping()

        self.loop.call_at(time.monotonic() + self._tick_s, tick)

    def _final_drain(self) -> None:
        """After the vCPU threads have left KVM_RUN (before the vCPUs are closed): the last coalesced
        writes, then the console buffer."""
        try:
            if self.coalesced is not None:
                self.coalesced.drain()
        except Exception as err:  # keep stopping; report
            log.error("replaying the coalesced ring at stop failed: %r", err)
        self.console.flush()

    def _collect_stats(self, wall_s: float) -> ExitStats:
        firsts = [c.first_run for c in self._counters if c.first_run is not None]
        start_to_first = None
        if firsts and self._age_at_start is not None:
            start_to_first = self._age_at_start + (min(firsts) - self._perf_at_start)
        from pyvmm.exitstats import ExitStats

        return ExitStats.collect(self._counters, wall_s=wall_s, start_to_first_run_s=start_to_first,
                                 coalesced=self.coalesced.counts() if self.coalesced is not None else None)

    def _sampler(self) -> None:
        while not self.stopping:
            time.sleep(self.profile_interval)
            self._sample_due = True
            for vcpu in self.vcpus:
                vcpu.kick()
            self._signal_vcpus()

    def _open_kernel_stats(self) -> None:
        """The kernel's own counters per vCPU, for the stop report.  Opened before the first KVM_RUN: the
        ioctl waits for the vCPU mutex, which KVM_RUN holds; reading the fd later does not."""
        for vcpu in self.vcpus:
            stats = StatsFd.open(vcpu.fd)
            if stats is not None:
                self._cleanup.callback(stats.close)
                self.progress.vcpu(vcpu.index).kernel_entries = lambda s=stats: s.value("exits")

    def _mark_progress(self) -> None:
        if not self.stopping:
            self.progress.mark(time.monotonic())
            self.loop.call_at(time.monotonic() + MARK_INTERVAL_S, self._mark_progress)

    def _sample_rips(self) -> None:
        """Each vCPU records its RIP at the kick's KVM_EXIT_INTR: the stop report's earlier observation."""
        self.progress.mark(time.monotonic())
        self.progress.want_rips()
        for vcpu in self.vcpus:
            vcpu.kick()
        self._signal_vcpus()

    def _pc(self, vcpu: VcpuFd) -> int | None:
        try:
            return self.arch.program_counter(vcpu)
        except Exception:  # the report does without it
            log.debug("vCPU %d: no program counter", vcpu.index, exc_info=True)
            return None

    def _stop_report(self) -> None:
        """After the vCPU threads have left KVM_RUN: where each one was (only for stops from outside).
        After a KVM_EXIT_IO/MMIO the instruction completes at the next KVM_RUN (api.rst: guest state is
        consistent only after re-entry), so RIP may point at the exiting instruction."""
        r = self._result
        if r is None or r.status not in (ExitStatus.TIMEOUT, ExitStatus.STOPPED):
            return
        try:
            rips = {v.index: None if self.progress.vcpu(v.index).running else self._pc(v) for v in self.vcpus}
            r.vcpu_report = self.progress.reports(rips, self.symbolize)
            r.last_console_line = self.console.last_line()
        except Exception as err:  # never let the report break the stop
            log.warning("vCPU report failed: %r", err)

    def _stop_threads(self) -> None:
        if self._result is None:
            self.request_stop(ExitStatus.VMM_ERROR, "event loop ended without a stop reason")
        deadline = time.monotonic() + 5.0
        for t in self._threads:
            while t.is_alive() and time.monotonic() < deadline:
                self._signal_vcpus()
                t.join(0.05)
            if t.is_alive():
                log.error("%s did not leave KVM_RUN", t.name)

    # -- the vCPU loop -------------------------------------------------------------------------------
    def _vcpu_thread(self, vcpu: VcpuFd) -> None:
        try:
            if self.debug is not None:
                self.debug.checkpoint(vcpu)
            self._vcpu_loop(vcpu)
        except BaseException as err:
            log.debug("vCPU %d failed", vcpu.index, exc_info=True)
            self.request_stop(ExitStatus.VMM_ERROR, f"vCPU {vcpu.index}: {type(err).__name__}: {err}"
                                                    f"{self._sandbox_hint(err)}")

    def _sandbox_hint(self, err: BaseException) -> str:
        if self.sandboxed and isinstance(err, PermissionError):
            return " (refused by pyvmm's seccomp sandbox: pyvmm tried a system call a running VMM never needs)"
        return ""

    # Two variants of the same loop, chosen once in __init__ (self._vcpu_loop): _plain_loop, and
    # _counting_loop for --stats.  They handle PIO and MMIO exits identically (tests/unit/test_vcpu_loop.py
    # runs both on one script); every other exit goes through _other_exit.  In both, a guest mistake
    # (an unclaimed address, an odd size) is the bus's to log and ignore; it never raises here.
    def _plain_loop(self, vcpu: VcpuFd) -> None:
        view = vcpu.run_view
        # VcpuFd.run() inlined: one Python call less per exit
        enter, fd, kvm_run, run_failed, reasons, reason_index = vcpu.run_args()
        t = self._tables
        pio_r, pio_w, mmio_r, mmio_w = t.pio_r, t.pio_w, t.mmio_r, t.mmio_w
        pio, mmio = self.pio, self.mmio
        io_unpack, io_off = kx.IO.unpack_from, kx.IO_OFFSET
        mmio_unpack, mmio_off = kx.MMIO.unpack_from, kx.MMIO_OFFSET
        mmio_data_pack, mmio_data_off = kx.MMIO_DATA.pack_into, kx.MMIO_DATA_OFFSET
        pio_data, mask = kx.PIO_DATA, kx.MASK
        exit_io, exit_mmio = _EXIT_IO, _EXIT_MMIO
        progress = self.progress.vcpu(vcpu.index)
        progress.enter()
        n_io = n_mmio = 0
        reason = -1
        try:
            while not self._stop:
                reason = reasons[reason_index] if enter(fd, kvm_run, None) >= 0 else run_failed()
                progress.exits += 1
                if reason == exit_io:
                    out, size, port, count, off = io_unpack(view, io_off)
                    if count != 1:
                        self._string_io(view, out, size, port, count, off)
                    elif out:
                        w = pio_w[port]
                        value = view[off] if size == 1 else pio_data[size].unpack_from(view, off)[0]
                        if w is None:
                            pio.write(port, size, value)
                        else:
                            w(size, value)
                    else:
                        r = pio_r[port]
                        value = (pio.read(port, size) if r is None else r(size)) & mask[size]
                        if size == 1:
                            view[off] = value
                        else:
                            pio_data[size].pack_into(view, off, value)
                    n_io += 1
                elif reason == exit_mmio:
                    addr, data, length, is_write = mmio_unpack(view, mmio_off)
                    if is_write:
                        w = mmio_w[addr]
                        if w is None:
                            mmio.write(addr, length, data & mask[length])
                        else:
                            w(length, data & mask[length])
                    else:
                        r = mmio_r[addr]
                        value = mmio.read(addr, length) if r is None else r(length)
                        mmio_data_pack(view, mmio_data_off, value & mask[length])
                    n_mmio += 1
                else:
                    self._other_exit(vcpu, reason, progress)
        finally:
            self._add_exits(n_io, n_mmio)
            progress.leave(in_guest=reason == abi.KVM_EXIT_INTR)  # interrupted in KVM_RUN, or busy in the VMM

    def _counting_loop(self, vcpu: VcpuFd) -> None:
        view = vcpu.run_view
        run = vcpu.run
        handle_io, handle_mmio = self._handle_io, self._handle_mmio
        from pyvmm.exitstats import ExitCounter

        counter = ExitCounter()
        pio_acc, mmio_acc, other_acc = counter.pio, counter.mmio, counter.other
        perf = time.perf_counter
        progress = self.progress.vcpu(vcpu.index)
        progress.enter()
        n_io = n_mmio = 0
        in_kvm = 0.0
        reason = -1
        done = counter.first_run = perf()
        try:
            while not self._stop:
                reason = run()
                back = perf()
                in_kvm += back - done
                progress.exits += 1
                if reason == _EXIT_IO:
                    acc, key = pio_acc, handle_io(view)
                    n_io += 1
                elif reason == _EXIT_MMIO:
                    acc, key = mmio_acc, handle_mmio(view)
                    n_mmio += 1
                else:
                    self._other_exit(vcpu, reason, progress)
                    acc, key = other_acc, reason
                done = perf()
                a = acc.get(key)
                if a is None:
                    a = acc[key] = [0, 0.0]
                a[0] += 1
                a[1] += done - back
        finally:
            counter.in_kvm_s = in_kvm
            with self._lock:
                self._counters.append(counter)
            self._add_exits(n_io, n_mmio)
            progress.leave(in_guest=reason == abi.KVM_EXIT_INTR)

    def _handle_io(self, view: memoryview) -> int:
        """One KVM_EXIT_IO (the counting loop's; the plain loop has the same inline); returns its
        statistics key, port << 1 | is_write."""
        out, size, port, count, off = kx.IO.unpack_from(view, kx.IO_OFFSET)
        t = self._tables
        if count != 1:
            self._string_io(view, out, size, port, count, off)
        elif out:
            w = t.pio_w[port]
            value = view[off] if size == 1 else kx.PIO_DATA[size].unpack_from(view, off)[0]
            if w is None:
                self.pio.write(port, size, value)
            else:
                w(size, value)
        else:
            r = t.pio_r[port]
            value = (self.pio.read(port, size) if r is None else r(size)) & kx.MASK[size]
            if size == 1:
                view[off] = value
            else:
                kx.PIO_DATA[size].pack_into(view, off, value)
        return int(port << 1 | out)

    def _handle_mmio(self, view: memoryview) -> int:
        """One KVM_EXIT_MMIO (as _handle_io); returns address << 1 | is_write."""
        addr, data, length, is_write = kx.MMIO.unpack_from(view, kx.MMIO_OFFSET)
        t = self._tables
        if is_write:
            w = t.mmio_w[addr]
            if w is None:
                self.mmio.write(addr, length, data & kx.MASK[length])
            else:
                w(length, data & kx.MASK[length])
        else:
            r = t.mmio_r[addr]
            value = self.mmio.read(addr, length) if r is None else r(length)
            kx.MMIO_DATA.pack_into(view, kx.MMIO_DATA_OFFSET, value & kx.MASK[length])
        return int(addr << 1 | is_write)

    def _string_io(self, view: memoryview, out: int, size: int, port: int, count: int, off: int) -> None:
        """``ins``/``outs`` (``rep`` included): ``count`` items of ``size`` bytes at ``off``, one port."""
        if size not in kx.PIO_DATA or off + count * size > len(view):
            log.debug("KVM_EXIT_IO with size %d count %d at %#x ignored", size, count, off)
            return
        data = kx.PIO_DATA[size]
        t = self._tables
        if out:
            w = t.pio_w[port] or functools.partial(self.pio.write, port)
            for i in range(count):
                w(size, data.unpack_from(view, off + i * size)[0])
        else:
            r = t.pio_r[port] or functools.partial(self.pio.read, port)
            for i in range(count):
                data.pack_into(view, off + i * size, r(size) & kx.MASK[size])

    def _add_exits(self, n_io: int, n_mmio: int) -> None:
        with self._lock:
            if n_io:
                self.exits["io"] += n_io
            if n_mmio:
                self.exits["mmio"] += n_mmio

    def _other_exit(self, vcpu: VcpuFd, reason: int, progress: VcpuProgress) -> None:
        """Every exit but PIO and MMIO: rare, so through ctypes and with the shared counter."""
        exits = self.exits
        run = vcpu.run_state
        if reason == abi.KVM_EXIT_INTR:
            progress.exits -= 1  # a kick or a signal, not the guest's doing
            run.immediate_exit = 0 if not self.stopping else 1
            if self._sample_due and not self.stopping:
                self.samples.append(self.arch.program_counter(vcpu))
            if progress.rip_due and not self.stopping:
                progress.rip_due = False
                progress.rip_before = self._pc(vcpu)
            exits["intr"] += 1
            if self.debug is not None and not self.stopping:
                self.debug.checkpoint(vcpu)
        elif reason == abi.KVM_EXIT_DEBUG and self.debug is not None:
            exits["debug"] += 1
            self.debug.debug_exit(vcpu)
        elif reason == abi.KVM_EXIT_INTERNAL_ERROR:
            exits["internal_error"] += 1
            if self.debug is not None and self.debug.emulation_failure(vcpu):
                return
            stop = self.arch.internal_error(vcpu)
            if stop is not None:
                self.request_stop(*stop)
            elif self.debug is not None:
                self.debug.after_assist(vcpu)
        elif reason == abi.KVM_EXIT_SHUTDOWN:
            exits["shutdown"] += 1
            self.request_stop(ExitStatus.OK, "guest reset (triple fault)")
        elif reason == abi.KVM_EXIT_SYSTEM_EVENT:
            ev = run.exit.system_event.type
            if ev == abi.KVM_SYSTEM_EVENT_SHUTDOWN:
                self.request_stop(ExitStatus.OK, "guest powered off")
            elif ev == abi.KVM_SYSTEM_EVENT_RESET:
                self.request_stop(ExitStatus.OK, "guest rebooted")
            else:
                self.request_stop(ExitStatus.GUEST_PANIC, f"guest system event {ev} (crash)")
        elif reason == abi.KVM_EXIT_HLT:
            exits["hlt"] += 1
            self.request_stop(ExitStatus.OK, "guest halted")
        elif reason == abi.KVM_EXIT_FAIL_ENTRY:
            fe = run.exit.fail_entry
            self.request_stop(ExitStatus.VMM_ERROR,
                              f"KVM_EXIT_FAIL_ENTRY: hardware reason {fe.hardware_entry_failure_reason:#x}")
        else:
            name = abi.EXIT_NAMES.get(reason, str(reason))
            self.request_stop(ExitStatus.VMM_ERROR, f"unexpected exit {name} on vCPU {vcpu.index}")


_EXIT_IO = abi.KVM_EXIT_IO
_EXIT_MMIO = abi.KVM_EXIT_MMIO


def print_err(msg: str) -> None:
    """One line on stderr, prefixed, even when stdout is the guest console in raw mode."""
    with contextlib.suppress(OSError):
        os.write(sys.stderr.fileno(), f"pyvmm: {msg}\r\n".encode() if os.isatty(sys.stderr.fileno())
                 else f"pyvmm: {msg}\n".encode())
