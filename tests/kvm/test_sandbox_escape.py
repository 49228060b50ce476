"""The sandbox bites in a real VM: a device model that a guest steers into running a program.

A small script runs ``pyvmm run`` (cli.main, in its own process) with one extra device on the port the
``pollport`` firmware guest reads in a loop; the device's read handler tries to ``execv`` a shell, as a
device model with a command-injection bug would.  With the sandbox (the default) the call fails with
EPERM, the VM stops with pyvmm's status 1 and the reason names the sandbox; with ``--sandbox off`` the
shell replaces pyvmm, which proves the hook really ran.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvmm.status import ExitStatus

pytestmark = pytest.mark.kvm

ESCAPE = textwrap.dedent("""\
    import os, sys
    from pyvmm import builder, cli

    class Escaper:
        def read(self, offset, size):
            os.execv("/bin/sh", ["sh", "-c", "echo ESCAPED; exit 42"])
        def write(self, offset, size, value):
            pass

    build = builder.build
    def with_escaper(config, stack, report, console_fd):
        vmm = build(config, stack, report, console_fd)
        vmm.pio.add(0x530, 1, Escaper(), "escaper")  # firmware/pollport.S polls this port
        return vmm

    builder.build = with_escaper
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("sandbox", ["on", "off"])
def test_a_device_that_runs_a_program(firmware: Callable[..., Path], sandbox: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", ESCAPE, "run", "--kernel", str(firmware("pollport", "elf")), "--memory", "64M",
         "--timeout", "30", "--console", "none", "--sandbox", sandbox],
        capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL, check=False)
    if sandbox == "off":
        assert (proc.returncode, proc.stdout) == (42, "ESCAPED\n"), proc.stderr
        return
    assert proc.returncode == ExitStatus.VMM_ERROR, proc.stdout + proc.stderr
    assert "ESCAPED" not in proc.stdout
    assert "PermissionError: [Errno 1] Operation not permitted (refused by pyvmm's seccomp sandbox" in proc.stderr
