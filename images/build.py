#!/usr/bin/env python3
"""Build pyvmm's default x86_64 guest from Debian packages only.

Usage: python3 images/build.py [--force] [kernel|initrd|rootfs|all]   (default: all)

Outputs (in images/out/):
  kernel: vmlinux, vmlinux.debug (with DWARF, for gdb), bzImage, config-x86_64
          (from linux-source-6.1 + guest-x86_64.config)
  initrd: initrd.cpio.gz                    (busybox-static + init.sh)
  rootfs: rootfs.ext4                       (64 MiB ext4, same busybox tree + /etc/pyvmm-hello)
and for each target a manifest <target>.inputs (JSON) naming the input hash.

Every target is built once into ${XDG_CACHE_HOME:-~/.cache}/pyvmm/<target>-<hash>/, where the hash covers
every input: the fragment or init script, the Debian versions of the sources and tools, and the code that
builds it (images/imagelib/: the library modules it uses and this script's build function for it).  When
that directory exists nothing is rebuilt, the files are only copied into images/out/.  --force rebuilds
anyway.

Standard library only (Python 3.11).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from imagelib import kernel, tree  # images/imagelib/, next to this script: sys.path[0]
from imagelib.cache import BuildError, Target, build_target, code_inputs, dpkg_version, log, run
from imagelib.elf import XEN_ELFNOTE_PHYS32_ENTRY, elf_notes
from imagelib.tree import CONSOLE_NODES, E2FSPROGS_PKG, HELLO_TEXT, Entry

IMAGES = Path(__file__).resolve().parent
OUT = IMAGES / "out"
FRAGMENT = IMAGES / "guest-x86_64.config"
INIT_SCRIPT = IMAGES / "init.sh"
BUSYBOX_PKG = "busybox-static"
BUSYBOX = Path("/bin/busybox")


def build_kernel(dest: Path) -> None:
    with kernel.built_tree("kernel", dest, FRAGMENT, ["vmlinux", "bzImage"],
                           expected_warnings=["changes choice state"]) as src:
        # vmlinux.debug keeps the DWARF sections for gdb; the image pyvmm boots keeps only what it loads and
        # the symbol table (the stop report names functions from it), a tenth of the size.
        shutil.copy2(src / "vmlinux", dest / "vmlinux.debug")
        run(["objcopy", "--strip-debug", src / "vmlinux", dest / "vmlinux"])
        shutil.copy2(src / "arch/x86/boot/bzImage", dest / "bzImage")
        shutil.copy2(src / ".config", dest / "config")
    wanted, _ = kernel.parse_fragment(FRAGMENT)
    if wanted.get("CONFIG_PVH") == "y":
        if not any(o == "Xen" and t == XEN_ELFNOTE_PHYS32_ENTRY for o, t, _ in elf_notes(dest / "vmlinux")):
            raise BuildError("CONFIG_PVH=y but vmlinux has no Xen PHYS32_ENTRY (PVH) ELF note")
        log("kernel", "vmlinux carries the Xen PHYS32_ENTRY (PVH) note")


def guest_tree(extra: Sequence[Entry]) -> list[Entry]:
    """The host's busybox-static with its applet links and images/init.sh as /init."""
    return tree.busybox_tree(BUSYBOX.read_bytes(), tree.host_applets(BUSYBOX), INIT_SCRIPT.read_bytes(), extra)


def build_initrd(dest: Path) -> None:
    log("initrd", f"busybox tree from {BUSYBOX} ({dpkg_version(BUSYBOX_PKG)})")
    entries = guest_tree(CONSOLE_NODES)
    size = tree.write_initrd(dest / "initrd.cpio.gz", entries)
    log("initrd", f"{len(entries)} entries, {size} bytes of cpio")


def build_rootfs(dest: Path) -> None:
    log("rootfs", f"busybox tree from {BUSYBOX} ({dpkg_version(BUSYBOX_PKG)})")
    entries = guest_tree([Entry("etc/pyvmm-hello", "file", 0o644, HELLO_TEXT.encode())])
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        tree.make_ext4(dest / "rootfs.ext4", entries, Path(tmp), "rootfs")
    log("rootfs", f"{len(entries)} entries, fsck clean")


def kernel_inputs() -> dict[str, bytes]:
    return {**code_inputs(kernel, build_kernel), **kernel.source_inputs(FRAGMENT)}


def initrd_inputs() -> dict[str, bytes]:
    return {
        **code_inputs(tree, guest_tree, build_initrd),
        "init.sh": INIT_SCRIPT.read_bytes(),
        f"dpkg:{BUSYBOX_PKG}": dpkg_version(BUSYBOX_PKG).encode(),
    }


def rootfs_inputs() -> dict[str, bytes]:
    return {
        **code_inputs(tree, guest_tree, build_rootfs),
        "init.sh": INIT_SCRIPT.read_bytes(),
        f"dpkg:{BUSYBOX_PKG}": dpkg_version(BUSYBOX_PKG).encode(),
        f"dpkg:{E2FSPROGS_PKG}": dpkg_version(E2FSPROGS_PKG).encode(),
    }


TARGETS: dict[str, Target] = {
    "kernel": Target(
        "kernel",
        kernel_inputs,
        build_kernel,
        {"vmlinux": "vmlinux", "vmlinux.debug": "vmlinux.debug", "bzImage": "bzImage", "config": "config-x86_64"},
    ),
    "initrd": Target("initrd", initrd_inputs, build_initrd, {"initrd.cpio.gz": "initrd.cpio.gz"}),
    "rootfs": Target("rootfs", rootfs_inputs, build_rootfs, {"rootfs.ext4": "rootfs.ext4"}),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached output exists")
    parser.add_argument("target", nargs="?", default="all", choices=[*TARGETS, "all"])
    args = parser.parse_args(argv)
    names = list(TARGETS) if args.target == "all" else [args.target]
    try:
        for name in names:
            build_target(TARGETS[name], args.force, OUT)
    except BuildError as exc:
        print(f"images/build.py: error: {exc}", file=sys.stderr)
        return 1
    log("all" if args.target == "all" else args.target, "done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
