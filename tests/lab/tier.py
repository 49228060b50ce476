"""The lab tier's plan and its view of the inner run (used by conftest.py and test_lab_tier.py).

The plan: which ``lab`` tests the inner pytest will run and each one's bound (its ``@pytest.mark.lab(bound_s=...)``),
found by a ``--collect-only`` pass of the same selection on the host (imports only, nothing boots), and
from them the bound of the whole lab run.

The view: the inner pytest prints one ``PYVMM-LABTEST:`` line when a test starts and one when it ends
(conftest.py, with PROGRESS_ENV set).  ``InnerRun`` reads the lab's output as it arrives, echoes it line
by line, knows which inner test runs and since when, and is the lab run's watchdog: an inner test past its
bound (plus grace: its own pytest-timeout should have ended it) means the lab is stuck, and so does a
long silence between tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# What the inner pytest runs, and what the bounds pass collects: the same selection.
INNER_SELECTION = ("-m", "lab", "tests/lab")
# Set in the collect pass: conftest.py writes {nodeid: bound_s} of the selected lab tests to this file.
BOUNDS_ENV = "PYVMM_LAB_BOUNDS_OUT"
# Set for the inner pytest: conftest.py prints the PROGRESS_MARK lines.
PROGRESS_ENV = "PYVMM_LAB_PROGRESS"
PROGRESS_MARK = "PYVMM-LABTEST:"

# QEMU start, the lab kernel to its init (2-3 s here), then the inner pytest starting and collecting on the
# lab's emulated CPU (Python, pytest, numpy, hypothesis imports: tens of seconds under load).
LAB_START_S = 120.0
# The inner pytest's own work between two tests (its reports) and after the last one (summary, junit
# file) until the lab has reset.
PER_TEST_OVERHEAD_S = 5.0
LAB_END_S = 60.0
# An inner test's pytest-timeout ends it at its bound; this much later the lab itself must be stuck.
STUCK_GRACE_S = 60.0
# The collect pass on the host: one Python start and the imports of the test modules.
COLLECT_TIMEOUT_S = 120.0
# After the lab run: stopping QEMU (5 s at most), reading the junit file.
AFTER_LAB_S = 60.0

# Lines of the inner pytest's progress that carry nothing the PROGRESS_MARK lines do not (-q dots).
_NOISE = re.compile(r"[.sFExX]+")


@dataclass(frozen=True)
class TierPlan:
    bounds: dict[str, float]  # nodeid -> bound_s, in the inner run's order

    @property
    def lab_timeout_s(self) -> float:
        """The bound of the whole lab run: start-up, every inner test's bound one after the other, the end."""
        return LAB_START_S + sum(b + PER_TEST_OVERHEAD_S for b in self.bounds.values()) + LAB_END_S

    @property
    def test_timeout_s(self) -> float:
        """test_lab_tier's own pytest-timeout: the lab run and what comes after it."""
        return self.lab_timeout_s + AFTER_LAB_S


def collect_bounds() -> dict[str, float]:
    """Each selected lab test's bound, from a ``pytest --collect-only`` pass of INNER_SELECTION here."""
    with tempfile.TemporaryDirectory(prefix="pyvmm-lab-bounds-") as tmp:
        out = Path(tmp) / "bounds.json"
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *INNER_SELECTION],
            cwd=ROOT, env={**os.environ, BOUNDS_ENV: str(out)}, stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=COLLECT_TIMEOUT_S, check=False,
        )
        # 5: no tests collected (test_lab_tier then says so)
        if proc.returncode not in (0, 5) or not out.is_file():
            raise RuntimeError(f"collecting the lab tests' bounds failed (pytest exit status {proc.returncode}):\n"
                               f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        bounds: dict[str, float] = json.loads(out.read_text())
        return bounds


def plan() -> TierPlan:
    return TierPlan(collect_bounds())


@dataclass
class InnerTest:
    nodeid: str
    bound_s: float | None
    started: float  # time.monotonic()
    outcome: str | None = None  # passed, failed, error, skipped
    seconds: float | None = None  # setup + call + teardown, as the inner pytest measured them


@dataclass
class InnerRun:
    """Follows the lab's output: ``feed`` gets it as it arrives (``runner.run``'s ``out``), ``watchdog``
    is ``runner.run``'s watchdog."""

    plan: TierPlan
    echo: Callable[[str], None]  # one line for the outer run's terminal
    started: float = field(default_factory=lambda: time.monotonic())
    lines: list[str] = field(default_factory=list)
    running: InnerTest | None = None
    finished: list[InnerTest] = field(default_factory=list)
    last_event: float = field(default_factory=lambda: time.monotonic())
    _partial: bytes = b""

    def feed(self, data: bytes) -> None:
        self._partial += data
        *complete, self._partial = self._partial.split(b"\n")
        for raw in complete:
            self._line(raw.decode(errors="replace").rstrip("\r"))

    def finish(self) -> None:
        if self._partial:
            self._line(self._partial.decode(errors="replace"))
            self._partial = b""

    def _line(self, text: str) -> None:
        self.lines.append(text)
        now = time.monotonic()
        stamp = f"[lab {now - self.started:6.1f}s]"
        idx = text.find(PROGRESS_MARK)
        if idx > 0:  # after a progress dot on the same line
            text, before = text[idx:], text[:idx]
            self._echo_output(stamp, before)
        if idx < 0:
            self._echo_output(stamp, text)
            return
        words = text[len(PROGRESS_MARK):].strip()
        kind, _, rest = words.partition(" ")
        self.last_event = now
        if kind == "start":
            self.running = InnerTest(rest, self.plan.bounds.get(rest), now)
            self.echo(f"{stamp} start  {rest}{_bound_text(self.running.bound_s)}")
        elif kind == "end":
            nodeid, outcome, seconds = rest.rsplit(" ", 2)
            test = self.running if self.running and self.running.nodeid == nodeid else InnerTest(
                nodeid, self.plan.bounds.get(nodeid), now)
            test.outcome, test.seconds = outcome, float(seconds)
            self.finished.append(test)
            self.running = None
            self.echo(f"{stamp} {outcome.upper():7} {nodeid} in {test.seconds:.1f} s{_bound_text(test.bound_s)}")
        else:
            self.echo(f"{stamp} {text}")

    def _echo_output(self, stamp: str, text: str) -> None:
        """Any other line of the inner output, unless it is only -q progress dots."""
        if text.strip() and not _NOISE.fullmatch(text.strip()):
            self.echo(f"{stamp} {text}")

    def watchdog(self) -> str | None:
        now = time.monotonic()
        test = self.running
        if test is not None:
            ran = now - test.started
            if test.bound_s is not None and ran > test.bound_s + STUCK_GRACE_S:
                return (f"{test.nodeid} has run for {ran:.0f} s inside the lab, past its bound of "
                        f"{test.bound_s:g} s + {STUCK_GRACE_S:g} s: its own pytest-timeout did not end it, "
                        "so the lab is stuck")
            return None
        quiet = now - self.last_event
        if quiet > LAB_START_S:
            after = (f"since {self.finished[-1].nodeid} ended" if self.finished
                     else "since the lab started, before the first inner test")
            return f"no inner test started or ended for {quiet:.0f} s ({after}; bound {LAB_START_S:g} s)"
        return None

    def where(self) -> str:
        """Which inner test was running (and for how long), and how far the run got."""
        now = time.monotonic()
        done = ", ".join(f"{n} {o}" for o, n in sorted(Counter(t.outcome or "?" for t in self.finished).items()))
        not_started = len(set(self.plan.bounds) - {t.nodeid for t in self.finished}
                          - ({self.running.nodeid} if self.running else set()))
        head = f"inner tests: {len(self.finished)} finished ({done or 'none'}), {not_started} not started"
        if self.running is not None:
            return (f"{head}; running: {self.running.nodeid} for {now - self.running.started:.1f} s"
                    f"{_bound_text(self.running.bound_s)}")
        if self.finished:
            return f"{head}; none running (the last, {self.finished[-1].nodeid}, ended {now - self.last_event:.1f} s before)"
        return f"{head}; none had started ({now - self.started:.1f} s after the lab run began)"

    def tail(self, n: int) -> str:
        return "\n".join(self.lines[-n:])

    def durations(self) -> list[str]:
        """The inner tests, slowest first, as lines for the outer terminal summary."""
        rows = sorted(self.finished, key=lambda t: t.seconds or 0.0, reverse=True)
        out = [f"{t.seconds or 0.0:8.2f}s {t.outcome or '?':7} {t.nodeid}{_bound_text(t.bound_s)}" for t in rows]
        if self.running is not None:
            out.insert(0, f"{time.monotonic() - self.running.started:8.2f}s {'RUNNING':7} {self.running.nodeid}"
                          f"{_bound_text(self.running.bound_s)} (stopped here)")
        return out


def _bound_text(bound: float | None) -> str:
    return f" (bound {bound:g} s)" if bound is not None else ""

