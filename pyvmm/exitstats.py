"""Exit statistics (``pyvmm run --stats``): exits by kind and device register, and where the time went.

The counting vCPU loop (:meth:`pyvmm.vmm.Vmm._counting_loop`, chosen once at start; the plain loop
counts nothing of this) fills one :class:`ExitCounter` per vCPU thread, without locks.  Per exit it
takes ``time.perf_counter()`` twice: when ``KVM_RUN`` returns and when the exit has been handled, so

- *in KVM_RUN* is the time from entering ``KVM_RUN`` to its return (the ctypes call included), summed
  over vCPUs: guest time plus the kernel's own exit handling;
- *VMM time* of an exit is from ``KVM_RUN``'s return to the next ``KVM_RUN`` (decode, dispatch, the
  device, the loop itself), summed per kind of exit.

*Process start -> first KVM_RUN* uses the kernel's start time of this process (``starttime`` in
``/proc/self/stat``, in clock ticks since boot: 10 ms resolution) against ``CLOCK_BOOTTIME``, the clock
it is counted on, so it includes the interpreter's own start and every import.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from pyvmm.kvm import abi

PIO, MMIO = "pio", "mmio"
TABLE_ROWS = 8  # the table shows the busiest kinds of exit; the rest are summed in one line


def parse_start_ticks(stat: str) -> int:
    """``starttime`` (field 22 of proc(5)'s ``/proc/PID/stat``) from that file's text.  The command
    name (field 2, in parentheses) may itself hold spaces and parentheses: count from the last ``)``."""
    rest = stat[stat.rindex(")") + 1:].split()
    return int(rest[22 - 3])  # rest[0] is field 3


def process_age_s() -> float | None:
    """Seconds since this process started (kernel ``starttime``, CLOCK_BOOTTIME); None if unknown."""
    try:
        with open("/proc/self/stat") as f:
            ticks = parse_start_ticks(f.read())
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / hz


class ExitCounter:
    """One vCPU thread's counts.  Keys: ``port << 1 | is_write`` (pio), ``address << 1 | is_write`` (mmio),
    the exit reason (everything else); values: ``[count, VMM seconds]``."""

    __slots__ = ("first_run", "in_kvm_s", "mmio", "other", "pio")

    def __init__(self) -> None:
        self.pio: dict[int, list[float]] = {}
        self.mmio: dict[int, list[float]] = {}
        self.other: dict[int, list[float]] = {}
        self.in_kvm_s = 0.0
        self.first_run: float | None = None  # time.perf_counter() when this vCPU first entered KVM_RUN


@dataclass(frozen=True)
class ExitRow:
    kind: str  # "pio", "mmio", or the exit reason's name in lower case ("intr", "hlt", "internal_error")
    addr: int | None  # the port or guest-physical address (pio, mmio)
    access: str  # "read" or "write" (pio, mmio); "" otherwise
    count: int
    handle_s: float  # VMM time spent on these exits

    @property
    def label(self) -> str:
        return self.kind if self.addr is None else f"{self.kind} {self.addr:#x} {self.access}"


def _reason_name(reason: int) -> str:
    return abi.EXIT_NAMES.get(reason, f"exit_{reason}").removeprefix("KVM_EXIT_").lower()


@dataclass
class ExitStats:
    """What a ``--stats`` run measured (``VmResult.stats``)."""

    rows: list[ExitRow]  # busiest first
    in_kvm_s: float
    wall_s: float
    start_to_first_run_s: float | None
    # writes KVM recorded in its coalesced ring instead of exiting, replayed by pyvmm: label -> count
    coalesced: dict[str, int] = field(default_factory=dict)

    @property
    def exits(self) -> int:
        return sum(r.count for r in self.rows)

    @property
    def handle_s(self) -> float:
        return sum(r.handle_s for r in self.rows)

    def count(self, kind: str, addr: int | None = None, access: str = "") -> int:
        return sum(r.count for r in self.rows if r.kind == kind and r.addr == addr and r.access == access)

    @classmethod
    def collect(cls, counters: Iterable[ExitCounter], *, wall_s: float, start_to_first_run_s: float | None,
                coalesced: dict[str, int] | None = None) -> ExitStats:
        merged: dict[tuple[str, int | None, str], list[float]] = {}

        def add(key: tuple[str, int | None, str], value: list[float]) -> None:
            acc = merged.setdefault(key, [0, 0.0])
            acc[0] += value[0]
            acc[1] += value[1]

        in_kvm = 0.0
        for c in counters:
            in_kvm += c.in_kvm_s
            for kind, table in ((PIO, c.pio), (MMIO, c.mmio)):
                for k, v in table.items():
                    add((kind, k >> 1, "write" if k & 1 else "read"), v)
            for reason, v in c.other.items():
                add((_reason_name(reason), None, ""), v)
        rows = [ExitRow(kind, addr, access, int(v[0]), v[1]) for (kind, addr, access), v in merged.items()]
        rows.sort(key=lambda r: (-r.count, r.label))
        return cls(rows, in_kvm, wall_s, start_to_first_run_s, dict(coalesced or {}))

    def table(self) -> list[str]:
        """The compact report ``pyvmm run --stats`` prints at the end."""
        n, handle = self.exits, self.handle_s
        per = f" ({handle / n * 1e6:.1f} us/exit)" if n else ""
        first = ("unknown" if self.start_to_first_run_s is None else f"{self.start_to_first_run_s:.2f} s")
        lines = [f"exit statistics: {n} exits in {self.wall_s:.2f} s; in KVM_RUN {self.in_kvm_s:.2f} s; "
                 f"handling exits in the VMM {handle:.3f} s{per}; process start -> first KVM_RUN {first}",
                 f"  {'exit':28} {'count':>9} {'VMM ms':>9} {'us/exit':>8}"]
        for r in self.rows[:TABLE_ROWS]:
            lines.append(f"  {r.label:28} {r.count:>9} {r.handle_s * 1e3:>9.1f} {r.handle_s / r.count * 1e6:>8.1f}")
        rest = self.rows[TABLE_ROWS:]
        if rest:
            rest_n, rest_s = sum(r.count for r in rest), sum(r.handle_s for r in rest)
            lines.append(f"  {f'({len(rest)} more kinds)':28} {rest_n:>9} {rest_s * 1e3:>9.1f} "
                         f"{rest_s / rest_n * 1e6:>8.1f}")
        for label, count in self.coalesced.items():
            lines.append(f"  {label:28} {count:>9} (coalesced: replayed from KVM's ring, no exit)")
        return lines
