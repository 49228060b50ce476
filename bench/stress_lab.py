#!/usr/bin/env python3
"""Boot the default guest N times in a row, on a KVM that runs guest user space, and report every stall.

Each boot is ``python -m pyvmm run --kernel images/out/vmlinux --initrd images/out/initrd.cpio.gz`` (or, with
``--root-disk``, a fresh copy of ``images/out/rootfs.ext4`` as its root on virtio-blk) with its own
``--timeout``, the console in a file.  A boot is good when the guest ran its /init to the end (the
``PYVMM-INIT:`` lines, checked as tests/lab/test_guest_userspace.py does) and pyvmm exited with status 0
on the guest's reboot.  Prints one line per boot as it ends, then a table: how long each took to reach
/init and to end, and for every boot that did not end well, the tail of pyvmm's stderr (its report of
where the vCPUs were when the timeout hit) and of the console.  Exit status 0 when every boot was good.

On a software-KVM host (hosts.md) it re-runs itself inside ONE run of the KVM lab (``pyvmm.lab``):
``make stress-lab`` (``STRESS_N=...``, default 50).  Usage: ``python bench/stress_lab.py [-n N]
[--timeout SECONDS] [--root-disk]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyvmm.arch.x86_64 import hostkvm  # noqa: E402
from pyvmm.lab import LabOptions, in_lab, run, unavailable_reason  # noqa: E402
from tests.lab.conftest import BOOT_S, VM_GRACE_S, vm_timeout  # noqa: E402
from tests.lab.test_guest_userspace import INIT_MARKERS, ROOT_CMDLINE, reached_user_space  # noqa: E402
from tests.lab.tier import LAB_START_S  # noqa: E402

IMAGES = ROOT / "images" / "out"
INIT_MARK = INIT_MARKERS[0]  # "PYVMM-INIT: start": the kernel has started /init
STATUS_TIMEOUT = 5  # pyvmm's exit status when its --timeout expired
POLL_S = 0.2
STDERR_TAIL = 40
CONSOLE_TAIL = 12


@dataclass
class Boot:
    n: int
    status: int  # pyvmm's exit status; -9 when it outlived its --timeout and was killed here
    to_init: float | None  # seconds from pyvmm's start to the /init marker on the console
    seconds: float
    good: bool
    stderr: str
    console: str

    @property
    def verdict(self) -> str:
        if self.good:
            return "ok"
        if self.status == STATUS_TIMEOUT:
            return "stalled (--timeout)"
        if self.status < 0:
            return "stalled (killed)"
        return f"failed (exit {self.status})"


def boot_once(n: int, work: Path, timeout: float, root_disk: bool) -> Boot:
    console, stderr_log = work / f"console-{n}.log", work / f"stderr-{n}.log"
    cmd = [sys.executable, "-m", "pyvmm", "run", "--kernel", str(IMAGES / "vmlinux"), "--memory", "256M",
           "--console", f"file:{console}", "--timeout", f"{timeout:g}"]
    if root_disk:
        disk = work / "rootfs.ext4"
        shutil.copyfile(IMAGES / "rootfs.ext4", disk)
        cmd += ["--disk", f"path={disk}", "--cmdline", ROOT_CMDLINE]
    else:
        cmd += ["--initrd", str(IMAGES / "initrd.cpio.gz"), "--cmdline", "console=ttyS0"]
    t0 = time.monotonic()
    with open(stderr_log, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    to_init = None
    deadline = t0 + timeout + VM_GRACE_S  # pyvmm stops itself at --timeout; this is in case it does not
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if to_init is None and console.exists() and INIT_MARK in console.read_text(errors="replace"):
                to_init = time.monotonic() - t0
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        status = proc.wait()
    seconds = time.monotonic() - t0
    text = console.read_text(errors="replace") if console.exists() else ""
    if to_init is None and INIT_MARK in text:  # printed within the last poll interval
        to_init = seconds
    good = status == 0 and reached_user_space(text, root_disk=root_disk)
    return Boot(n, status, to_init, seconds, good, stderr_log.read_text(errors="replace"), text)


def _tail(text: str, n: int) -> str:
    return "\n".join(f"    | {line}" for line in text.splitlines()[-n:])


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"median {statistics.median(values):.1f} s, min {min(values):.1f} s, max {max(values):.1f} s"


def stress(count: int, timeout: float, root_disk: bool) -> int:
    needed = ["vmlinux", "rootfs.ext4" if root_disk else "initrd.cpio.gz"]
    missing = [n for n in needed if not (IMAGES / n).is_file()]
    if missing:
        print(f"images/out lacks {', '.join(missing)}: run `make images`", file=sys.stderr)
        return 2
    where = "inside the KVM lab" if in_lab() else "on this host's KVM"
    what = "root disk (a fresh copy of rootfs.ext4 each time)" if root_disk else "initramfs"
    print(f"{count} boots of the default guest from its {what} {where}, --timeout {timeout:g} s each", flush=True)
    boots: list[Boot] = []
    with tempfile.TemporaryDirectory(prefix="pyvmm-stress-") as tmp:
        for n in range(1, count + 1):
            b = boot_once(n, Path(tmp), timeout, root_disk)
            boots.append(b)
            init = f"{b.to_init:.1f} s" if b.to_init is not None else "never"
            print(f"  boot {n:3}/{count}: {b.verdict:20} /init {init:>8}, end {b.seconds:6.1f} s, "
                  f"exit {b.status}", flush=True)
    print("\n| boot | result | to /init (s) | to end (s) | pyvmm exit |\n|---|---|---|---|---|")
    for b in boots:
        init = f"{b.to_init:.1f}" if b.to_init is not None else "-"
        print(f"| {b.n} | {b.verdict} | {init} | {b.seconds:.1f} | {b.status} |")
    reached = [b for b in boots if b.to_init is not None]
    good = [b for b in boots if b.good]
    print(f"\nreached /init: {len(reached)} of {count}; ran /init to the end and exited 0: {len(good)} of {count}")
    print(f"to /init: {_spread([b.to_init for b in reached if b.to_init is not None])}")
    print(f"to end (good boots): {_spread([b.seconds for b in good])}")
    for b in boots:
        if not b.good:
            print(f"\n--- boot {b.n}: {b.verdict} after {b.seconds:.1f} s; pyvmm stderr (last {STDERR_TAIL} "
                  f"lines) ---\n{_tail(b.stderr, STDERR_TAIL)}\n--- boot {b.n}: console (last {CONSOLE_TAIL} "
                  f"lines) ---\n{_tail(b.console, CONSOLE_TAIL)}")
    return 0 if len(good) == count else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--count", type=int, default=50, help="boots, one after the other (default: 50)")
    parser.add_argument("--timeout", type=float, default=vm_timeout(BOOT_S),
                        help="pyvmm --timeout of each boot, seconds (default: %(default)g, the lab tests' bound "
                             "for one boot)")
    parser.add_argument("--root-disk", action="store_true",
                        help="boot with rootfs.ext4 as the root on virtio-blk instead of the initramfs")
    args = parser.parse_args()
    if args.count < 1:
        parser.error("-n must be at least 1")
    if in_lab() or not hostkvm.detect().software:
        return stress(args.count, args.timeout, args.root_disk)
    reason = unavailable_reason()
    if reason:
        print(f"this host's KVM cannot run guest user space, and the KVM lab cannot start: {reason}",
              file=sys.stderr)
        return 2
    # One lab for every boot: its start-up, then each boot's whole bound, then the report.
    lab_timeout = LAB_START_S + args.count * (args.timeout + VM_GRACE_S) + 60
    print(f"host KVM is software (kvm_pvm): {args.count} boots inside one run of the KVM lab "
          f"(lab timeout {lab_timeout:g} s)", file=sys.stderr, flush=True)
    command = [sys.executable, str(Path(__file__).resolve()), "-n", str(args.count),
               "--timeout", f"{args.timeout:g}", *(["--root-disk"] if args.root_disk else [])]
    result = run(LabOptions(command=command, cwd=ROOT, timeout=lab_timeout))
    boot = f"{result.boot_s:.1f} s" if result.boot_s is not None else "?"
    print(f"\nlab: start {boot}, whole run {result.total_s:.1f} s, exit status {result.status} {result.reason}",
          file=sys.stderr)
    return result.status


if __name__ == "__main__":
    sys.exit(main())
