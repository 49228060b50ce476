#!/usr/bin/env python3
"""Build pyvmm's arm64 images: the arm64 guest, and the arm64 KVM lab it is tested in.

Usage: python3 images/arm64.py [--force] [guest|lab|all]   (default: all)

Outputs (in images/out/arm64/):
  guest: Image, config-arm64        the guest kernel: linux-source-6.1 + images/guest-arm64.config,
                                    cross-built (ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-), the
                                    uncompressed arch/arm64/boot/Image, and its final .config
         initrd.cpio.gz, rootfs.ext4  the x86 guest's user space with Debian's arm64 busybox-static
  lab:   lab/vmlinuz, lab/config, lab/initrd.cpio.gz, lab/root/, lab/packages.txt
                                    Debian's arm64 kernel, an initramfs and a Python root for the lab
and, as images/build.py does, a JSON manifest per cache entry: images/out/arm64-{kernel,userspace,lab}.inputs.
What each is and how it is made: images/arm64_guest.py (the guest) and images/arm64_lab.py (the lab).

Cache: images/imagelib's, as for images/build.py.  Three entries, so that a busybox or Debian kernel update
does not rebuild the guest kernel:
  arm64-kernel-<hash>     Image, config                  (`guest`: 5 minutes on 2 cores, measured 296 s:
                                                           extract 10 s, config 10 s, make -j2 256 s)
  arm64-userspace-<hash>  initrd.cpio.gz, rootfs.ext4    (`guest`: 3 s)
  arm64-lab-<hash>        lab/                           (`lab`: about a minute; 62 MB of downloads)
Each key covers that entry's real inputs: the fragment or init scripts, SOURCE_DATE_EPOCH, the Debian
versions of the host tools (linux-source-6.1, the cross compiler, busybox-static, e2fsprogs), for the
arm64 packages the exact version and sha256 of every .deb as resolved from the mirror's current indexes
(images/imagelib/debian.py: a private apt state, the host's dpkg untouched), and the code that builds it.
Checking the cache costs a few seconds (`apt-get update` and two dependency resolutions, for the key).
--force rebuilds anyway.

Standard library only (Python 3.11).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import arm64_lab  # images/arm64_lab.py, next to this script: sys.path[0]
from arm64_guest import KERNEL, USERSPACE
from imagelib.cache import BuildError, Target, build_target, log

OUT = Path(__file__).resolve().parent / "out"
TARGETS: dict[str, list[Target]] = {"guest": [KERNEL, USERSPACE], "lab": [arm64_lab.LAB]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached output exists")
    parser.add_argument("target", nargs="?", default="all", choices=[*TARGETS, "all"])
    args = parser.parse_args(argv)
    names = list(TARGETS) if args.target == "all" else [args.target]
    try:
        for name in names:
            for target in TARGETS[name]:
                start = time.monotonic()
                cached, digest = build_target(target, args.force, OUT)
                if target is arm64_lab.LAB:
                    arm64_lab.install_root(cached, digest, args.force, OUT / arm64_lab.OUT_SUB)
                log(target.name, f"done in {time.monotonic() - start:.1f}s")
    except BuildError as exc:
        print(f"images/arm64.py: error: {exc}", file=sys.stderr)
        return 1
    log("arm64", "done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
