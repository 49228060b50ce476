"""The ``lab`` tier: tests that need a KVM which runs guest user space (hardware, or the KVM lab).

A test marked ``lab`` runs directly where that is possible: inside the lab (``PYVMM_IN_LAB=1``, set by
``pyvmm.lab``) or on a host whose ``/dev/kvm`` is hardware virtualization.  On a software-KVM host it is
skipped here with that reason, and ``test_lab_tier.py::test_lab_tier`` runs all of them inside the lab
in one lab run (one QEMU start per pytest session) and fails if any of them fails there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvmm.arch.x86_64 import hostkvm
from pyvmm.lab import in_lab
from tests.conftest import kvm_unavailable_reason

GUEST_TIMEOUT_S = 300.0  # a bound: a boot to user space takes seconds inside the lab

# Filled by test_lab_tier for the terminal summary.
LAB_TIER_SUMMARY: list[str] = []


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

    def explain(self) -> str:
        tail = "\n".join(self.console.splitlines()[-30:])
        return (f"pyvmm exit status {self.status} after {self.seconds:.1f} s\n--- stderr ---\n{self.stderr}"
                f"\n--- console tail ---\n{tail}")


@pytest.fixture
def pyvmm_run(tmp_path: Path) -> Callable[..., Guest]:
    """``pyvmm_run(*pyvmm_run_args) -> Guest``: ``pyvmm run`` with the console captured to a file."""

    def run(*args: str, timeout: float = GUEST_TIMEOUT_S) -> Guest:
        console = tmp_path / "console.log"
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "pyvmm", "run", "--console", f"file:{console}", "--timeout", str(timeout),
             *args],
            capture_output=True, text=True, timeout=timeout + 60, stdin=subprocess.DEVNULL, check=False,
        )
        g = Guest(proc.returncode, console.read_text(errors="replace") if console.exists() else "",
                  proc.stderr, time.monotonic() - t0)
        print(g.explain())  # shown by pytest on failure, and with -s
        return g

    return run


@pytest.fixture
def e2fsprogs() -> None:
    missing = [t for t in ("debugfs", "e2fsck") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"e2fsprogs ({', '.join(missing)}) is not installed")
