#!/usr/bin/env python3
"""Run every benchmark, print their tables, write bench/out/*.json (``make bench``).

Order: host-side kernel load, exit round trips (tiny guest), virtio-blk device model vs its limit, and a
real boot of the default guest (boot phases + VMM memory overhead; a couple of minutes on a software
KVM).  ``--quick`` skips the boot.  Numbers are never asserted: each table compares side by side within
one run, because absolute numbers on a loaded machine mean little.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import blk  # noqa: E402
import boot  # noqa: E402
import exits  # noqa: E402
import loader  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the real boot (minutes on a software KVM)")
    ap.add_argument("--blk-seconds", default="0.4", help="virtio-blk: seconds per round and case")
    args = ap.parse_args()
    t0 = time.monotonic()
    summary: dict[str, object] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    steps: list[tuple[str, object]] = [
        ("loader", lambda: loader.main([])),
        ("exits", lambda: exits.main([])),
        ("blk", lambda: blk.main(["--seconds", args.blk_seconds])),
    ]
    if not args.quick:
        steps.append(("boot", lambda: boot.main([])))
    for name, fn in steps:
        print(f"\n=== {name} ===", flush=True)
        t = time.monotonic()
        try:
            summary[name] = fn()  # type: ignore[operator]
        except Exception as err:  # one failing bench must not hide the others' tables
            print(f"{name}: FAILED: {err}", flush=True)
            summary[name] = {"error": str(err)}
        print(f"({name}: {time.monotonic() - t:.1f} s)", flush=True)
    summary["total_s"] = time.monotonic() - t0
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nall benchmarks: {summary['total_s']:.0f} s; JSON in {out.relative_to(HERE.parent)}/")
    if any(isinstance(v, dict) and "error" in v for v in summary.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
