"""The arm64 guest (images/arm64.py ``guest``): its kernel, cross-built here, and its user space.

- arm64-kernel: linux-source-6.1 + images/guest-arm64.config, cross-built (ARCH=arm64
  CROSS_COMPILE=aarch64-linux-gnu-) with images/imagelib's kernel recipe; the uncompressed
  arch/arm64/boot/Image (its header magic checked) and the final .config.  About 5 minutes on 2 cores.
- arm64-userspace: the x86 guest's user space (images/build.py: a busybox tree with images/init.sh as
  /init; a 64 MiB ext4 with /etc/pyvmm-hello, byte-reproducible) with Debian's arm64 busybox-static.  It
  cannot run here to list its applets (no binfmt): the names are read from the binary's applet_names table
  and placed where the host's busybox (same Debian version line) puts them.  A few seconds.

Two cache entries, so that a busybox update does not rebuild the kernel.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from imagelib import kernel, tree
from imagelib.cache import BuildError, Target, code_inputs, dpkg_version, log
from imagelib.debian import Deb, DebianApt, deb_member
from imagelib.elf import EM_AARCH64, elf_machine
from imagelib.tree import CONSOLE_NODES, E2FSPROGS_PKG, HELLO_TEXT, Entry

IMAGES = Path(__file__).resolve().parent
OUT_SUB = "arm64"  # images/out/arm64/
GUEST_FRAGMENT = IMAGES / "guest-arm64.config"
GUEST_INIT = IMAGES / "init.sh"  # the x86 guest's, unchanged
CROSS_COMPILE = "aarch64-linux-gnu-"
CROSS_PKGS = ("gcc-aarch64-linux-gnu", "binutils-aarch64-linux-gnu")
HOST_BUSYBOX = Path("/bin/busybox")  # only its applet -> directory layout is used
HOST_BUSYBOX_PKG = "busybox-static"
BUSYBOX_DEB = "busybox-static"

APT = DebianApt("arm64")


@functools.cache
def busybox_deb() -> Deb:
    (deb,) = APT.resolve([BUSYBOX_DEB])
    return deb


def arm64_busybox() -> bytes:
    deb = busybox_deb()
    data = deb_member(APT.fetch([deb])[deb.name], "./bin/busybox")
    if elf_machine(data) != EM_AARCH64:
        raise BuildError(f"{deb.local_name}: ./bin/busybox is not an aarch64 ELF file")
    return data


def arm64_tree(busybox: bytes, init: bytes, extra: Sequence[Entry]) -> list[Entry]:
    """The guest tree around the arm64 busybox, its applets laid out as the host's busybox lays them out."""
    return tree.busybox_tree(busybox, tree.layout_like(tree.binary_applets(busybox), HOST_BUSYBOX), init, extra)


# The code every tree built around the arm64 busybox depends on (for the cache keys).
TREE_CODE = (tree, arm64_busybox, arm64_tree)


def cross_versions() -> dict[str, bytes]:
    if shutil.which(CROSS_COMPILE + "gcc") is None:
        raise BuildError(f"{CROSS_COMPILE}gcc is missing (apt-get install {' '.join(CROSS_PKGS)})")
    return {f"dpkg:{p}": dpkg_version(p).encode() for p in CROSS_PKGS}


def build_kernel(dest: Path) -> None:
    env = {"ARCH": "arm64", "CROSS_COMPILE": CROSS_COMPILE}
    # HZ_100 and NO_HZ_IDLE change choice defaults: expected.
    with kernel.built_tree("arm64-kernel", dest, GUEST_FRAGMENT, ["Image"], env=env,
                           expected_warnings=["changes choice state"]) as src:
        image = src / "arch/arm64/boot/Image"
        if image.read_bytes()[0x38:0x3C] != b"ARM\x64":
            raise BuildError(f"{image} has no arm64 Image header magic")
        shutil.copy2(image, dest / "Image")
        shutil.copy2(src / ".config", dest / "config")


def kernel_inputs() -> dict[str, bytes]:
    return {**code_inputs(kernel, build_kernel), **kernel.source_inputs(GUEST_FRAGMENT), **cross_versions()}


def build_userspace(dest: Path) -> None:
    name = "arm64-userspace"
    busybox = arm64_busybox()
    init = GUEST_INIT.read_bytes()
    log(name, f"busybox tree from {busybox_deb().local_name}")
    entries = arm64_tree(busybox, init, CONSOLE_NODES)
    size = tree.write_initrd(dest / "initrd.cpio.gz", entries)
    log(name, f"initrd: {len(entries)} entries, {size} bytes of cpio")
    entries = arm64_tree(busybox, init, [Entry("etc/pyvmm-hello", "file", 0o644, HELLO_TEXT.encode())])
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        tree.make_ext4(dest / "rootfs.ext4", entries, Path(tmp), name)
    log(name, f"rootfs: {len(entries)} entries, fsck clean")


def userspace_inputs() -> dict[str, bytes]:
    return {
        **code_inputs(*TREE_CODE, build_userspace),
        "init.sh": GUEST_INIT.read_bytes(),
        **dict([busybox_deb().key()]),
        f"dpkg:{HOST_BUSYBOX_PKG}": dpkg_version(HOST_BUSYBOX_PKG).encode(),
        f"dpkg:{E2FSPROGS_PKG}": dpkg_version(E2FSPROGS_PKG).encode(),
    }


def out(*names: str) -> dict[str, str]:
    return {n: f"{OUT_SUB}/{n}" for n in names}


KERNEL = Target("arm64-kernel", kernel_inputs, build_kernel, {"Image": f"{OUT_SUB}/Image", "config": f"{OUT_SUB}/config-arm64"})
USERSPACE = Target("arm64-userspace", userspace_inputs, build_userspace, out("initrd.cpio.gz", "rootfs.ext4"))
