"""The ``lab`` tier: tests that need a KVM which runs guest user space (hardware, or the KVM lab).

A test marked ``lab`` runs directly where that is possible: inside the lab (``PYVMM_IN_LAB=1``, set by
``pyvmm.lab``) or on a host whose ``/dev/kvm`` is hardware virtualization.  On a software-KVM host it is
skipped here with that reason, and ``test_lab_tier.py::test_lab_tier`` runs all of them inside the lab
in one lab run (one QEMU start per pytest session) and fails if any of them fails there.

Time bounds.  Every lab test declares its bound, ``@pytest.mark.lab(bound_s=...)``, computed with
``bound_for`` from the timeouts of the VMs it starts (``vm_timeout``: the work a VM does, times MARGIN) and
its own work around them.  The bound becomes the test's pytest-timeout (a test past it fails alone; the
others still run), and test_lab_tier adds up the bounds for the lab run's timeout (tier.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvmm.arch.x86_64 import hostkvm
from pyvmm.lab import in_lab, unavailable_reason
from tests.conftest import kvm_unavailable_reason
from tests.lab import tier

# A boot of the default guest to the end of its /init and its reboot takes ~20-60 s of VM time inside the
# lab, more under load (39-85 s measured for one boot): BOOT_S is that expectation, and a VM's timeout
# is MARGIN times the work it is expected to do.
BOOT_S = 60.0
MARGIN = 3.0
# pyvmm stops a VM itself at --timeout (exit status 5, with its report on stderr); the test kills it if it
# has not ended this much later.
VM_GRACE_S = 30.0
# What a test does around its VMs, on the host side: copies of images, debugfs, e2fsck.
HOST_WORK_S = 30.0

# Filled by test_lab_tier for the terminal summary.
LAB_TIER_SUMMARY: list[str] = []


def vm_timeout(expected_s: float) -> float:
    """The ``--timeout`` of one VM whose work is expected to take ``expected_s`` inside the lab."""
    return MARGIN * expected_s


def bound_for(*vm_timeouts: float, host_s: float = HOST_WORK_S) -> float:
    """A lab test's bound (its ``bound_s``): its VMs one after the other, each with VM_GRACE_S to stop, and
    ``host_s`` of its own work around them."""
    return sum(t + VM_GRACE_S for t in vm_timeouts) + host_s


def lab_bound(item: pytest.Item) -> float | None:
    """The ``bound_s`` a ``lab`` test declares, or None."""
    for mark in item.iter_markers("lab"):
        if "bound_s" in mark.kwargs:
            return float(mark.kwargs["bound_s"])
    return None


def direct_unavailable_reason() -> str | None:
    """Why ``lab`` tests cannot run directly in this process, or None when they can."""
    if in_lab():
        return None
    reason = kvm_unavailable_reason()
    if reason:
        return reason
    host = hostkvm.detect()
    if host.software:
        return (f"{host.reason}, which cannot run guest user space: this test runs inside the KVM lab "
                "(tests/lab/test_lab_tier.py::test_lab_tier)")
    return None


@pytest.fixture(autouse=True)
def _lab_tier_gate(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("lab") is not None:
        reason = direct_unavailable_reason()
        if reason:
            pytest.skip(reason)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each lab test's bound becomes its pytest-timeout; a lab test without a bound is a usage error."""
    lab = [item for item in items if item.get_closest_marker("lab") is not None]
    if not lab:
        return
    if not config.pluginmanager.hasplugin("timeout"):
        raise pytest.UsageError("the lab tests need pytest-timeout (the dev extras of pyproject.toml): "
                                "run `make venv`, or `.venv/bin/pip install -e '.[dev]'`")
    missing = [item.nodeid for item in lab if lab_bound(item) is None]
    if missing:
        raise pytest.UsageError("lab tests without a bound (declare @pytest.mark.lab(bound_s=...), see "
                                f"tests/lab/conftest.py): {', '.join(missing)}")
    for item in lab:
        # signal: SIGALRM fails this test in the main thread; the session goes on with the next one
        item.add_marker(pytest.mark.timeout(lab_bound(item), method="signal"))


def pytest_collection_finish(session: pytest.Session) -> None:
    """In the tier's collect pass (tier.BOUNDS_ENV set): write the selected lab tests' bounds."""
    out = os.environ.get(tier.BOUNDS_ENV)
    if out:
        bounds = {item.nodeid: lab_bound(item) for item in session.items if item.get_closest_marker("lab")}
        Path(out).write_text(json.dumps(bounds))


# Inner progress (tier.PROGRESS_ENV set, i.e. inside the tier's lab run): nodeid -> (outcome, seconds so far)
_PHASES: dict[str, tuple[str, float]] = {}
# test_lab_tier's plan, made before its pytest-timeout starts (pytest_runtest_protocol below).
TIER_PLAN = pytest.StashKey["tier.TierPlan | Exception"]()


def _is_lab_tier(item: pytest.Item) -> bool:
    return item.name == "test_lab_tier" and item.path == Path(__file__).with_name("test_lab_tier.py")


def tier_skip_reason() -> str | None:
    """Why test_lab_tier has nothing to do here, or None."""
    if in_lab():
        return "already inside the KVM lab"
    if direct_unavailable_reason() is None:
        return "this host's KVM runs guest user space: the lab tests run directly"
    return unavailable_reason()


def _progress(item: pytest.Item, text: str) -> None:
    """One whole PYVMM-LABTEST line on the terminal, now (after a -q progress dot: on a line of its own)."""
    tw = item.config.get_terminal_writer()
    if tw.width_of_current_line:
        tw.line()
    tw.line(f"{tier.PROGRESS_MARK} {text}")
    tw.flush()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    """Outermost around each test: the tier's plan (its bound is test_lab_tier's pytest-timeout, which
    starts inside this wrapper), and the inner run's PYVMM-LABTEST start and end lines."""
    if _is_lab_tier(item) and tier_skip_reason() is None:
        try:
            plan = tier.plan()
        except Exception as err:  # the test reports it
            item.stash[TIER_PLAN] = err
        else:
            item.stash[TIER_PLAN] = plan
            if item.config.pluginmanager.hasplugin("timeout"):
                item.add_marker(pytest.mark.timeout(plan.test_timeout_s, method="signal"))
    progress = os.environ.get(tier.PROGRESS_ENV) == "1" and item.get_closest_marker("lab") is not None
    if progress:
        _PHASES[item.nodeid] = ("passed", 0.0)
        _progress(item, f"start {item.nodeid}")
    try:
        return (yield)
    finally:
        if progress:
            outcome, seconds = _PHASES.pop(item.nodeid)
            _progress(item, f"end {item.nodeid} {outcome} {seconds:.2f}")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.nodeid not in _PHASES:
        return
    outcome, seconds = _PHASES[report.nodeid]
    if report.failed and outcome not in ("failed", "error"):
        outcome = "failed" if report.when == "call" else "error"
    elif report.skipped and outcome == "passed":
        outcome = "skipped"
    _PHASES[report.nodeid] = (outcome, seconds + report.duration)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if LAB_TIER_SUMMARY:
        terminalreporter.write_sep("=", "KVM lab tier")
        for line in LAB_TIER_SUMMARY:
            terminalreporter.write_line(line)


@dataclass
class Guest:
    status: int
    console: str
    stderr: str
    seconds: float
    timeout: float  # the VM's --timeout

    def explain(self) -> str:
        tail = "\n".join(self.console.splitlines()[-30:])
        if self.status == 5:
            what = f"its --timeout of {self.timeout:g} s expired"
        elif self.status == -signal.SIGKILL:
            what = f"it did not stop at its --timeout of {self.timeout:g} s and was killed"
        else:
            what = f"--timeout {self.timeout:g} s"
        return (f"pyvmm exit status {self.status} after {self.seconds:.1f} s ({what})\n--- stderr ---\n"
                f"{self.stderr}\n--- console tail ---\n{tail}")


def _text(data: str | bytes | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


@pytest.fixture
def pyvmm_run(tmp_path: Path) -> Callable[..., Guest]:
    """``pyvmm_run(*pyvmm_run_args, timeout=SECONDS[, command=ARGV]) -> Guest``: ``pyvmm run`` (``ARGV run``,
    by default ``python -m pyvmm run``) with the console captured to
    a file.  ``timeout`` (required: ``vm_timeout`` of what the VM does) is the VM's own --timeout; the VM is
    killed VM_GRACE_S later if it has not stopped by then."""

    def run(*args: str, timeout: float, command: Sequence[str] = (sys.executable, "-m", "pyvmm")) -> Guest:
        console = tmp_path / "console.log"
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                [*command, "run", "--console", f"file:{console}", "--timeout", f"{timeout:g}", *args],
                capture_output=True, text=True, timeout=timeout + VM_GRACE_S, stdin=subprocess.DEVNULL,
                check=False,
            )
            status, stderr = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as err:  # subprocess.run has killed it
            status, stderr = -signal.SIGKILL, _text(err.stderr)
        g = Guest(status, console.read_text(errors="replace") if console.exists() else "", stderr,
                  time.monotonic() - t0, timeout)
        print(g.explain())  # shown by pytest on failure, and with -s
        return g

    return run


@pytest.fixture
def e2fsprogs() -> None:
    missing = [t for t in ("debugfs", "e2fsck") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"e2fsprogs ({', '.join(missing)}) is not installed")
