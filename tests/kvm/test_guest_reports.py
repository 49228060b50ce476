"""The guest says how it ended, through devices rather than console text (real VMs of tiny firmware
guests on the host KVM, through ``pyvmm run``):

- ``pvpanic``: reads the supported events from port 0x505, writes PVPANIC_PANICKED and resets at once (as
  ``panic=-1`` does) without a panic line on the console.  The verdict must be the panic's.
- ``guestexit``: checks the guest exit device's magic and version and writes the status the command line
  starts with; pyvmm exits with 0 for 0, 32 + N otherwise, 255 from N = 223 on.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvmm.status import ExitStatus

pytestmark = pytest.mark.kvm


def _run(kernel: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvmm", "run", "--kernel", str(kernel), "--memory", "64M",
                           "--timeout", "30", "--console", "stdio", *args],
                          capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL, check=False)


def test_pvpanic_decides_the_verdict(firmware: Callable[..., Path]) -> None:
    proc = _run(firmware("pvpanic", "elf"))
    assert "reporting a panic" in proc.stdout, proc.stdout + proc.stderr  # the port offered the event
    assert "Kernel panic" not in proc.stdout
    assert proc.returncode == ExitStatus.GUEST_PANIC, proc.stderr
    assert "guest kernel panic: reported by pvpanic (panicked) (then: guest reset (i8042))" in proc.stderr


def test_pvpanic_with_no_panic_exit_is_a_log_line(firmware: Callable[..., Path]) -> None:
    # --no-panic-exit turns the panic watchers off, the console's and this one
    proc = _run(firmware("pvpanic", "elf"), "--no-panic-exit")
    assert proc.returncode == ExitStatus.OK, proc.stderr
    assert "reported a panic through pvpanic (panicked); --no-panic-exit" in proc.stderr


@pytest.mark.parametrize(("status", "code"), [(0, 0), (1, 33), (3, 35), (7, 39), (222, 254), (223, 255),
                                              (255, 255), (300, 76)])
def test_guest_exit_status(firmware: Callable[..., Path], status: int, code: int) -> None:
    proc = _run(firmware("guestexit", "elf"), "--cmdline", f"{status} console=ttyS0")
    assert "writing the status" in proc.stdout and "still running" not in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == code, proc.stderr
    assert f"guest exited with status {status & 0xFF} (guest exit device)" in proc.stderr
    assert f"(exit status {code})" in proc.stderr


def test_exec_without_a_reported_status_is_its_own_failure(firmware: Callable[..., Path]) -> None:
    # these guests never read pyvmm.exec=: the command's status never comes
    proc = _run(firmware("pvpanic", "elf"), "--no-panic-exit", "--exec", "true")
    assert proc.returncode == ExitStatus.NO_GUEST_STATUS, proc.stderr
    assert "without reporting the --exec command's status" in proc.stderr
    proc = _run(firmware("pvpanic", "elf"), "--exec", "true")
    assert proc.returncode == ExitStatus.GUEST_PANIC, proc.stderr  # a panic is still a panic
    proc = _run(firmware("guestexit", "elf"), "--cmdline", "5", "--exec", "uname -r")
    assert proc.returncode == 37 and 'pyvmm.exec="uname -r"' in proc.stderr, proc.stderr
