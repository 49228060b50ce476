"""Host-side kernel load time: ELF ``vmlinux`` vs ``bzImage`` (decompressed on the host), no KVM needed.

``pyvmm.arch.x86_64.kernel.load_kernel`` into a fresh ``GuestMemory`` (the same size as the default guest), REPS
times each, alternating, median and best.  ``bzImage --boot guest`` (load only, the decompressor runs in
the guest) is listed for reference: that decompression then costs guest time, which on a software KVM is
tens of seconds (see docs/hosts.md).  Usage: ``python bench/loader.py [--reps N]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyvmm.arch.x86_64 import layout  # noqa: E402
from pyvmm.arch.x86_64.kernel import load_kernel  # noqa: E402
from pyvmm.memory import GuestMemory  # noqa: E402

OUT = ROOT / "bench" / "out"
IMAGES = ROOT / "images" / "out"
MEMORY = 512 << 20
CASES = (("vmlinux (ELF)", "vmlinux", "elf"), ("bzImage, host decompression", "bzImage", "elf"),
         ("bzImage, guest decompression (load only)", "bzImage", "guest"))


def measure(reps: int) -> list[dict[str, object]]:
    samples: dict[str, list[float]] = {name: [] for name, _, _ in CASES}
    sizes: dict[str, int] = {}
    for _ in range(reps):
        for name, file, boot in CASES:
            path = IMAGES / file
            if not path.exists():
                continue
            sizes[name] = path.stat().st_size
            mem = GuestMemory(layout.ram_layout(MEMORY))
            try:
                t0 = time.perf_counter()
                load_kernel(mem, path, boot=boot)  # type: ignore[arg-type]
                samples[name].append(time.perf_counter() - t0)
            finally:
                mem.close()
    return [{"case": name, "file_bytes": sizes[name], "median_ms": statistics.median(s) * 1e3,
             "best_ms": min(s) * 1e3} for name, s in samples.items() if s]


def table(rows: list[dict[str, object]]) -> str:
    head = f"{'kernel':42} {'file MiB':>9} {'median ms':>10} {'best ms':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['case']!s:42} {int(r['file_bytes']) / 2**20:>9.1f} {r['median_ms']:>10.1f} "  # type: ignore[call-overload]
                     f"{r['best_ms']:>9.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    rows = measure(args.reps)
    print("host-side kernel load (pyvmm.arch.x86_64.kernel.load_kernel into guest memory)")
    print(table(rows) if rows else "no kernel in images/out (make images)")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "loader.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
