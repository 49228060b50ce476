#!/usr/bin/env python3
"""Build the KVM lab kernel (pyvmm/lab/) from Debian's linux-source-6.1.

Usage: python3 images/lab.py [--force]

Output (in images/out/): lab-bzImage, config-lab-x86_64 and the manifest lab.inputs, from
linux-source-6.1 + images/lab-x86_64.config (the guest fragment plus KVM/KVM_AMD, 9p over virtio-mmio,
overlayfs, ...).  The kernel recipe and the cache are images/imagelib's, as for images/build.py (a separate
cache entry, ${XDG_CACHE_HOME:-~/.cache}/pyvmm/lab-<hash>/; the hash covers the fragment, the
linux-source-6.1 version and the code that builds it): built once (about 6 minutes on 2 cores), then only
copied.

Standard library only (Python 3.11).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from imagelib import kernel  # images/imagelib/, next to this script: sys.path[0]
from imagelib.cache import BuildError, Target, build_target, code_inputs, log

IMAGES = Path(__file__).resolve().parent
OUT = IMAGES / "out"
LAB_FRAGMENT = IMAGES / "lab-x86_64.config"
NAME = "lab"


def build_lab_kernel(dest: Path) -> None:
    with kernel.built_tree(NAME, dest, LAB_FRAGMENT, ["bzImage"], expected_warnings=["changes choice state"]) as src:
        shutil.copy2(src / "arch/x86/boot/bzImage", dest / "bzImage")
        shutil.copy2(src / ".config", dest / "config")


def lab_inputs() -> dict[str, bytes]:
    return {**code_inputs(kernel, build_lab_kernel), **kernel.source_inputs(LAB_FRAGMENT)}


TARGET = Target(NAME, lab_inputs, build_lab_kernel, {"bzImage": "lab-bzImage", "config": "config-lab-x86_64"})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached output exists")
    args = parser.parse_args(argv)
    try:
        build_target(TARGET, args.force, OUT)
    except BuildError as exc:
        print(f"images/lab.py: error: {exc}", file=sys.stderr)
        return 1
    log(NAME, "done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
