"""Where each vCPU was when the VM was stopped from outside (``--timeout``, a signal, Ctrl-A x).

For each vCPU the report gives its instruction pointer at the stop (RIP; PC on aarch64) with the kernel
symbol when the kernel's symbols are known, whether its thread was inside ``KVM_RUN`` (in the guest) or in
the VMM handling an exit, how many exits it made in about the last second, and a verdict:

- **stuck**: no exit in that second, and the instruction pointer did not move (when there are two
  observations of it); the guest makes no progress pyvmm can see;
- **slow**: it kept exiting, or the instruction pointer moved: the guest works, too slowly for the timeout.

"In the guest" or "in the VMM" is how the vCPU's last ``KVM_RUN`` ended: interrupted by the stop's kick
(``EINTR``), or with an exit the thread was still handling when the stop came.

What it costs while nothing stops: the vCPU loop increments one integer attribute per return from
``KVM_RUN`` (:class:`VcpuProgress`) and takes the increment back for a ``KVM_EXIT_INTR`` (a kick, not the
guest's doing); the event loop copies those integers every :data:`MARK_INTERVAL_S`.  With a timeout, the
event loop also kicks every vCPU once, :data:`REPORT_WINDOW_S` before the deadline, and each vCPU thread
then records its RIP: the second observation.  The RIP at the stop is read once the vCPU threads have
left their loops: a vCPU ioctl such as ``KVM_GET_REGS`` waits for a ``KVM_RUN`` in progress on that vCPU.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping

from pyvmm.record import record

REPORT_WINDOW_S = 1.0  # "the last second" of the report
MARK_INTERVAL_S = 0.5  # how often the event loop copies the exit counters
STUCK, SLOW = "stuck", "slow"
_NEW, _RUNNING, _LEFT = 0, 1, 2


@record
class VcpuReport:
    """One vCPU at the stop (see the module docstring)."""

    index: int
    rip: int | None  # instruction pointer at the stop (RIP; PC on arm64); None if it could not be read
    symbol: str | None  # "name+0xoffset" of ``rip`` in the kernel's symbols, when known
    in_guest: bool  # True: the vCPU thread was inside KVM_RUN; False: in the VMM, handling an exit
    exits_last_s: int  # exits to the VMM in the ``window_s`` seconds before the stop
    window_s: float  # about REPORT_WINDOW_S; shorter when the VM ran less than that
    verdict: str  # STUCK or SLOW
    rip_before: int | None = None  # RIP about REPORT_WINDOW_S before the stop (runs with a timeout)
    # Guest entries KVM made for this vCPU in the same window (its binary stats' "exits" counter, which
    # counts every return from the guest, including the exits the kernel handles itself); None: unknown
    guest_entries: int | None = None

    @property
    def never_entered(self) -> bool:
        """Inside KVM_RUN, yet the kernel did not enter the guest once in the window."""
        return self.guest_entries == 0 and self.in_guest and self.exits_last_s == 0

    def line(self) -> str:
        where = "an unknown address" if self.rip is None else f"{self.rip:#x}"
        if self.symbol:
            where += f" <{self.symbol}>"
        place = "the guest" if self.in_guest else "the VMM"
        line = (f"vCPU {self.index} {self.verdict} at {where} in {place}; {self.exits_last_s} exits in the last "
                f"{self.window_s:.1f} s")
        if self.guest_entries is not None:
            line += f"; KVM entered the guest {self.guest_entries} times"
            if self.never_entered:
                line += " (the host kernel is not running this vCPU: it never reached the guest)"
        return line


def verdict(*, exits: int, rip: int | None, rip_before: int | None) -> str:
    moved = rip is not None and rip_before is not None and rip != rip_before
    return SLOW if exits or moved else STUCK


def report_lines(reports: list[VcpuReport], last_console_line: str | None) -> list[str]:
    """The lines pyvmm prints after its stop line (none when there is no report)."""
    if not reports:
        return []
    last = last_console_line if last_console_line is not None else "(no console output)"
    return [r.line() for r in reports] + [f"last console line: {last}"]


# compiled (and cached by re) at the first parse, not by every run's import
_LINE = (r"pyvmm: vCPU (\d+) (stuck|slow) at (?:(0x[0-9a-f]+)(?: <(\S+)>)?|an unknown address) in the "
         r"(guest|VMM); (\d+) exits in the last ([0-9.]+) s(?:; KVM entered the guest (\d+) times)?")


def parse_report(log: str) -> list[VcpuReport]:
    """The vCPU report in pyvmm's stderr ``log`` (``rip_before`` is not printed: None)."""
    out = []
    for m in map(re.compile(_LINE).search, log.splitlines()):
        if m is not None:
            index, verdict_, rip, symbol, place, exits, window, entries = m.groups()
            out.append(VcpuReport(int(index), None if rip is None else int(rip, 16), symbol, place == "guest",
                                  int(exits), float(window), verdict_,
                                  guest_entries=None if entries is None else int(entries)))
    return out


class VcpuProgress:
    """What one vCPU thread records for the report.  ``exits`` is the hot-path counter."""

    __slots__ = ("exits", "in_guest", "kernel_entries", "rip_before", "rip_due", "state")

    def __init__(self) -> None:
        self.exits = 0
        self.state = _NEW
        self.in_guest = False
        self.rip_due = False  # set by the event loop: record RIP at the next KVM_EXIT_INTR
        self.rip_before: int | None = None
        # Reads the kernel's count of guest entries for this vCPU (KVM's binary stats); None: not available
        self.kernel_entries: Callable[[], int | None] | None = None

    def enter(self) -> None:
        """The vCPU thread starts its KVM_RUN loop."""
        self.state = _RUNNING

    def leave(self, *, in_guest: bool) -> None:
        """The loop ended; ``in_guest``: its last KVM_RUN was interrupted (the stop found it in the guest)."""
        self.state, self.in_guest = _LEFT, in_guest

    @property
    def running(self) -> bool:
        """Inside its loop, possibly inside KVM_RUN: its registers cannot be read."""
        return self.state == _RUNNING


class ProgressWatch:
    """The vCPUs' counters, marked over time; turns them into :class:`VcpuReport` at the stop."""

    def __init__(self, indices: Iterable[int]) -> None:
        self._vcpus = {i: VcpuProgress() for i in indices}
        self._marks: deque[tuple[float, dict[int, int], dict[int, int | None]]] = deque(maxlen=8)
        self._stop: tuple[float, dict[int, int], dict[int, int | None]] | None = None

    def vcpu(self, index: int) -> VcpuProgress:
        return self._vcpus[index]

    def _counts(self) -> dict[int, int]:
        return {i: p.exits for i, p in self._vcpus.items()}

    def _kernel_counts(self) -> dict[int, int | None]:
        out: dict[int, int | None] = {}
        for i, p in self._vcpus.items():
            try:
                out[i] = p.kernel_entries() if p.kernel_entries is not None else None
            except OSError:
                out[i] = None
        return out

    def mark(self, now: float) -> None:
        self._marks.append((now, self._counts(), self._kernel_counts()))

    def mark_stop(self, now: float) -> None:
        """The counters at the moment of the stop (before the kick); the first call counts."""
        if self._stop is None:
            self._stop = (now, self._counts(), self._kernel_counts())

    def want_rips(self) -> None:
        for p in self._vcpus.values():
            p.rip_due = True

    def reports(self, rips: Mapping[int, int | None],
                symbolize: Callable[[int], str | None] | None) -> list[VcpuReport]:
        """One report per vCPU; ``rips`` are read at the stop, ``symbolize`` names them."""
        if self._stop is None:
            self.mark_stop(time.monotonic())
        assert self._stop is not None
        t_stop, at_stop, kernel_at_stop = self._stop
        earlier = [m for m in self._marks if m[0] <= t_stop]
        t_from, base, kernel_base = min(earlier, key=lambda m: abs(t_stop - m[0] - REPORT_WINDOW_S),
                                        default=self._stop)
        out = []
        for i, p in sorted(self._vcpus.items()):
            rip = rips.get(i)
            exits = at_stop[i] - base.get(i, 0)
            k_now, k_then = kernel_at_stop.get(i), kernel_base.get(i)
            entries = None if k_now is None or k_then is None or t_stop <= t_from else k_now - k_then
            out.append(VcpuReport(i, rip, _name(symbolize, rip), p.running or p.in_guest, exits, t_stop - t_from,
                                  verdict(exits=exits, rip=rip, rip_before=p.rip_before), p.rip_before,
                                  guest_entries=entries))
        return out


def _name(symbolize: Callable[[int], str | None] | None, rip: int | None) -> str | None:
    if symbolize is None or rip is None:
        return None
    try:
        return symbolize(rip)
    except Exception:  # a report must not fail for want of a name
        return None
