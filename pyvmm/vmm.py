"""The running VM: vCPU threads, the event loop, and the one way to stop.

Each vCPU thread loops on ``KVM_RUN`` and dispatches PIO/MMIO exits through the buses on its own
thread.  The event loop (the caller's thread) serves ioeventfds, console input and timers.  Every way a
VM ends — guest power-off or reset, a panic on the console, an unhandled exit, a signal, the timeout —
goes through :meth:`Vmm.request_stop`: the first reason wins, the loop wakes, each vCPU gets
``immediate_exit`` and a signal so ``KVM_RUN`` returns ``EINTR``, and resources are released in
reverse order of creation.  A stop from outside (timeout, signal) also reports where each vCPU was
(:mod:`pyvmm.stopreport`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvmm.bus import Bus
from pyvmm.console import ConsoleOutput
from pyvmm.eventloop import EventLoop
from pyvmm.kvm import abi
from pyvmm.kvm.stats import StatsFd
from pyvmm.kvm.vcpu import VcpuFd
from pyvmm.status import ExitStatus
from pyvmm.stopreport import MARK_INTERVAL_S, REPORT_WINDOW_S, ProgressWatch, VcpuReport

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGUSR1


@dataclass
class VmResult:
    status: ExitStatus
    reason: str
    elapsed: float = 0.0
    exits: Counter[str] = field(default_factory=Counter)
    details: list[str] = field(default_factory=list)
    # Where each vCPU was, when the VM was stopped from outside (timeout, signal): pyvmm.stopreport
    vcpu_report: list[VcpuReport] = field(default_factory=list)
    last_console_line: str | None = None


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
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.exits: Counter[str] = Counter()
        self.started_at = 0.0
        self.first_run_at = 0.0
        self.on_stop: list[Callable[[], None]] = []
        # Guest sampling profiler (PYVMM_GUEST_PROFILE=SECONDS): a thread kicks the vCPUs out of
        # KVM_RUN every SECONDS and each records its guest PC.  For finding where an emulated boot
        # spends its time; symbolize with `nm -n vmlinux`.
        self.profile_interval = float(os.environ.get("PYVMM_GUEST_PROFILE", "0") or 0)
        self.samples: list[int] = []
        self._sample_due = False
        # For the stop report: per-vCPU exit counters and RIP samples; kernel symbols, read only for a report.
        self.progress = ProgressWatch(v.index for v in vcpus)
        self.symbolize: Callable[[int], str | None] | None = None

    # -- stopping --------------------------------------------------------------------------------------
    def request_stop(self, status: ExitStatus, reason: str) -> None:
        """Thread-safe; the first call decides the result."""
        with self._lock:
            if self._result is not None:
                return
            self._result = VmResult(status, reason)
            self.progress.mark_stop(time.monotonic())
        for vcpu in self.vcpus:
            vcpu.kick()
        self._signal_vcpus()
        self.loop.stop()

    def _signal_vcpus(self) -> None:
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
            return  # no handler installed: a signal would kill the process; immediate_exit must do
        for t in self._threads:
            if t.is_alive() and t.ident is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pthread_kill(t.ident, KICK_SIGNAL)

    @property
    def stopping(self) -> bool:
        return self._result is not None

    # -- running ---------------------------------------------------------------------------------------
    def run(self) -> VmResult:
        """Run until the VM ends; always releases every resource.  Call from the main thread to get
        clean signal handling (elsewhere the vCPU kick relies on ``immediate_exit`` alone)."""
        self.started_at = time.monotonic()
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
            self._mark_progress()
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
                self.request_stop(ExitStatus.VMM_ERROR, f"event loop failed: {err!r}")
                raise
            finally:
                self._stop_threads()
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
        if self.samples:
            path = os.environ.get("PYVMM_GUEST_PROFILE_OUT", "pyvmm-guest-profile.txt")
            with open(path, "w") as f:
                f.writelines(f"{pc:#x}\n" for pc in self.samples)
            self._result.details.append(f"{len(self.samples)} guest PC samples written to {path}")
        return self._result

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
            self._vcpu_loop(vcpu)
        except BaseException as err:
            log.debug("vCPU %d failed", vcpu.index, exc_info=True)
            self.request_stop(ExitStatus.VMM_ERROR, f"vCPU {vcpu.index}: {type(err).__name__}: {err}")

    def _vcpu_loop(self, vcpu: VcpuFd) -> None:
        run = vcpu.run_state
        view = vcpu.run_view
        exits = self.exits
        pio, mmio = self.pio, self.mmio
        progress = self.progress.vcpu(vcpu.index)
        progress.enter()
        reason = -1
        while not self.stopping:
            reason = vcpu.run()
            progress.exits += 1
            if reason == abi.KVM_EXIT_IO:
                io = run.exit.io
                size, port, count, off = io.size, io.port, io.count, io.data_offset
                if io.direction == abi.KVM_EXIT_IO_OUT:
                    for i in range(count):
                        o = off + i * size
                        pio.write(port, size, int.from_bytes(view[o : o + size], "little"))
                else:
                    for i in range(count):
                        o = off + i * size
                        view[o : o + size] = pio.read(port, size).to_bytes(size, "little")
                exits["io"] += 1
            elif reason == abi.KVM_EXIT_MMIO:
                m = run.exit.mmio
                length = m.len
                if m.is_write:
                    mmio.write(m.phys_addr, length, int.from_bytes(bytes(m.data)[:length], "little"))
                else:
                    value = mmio.read(m.phys_addr, length)
                    ctypes_data = value.to_bytes(length, "little")
                    for i in range(length):
                        m.data[i] = ctypes_data[i]
                exits["mmio"] += 1
            elif reason == abi.KVM_EXIT_INTR:
                progress.exits -= 1  # a kick or a signal, not the guest's doing
                run.immediate_exit = 0 if not self.stopping else 1
                if self._sample_due and not self.stopping:
                    self.samples.append(self.arch.program_counter(vcpu))
                if progress.rip_due and not self.stopping:
                    progress.rip_due = False
                    progress.rip_before = self._pc(vcpu)
                exits["intr"] += 1
            elif reason == abi.KVM_EXIT_INTERNAL_ERROR:
                exits["internal_error"] += 1
                stop = self.arch.internal_error(vcpu)
                if stop is not None:
                    self.request_stop(*stop)
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
        progress.leave(in_guest=reason == abi.KVM_EXIT_INTR)  # interrupted in KVM_RUN, or busy in the VMM


def print_err(msg: str) -> None:
    """One line on stderr, prefixed, even when stdout is the guest console in raw mode."""
    with contextlib.suppress(OSError):
        os.write(sys.stderr.fileno(), f"pyvmm: {msg}\r\n".encode() if os.isatty(sys.stderr.fileno())
                 else f"pyvmm: {msg}\n".encode())
