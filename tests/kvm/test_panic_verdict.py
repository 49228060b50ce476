"""A panic on the console decides how the VM ended, whatever the guest does next: a kernel with
``panic=-1`` or ``panic=N`` resets right after its panic report, and that reset must not turn a panic
into a pass.  The firmware guest ``panicreset`` prints Linux's panic line and resets through the i8042
at once, which beats any grace period."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvmm.status import ExitStatus

pytestmark = pytest.mark.kvm


def test_a_reset_after_a_panic_still_ends_with_the_panic_status(firmware: Callable[..., Path]) -> None:
    proc = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--kernel", str(firmware("panicreset", "elf")),
                           "--memory", "64M", "--timeout", "30", "--console", "none"],
                          capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == ExitStatus.GUEST_PANIC, proc.stderr
    assert "guest kernel panic: [    1.234567] Kernel panic - not syncing: VFS: Unable to mount root fs" in proc.stderr
    assert "guest reset (i8042)" in proc.stderr  # what happened after the panic is still said
