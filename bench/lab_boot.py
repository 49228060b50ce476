#!/usr/bin/env python3
"""Boot time, pyvmm side by side with QEMU-KVM (-M microvm), on a KVM that runs guest user space.

For each configuration (the default guest's kernel with its initramfs, and with its ext4 root disk on
virtio-blk) and each VMM, the same kernel, initrd and disk are booted REPS times; measured from process
start to the guest's ``PYVMM-INIT: start`` line on the console, and to the process exit (the guest's
``reboot -f``: pyvmm ends on the i8042 reset, QEMU with ``reboot=t`` + ``-no-reboot`` on the triple fault;
microvm without ACPI cannot power off).  Run i of every VMM is made back to back with run i of the others
(interleaved), so that noise on a busy machine hits them alike; the ratios of the medians are what to
read.  pyvmm runs as a user runs it (the plain vCPU loop, not the counting one of ``--stats``); its
closing line gives its exits per boot.  Prints a table and one line
``ratio pyvmm/QEMU <configuration>: <ratio>`` per configuration; not a pass/fail test.

On a software-KVM host (hosts.md) it re-runs itself inside the KVM lab (``pyvmm.lab``): ``make
bench-lab``.  Usage: ``python bench/lab_boot.py [--reps N]``.
"""

from __future__ import annotations

import argparse
import os
import re
import select
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

IMAGES = ROOT / "images" / "out"
MARK = b"PYVMM-INIT: start"
BOOT_TIMEOUT_S = 300.0
# acpi=off: QEMU's microvm runs here without ACPI (acpi=off), so the guest runs without it under pyvmm too
# and both boot the same work; the default guest has ACPI for pyvmm's pvpanic device (docs/acpi.md).
BASE_CMDLINE = "console=ttyS0 panic=-1 8250.nr_uarts=1 pci=off acpi=off"
CONFIGS = ("initrd", "root disk")
QEMU_NAME = "QEMU-KVM microvm"


@dataclass
class Sample:
    to_init: float | None
    to_end: float
    status: int
    exits: int | None = None  # pyvmm's exits to the VMM in the boot (its closing line's "exits: ...")


# pyvmm's closing line: "... (exit status 0); exits: intr 1, io 9713, mmio 1; peak RSS ..."
EXITS_LINE = re.compile(rb"\(exit status \d+\); exits: ([^;]*);")


def measure(cmd: list[str]) -> Sample:
    with tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        to_init = _watch(proc, t0)
        status = proc.wait()
        end = time.monotonic() - t0
        err.seek(0)
        m = EXITS_LINE.search(err.read())
    return Sample(to_init, end, status, _guest_exits(m.group(1)) if m else None)


def _guest_exits(text: bytes) -> int:
    """The guest's exits in "intr 1, io 9713, mmio 1" (an intr is pyvmm kicking its own vCPU)."""
    kinds = (item.split() for item in text.decode().split(","))
    return sum(int(n) for kind, n in kinds if kind != "intr")


def _watch(proc: subprocess.Popen[bytes], t0: float) -> float | None:
    """Read the console until it closes (or the bound passes); when the /init marker appeared."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    to_init = None
    while True:
        left = t0 + BOOT_TIMEOUT_S - time.monotonic()
        if left <= 0:
            proc.kill()
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        data = os.read(fd, 65536)
        if not data:
            break
        if to_init is None:
            seen = seen[-64:] + data
            if MARK in seen:
                to_init = time.monotonic() - t0
    return to_init


EXIT_ITERATIONS = 5000  # per phase of bench/exits.py; exits cost hundreds of microseconds in the lab


def exit_costs() -> str:
    """What one exit costs here, from bench/exits.py's tiny guest (run in this process: inside the lab the
    project tree is read-only, so its JSON output is skipped)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import exits  # bench/exits.py

    return ("\nexit round trips here (bench/exits.py, tiny guest firmware/exitloop.S, minus the empty loop)\n"
            + exits.table(exits.measure(EXIT_ITERATIONS)))


def import_summary(top: int = 6) -> str:
    """What `pyvmm run` imports before it builds a VM, from ``python -X importtime``: the total and the
    modules with the largest own cost (start-up is part of command-to-guest time)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import pyvmm.cli, pyvmm.runner, pyvmm.builder"],
                          capture_output=True, text=True, check=False)
    rows = []
    for line in proc.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[0].strip().isdigit():
            rows.append((int(parts[0]), parts[2].strip()))
    total = sum(us for us, _ in rows) / 1000
    largest = ", ".join(f"{name} {us / 1000:.1f}" for us, name in sorted(rows, reverse=True)[:top])
    return f"\npyvmm start-up imports (python -X importtime): {len(rows)} modules, {total:.0f} ms; largest (ms): {largest}"


def pyvmm_entry() -> list[str]:
    """How a user starts pyvmm: the ``pyvmm`` command its installation made (the README's
    ``.venv/bin/pyvmm``), next to this interpreter; ``python -m pyvmm`` where there is none."""
    script = Path(sys.executable).with_name("pyvmm")
    return [str(script)] if os.access(script, os.X_OK) else [sys.executable, "-m", "pyvmm"]


def pyvmm_cmd(initrd: Path | None, disk: Path | None) -> list[str]:
    cmd = [*pyvmm_entry(), "run", "--console", "stdio", "--memory", "256M", "--kernel", str(IMAGES / "vmlinux")]
    if initrd:
        return [*cmd, "--initrd", str(initrd), "--cmdline", f"{BASE_CMDLINE} reboot=k"]
    return [*cmd, "--disk", f"path={disk}", "--cmdline", f"{BASE_CMDLINE} reboot=k root=/dev/vda rw init=/init"]


def qemu_cmd(initrd: Path | None, disk: Path | None) -> list[str]:
    cmd = ["qemu-system-x86_64", "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host", "-smp", "1",
           "-m", "256M", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
           "-serial", "stdio", "-kernel", str(IMAGES / "vmlinux")]
    if initrd:
        return [*cmd, "-initrd", str(initrd), "-append", f"{BASE_CMDLINE} reboot=t"]
    return [*cmd, "-drive", f"id=vda,file={disk},format=raw,if=none", "-device", "virtio-blk-device,drive=vda",
            "-append", f"{BASE_CMDLINE} reboot=t root=/dev/vda rw init=/init"]


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):6.2f} ({min(values):.2f}-{max(values):.2f})"


def bench(reps: int) -> int:
    missing = [n for n in ("vmlinux", "initrd.cpio.gz", "rootfs.ext4") if not (IMAGES / n).is_file()]
    if missing:
        print(f"images/out lacks {', '.join(missing)}: run `make images`", file=sys.stderr)
        return 2
    vmms = {"pyvmm": pyvmm_cmd}
    if shutil.which("qemu-system-x86_64"):
        vmms[QEMU_NAME] = qemu_cmd
    else:
        print("qemu-system-x86_64 is not installed: pyvmm only", file=sys.stderr)
    samples: dict[tuple[str, str], list[Sample]] = {(n, c): [] for c in CONFIGS for n in vmms}
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-") as tmp:
        for config in CONFIGS:
            for i in range(reps):
                for name, make in vmms.items():  # run i of each VMM back to back
                    disk = Path(tmp) / "rootfs.ext4"
                    shutil.copyfile(IMAGES / "rootfs.ext4", disk)
                    initrd = IMAGES / "initrd.cpio.gz" if config == "initrd" else None
                    s = measure(make(initrd, None if initrd else disk))
                    print(f"  {name:18} {config:10} run {i + 1}: /init {s.to_init if s.to_init is None else round(s.to_init, 2)} s, "
                          f"end {s.to_end:.2f} s, exit {s.status}"
                          + (f", {s.exits} exits" if s.exits is not None else ""), file=sys.stderr, flush=True)
                    samples[(name, config)].append(s)
    where = "inside the KVM lab (QEMU TCG, nested SVM KVM)" if in_lab() else "on this host's KVM"
    print(f"\nBoot time {where}, {reps} run(s) each, interleaved: median (min-max) seconds from process start\n")
    print("| VMM | boot | to /init marker | to guest end | exits to the VMM | exit status |")
    print("|---|---|---|---|---|---|")
    for (name, config), ss in samples.items():
        inits = [s.to_init for s in ss if s.to_init is not None]
        statuses = ",".join(sorted({str(s.status) for s in ss}))
        missed = f" ({len(ss) - len(inits)} never)" if len(inits) < len(ss) else ""
        exits = [s.exits for s in ss if s.exits is not None]
        exit_text = f"{statistics.median(exits):.0f}" if exits else "-"
        print(f"| {name} | {config} | {fmt(inits)}{missed} | {fmt([s.to_end for s in ss])} | {exit_text} | {statuses} |")
    print()
    for config in CONFIGS:
        mine = [s.to_init for s in samples.get(("pyvmm", config), []) if s.to_init is not None]
        theirs = [s.to_init for s in samples.get((QEMU_NAME, config), []) if s.to_init is not None]
        if mine and theirs:
            print(f"ratio pyvmm/QEMU {config}: {statistics.median(mine) / statistics.median(theirs):.2f}")
    print(import_summary())
    print(exit_costs())
    print("\nkernel images/out/vmlinux (ELF; pyvmm loads it, QEMU boots its PVH entry), initrd "
          "images/out/initrd.cpio.gz, disk: a fresh copy of images/out/rootfs.ext4 per run; command line "
          f"{BASE_CMDLINE!r} (acpi=off: neither VMM gives the guest ACPI)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="boots per VMM and configuration (default: 5)")
    args = parser.parse_args()
    if in_lab() or not hostkvm.detect().software:
        return bench(args.reps)
    reason = unavailable_reason()
    if reason:
        print(f"this host's KVM cannot run guest user space, and the KVM lab cannot start: {reason}",
              file=sys.stderr)
        return 2
    print("host KVM is software (kvm_pvm): running the benchmark inside the KVM lab", file=sys.stderr)
    result = run(LabOptions(command=[sys.executable, str(Path(__file__).resolve()), "--reps", str(args.reps)],
                            cwd=ROOT, timeout=1800))
    boot = f"{result.boot_s:.1f} s" if result.boot_s is not None else "?"
    print(f"\nlab: start {boot}, whole run {result.total_s:.1f} s, exit status {result.status} {result.reason}")
    return result.status


if __name__ == "__main__":
    sys.exit(main())
