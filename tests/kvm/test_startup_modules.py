"""What a real ``pyvmm run`` has imported when its first vCPU enters KVM_RUN (a tiny firmware guest on the
host KVM).  tests/unit/test_startup_imports.py checks the imports of the run path's modules; this checks the
run itself, which also calls code (a log message, a file check) that may import more."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.kvm

# Patch the vCPU thread's entry to print the heavy modules already imported, then run the CLI.
PROBE = """
import os, sys
import pyvmm.vmm as vmm
heavy = sys.argv.pop(1).split(",")
enter = vmm.Vmm._vcpu_thread
def probe(self, vcpu):
    os.write(2, ("loaded at KVM_RUN: " + ",".join(sorted(m for m in heavy if m in sys.modules)) + "\\n").encode())
    return enter(self, vcpu)
vmm.Vmm._vcpu_thread = probe
from pyvmm.cli import main
sys.argv[0] = "pyvmm"
sys.exit(main())
"""

HEAVY = ("logging", "traceback", "tokenize", "linecache", "dataclasses", "inspect", "typing", "pathlib",
         "numpy", "elftools")


def test_a_run_reaches_kvm_run_without_the_heavy_modules(firmware: Callable[..., Path], tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"  # a virtio-blk disk too: its devices are on the path of a root-disk boot
    disk.write_bytes(bytes(1 << 20))
    proc = subprocess.run([sys.executable, "-c", PROBE, ",".join(HEAVY), "run", "--kernel",
                           str(firmware("guestexit", "elf")), "--memory", "64M", "--timeout", "30",
                           "--console", "stdio", "--cmdline", "0 console=ttyS0", "--disk", f"path={disk}"],
                          capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("loaded at KVM_RUN:")]
    assert lines == ["loaded at KVM_RUN: "], proc.stderr
