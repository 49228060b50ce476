"""Soak and load: does pyvmm leak when it runs for long, or runs many VMs?

Two measurements, shared by ``make soak`` (bench/soak.py: 10 minutes, tables) and their one-minute
versions in the test suite (tests/kvm/test_soak.py, tests/lab/test_soak.py):

- :func:`vm_loop`: N tiny firmware VMs built, run and torn down one after another in *this* process; after
  each, the process's open fds, threads and RSS.  Every VM must give back its fds and threads.
- :func:`guest_soak`: one ``pyvmm run`` of the default guest with two disks whose ``--exec`` command
  (:func:`guest_script`) writes, reads back and checks data on both for a given time; pyvmm's RSS and fd
  count are sampled from outside every few seconds.  They must stay flat, and every round must verify.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.memory import is_guest_ram_vma

MiB = 1 << 20


@dataclass
class Sample:
    t: float  # seconds since the start
    rss: int  # bytes
    fds: int
    threads: int = 0


def process_sample(pid: int, t0: float, *, guest_ram: int = 0) -> Sample | None:
    """RSS, open fds and threads of process ``pid`` from /proc (None once it is gone).

    With ``guest_ram`` (bytes), the resident part of mappings of that RAM's size (the guest's RAM,
    which grows as the guest touches it and is not pyvmm's own memory) is left out of the RSS.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        smaps = Path(f"/proc/{pid}/smaps").read_text() if guest_ram else ""
    except (FileNotFoundError, ProcessLookupError):
        return None
    rss = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) * 1024  # type: ignore[union-attr]
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    if guest_ram:
        size_kb = None
        for line in smaps.splitlines():
            if line.startswith("Size:"):
                size_kb = int(line.split()[1])
            elif line.startswith("Rss:") and size_kb is not None and is_guest_ram_vma(size_kb * 1024, guest_ram):
                rss -= int(line.split()[1]) * 1024
    return Sample(time.monotonic() - t0, rss, fds, threads)


@dataclass
class Verdict:
    ok: bool
    lines: list[str] = field(default_factory=list)


def judge(samples: list[Sample], *, warmup: int, rss_growth_max: int, what: str) -> Verdict:
    """Flat: after ``warmup`` samples, fds and threads never above their value then, and RSS at most
    ``rss_growth_max`` bytes above it."""
    if len(samples) <= warmup:
        return Verdict(False, [f"{what}: only {len(samples)} samples"])
    base = samples[warmup]
    rest = samples[warmup:]
    fd_max, thr_max = max(s.fds for s in rest), max(s.threads for s in rest)
    rss_max = max(s.rss for s in rest)
    lines = [f"{what}: {len(samples)} samples over {samples[-1].t:.0f} s; after {warmup} to warm up: "
             f"fds {base.fds}..{fd_max}, threads {base.threads}..{thr_max}, "
             f"RSS {base.rss / MiB:.1f}..{rss_max / MiB:.1f} MiB (bound +{rss_growth_max / MiB:.0f} MiB)"]
    ok = fd_max <= base.fds and thr_max <= base.threads and rss_max - base.rss <= rss_growth_max
    return Verdict(ok, lines)


def table(samples: list[Sample], every: int = 1) -> list[str]:
    out = [f"{'t (s)':>8} {'RSS (MiB)':>10} {'fds':>5} {'threads':>8}"]
    for s in samples[::every]:
        out.append(f"{s.t:8.1f} {s.rss / MiB:10.1f} {s.fds:5d} {s.threads:8d}")
    return out


# -- many VMs in one process ------------------------------------------------------------------------
def vm_loop(kernel: Path, count: int) -> list[Sample]:
    """Run ``count`` VMs of the firmware guest ``kernel`` (guestexit.elf: it ends at once with the status
    its command line starts with) one after another in this process; a sample after each."""
    from pyvmm.builder import build_vm
    from pyvmm.config import CONSOLE_NONE, VmConfig

    t0 = time.monotonic()
    pid = os.getpid()
    samples = []
    for _ in range(count):
        vmm, _report = build_vm(VmConfig(kernel=str(kernel), cmdline="0", memory=64 * MiB, console=CONSOLE_NONE,
                                         timeout=30))
        result = vmm.run()
        if result.exit_code != 0:
            raise RuntimeError(f"soak VM ended badly: {result.reason}")
        sample = process_sample(pid, t0)
        assert sample is not None
        sample.threads = threading.active_count()
        samples.append(sample)
    return samples


# -- one guest, busy for a while ----------------------------------------------------------------------
def guest_script(seconds: float) -> str:
    """The guest's command: rounds of writes, reads and checks on /dev/vdb (raw) and the root fs, with
    flushes, until ``seconds`` have passed; prints SOAK-ROUND lines and one SOAK-DONE line."""
    return (
        f"end=$(( $(cut -d. -f1 /proc/uptime) + {int(seconds)} )); n=0; bad=0; "
        "while [ $(cut -d. -f1 /proc/uptime) -lt $end ]; do "
        "n=$((n + 1)); "
        "yes soak-$n | head -c 262144 > /soak-pat; want=$(sha256sum < /soak-pat); "
        "dd if=/soak-pat of=/dev/vdb bs=4096 seek=$(( (n % 64) * 64 )) conv=fsync 2>/dev/null; "
        "cp /soak-pat /soak-file; sync; echo 3 > /proc/sys/vm/drop_caches; "
        "got=$(dd if=/dev/vdb bs=4096 skip=$(( (n % 64) * 64 )) count=64 2>/dev/null | sha256sum); "
        "root=$(sha256sum < /soak-file); "
        "if [ \"$got\" = \"$want\" ] && [ \"$root\" = \"$want\" ]; then echo SOAK-ROUND $n ok; "
        "else echo SOAK-ROUND $n bad; bad=$((bad + 1)); fi; "
        "done; echo SOAK-DONE rounds=$n bad=$bad; [ $bad -eq 0 ]"
    )


@dataclass
class GuestSoak:
    status: int
    rounds: int
    bad: int
    samples: list[Sample]
    console: str
    stderr: str


def guest_soak(images: Path, scratch: Path, seconds: float, *, interval: float = 2.0,
               boot_s: float = 120.0) -> GuestSoak:
    """``pyvmm run`` the default guest (root: a snapshot of the root disk; vdb: a 16 MiB scratch image)
    running :func:`guest_script` for ``seconds``, sampling pyvmm every ``interval`` seconds (its RSS
    without the guest's RAM)."""
    disk = scratch / "soak-vdb.img"
    with open(disk, "wb") as f:
        f.truncate(16 * MiB)
    console = scratch / "soak-console.log"
    timeout = seconds + boot_s
    cmd = [sys.executable, "-m", "pyvmm", "run", "--kernel", str(images / "vmlinux"), "--memory", "256M",
           "--disk", f"path={images / 'rootfs.ext4'},snapshot=on", "--disk", f"path={disk}",
           "--cmdline", "console=ttyS0 root=/dev/vda rw init=/init", "--console", f"file:{console}",
           "--timeout", f"{timeout:g}", "--exec", guest_script(seconds)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    samples: list[Sample] = []
    try:
        while proc.poll() is None:
            s = process_sample(proc.pid, t0, guest_ram=256 * MiB)
            if s is not None:
                samples.append(s)
            time.sleep(interval)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = console.read_text(errors="replace") if console.exists() else ""
    done = re.search(r"SOAK-DONE rounds=(\d+) bad=(\d+)", text)
    rounds, bad = (int(done.group(1)), int(done.group(2))) if done else (0, -1)
    return GuestSoak(proc.returncode, rounds, bad, samples, text, stderr)
