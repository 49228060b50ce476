"""Boot tests: real Linux boots of the default guest (minutes each on a software-emulating host KVM)."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvmm.arch.x86_64 import hostkvm

BOOT_TIMEOUT_S = 600  # a bound, not a benchmark: ~90 s here, well under a second on hardware


@dataclass
class Boot:
    status: int
    console: str
    stderr: str
    seconds: float

    def explain(self) -> str:
        tail = "\n".join(self.console.splitlines()[-25:])
        return f"exit status {self.status} after {self.seconds:.0f} s\n--- stderr ---\n{self.stderr}\n--- console tail ---\n{tail}"


@pytest.fixture(scope="session")
def software_kvm() -> bool:
    return hostkvm.detect().software


@pytest.fixture
def boot(tmp_path: Path, kvm: None) -> object:
    """``boot(*pyvmm_run_args) -> Boot``: run ``pyvmm run`` with the console captured to a file."""

    def run(*args: str, timeout: float = BOOT_TIMEOUT_S) -> Boot:
        console = tmp_path / "console.log"
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "pyvmm", "run", "--console", f"file:{console}", "--timeout", str(timeout), *args],
            capture_output=True, text=True, timeout=timeout + 60, stdin=subprocess.DEVNULL, check=False,
        )
        b = Boot(proc.returncode, console.read_text(errors="replace") if console.exists() else "", proc.stderr,
                 time.monotonic() - t0)
        print(b.explain())  # shown by pytest on failure, and with -s
        return b

    return run
