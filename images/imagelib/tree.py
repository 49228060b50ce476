"""A busybox guest tree, and it as a newc cpio archive (an initramfs) or a reproducible ext4 image.

Every file has a fixed owner (0:0), mode and time (:data:`imagelib.repro.EPOCH`), so the outputs are the
same bytes for any builder.
"""

from __future__ import annotations

import gzip
import os
import re
import stat
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from imagelib.cache import BuildError, dpkg_version, log, run
from imagelib.repro import EPOCH, repro_env

E2FSPROGS_PKG = "e2fsprogs"
ROOTFS_UUID = "6d1e5c0a-7f3b-4c1e-9a55-70797666d6d6"
ROOTFS_HASH_SEED = "0b6f3f0e-3c1a-4e0d-8f0e-70797666d6d6"
ROOTFS_SIZE = "64M"
ROOTFS_LABEL = "pyvmm-root"
HELLO_TEXT = "hello from the pyvmm root disk\n"  # the default guests' root disk: /etc/pyvmm-hello
GUEST_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "mnt", "root", "run", "etc")


@dataclass(frozen=True)
class Entry:
    """One file of the guest tree; paths are relative, without a leading slash."""

    path: str
    kind: str  # "dir", "file", "symlink", "chr"
    mode: int  # permission bits
    data: bytes = b""  # file contents or symlink target
    rdev: tuple[int, int] = (0, 0)


# The two device nodes an initramfs needs before devtmpfs is mounted (a root disk has none: with root=
# the kernel mounts devtmpfs on /dev itself, and the build needs no mknod).
CONSOLE_NODES = (Entry("dev/console", "chr", 0o600, rdev=(5, 1)), Entry("dev/null", "chr", 0o666, rdev=(1, 3)))


def host_applets(busybox: Path) -> list[str]:
    """Where the host's busybox puts its applets (``busybox --list-full``), as relative paths."""
    return [a.strip("/") for a in run([busybox, "--list-full"]).split() if a.strip("/")]


def binary_applets(binary: bytes) -> list[str]:
    """The applet names of a busybox binary that cannot run here, from its sorted applet_names table
    ("[\\0[[\\0acpid\\0...")."""
    start = binary.find(b"\0[\0[[\0")
    if start < 0:
        raise BuildError("busybox: applet_names table not found")
    names: list[str] = []
    pos = start + 1
    while True:
        end = binary.index(b"\0", pos)
        name = binary[pos:end].decode("ascii", errors="replace")
        if not re.fullmatch(r"[][a-z0-9_.-]+", name) or (names and name <= names[-1]):
            break
        names.append(name)
        pos = end + 1
    if len(names) < 50:
        raise BuildError(f"busybox: only {len(names)} applet names found")
    return names


def layout_like(names: Sequence[str], host_busybox: Path) -> list[str]:
    """Install paths for the applets ``names``, as the host's busybox (same Debian version line) places
    them; one it does not know goes to bin/."""
    host = {Path(p).name: p for p in host_applets(host_busybox)}
    extra = sorted(set(names) - set(host))
    if extra:
        log("busybox", f"applets unknown to the host's busybox, put in /bin: {' '.join(extra)}")
    return [host.get(name, f"bin/{name}") for name in names]


def busybox_tree(busybox: bytes, applets: Iterable[str], init: bytes, extra: Iterable[Entry] = ()) -> list[Entry]:
    """The guest tree: the usual directories, busybox with a link per applet path, /init, and ``extra``."""
    entries: dict[str, Entry] = {}

    def add(e: Entry) -> None:
        parts = e.path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            entries.setdefault(parent, Entry(parent, "dir", 0o755))
        entries[e.path] = e

    for d in GUEST_DIRS:
        add(Entry(d, "dir", 0o1777 if d == "tmp" else (0o700 if d == "root" else 0o755)))
    add(Entry("bin/busybox", "file", 0o755, busybox))
    for applet in applets:
        if applet and applet != "bin/busybox":
            add(Entry(applet, "symlink", 0o777, b"/bin/busybox"))
    add(Entry("init", "file", 0o755, init))
    for e in extra:
        add(e)
    return [entries[k] for k in sorted(entries)]


def newc_archive(entries: Sequence[Entry]) -> bytes:
    """A cpio 'newc' archive with fixed owners, inode numbers and mtimes (like gen_init_cpio)."""
    out = bytearray()

    def record(name: str, mode: int, data: bytes, ino: int, nlink: int, rdev: tuple[int, int]) -> None:
        namez = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}"
            for v in (ino, mode, 0, 0, nlink, EPOCH, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0)
        )
        out.extend(hdr.encode() + namez)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    kinds = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK, "chr": stat.S_IFCHR}
    for ino, e in enumerate(entries, start=721):
        data = b"" if e.kind in ("dir", "chr") else e.data
        record(e.path, kinds[e.kind] | e.mode, data, ino, 2 if e.kind == "dir" else 1, e.rdev)
    record("TRAILER!!!", 0, b"", 0, 1, (0, 0))
    return bytes(out)


def write_initrd(path: Path, entries: Sequence[Entry]) -> int:
    """The tree as a gzip-compressed newc archive (no name or time in the gzip header); its cpio size."""
    archive = newc_archive(entries)
    path.write_bytes(gzip.compress(archive, compresslevel=9, mtime=0))
    return len(archive)


def make_ext4(image: Path, entries: Sequence[Entry], tmp: Path, target: str) -> None:
    """The tree as a ROOTFS_SIZE ext4 image: staged under ``tmp``, ``mkfs.ext4 -d`` with a fixed UUID and
    hash seed, then every inode made root's with a fixed ctime (mkfs copies the staged files' owners and
    ctimes, and a ctime cannot be set on the host), then ``e2fsck -fn``."""
    stage = tmp / "root"
    stage.mkdir()
    for e in entries:
        p = stage / e.path
        if e.kind == "dir":
            p.mkdir(exist_ok=True)
        elif e.kind == "file":
            p.write_bytes(e.data)
        elif e.kind == "symlink":
            p.symlink_to(e.data.decode())
        else:
            raise BuildError(f"rootfs: unsupported entry kind {e.kind} for {e.path}")
    for e in reversed(entries):  # deepest first so directory mtimes are not touched again
        p = stage / e.path
        if e.kind != "symlink":
            p.chmod(e.mode)
        os.utime(p, (EPOCH, EPOCH), follow_symlinks=False)
    stage.chmod(0o755)
    os.utime(stage, (EPOCH, EPOCH))
    log(target, f"mkfs.ext4 {ROOTFS_SIZE} ({dpkg_version(E2FSPROGS_PKG)})")
    run(
        [
            "mkfs.ext4", "-q", "-F", "-L", ROOTFS_LABEL, "-U", ROOTFS_UUID,
            "-E", f"root_owner=0:0,hash_seed={ROOTFS_HASH_SEED}", "-d", stage, image, ROOTFS_SIZE,
        ],
        env=repro_env(),
    )  # fmt: skip
    script = tmp / "fixup.debugfs"
    script.write_text(
        "".join(
            f'set_inode_field "{p}" uid 0\nset_inode_field "{p}" gid 0\nset_inode_field "{p}" ctime @{EPOCH}\n'
            for p in ["/", "/lost+found", *(f"/{e.path}" for e in entries)]
        )
    )
    proc = subprocess.run(
        ["debugfs", "-w", "-f", str(script), str(image)], env=repro_env(), capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    if proc.returncode != 0 or "set_inode_field:" in proc.stderr:
        raise BuildError(f"debugfs fix-up failed:\n{proc.stdout}{proc.stderr}")
    run(["e2fsck", "-fn", image])
