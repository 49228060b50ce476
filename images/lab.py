#!/usr/bin/env python3
"""Build the KVM lab kernel (pyvmm/lab/) from Debian's linux-source-6.1.

Usage: python3 images/lab.py [--force]

Output (in images/out/): lab-bzImage, config-lab-x86_64 and the manifest lab.inputs, from
linux-source-6.1 + images/lab-x86_64.config (the guest fragment plus KVM/KVM_AMD, 9p over virtio-mmio,
overlayfs, ...).  Same machinery and cache as images/build.py (a separate cache entry,
${XDG_CACHE_HOME:-~/.cache}/pyvmm/lab-<hash>/; the hash covers build.py, this file, the fragment and the
linux-source-6.1 version): built once (about 6 minutes on 2 cores), then only copied.

This is a separate script rather than a target inside build.py on purpose: build.py's own bytes are part
of every cache key there, so adding a target to it would rebuild the default guest kernel too.

Standard library only (Python 3.11).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import build  # images/build.py, next to this file
from build import (
    KERNEL_SOURCE_PKG,
    KERNEL_TARBALL,
    BuildError,
    Target,
    build_target,
    check_config,
    common_inputs,
    dpkg_version,
    log,
    make_with_progress,
    repro_env,
    run,
)

LAB_FRAGMENT = build.IMAGES / "lab-x86_64.config"
NAME = "lab"


def lab_inputs() -> dict[str, bytes]:
    return {
        **common_inputs(),
        "lab.py": Path(__file__).read_bytes(),
        "lab-x86_64.config": LAB_FRAGMENT.read_bytes(),
        f"dpkg:{KERNEL_SOURCE_PKG}": dpkg_version(KERNEL_SOURCE_PKG).encode(),
    }


def build_lab_kernel(dest: Path) -> None:
    env = repro_env()
    src = dest / "build"
    src.mkdir()
    log(NAME, f"extracting {KERNEL_TARBALL} ({dpkg_version(KERNEL_SOURCE_PKG)})")
    run(["tar", "-xJf", KERNEL_TARBALL, "-C", src, "--strip-components=1"])
    log(NAME, "make tinyconfig")
    run(["make", "tinyconfig"], cwd=src, env=env)
    log(NAME, f"merge_config.sh -m .config {LAB_FRAGMENT.name}")
    merge_out = run(["scripts/kconfig/merge_config.sh", "-m", ".config", LAB_FRAGMENT], cwd=src, env=env)
    for line in merge_out.splitlines():
        if "warning" in line.lower() and not line.startswith(("Value of", "Previous value", "New value")):
            print(f"    | {line}", flush=True)
    log(NAME, "make olddefconfig")
    run(["make", "olddefconfig"], cwd=src, env=env)
    check_config(src / ".config", LAB_FRAGMENT)
    log(NAME, "all fragment options survived olddefconfig")
    make_with_progress(NAME, [f"-j{os.cpu_count() or 1}", "bzImage"], src, env)
    shutil.copy2(src / "arch/x86/boot/bzImage", dest / "bzImage")
    shutil.copy2(src / ".config", dest / "config")
    log(NAME, "removing the build tree")
    shutil.rmtree(src)


TARGET = Target(NAME, lab_inputs, build_lab_kernel, {"bzImage": "lab-bzImage", "config": "config-lab-x86_64"})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached output exists")
    args = parser.parse_args(argv)
    try:
        build_target(TARGET, args.force)
    except BuildError as exc:
        print(f"images/lab.py: error: {exc}", file=sys.stderr)
        return 1
    log(NAME, "done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
