#!/usr/bin/env python3
"""Build pyvmm's default x86_64 guest from Debian packages only.

Usage: python3 images/build.py [--force] [kernel|initrd|rootfs|all]   (default: all)

Outputs (in images/out/):
  kernel: vmlinux, vmlinux.debug (with DWARF, for gdb), bzImage, config-x86_64
          (from linux-source-6.1 + guest-x86_64.config)
  initrd: initrd.cpio.gz                    (busybox-static + init.sh)
  rootfs: rootfs.ext4                       (64 MiB ext4, same busybox tree + /etc/pyvmm-hello)
and for each target a manifest <target>.inputs (JSON) naming the input hash.

Every target is built once into ${XDG_CACHE_HOME:-~/.cache}/pyvmm/<target>-<hash>/, where the
hash covers every input (this script, the fragment or init script, Debian package versions of
the sources and tools); when that directory exists nothing is rebuilt, the files are only
copied into images/out/. --force rebuilds anyway.

Standard library only (Python 3.11).
"""

from __future__ import annotations

import argparse
import collections
import filecmp
import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

IMAGES = Path(__file__).resolve().parent
OUT = IMAGES / "out"
FRAGMENT = IMAGES / "guest-x86_64.config"
INIT_SCRIPT = IMAGES / "init.sh"

KERNEL_SOURCE_PKG = "linux-source-6.1"
KERNEL_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
BUSYBOX_PKG = "busybox-static"
BUSYBOX = Path("/bin/busybox")
E2FSPROGS_PKG = "e2fsprogs"

# Fixed values that make the outputs byte-reproducible.
EPOCH = int(os.environ.get("SOURCE_DATE_EPOCH", "1700000000"))
ROOTFS_UUID = "6d1e5c0a-7f3b-4c1e-9a55-70797666d6d6"
ROOTFS_HASH_SEED = "0b6f3f0e-3c1a-4e0d-8f0e-70797666d6d6"
ROOTFS_SIZE = "64M"
ROOTFS_LABEL = "pyvmm-root"
HELLO_TEXT = "hello from the pyvmm root disk\n"

PROGRESS_INTERVAL_S = 30.0

T0 = time.monotonic()


class BuildError(Exception):
    pass


def log(target: str, msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {target}: {msg}", flush=True)


def run(cmd: Sequence[str | Path], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a command, return its stdout; on failure raise with its output."""
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise BuildError(
            f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stdout}{proc.stderr}"
        )
    return proc.stdout


def dpkg_version(pkg: str) -> str:
    try:
        out = run(["dpkg-query", "-W", "-f=${Version}", pkg])
    except (BuildError, FileNotFoundError) as exc:
        raise BuildError(f"Debian package {pkg} is not installed (see images/requirements-apt.txt)") from exc
    if not out:
        raise BuildError(f"Debian package {pkg} is not installed (see images/requirements-apt.txt)")
    return out


def repro_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SOURCE_DATE_EPOCH=str(EPOCH),
        E2FSPROGS_FAKE_TIME=str(EPOCH),
        LC_ALL="C",
        TZ="UTC",
        KBUILD_BUILD_TIMESTAMP=time.strftime("%Y-%m-%d", time.gmtime(EPOCH)),
        KBUILD_BUILD_USER="pyvmm",
        KBUILD_BUILD_HOST="pyvmm",
        KBUILD_BUILD_VERSION="1",
    )
    return env


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    # name -> bytes or str whose digest goes into the cache key
    inputs: Callable[[], dict[str, bytes]]
    # builds into the given (empty) directory
    build: Callable[[Path], None]
    # file in cache dir -> file name in images/out/
    outputs: dict[str, str] = field(default_factory=dict)


def common_inputs() -> dict[str, bytes]:
    return {"build.py": Path(__file__).read_bytes(), "epoch": str(EPOCH).encode()}


def kernel_inputs() -> dict[str, bytes]:
    return {
        **common_inputs(),
        "guest-x86_64.config": FRAGMENT.read_bytes(),
        f"dpkg:{KERNEL_SOURCE_PKG}": dpkg_version(KERNEL_SOURCE_PKG).encode(),
    }


def initrd_inputs() -> dict[str, bytes]:
    return {
        **common_inputs(),
        "init.sh": INIT_SCRIPT.read_bytes(),
        f"dpkg:{BUSYBOX_PKG}": dpkg_version(BUSYBOX_PKG).encode(),
    }


def rootfs_inputs() -> dict[str, bytes]:
    return {
        **initrd_inputs(),
        f"dpkg:{E2FSPROGS_PKG}": dpkg_version(E2FSPROGS_PKG).encode(),
    }


def input_hash(inputs: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for key in sorted(inputs):
        h.update(key.encode() + b"\0" + hashlib.sha256(inputs[key]).hexdigest().encode() + b"\n")
    return h.hexdigest()[:16]


def describe_inputs(inputs: dict[str, bytes]) -> dict[str, str]:
    """Human-readable manifest entry: versions verbatim, files by sha256."""
    return {
        k: (
            v.decode() if k.startswith("dpkg:") or k == "epoch" else "sha256:" + hashlib.sha256(v).hexdigest()
        )
        for k, v in sorted(inputs.items())
    }


# --------------------------------------------------------------------------- kernel


def parse_fragment(path: Path) -> tuple[dict[str, str], set[str]]:
    """Return ({SYMBOL: value} for CONFIG_X=v lines, {SYMBOL} for '# CONFIG_X is not set')."""
    wanted: dict[str, str] = {}
    unset: set[str] = set()
    for line in path.read_text().splitlines():
        line = line.strip()
        if m := re.fullmatch(r"(CONFIG_\w+)=(.*)", line):
            wanted[m[1]] = m[2]
        elif m := re.fullmatch(r"# (CONFIG_\w+) is not set", line):
            unset.add(m[1])
    return wanted, unset


def check_config(config: Path, fragment: Path) -> None:
    """Fail loudly if an option of the fragment did not survive olddefconfig."""
    final: dict[str, str] = {}
    for line in config.read_text().splitlines():
        if m := re.fullmatch(r"(CONFIG_\w+)=(.*)", line):
            final[m[1]] = m[2]
    wanted, unset = parse_fragment(fragment)
    problems = [
        f"  {sym}={val} requested, final .config has {sym}={final[sym]}"
        if sym in final
        else f"  {sym}={val} requested, final .config has it unset (a dependency is missing?)"
        for sym, val in wanted.items()
        if final.get(sym) != val
    ]
    problems += [
        f"  {sym} requested unset, final .config has {sym}={final[sym]}" for sym in unset if sym in final
    ]
    if problems:
        raise BuildError(
            "kernel config options did not survive `make olddefconfig`:\n"
            + "\n".join(problems)
            + f"\n(fragment: {fragment}, final config: {config})"
        )


def elf_notes(path: Path) -> list[tuple[str, int, bytes]]:
    """(owner, type, desc) of every note in the PT_NOTE segments of an ELF64 little-endian file."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BuildError(f"{path} is not an ELF64 little-endian file")
    (e_phoff,) = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    notes = []
    for i in range(e_phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, e_phoff + i * e_phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        off, end = p_offset, p_offset + p_filesz
        while off + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, off)
            off += 12
            name = data[off : off + namesz].rstrip(b"\0").decode(errors="replace")
            off += (namesz + 3) & ~3
            desc = data[off : off + descsz]
            off += (descsz + 3) & ~3
            notes.append((name, ntype, desc))
    return notes


XEN_ELFNOTE_PHYS32_ENTRY = 18


def make_with_progress(target: str, args: Sequence[str], cwd: Path, env: dict[str, str]) -> None:
    """Run make, printing a summary line every PROGRESS_INTERVAL_S and warnings/errors as they come."""
    log(target, "$ make " + " ".join(args))
    proc = subprocess.Popen(
        ["make", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    assert proc.stdout is not None
    counts: collections.Counter[str] = collections.Counter()
    tail: collections.deque[str] = collections.deque(maxlen=60)
    last_line = ""
    next_report = time.monotonic() + PROGRESS_INTERVAL_S
    for raw in proc.stdout:
        line = raw.rstrip("\n")
        tail.append(line)
        words = line.split()
        if len(words) >= 2 and words[0].isupper() and words[0].isalnum():
            counts[words[0]] += 1
            last_line = line.strip()
        elif "warning:" in line or "error:" in line or line.startswith("make"):
            print(f"    | {line}", flush=True)
        if time.monotonic() >= next_report:
            next_report = time.monotonic() + PROGRESS_INTERVAL_S
            top = ", ".join(f"{k} {v}" for k, v in counts.most_common(4))
            log(target, f"make: {sum(counts.values())} steps ({top}); last: {last_line}")
    rc = proc.wait()
    if rc != 0:
        sys.stdout.write("".join(f"    | {t}\n" for t in tail))
        raise BuildError(f"make {' '.join(args)} failed with exit status {rc}")
    top = ", ".join(f"{k} {v}" for k, v in counts.most_common(6))
    log(target, f"make finished: {sum(counts.values())} steps ({top})")


def build_kernel(dest: Path) -> None:
    env = repro_env()
    src = dest / "build"
    src.mkdir()
    log("kernel", f"extracting {KERNEL_TARBALL} ({dpkg_version(KERNEL_SOURCE_PKG)})")
    run(["tar", "-xJf", KERNEL_TARBALL, "-C", src, "--strip-components=1"])
    log("kernel", "make tinyconfig")
    run(["make", "tinyconfig"], cwd=src, env=env)
    log("kernel", f"merge_config.sh -m .config {FRAGMENT.name}")
    merge_out = run(["scripts/kconfig/merge_config.sh", "-m", ".config", FRAGMENT], cwd=src, env=env)
    for line in merge_out.splitlines():
        if line.startswith(("Value of", "Previous value", "New value")):
            pass  # normal overrides of tinyconfig values
        elif "warning" in line.lower():
            print(f"    | {line}", flush=True)
    log("kernel", "make olddefconfig")
    run(["make", "olddefconfig"], cwd=src, env=env)
    check_config(src / ".config", FRAGMENT)
    log("kernel", "all fragment options survived olddefconfig")
    jobs = str(os.cpu_count() or 1)
    make_with_progress("kernel", [f"-j{jobs}", "vmlinux", "bzImage"], src, env)
    # vmlinux.debug keeps the DWARF sections for gdb; the image pyvmm boots keeps only what it loads and
    # the symbol table (the stop report names functions from it), a tenth of the size.
    shutil.copy2(src / "vmlinux", dest / "vmlinux.debug")
    run(["objcopy", "--strip-debug", src / "vmlinux", dest / "vmlinux"])
    shutil.copy2(src / "arch/x86/boot/bzImage", dest / "bzImage")
    shutil.copy2(src / ".config", dest / "config")
    wanted, _ = parse_fragment(FRAGMENT)
    if wanted.get("CONFIG_PVH") == "y":
        if not any(o == "Xen" and t == XEN_ELFNOTE_PHYS32_ENTRY for o, t, _ in elf_notes(dest / "vmlinux")):
            raise BuildError("CONFIG_PVH=y but vmlinux has no Xen PHYS32_ENTRY (PVH) ELF note")
        log("kernel", "vmlinux carries the Xen PHYS32_ENTRY (PVH) note")
    log("kernel", "removing the build tree")
    shutil.rmtree(src)


# --------------------------------------------------------------------------- busybox tree


@dataclass(frozen=True)
class Entry:
    """One file of the guest tree; paths are relative, without a leading slash."""

    path: str
    kind: str  # "dir", "file", "symlink", "chr"
    mode: int  # permission bits
    data: bytes = b""  # file contents or symlink target
    rdev: tuple[int, int] = (0, 0)


def busybox_tree(extra: Iterable[Entry] = ()) -> list[Entry]:
    """The common guest tree: busybox, its applet links, /init, empty mount points."""
    entries: dict[str, Entry] = {}

    def add(e: Entry) -> None:
        parts = e.path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            entries.setdefault(parent, Entry(parent, "dir", 0o755))
        entries[e.path] = e

    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "mnt", "root", "run", "etc"):
        add(Entry(d, "dir", 0o1777 if d == "tmp" else (0o700 if d == "root" else 0o755)))
    add(Entry("bin/busybox", "file", 0o755, BUSYBOX.read_bytes()))
    applets = run([BUSYBOX, "--list-full"]).split()
    for applet in applets:
        applet = applet.strip("/")
        if applet and applet != "bin/busybox":
            add(Entry(applet, "symlink", 0o777, b"/bin/busybox"))
    add(Entry("init", "file", 0o755, INIT_SCRIPT.read_bytes()))
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


def build_initrd(dest: Path) -> None:
    log("initrd", f"busybox tree from {BUSYBOX} ({dpkg_version(BUSYBOX_PKG)})")
    entries = busybox_tree(
        [
            Entry("dev/console", "chr", 0o600, rdev=(5, 1)),
            Entry("dev/null", "chr", 0o666, rdev=(1, 3)),
        ]
    )
    archive = newc_archive(entries)
    (dest / "initrd.cpio.gz").write_bytes(gzip.compress(archive, compresslevel=9, mtime=0))
    log("initrd", f"{len(entries)} entries, {len(archive)} bytes of cpio")


def build_rootfs(dest: Path) -> None:
    log("rootfs", f"busybox tree from {BUSYBOX} ({dpkg_version(BUSYBOX_PKG)})")
    # No device nodes: with root=/dev/vda the kernel mounts devtmpfs on /dev (DEVTMPFS_MOUNT)
    # and opens the console from the initial rootfs; this way the build needs no mknod (root).
    entries = busybox_tree([Entry("etc/pyvmm-hello", "file", 0o644, HELLO_TEXT.encode())])
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        stage = Path(tmp) / "root"
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
        # Fixed modes and mtimes, deepest first so directory mtimes are not touched again.
        for e in reversed(entries):
            p = stage / e.path
            if e.kind != "symlink":
                p.chmod(e.mode)
            os.utime(p, (EPOCH, EPOCH), follow_symlinks=False)
        stage.chmod(0o755)
        os.utime(stage, (EPOCH, EPOCH))
        image = dest / "rootfs.ext4"
        log("rootfs", f"mkfs.ext4 {ROOTFS_SIZE} ({dpkg_version(E2FSPROGS_PKG)})")
        run(
            [
                "mkfs.ext4", "-q", "-F",
                "-L", ROOTFS_LABEL,
                "-U", ROOTFS_UUID,
                "-E", f"root_owner=0:0,hash_seed={ROOTFS_HASH_SEED}",
                "-d", stage,
                image, ROOTFS_SIZE,
            ],
            env=repro_env(),
        )  # fmt: skip
        # mkfs -d copies owner and ctime of each staged file (ctime cannot be set on the host):
        # make every inode root's with a fixed ctime, so the image is the same for any builder.
        script = Path(tmp) / "fixup.debugfs"
        script.write_text(
            "".join(
                f'set_inode_field "{p}" uid 0\nset_inode_field "{p}" gid 0\n'
                f'set_inode_field "{p}" ctime @{EPOCH}\n'
                for p in ["/", "/lost+found", *(f"/{e.path}" for e in entries)]
            )
        )
        proc = subprocess.run(
            ["debugfs", "-w", "-f", str(script), str(image)],
            env=repro_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0 or "set_inode_field:" in proc.stderr:
            raise BuildError(f"debugfs fix-up failed:\n{proc.stdout}{proc.stderr}")
    run(["e2fsck", "-fn", image])
    log("rootfs", f"{len(entries)} entries, fsck clean")


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


# --------------------------------------------------------------------------- driver


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pyvmm"


def install(target: Target, cached: Path) -> bool:
    """Copy the cached outputs into images/out/; return True if anything changed."""
    OUT.mkdir(parents=True, exist_ok=True)
    changed = False
    for src_name, out_name in target.outputs.items():
        src, dst = cached / src_name, OUT / out_name
        if dst.exists() and filecmp.cmp(src, dst, shallow=False):
            continue
        # A copy, not a hard link: images/out/rootfs.ext4 may be written to by a guest.
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copy2(src, tmp)
        tmp.replace(dst)
        changed = True
    return changed


def build_target(target: Target, force: bool) -> None:
    inputs = target.inputs()
    digest = input_hash(inputs)
    cached = cache_root() / f"{target.name}-{digest}"
    if force and cached.exists():
        shutil.rmtree(cached)
    if cached.is_dir():
        log(target.name, f"cached: {cached}")
    else:
        cached.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{target.name}-{digest}.tmp-", dir=cached.parent))
        start = time.monotonic()
        log(target.name, f"building into {work}")
        try:
            target.build(work)
            missing = [name for name in target.outputs if not (work / name).is_file()]
            if missing:
                raise BuildError(f"build produced no {', '.join(missing)}")
            work.replace(cached)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        log(target.name, f"built in {time.monotonic() - start:.0f}s")
    changed = install(target, cached)
    manifest = {
        "target": target.name,
        "hash": digest,
        "cache_dir": str(cached),
        "inputs": describe_inputs(inputs),
        "files": {
            out_name: {
                "size": (OUT / out_name).stat().st_size,
                "sha256": hashlib.sha256((OUT / out_name).read_bytes()).hexdigest(),
            }
            for out_name in target.outputs.values()
        },
    }
    manifest_path = OUT / f"{target.name}.inputs"
    text = json.dumps(manifest, indent=2) + "\n"
    if not manifest_path.exists() or manifest_path.read_text() != text:
        manifest_path.write_text(text)
    files = ", ".join(target.outputs.values())
    log(target.name, f"{'installed' if changed else 'up to date'}: images/out/{{{files}}} (hash {digest})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached output exists")
    parser.add_argument("target", nargs="?", default="all", choices=[*TARGETS, "all"])
    args = parser.parse_args(argv)
    names = list(TARGETS) if args.target == "all" else [args.target]
    try:
        for name in names:
            build_target(TARGETS[name], args.force)
    except BuildError as exc:
        print(f"images/build.py: error: {exc}", file=sys.stderr)
        return 1
    log("all" if args.target == "all" else args.target, "done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
