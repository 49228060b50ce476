"""Shared by the unit tests: a fake ``pyvmm`` for the API and the pytest plugin, so nothing boots."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FAKE_PYVMM = f"""\
#!{sys.executable}
# Stands in for `python -m pyvmm run --config FILE --console stdio`: stderr is pyvmm's log, the terminal
# is the guest console, a shell is the guest; SIGTERM ends it with pyvmm's status 6.
import os, signal, subprocess, sys, tomllib
args = sys.argv[1:]
assert args[:3] == ["-m", "pyvmm", "run"] and "--console" in args, args
with open(args[args.index("--config") + 1], "rb") as f:
    conf = tomllib.load(f)
print(f"pyvmm: kernel {{conf['kernel']}}, memory {{conf['memory']}}", file=sys.stderr, flush=True)
os.write(1, b"Linux version 6.1-fake\\r\\nRun /init as init process\\r\\n")
if "exec" in conf:  # --exec: what images/init.sh prints, and pyvmm's status for the guest's
    if conf["exec"] == "PANIC":
        os.write(1, b"Kernel panic - not syncing: fake\\r\\n")
        print("pyvmm: guest kernel panic: fake after 0.1 s (exit status 3)", file=sys.stderr, flush=True)
        sys.exit(3)
    os.write(1, b"PYVMM-EXEC: begin\\r\\n")
    p = subprocess.run(["sh", "-c", conf["exec"]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    os.write(1, p.stdout.replace(b"\\n", b"\\r\\n") + b"\\r\\nPYVMM-EXEC: end %d\\r\\n" % p.returncode)
    code = 0 if p.returncode == 0 else min(32 + p.returncode, 255)
    print(f"pyvmm: guest exited with status {{p.returncode}} (guest exit device) after 0.1 s (exit status "
          f"{{code}})", file=sys.stderr, flush=True)
    sys.exit(code)
sh = subprocess.Popen(["sh"], env={{"PATH": os.environ.get("PATH", "/usr/bin:/bin")}})
def stop(*_):
    sh.kill()
    print("pyvmm: stopped by SIGTERM", file=sys.stderr, flush=True)
    os._exit(6)
signal.signal(signal.SIGTERM, stop)
sys.exit(sh.wait())
"""


@pytest.fixture
def fake_pyvmm(tmp_path: Path) -> Path:
    path = tmp_path / "fake-pyvmm"
    path.write_text(FAKE_PYVMM)
    path.chmod(0o755)
    return path
