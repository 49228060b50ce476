"""Boot phases of one real boot of the default guest, and the VMM's memory overhead during it.

The VM runs in a child process (``python bench/boot.py --child``: ``build_vm`` + ``Vmm.run`` with the
console on its stdout).  The parent timestamps, on CLOCK_MONOTONIC (one clock for both processes):

* process start (just before it starts the child), VMM ready (``Vmm.first_run_at``: before the first
  KVM_RUN; the child reports it with ``Vmm.started_at`` and its own import time);
* kernel milestones from the console lines: banner (``Linux version``), root mounted (``VFS: Mounted
  root``), ``Run /init``; and the boot-timer marks (``pyvmm/devices/boottimer.py``) a guest that runs
  user space writes (``images/init.sh``: ``devmem 0xd0008000 8 1``; none on a software KVM, where guest
  user space cannot run);
* the end: the child's exit (power-off/reset; on a software KVM the init panic).

Memory: psutil samples the child every 0.25 s: RSS, and the RSS of the guest-RAM mapping (guest RAM
actually touched).  Overhead = max(RSS - guest RAM touched).  Usage: ``python bench/boot.py``.
"""

from __future__ import annotations

import time

T_IMPORT = time.monotonic()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import select  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyvmm.memory import is_guest_ram_vma  # noqa: E402

OUT = ROOT / "bench" / "out"
IMAGES = ROOT / "images" / "out"
MEMORY = 512 << 20
CMDLINE = "console=ttyS0 root=/dev/vda ro init=/init"
MILESTONES = (("kernel banner", b"Linux version"), ("root mounted", b"VFS: Mounted root"),
              ("/init started", b"Run /init as init process"), ("init user space (console)", b"PYVMM-INIT: start"))
SAMPLE_S = 0.25
PRINTK_TIME = re.compile(rb"\s*\[\s*(\d+\.\d+)\]")
RESULT_TAG = "BENCH-BOOT-RESULT "


def child(timeout: float) -> None:
    from pyvmm.builder import build_vm
    from pyvmm.config import DiskConfig, VmConfig

    config = VmConfig(kernel=IMAGES / "vmlinux", cmdline=CMDLINE, memory=MEMORY, console="none",
                      disks=(DiskConfig(IMAGES / "rootfs.ext4", readonly=True),), timeout=timeout)
    t_build = time.monotonic()
    vmm, _ = build_vm(config, console_fd=1)
    t_built = time.monotonic()
    result = vmm.run()
    assert vmm.boot_timer is not None
    marks = list(vmm.boot_timer.marks)
    out = {"import": T_IMPORT, "build_start": t_build, "built": t_built, "started_at": vmm.started_at,
           "first_run_at": vmm.first_run_at, "marks": marks, "status": int(result.status),
           "reason": result.reason, "exits": dict(result.exits), "end": time.monotonic(),
           "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    print(RESULT_TAG + json.dumps(out), file=sys.stderr, flush=True)


def guest_rss(proc: object) -> tuple[int, int]:
    """(RSS, RSS of the guest-RAM mapping) of a psutil.Process."""
    rss = proc.memory_info().rss  # type: ignore[attr-defined]
    guest = 0
    for m in proc.memory_maps(grouped=False):  # type: ignore[attr-defined]
        lo, hi = (int(x, 16) for x in m.addr.split("-"))
        if is_guest_ram_vma(hi - lo, MEMORY) and not m.path.startswith("/"):
            guest = max(guest, m.rss)
    return rss, guest


def measure(timeout: float) -> dict[str, object]:
    import psutil

    with tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, __file__, "--child", "--timeout", str(timeout)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        ps = psutil.Process(proc.pid)
        fd = proc.stdout.fileno()
        seen: dict[str, float] = {}
        printk: dict[str, float] = {}  # the kernel's own timestamp of the line ([ seconds ]), guest time
        buf = b""
        peak = peak_guest = overhead = 0
        samples = 0
        next_sample = 0.0
        while True:
            now = time.monotonic()
            if now >= next_sample:
                try:
                    rss, guest = guest_rss(ps)
                    peak, peak_guest = max(peak, rss), max(peak_guest, guest)
                    overhead = max(overhead, rss - guest)
                    samples += 1
                except (psutil.Error, OSError):
                    pass
                next_sample = now + SAMPLE_S
            ready, _, _ = select.select([fd], [], [], SAMPLE_S)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            stamp = time.monotonic()
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                for name, pattern in MILESTONES:
                    if name not in seen and pattern in line:
                        seen[name] = stamp
                        m = PRINTK_TIME.match(line)
                        if m:
                            printk[name] = float(m.group(1))
        proc.wait()
        t_end = time.monotonic()
        err.seek(0)
        text = err.read().decode(errors="replace")
    info = next((json.loads(line[len(RESULT_TAG):]) for line in text.splitlines() if line.startswith(RESULT_TAG)),
                None)
    if info is None:
        raise RuntimeError(f"boot child failed (status {proc.returncode}):\n{text[-2000:]}")
    phases: list[tuple[str, float]] = [("process start", t0), ("child python started", info["import"]),
                                       ("VM built (kernel loaded)", info["built"]),
                                       ("VMM ready (first KVM_RUN)", info["first_run_at"])]
    phases += [(f"{name} (console; printk {printk[name]:.1f} s)" if name in printk else f"{name} (console)",
                seen[name]) for name, _ in MILESTONES if name in seen]
    phases += [(f"boot-timer mark {v}", t) for t, v in info["marks"]]
    phases.append((f"VM ended: {info['reason']}", info["end"]))
    phases.append(("process exit", t_end))
    phases.sort(key=lambda p: p[1])
    return {"phases": [{"phase": n, "t_s": t - t0} for n, t in phases], "status": info["status"],
            "exits": info["exits"], "memory": {
                "guest_ram_mib": MEMORY >> 20, "peak_rss_mib": peak / 2**20,
                "guest_touched_peak_mib": peak_guest / 2**20, "overhead_peak_mib": overhead / 2**20,
                "ru_maxrss_mib": info["ru_maxrss_kib"] / 1024, "samples": samples}}


def table(res: dict[str, object]) -> str:
    lines = [f"{'milestone':58} {'t (s)':>8} {'delta':>8}", "-" * 76]
    prev = 0.0
    for p in res["phases"]:  # type: ignore[attr-defined]
        lines.append(f"{p['phase'][:58]:58} {p['t_s']:>8.3f} {p['t_s'] - prev:>8.3f}")
        prev = p["t_s"]
    m = res["memory"]
    assert isinstance(m, dict)
    lines.append(f"memory: peak RSS {m['peak_rss_mib']:.1f} MiB (ru_maxrss {m['ru_maxrss_mib']:.1f}), guest RAM "
                 f"touched {m['guest_touched_peak_mib']:.1f} of {m['guest_ram_mib']} MiB, VMM overhead "
                 f"(RSS - guest touched, max) {m['overhead_peak_mib']:.1f} MiB; {m['samples']} samples")
    exits = res["exits"]
    assert isinstance(exits, dict)
    lines.append("exits: " + ", ".join(f"{k} {v}" for k, v in sorted(exits.items())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object] | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=420.0, help="stop the guest after this long (s)")
    args = ap.parse_args(argv)
    if args.child:
        child(args.timeout)
        return None
    res = measure(args.timeout)
    print("boot phases of the default guest (vmlinux + rootfs.ext4 on virtio-blk, 512 MiB), one boot")
    print(table(res))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "boot.json").write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
