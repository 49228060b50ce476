#!/usr/bin/env python3
"""Soak: pyvmm under long load, with its memory, fds and threads sampled (``make soak``).

1. Many VMs in one process: ``--vms N`` (default 200) tiny firmware VMs built, run and torn down one after
   another in this process; a sample after each (pyvmm.testing.soak.vm_loop).
2. One busy guest: the default guest with a root snapshot disk and a scratch vdb runs rounds of writes,
   flushes, reads and checks on both for ``--minutes M`` (default 10); pyvmm's RSS without the guest's
   RAM and its fds are sampled every 5 s (pyvmm.testing.soak.guest_soak).  On a host whose KVM cannot
   run guest user space (docs/hosts.md) this part runs inside the KVM lab.

Prints a table per part and a verdict: flat (fds and threads never above their level after warm-up,
RSS within a bound) and, for the guest, every round verified.  Exit status 0 when both hold.  The test
suite runs one-minute versions (tests/kvm/test_soak.py, tests/lab/test_soak.py).
Usage: python bench/soak.py [--minutes M] [--vms N] [--guest-only]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyvmm.arch.x86_64 import hostkvm  # noqa: E402
from pyvmm.lab import LabOptions, in_lab, run, unavailable_reason  # noqa: E402
from pyvmm.testing.soak import MiB, guest_soak, judge, table, vm_loop  # noqa: E402
from tests.lab.tier import LAB_START_S  # noqa: E402

IMAGES = ROOT / "images" / "out"
FIRMWARE = ROOT / "firmware" / "out" / "guestexit.elf"


def host_part(vms: int) -> bool:
    if not FIRMWARE.is_file():
        print(f"{FIRMWARE} missing: run `make firmware`", file=sys.stderr)
        return False
    samples = vm_loop(FIRMWARE, vms)
    verdict = judge(samples, warmup=5, rss_growth_max=8 * MiB, what=f"{vms} VMs in one process")
    print("\n".join(table(samples, max(1, vms // 20))))
    print("\n".join(verdict.lines), "->", "flat" if verdict.ok else "GROWS")
    return verdict.ok


def guest_part(minutes: float) -> bool:
    with tempfile.TemporaryDirectory(prefix="pyvmm-soak-") as tmp:
        result = guest_soak(IMAGES, Path(tmp), minutes * 60, interval=5.0)
    print("\n".join(table(result.samples, max(1, len(result.samples) // 30))))
    verdict = judge(result.samples, warmup=6, rss_growth_max=16 * MiB, what="pyvmm with a busy guest")
    ok = verdict.ok and result.status == 0 and result.bad == 0 and result.rounds > 0
    print("\n".join(verdict.lines), "->", "flat" if verdict.ok else "GROWS")
    print(f"guest: {result.rounds} rounds, {result.bad} failed verification; pyvmm exit status {result.status}")
    if not ok:
        print(result.stderr[-3000:], "\n".join(result.console.splitlines()[-20:]), sep="\n")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="how long the guest works (default: %(default)g)")
    p.add_argument("--vms", type=int, default=200, help="VMs in one process (default: %(default)d)")
    p.add_argument("--guest-only", action="store_true", help="only the busy guest (used inside the lab)")
    args = p.parse_args()
    ok = True
    if not args.guest_only:
        print(f"== {args.vms} VMs, one after another, in one process")
        ok = host_part(args.vms)
    print(f"\n== a guest doing mixed I/O on two disks for {args.minutes:g} min")
    if in_lab() or not hostkvm.detect().software:
        return 0 if guest_part(args.minutes) and ok else 1
    reason = unavailable_reason()
    if reason:
        print(f"this host's KVM cannot run guest user space, and the KVM lab cannot start: {reason}")
        return 1
    command = [sys.executable, "bench/soak.py", "--guest-only", "--minutes", f"{args.minutes:g}"]
    print(f"(inside the KVM lab: {shlex.join(command)})", flush=True)
    result = run(LabOptions(command=command, cwd=ROOT, timeout=LAB_START_S + args.minutes * 60 + 300))
    return 0 if result.status == 0 and ok else 1


if __name__ == "__main__":
    sys.exit(main())
