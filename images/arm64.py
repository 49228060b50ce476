#!/usr/bin/env python3
"""Build pyvmm's arm64 images: the arm64 guest, and the arm64 KVM lab it is tested in.

Usage: python3 images/arm64.py [--force] [guest|lab|all]   (default: all)

Outputs (in images/out/arm64/):
  guest: Image, config-arm64        the guest kernel: linux-source-6.1 + images/guest-arm64.config,
                                    cross-built (ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-), the
                                    uncompressed arch/arm64/boot/Image, and its final .config
         initrd.cpio.gz, rootfs.ext4  the x86 guest's user space (images/build.py: busybox tree with
                                    images/init.sh as /init; 64 MiB ext4 with /etc/pyvmm-hello, made
                                    with mkfs.ext4 -d, byte-reproducible) with Debian's arm64 busybox-static
  lab:   lab/vmlinuz                Debian's stock arm64 kernel (linux-image-6.1.0-*-arm64, bookworm's
                                    current one), an uncompressed Image
         lab/config                 its .config
         lab/initrd.cpio.gz         arm64 busybox-static, the 9p/overlay modules, /init =
                                    images/lab-arm64-init.sh, /lab-init.sh = pyvmm/lab/init.sh
         lab/root/                  the lab's root directory (served read-only over 9p): Debian arm64
                                    python3 (3.11), dash, coreutils, util-linux, mount, grep, sed, the same
                                    kernel modules, and numpy, pyelftools, pexpect, ptyprocess, lz4,
                                    zstandard from PyPI's aarch64 wheels in /usr/local/lib/python3.11/dist-packages
         lab/packages.txt           what lab/ is made of: kernel, Debian packages, wheels (versions, sha256)
and, as images/build.py does, a JSON manifest per cache entry: images/out/arm64-{kernel,userspace,lab}.inputs.

The lab is meant to run as
    qemu-system-aarch64 -M virt,virtualization=on,gic-version=3 -cpu max -m 2G -smp 2 -nographic -no-reboot
        -kernel lab/vmlinuz -initrd lab/initrd.cpio.gz
        -append "console=ttyAMA0 panic=-1 quiet PYVMM_LAB_SCRATCH=<dir> [PYVMM_LAB_MOUNTS=...]"
        -fsdev local,id=host,path=<lab/root>,security_model=none,readonly=on
        -device virtio-9p-device,fsdev=host,mount_tag=host
        -fsdev local,id=scratch,path=<dir>,security_model=none -device virtio-9p-device,fsdev=scratch,mount_tag=scratch
The initramfs loads the modules, mounts the 9p tag "host" read-only as the lower layer of an overlayfs
root (tmpfs upper; a plain read-only root if overlayfs fails), copies pyvmm/lab/init.sh into it as
/.pyvmm-lab-init.sh and switch_roots to `/bin/sh /.pyvmm-lab-init.sh`, which runs
$PYVMM_LAB_SCRATCH/.pyvmm-lab/run.sh exactly as on x86.  Inside, /dev/kvm is the kernel's KVM on QEMU's
emulated EL2 (VHE, vGICv3).  Measured on 2 idle cores (QEMU 7.2, TCG): QEMU start to "PYVMM-LAB: start"
21-22 s with -cpu max, 6.5-7 s with -cpu max,pauth-impdef=on (TCG otherwise computes the architected
QARMA pointer authentication, which Debian's arm64 kernel and user space use on every call); python3
importing numpy, elftools, pexpect, lz4 and zstandard then takes 10-14 s, or 7-8 s with pauth-impdef=on.

Cache: like images/build.py and images/lab.py (whose machinery this reuses), each part is built once into
${XDG_CACHE_HOME:-~/.cache}/pyvmm/<entry>-<hash>/ and then only copied into images/out/arm64/; the hash
covers build.py, this file, the fragment or init scripts, SOURCE_DATE_EPOCH, the Debian versions of the
host tools (linux-source-6.1, the cross compiler, busybox-static, e2fsprogs) and, for the arm64
packages, the exact version and sha256 of every .deb as resolved from the mirror's current indexes.
Three entries, so that a busybox or Debian kernel update does not rebuild the guest kernel:
  arm64-kernel-<hash>     Image, config                  (`guest`: 5 minutes on 2 cores, measured 296 s:
                                                           extract 10 s, config 10 s, make -j2 256 s)
  arm64-userspace-<hash>  initrd.cpio.gz, rootfs.ext4    (`guest`: 3 s)
  arm64-lab-<hash>        lab/ (root/ is a directory: copied into images/out/arm64/lab/root when the hash
                          recorded in lab/root.stamp differs, the previous one kept as lab/root.old
                          until the next copy; about 210 MB)
                                                         (`lab`: about a minute; 62 MB of downloads)
Checking the cache costs a few seconds (`apt-get update` and two dependency resolutions, for the key).
--force rebuilds anyway.  Since this file's bytes are part of every key, editing it rebuilds the guest
kernel too (as build.py does for its targets).

Choices:
- arm64 packages without touching the host's dpkg: no `dpkg --add-architecture`.  This script keeps a
  private apt state for bookworm arm64 in ${XDG_CACHE_HOME:-~/.cache}/pyvmm/apt-arm64/ (its own
  sources.list, lists, package cache, empty dpkg status; `-o Dir::...=` options on every apt command
  point apt there, with APT::Architecture=arm64; the host's other apt settings, e.g. a proxy, apply), runs
  `apt-get update` there (signatures checked against debian-archive-keyring; mirrors: deb.debian.org,
  or $PYVMM_DEBIAN_MIRROR and $PYVMM_DEBIAN_SECURITY_MIRROR), resolves a package set
  with `apt-get -s install` (an empty status file means the whole dependency closure), downloads the
  .debs with `apt-get download` into apt-arm64/archives/ (kept, checked against the index's sha256) and
  unpacks them with `dpkg-deb --fsys-tarfile | tar -x --keep-directory-symlink`, onto merged-/usr
  symlinks (/bin, /sbin, /lib -> usr/...), as mmdebstrap's `extract` variant does.  No maintainer script
  runs (no qemu-user/binfmt needed); the few things they would have made are made here (/etc/passwd and
  /etc/group from base-passwd's masters).  Packages resolve to the mirror's current versions; the
  versions and sha256 go into the cache key, so a Debian update means one rebuild.  When the mirror
  cannot be reached the last downloaded indexes are used (with a warning).  Not debootstrap --foreign:
  its first stage unpacks only the Essential set (python3 waits for the second stage, which runs arm64
  code); not mmdebstrap --variant=extract, which would work but is one more host package and resolves
  only while it builds, when the cache key needs the versions first.
- The lab kernel is Debian's stock arm64 kernel rather than one cross-built here: it saves CI a second
  kernel build; it has KVM built in (VHE) and was measured to boot under the QEMU above.  What the lab
  needs that it has as modules (virtio_mmio too: =m there; 9pnet, 9pnet_virtio, netfs, fscache, 9p,
  overlay) is
  taken from the same package; the load order comes from each module's .modinfo `depends=` (the package
  ships no modules.dep: depmod runs in its postinst).
- The lab's Python packages are PyPI's manylinux aarch64 wheels (pinned below with their sha256),
  installed with `pip install --target ... --platform manylinux_2_{17..36}_aarch64 --only-binary=:all:
  --python-version 3.11 --implementation cp --require-hashes` (the pip of the Python running this script:
  run it with the project's .venv/bin/python).  Debian's python3-numpy would need the BLAS/LAPACK
  alternatives symlinks that only its maintainer scripts create.  The same versions as the host's .venv.
- The whole lab root is byte-compiled here (unchecked-hash .pyc, when this script runs on Python 3.11,
  the lab's version): the root is read-only, so otherwise every lab boot would compile the standard
  library and numpy again, under TCG.
- busybox-static:arm64 cannot be run here to list its applets (no binfmt); the applet names are read
  from the binary's applet_names table and placed where the host's busybox (same Debian version line)
  puts them.

Standard library only (Python 3.11).
"""

from __future__ import annotations

import argparse
import compileall
import functools
import gzip
import hashlib
import os
import py_compile
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import build  # images/build.py, next to this file
from build import (
    E2FSPROGS_PKG,
    EPOCH,
    HELLO_TEXT,
    KERNEL_SOURCE_PKG,
    KERNEL_TARBALL,
    ROOTFS_HASH_SEED,
    ROOTFS_LABEL,
    ROOTFS_SIZE,
    ROOTFS_UUID,
    BuildError,
    Entry,
    Target,
    build_target,
    cache_root,
    check_config,
    common_inputs,
    dpkg_version,
    input_hash,
    log,
    make_with_progress,
    newc_archive,
    repro_env,
    run,
)

IMAGES = build.IMAGES
REPO = IMAGES.parent
OUT_SUB = "arm64"  # images/out/arm64/
OUT = build.OUT / OUT_SUB
GUEST_FRAGMENT = IMAGES / "guest-arm64.config"
GUEST_INIT = build.INIT_SCRIPT  # images/init.sh, unchanged
LAB_INITRD_INIT = IMAGES / "lab-arm64-init.sh"
LAB_INIT = REPO / "pyvmm" / "lab" / "init.sh"

CROSS_COMPILE = "aarch64-linux-gnu-"
CROSS_PKGS = ("gcc-aarch64-linux-gnu", "binutils-aarch64-linux-gnu")
HOST_BUSYBOX = build.BUSYBOX  # only its applet -> directory layout is used
HOST_BUSYBOX_PKG = build.BUSYBOX_PKG

# Debian bookworm arm64, through the private apt state (see the docstring).
DEBIAN_MIRROR = os.environ.get("PYVMM_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBIAN_SECURITY_MIRROR = os.environ.get(
    "PYVMM_DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security"
)
SUITE = "bookworm"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
BUSYBOX_DEB = "busybox-static"
LAB_KERNEL_META = "linux-image-arm64"  # depends on the current linux-image-6.1.0-<abi>-arm64
# The lab root: what pyvmm/lab/init.sh and a command need (sh, mount, mountpoint, mkdir, chmod, cut,
# setsid, stty, sync, sleep, cat, dd, sha256sum, python3) and a little more for shell scripts.  The
# dependency closure comes with them.
LAB_ROOT_PACKAGES = (
    "base-files", "base-passwd", "dash", "coreutils", "util-linux", "mount", "grep", "sed", "python3",
    "libstdc++6",  # numpy's wheel links it (manylinux wheels expect it from the system)
)  # fmt: skip
# Checked after unpacking: each must be found on the lab's PATH and be an aarch64 ELF file (or a script).
LAB_ROOT_COMMANDS = (
    "sh", "mount", "umount", "mountpoint", "mkdir", "chmod", "cut", "setsid", "stty", "sync", "sleep",
    "cat", "dd", "sha256sum", "grep", "sed", "python3",
)  # fmt: skip
LAB_PATH = ("usr/local/sbin", "usr/local/bin", "usr/sbin", "usr/bin", "sbin", "bin")
# Modules the lab kernel needs that Debian builds as modules (their dependencies are added).
LAB_MODULES = ("virtio_mmio", "9pnet_virtio", "9p", "overlay")
# PyPI wheels for the lab root: (name, version, sha256 of the cp311 manylinux aarch64 or pure wheel).
# The versions of the host's .venv; bump a version together with its hash.
PYPI_WHEELS = (
    ("numpy", "2.4.6", "0ab0a9c4ffb1a6d95ef519fe4247dba8eb6b18ad93999f76b7f657039acabd47"),
    ("pyelftools", "0.33", "f215ad5f47d3f1373a21496a6c9e0707c622840d0622f23ff7ce08678b020036"),
    ("pexpect", "4.9.0", "7236d1e080e4936be2dc3e326cec0af72acf9212a7e1d060210e70a47e253523"),
    ("ptyprocess", "0.7.0", "4b41f3967fce3af57cc7e94b888626c18bf37a083e3651ca8feeb66d492fef35"),
    ("lz4", "4.4.5", "609a69c68e7cfcfa9d894dc06be13f2e00761485b62df4e2472f1b66f7b405fb"),
    ("zstandard", "0.25.0", "01582723b3ccd6939ab7b3a78622c573799d5d8737b534b86d0e06ac18dbde4a"),
)
PYTHON_VERSION = "3.11"  # bookworm's python3
GLIBC_MINOR = 36  # bookworm's glibc 2.36: wheels tagged manylinux_2_17 .. manylinux_2_36 fit
SITE_PACKAGES = f"usr/local/lib/python{PYTHON_VERSION}/dist-packages"  # on Debian python3's sys.path

EM_AARCH64 = 183


# --------------------------------------------------------------------------- Debian arm64 packages


@dataclass(frozen=True)
class Deb:
    name: str
    version: str
    arch: str
    filename: str  # pool path on the mirror
    sha256: str

    @property
    def local_name(self) -> str:
        return Path(self.filename).name

    def key(self) -> tuple[str, bytes]:
        """A cache-key entry; "dpkg:" keys are shown verbatim in the .inputs manifest."""
        return f"dpkg:{self.name}:{self.arch}", f"{self.version} sha256:{self.sha256}".encode()


class DebianArm64:
    """A private apt state for Debian bookworm arm64: the host's dpkg and apt configuration are left alone."""

    def __init__(self) -> None:
        self.dir = cache_root() / "apt-arm64"
        self.archives = self.dir / "archives"
        self.updated = False

    def _setup(self) -> None:
        for sub in ("lists/partial", "cache", "archives/partial", "etc/preferences.d", "etc/sources.list.d"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        status = self.dir / "status"
        if not status.exists():
            status.write_text("")  # nothing installed: -s install shows the whole dependency closure
        if not KEYRING.is_file():
            raise BuildError(f"{KEYRING} is missing (Debian package debian-archive-keyring)")
        opts = f"[arch=arm64 signed-by={KEYRING}]"
        sources = (
            f"deb {opts} {DEBIAN_MIRROR} {SUITE} main\n"
            f"deb {opts} {DEBIAN_MIRROR} {SUITE}-updates main\n"
            f"deb {opts} {DEBIAN_SECURITY_MIRROR} {SUITE}-security main\n"
        )
        path = self.dir / "etc/sources.list"
        if not path.exists() or path.read_text() != sources:
            path.write_text(sources)

    def options(self) -> list[str]:
        """apt options on the command line, where they override the host's apt.conf(.d) (whose other
        settings, e.g. a proxy, still apply; some hosts turn the package cache off there)."""
        d = self.dir
        opts = {
            "APT::Architecture": "arm64",
            "APT::Architectures": "arm64",
            "APT::Install-Recommends": "false",
            "APT::Sandbox::User": "root",
            "Acquire::Languages": "none",
            "Dir::State": d,
            "Dir::State::Lists": d / "lists",
            "Dir::State::status": d / "status",
            "Dir::Cache": d / "cache",
            "Dir::Cache::pkgcache": d / "cache/pkgcache.bin",
            "Dir::Cache::srcpkgcache": d / "cache/srcpkgcache.bin",
            "Dir::Cache::archives": self.archives,
            "Dir::Etc::SourceList": d / "etc/sources.list",
            "Dir::Etc::SourceParts": d / "etc/sources.list.d",
            "Dir::Etc::Preferences": d / "etc/preferences",
            "Dir::Etc::PreferencesParts": d / "etc/preferences.d",
        }
        return [a for k, v in opts.items() for a in ("-o", f"{k}={v}")]

    def apt(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
        return run([tool, *self.options(), *args], cwd=cwd, env=env)

    def update(self) -> None:
        if self.updated:
            return
        self._setup()
        try:
            self.apt("apt-get", "-q", "update")
            log("apt-arm64", f"indexes updated ({self.dir})")
        except BuildError as exc:
            if not any((self.dir / "lists").glob("*_Packages*")):
                raise BuildError(f"cannot fetch the Debian arm64 package indexes:\n{exc}") from exc
            log("apt-arm64", "warning: `apt-get update` failed; using the indexes downloaded last time")
        self.updated = True

    def resolve(self, packages: Sequence[str]) -> list[Deb]:
        """The packages and their whole dependency closure (no Recommends), as the mirror has them now."""
        self.update()
        out = self.apt("apt-get", "-s", "-q", "install", *packages)
        inst = re.findall(r"^Inst (\S+) (?:\[\S+\] )?\((\S+) [^[]*\[(\S+)\]\)", out, re.M)
        if not inst:
            raise BuildError(f"apt-get -s install {' '.join(packages)} resolved nothing:\n{out}")
        show = self.apt("apt-cache", "show", *(f"{name}={version}" for name, version, _ in inst))
        fields: dict[tuple[str, str], dict[str, str]] = {}
        for stanza in show.split("\n\n"):
            stanza_fields = dict(re.findall(r"^([\w-]+): (.*)$", stanza, re.M))
            if "Package" in stanza_fields:
                fields.setdefault((stanza_fields["Package"], stanza_fields["Version"]), stanza_fields)
        debs = []
        for name, version, arch in inst:
            f = fields.get((name, version), {})
            if "SHA256" not in f or "Filename" not in f:
                raise BuildError(f"apt-cache show {name}={version}: no Filename/SHA256")
            debs.append(Deb(name, version, arch, f["Filename"], f["SHA256"]))
        return sorted(debs, key=lambda d: d.name)

    def fetch(self, debs: Iterable[Deb]) -> dict[str, Path]:
        """Download (or reuse) the .debs in apt-arm64/archives/; {package name: path}."""
        debs = list(debs)
        have = {d.name: self.archives / d.local_name for d in debs}
        missing = [d for d in debs if not (have[d.name].is_file() and sha256_file(have[d.name]) == d.sha256)]
        if missing:
            log("apt-arm64", f"downloading {len(missing)} package(s): {', '.join(d.name for d in missing)}")
            with tempfile.TemporaryDirectory(dir=self.archives / "partial") as tmp:
                self.apt(
                    "apt-get", "-q", "download", *(f"{d.name}={d.version}" for d in missing), cwd=Path(tmp)
                )
                by_hash = {sha256_file(p): p for p in Path(tmp).glob("*.deb")}
                for d in missing:
                    if d.sha256 not in by_hash:
                        raise BuildError(
                            f"apt-get download {d.name}={d.version}: no file with sha256 {d.sha256}"
                        )
                    by_hash[d.sha256].replace(have[d.name])
        return have


APT = DebianArm64()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def unpack_deb(deb: Path, dest: Path, *members: str) -> None:
    """dpkg-deb --fsys-tarfile DEB | tar -x (onto existing directory symlinks, as dpkg and mmdebstrap do)."""
    dpkg = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    tar = subprocess.run(
        ["tar", "-x", "--keep-directory-symlink", "--warning=no-timestamp", "-C", str(dest), "-f", "-", *members],
        stdin=dpkg.stdout, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert dpkg.stdout is not None
    dpkg.stdout.close()
    if dpkg.wait() != 0 or tar.returncode != 0:
        raise BuildError(f"unpacking {deb.name} failed:\n{tar.stderr}")


def deb_member(deb: Path, member: str) -> bytes:
    dpkg = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    tar = subprocess.run(
        ["tar", "-xO", "-f", "-", member], stdin=dpkg.stdout, capture_output=True, check=False
    )
    assert dpkg.stdout is not None
    dpkg.stdout.close()
    if dpkg.wait() != 0 or tar.returncode != 0:
        raise BuildError(f"{deb.name} has no {member}: {tar.stderr.decode(errors='replace')}")
    return tar.stdout


@functools.cache
def busybox_deb() -> Deb:
    (deb,) = APT.resolve([BUSYBOX_DEB])
    return deb


@functools.cache
def lab_debs() -> tuple[Deb, list[Deb]]:
    """(the linux-image-6.1.0-*-arm64 package, the lab root's packages)."""
    kernel = [
        d for d in APT.resolve([LAB_KERNEL_META]) if re.fullmatch(r"linux-image-[\d.]+-\d+-arm64", d.name)
    ]
    if len(kernel) != 1:
        raise BuildError(f"{LAB_KERNEL_META} resolves to no single linux-image-*-arm64: {kernel}")
    return kernel[0], APT.resolve(LAB_ROOT_PACKAGES)


# --------------------------------------------------------------------------- ELF helpers


def elf_machine(data: bytes) -> int | None:
    if data[:4] != b"\x7fELF" or len(data) < 20:
        return None
    machine: int = struct.unpack_from("<H", data, 18)[0]
    return machine


def elf_section(data: bytes, wanted: str) -> bytes:
    """The contents of one section of an ELF64 little-endian file (b"" if there is none)."""
    (e_shoff,) = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
    strtab_off = headers[e_shstrndx][4]
    for sh_name, _type, _flags, _addr, off, size in headers:
        end = data.index(b"\0", strtab_off + sh_name)
        if data[strtab_off + sh_name : end].decode() == wanted:
            return data[off : off + size]
    return b""


def elf_needed(data: bytes) -> list[str]:
    """The DT_NEEDED entries (shared libraries) of an ELF64 little-endian file."""
    dynamic, dynstr = elf_section(data, ".dynamic"), elf_section(data, ".dynstr")
    needed = []
    for off in range(0, len(dynamic) - 15, 16):
        tag, val = struct.unpack_from("<qQ", dynamic, off)
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED
            needed.append(dynstr[val : dynstr.index(b"\0", val)].decode())
    return needed


def modinfo(ko: Path) -> dict[str, str]:
    info: dict[str, str] = {}
    for item in elf_section(ko.read_bytes(), ".modinfo").split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            info.setdefault(key, value)
    return info


def module_closure(moddir: Path, wanted: Sequence[str]) -> list[Path]:
    """The .ko files of `wanted` and their dependencies, dependencies first; built-in ones are skipped."""
    by_name = {p.name[:-3].replace("-", "_"): p for p in moddir.rglob("*.ko")}
    builtin = {
        Path(line).name[:-3].replace("-", "_") for line in (moddir / "modules.builtin").read_text().split()
    }
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen or name in builtin:
            return
        if name in chain:
            raise BuildError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in by_name:
            raise BuildError(f"kernel module {name} is neither built in nor in {moddir}")
        deps = [d for d in modinfo(by_name[name]).get("depends", "").split(",") if d]
        for dep in deps:
            visit(dep.replace("-", "_"), (*chain, name))
        seen.add(name)
        order.append(by_name[name])

    for name in wanted:
        visit(name, ())
    return order


def busybox_applets(binary: bytes) -> list[str]:
    """The applet names of a busybox binary, from its sorted applet_names table ("[\\0[[\\0acpid\\0...")."""
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


def busybox_layout(names: Sequence[str]) -> list[str]:
    """Install paths (relative) for the applets, as the host's busybox --list-full places them."""
    host = {Path(p).name: p.strip("/") for p in run([HOST_BUSYBOX, "--list-full"]).split()}
    paths = [host.get(name, f"bin/{name}") for name in names]
    extra = sorted(set(names) - set(host))
    if extra:
        log("busybox", f"applets unknown to the host's busybox, put in /bin: {' '.join(extra)}")
    return paths


def busybox_tree(busybox: bytes, init: bytes, extra: Iterable[Entry] = ()) -> list[Entry]:
    """build.busybox_tree() for a busybox that cannot run here: same directories, links and /init."""
    entries: dict[str, Entry] = {}

    def add(e: Entry) -> None:
        parts = e.path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            entries.setdefault(parent, Entry(parent, "dir", 0o755))
        entries[e.path] = e

    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "mnt", "root", "run", "etc"):
        add(Entry(d, "dir", 0o1777 if d == "tmp" else (0o700 if d == "root" else 0o755)))
    add(Entry("bin/busybox", "file", 0o755, busybox))
    for applet in busybox_layout(busybox_applets(busybox)):
        if applet and applet != "bin/busybox":
            add(Entry(applet, "symlink", 0o777, b"/bin/busybox"))
    add(Entry("init", "file", 0o755, init))
    for e in extra:
        add(e)
    return [entries[k] for k in sorted(entries)]


def write_initrd(path: Path, entries: Sequence[Entry]) -> int:
    archive = newc_archive(entries)
    path.write_bytes(gzip.compress(archive, compresslevel=9, mtime=0))
    return len(archive)


# --------------------------------------------------------------------------- guest: kernel


def cross_versions() -> dict[str, bytes]:
    if shutil.which(CROSS_COMPILE + "gcc") is None:
        raise BuildError(f"{CROSS_COMPILE}gcc is missing (apt-get install {' '.join(CROSS_PKGS)})")
    return {f"dpkg:{p}": dpkg_version(p).encode() for p in CROSS_PKGS}


def kernel_inputs() -> dict[str, bytes]:
    return {
        **common_inputs(),
        "arm64.py": Path(__file__).read_bytes(),
        "guest-arm64.config": GUEST_FRAGMENT.read_bytes(),
        f"dpkg:{KERNEL_SOURCE_PKG}": dpkg_version(KERNEL_SOURCE_PKG).encode(),
        **cross_versions(),
    }


def build_kernel(dest: Path) -> None:
    name = "arm64-kernel"
    env = dict(repro_env(), ARCH="arm64", CROSS_COMPILE=CROSS_COMPILE)
    src = dest / "build"
    src.mkdir()
    log(name, f"extracting {KERNEL_TARBALL} ({dpkg_version(KERNEL_SOURCE_PKG)})")
    run(["tar", "-xJf", KERNEL_TARBALL, "-C", src, "--strip-components=1"])
    log(name, "make ARCH=arm64 tinyconfig")
    run(["make", "tinyconfig"], cwd=src, env=env)
    log(name, f"merge_config.sh -m .config {GUEST_FRAGMENT.name}")
    merge_out = run(["scripts/kconfig/merge_config.sh", "-m", ".config", GUEST_FRAGMENT], cwd=src, env=env)
    for line in merge_out.splitlines():
        # HZ_100 and NO_HZ_IDLE change choice defaults: expected.
        if "warning" in line.lower() and "changes choice state" not in line:
            print(f"    | {line}", flush=True)
    log(name, "make olddefconfig")
    run(["make", "olddefconfig"], cwd=src, env=env)
    check_config(src / ".config", GUEST_FRAGMENT)
    log(name, "all fragment options survived olddefconfig")
    make_with_progress(name, [f"-j{os.cpu_count() or 1}", "Image"], src, env)
    image = src / "arch/arm64/boot/Image"
    if image.read_bytes()[0x38:0x3C] != b"ARM\x64":
        raise BuildError(f"{image} has no arm64 Image header magic")
    shutil.copy2(image, dest / "Image")
    shutil.copy2(src / ".config", dest / "config")
    log(name, "removing the build tree")
    shutil.rmtree(src)


# --------------------------------------------------------------------------- guest: initrd and rootfs


def userspace_inputs() -> dict[str, bytes]:
    return {
        **common_inputs(),
        "arm64.py": Path(__file__).read_bytes(),
        "init.sh": GUEST_INIT.read_bytes(),
        **dict([busybox_deb().key()]),
        f"dpkg:{HOST_BUSYBOX_PKG}": dpkg_version(HOST_BUSYBOX_PKG).encode(),
        f"dpkg:{E2FSPROGS_PKG}": dpkg_version(E2FSPROGS_PKG).encode(),
    }


def arm64_busybox() -> bytes:
    deb = busybox_deb()
    data = deb_member(APT.fetch([deb])[deb.name], "./bin/busybox")
    if elf_machine(data) != EM_AARCH64:
        raise BuildError(f"{deb.local_name}: ./bin/busybox is not an aarch64 ELF file")
    return data


def make_ext4(image: Path, entries: Sequence[Entry], tmp: Path, name: str) -> None:
    """build.build_rootfs() for a given tree: reproducible mkfs.ext4 -d, owners 0:0, fixed times."""
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
    log(name, f"mkfs.ext4 {ROOTFS_SIZE} ({dpkg_version(E2FSPROGS_PKG)})")
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


def build_userspace(dest: Path) -> None:
    name = "arm64-userspace"
    busybox = arm64_busybox()
    init = GUEST_INIT.read_bytes()
    log(name, f"busybox tree from {busybox_deb().local_name}")
    entries = busybox_tree(
        busybox,
        init,
        [Entry("dev/console", "chr", 0o600, rdev=(5, 1)), Entry("dev/null", "chr", 0o666, rdev=(1, 3))],
    )
    size = write_initrd(dest / "initrd.cpio.gz", entries)
    log(name, f"initrd: {len(entries)} entries, {size} bytes of cpio")
    entries = busybox_tree(busybox, init, [Entry("etc/pyvmm-hello", "file", 0o644, HELLO_TEXT.encode())])
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        make_ext4(dest / "rootfs.ext4", entries, Path(tmp), name)
    log(name, f"rootfs: {len(entries)} entries, fsck clean")


# --------------------------------------------------------------------------- lab


def pip_version() -> str:
    try:
        return run([sys.executable, "-m", "pip", "--version"]).split()[1]
    except BuildError as exc:
        raise BuildError(
            f"{sys.executable} has no pip, needed for the lab's wheels: run this script with the project's "
            ".venv/bin/python (or apt-get install python3-pip)"
        ) from exc


def lab_inputs() -> dict[str, bytes]:
    kernel, root = lab_debs()
    return {
        **common_inputs(),
        "arm64.py": Path(__file__).read_bytes(),
        "lab-arm64-init.sh": LAB_INITRD_INIT.read_bytes(),
        "pyvmm/lab/init.sh": LAB_INIT.read_bytes(),
        **dict(d.key() for d in (kernel, busybox_deb(), *root)),
        f"dpkg:{HOST_BUSYBOX_PKG}": dpkg_version(HOST_BUSYBOX_PKG).encode(),
        "pip": pip_version().encode(),
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}".encode(),
    }


def in_root(root: Path, path: str, hops: int = 0) -> Path | None:
    """Resolve `path` inside the lab root as the lab will see it (absolute links are root-relative)."""
    parts = [p for p in path.split("/") if p and p != "."]
    cur = root
    for i, part in enumerate(parts):
        if part == "..":
            cur = cur.parent if cur != root else root
            continue
        nxt = cur / part
        if nxt.is_symlink():
            target = os.readlink(nxt)
            prefix = "" if target.startswith("/") else str(cur.relative_to(root))
            return (
                None if hops >= 40 else in_root(root, "/".join([prefix, target, *parts[i + 1 :]]), hops + 1)
            )
        if not nxt.exists():
            return None
        cur = nxt
    return cur


def check_lab_root(root: Path) -> None:
    problems = []
    for cmd in LAB_ROOT_COMMANDS:
        found = next((p for d in LAB_PATH if (p := in_root(root, f"{d}/{cmd}")) is not None), None)
        if found is None:
            problems.append(f"{cmd}: not found on the lab's PATH")
            continue
        head = found.read_bytes()[:64]
        if not head.startswith(b"#!") and elf_machine(head) != EM_AARCH64:
            problems.append(f"{cmd}: {found.relative_to(root)} is not an aarch64 ELF file")
    for path in ("lib/ld-linux-aarch64.so.1", "etc/passwd", f"{SITE_PACKAGES}/numpy/__init__.py"):
        if in_root(root, path) is None:
            problems.append(f"/{path} is missing")
    # Every shared library the Python extension modules and python3 link must be there (numpy's wheel,
    # for one, expects the system's libstdc++).
    site = root / SITE_PACKAGES
    libs = {p.name for d in ("usr/lib/aarch64-linux-gnu", "usr/lib") for p in (root / d).iterdir()}
    libs |= {p.name for d in site.glob("*.libs") for p in d.iterdir()}
    python = in_root(root, "usr/bin/python3")
    for so in [*site.rglob("*.so"), *([python] if python else [])]:
        missing = [lib for lib in elf_needed(so.read_bytes()) if lib not in libs]
        if missing:
            problems.append(f"/{so.relative_to(root)} needs {', '.join(missing)}: not in the lab root")
    if problems:
        raise BuildError("the lab root is incomplete:\n  " + "\n  ".join(problems))


def pip_install(target: Path, workdir: Path) -> None:
    requirements = workdir / "requirements.txt"
    requirements.write_text("".join(f"{n}=={v} --hash=sha256:{h}\n" for n, v, h in PYPI_WHEELS))
    platforms = [f"manylinux_2_{minor}_aarch64" for minor in range(GLIBC_MINOR, 16, -1)] + [
        "manylinux2014_aarch64"
    ]
    run(
        [
            sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-input",
            "--no-compile", "--no-deps", "--require-hashes", "--only-binary=:all:",
            "--python-version", PYTHON_VERSION, "--implementation", "cp",
            "--abi", "cp" + PYTHON_VERSION.replace(".", ""), "--abi", "abi3", "--abi", "none",
            *(a for p in platforms for a in ("--platform", p)),
            "--target", target, "-r", requirements,
        ]
    )  # fmt: skip
    shutil.rmtree(target / "bin", ignore_errors=True)  # console scripts with the host's #! line


def byte_compile(root: Path, name: str) -> None:
    if sys.version_info[:2] != tuple(int(x) for x in PYTHON_VERSION.split(".")):
        log(name, f"not byte-compiling the lab root: this is Python {sys.version_info[0]}.{sys.version_info[1]}, "
                  f"the lab's is {PYTHON_VERSION}")  # fmt: skip
        return
    ok = True
    for sub in (f"usr/lib/python{PYTHON_VERSION}", "usr/lib/python3/dist-packages", SITE_PACKAGES):
        d = root / sub
        if d.is_dir():
            ok &= compileall.compile_dir(
                d, quiet=2, stripdir=str(root), prependdir="/", workers=os.cpu_count() or 1,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )  # fmt: skip
    if not ok:
        log(name, "warning: some .py files of the lab root did not compile (they are compiled on import)")


def build_lab(dest: Path) -> None:
    name = "arm64-lab"
    kernel_deb, root_debs = lab_debs()
    paths = APT.fetch([kernel_deb, busybox_deb(), *root_debs])
    lab = dest / "lab"
    lab.mkdir()
    listing = [f"# images/arm64.py: what images/out/{OUT_SUB}/lab/ is made of (Debian {SUITE} arm64, PyPI)"]

    # The kernel and its modules.
    kdir = dest / "kernel"
    kdir.mkdir()
    log(name, f"unpacking {kernel_deb.local_name}")
    unpack_deb(paths[kernel_deb.name], kdir, "./boot", "./lib/modules")
    (moddir,) = (kdir / "lib/modules").iterdir()
    kver = moddir.name
    shutil.copy2(kdir / f"boot/vmlinuz-{kver}", lab / "vmlinuz")
    shutil.copy2(kdir / f"boot/config-{kver}", lab / "config")
    modules = module_closure(moddir, LAB_MODULES)
    log(name, f"kernel {kver}; modules in load order: {' '.join(m.name[:-3] for m in modules)}")
    listing.append(f"kernel {kver} {kernel_deb.name} {kernel_deb.version} sha256:{kernel_deb.sha256}")
    listing.append("modules " + " ".join(m.name[:-3] for m in modules))

    # The initramfs.
    entries = busybox_tree(
        arm64_busybox(),
        LAB_INITRD_INIT.read_bytes(),
        [
            Entry("dev/console", "chr", 0o600, rdev=(5, 1)),
            Entry("dev/null", "chr", 0o666, rdev=(1, 3)),
            Entry("lab-init.sh", "file", 0o755, LAB_INIT.read_bytes()),
            *(Entry(d, "dir", 0o755) for d in ("lower", "upper", "newroot")),
            *(Entry(f"lib/modules/{m.name}", "file", 0o644, m.read_bytes()) for m in modules),
            Entry("lib/modules/load-order", "file", 0o644, "".join(f"{m.name}\n" for m in modules).encode()),
        ],
    )
    size = write_initrd(lab / "initrd.cpio.gz", entries)
    log(name, f"initrd: {len(entries)} entries, {size} bytes of cpio")

    # The root: Debian packages onto merged-/usr symlinks.
    root = dest / "root"
    for d in ("usr/bin", "usr/sbin", "usr/lib"):
        (root / d).mkdir(parents=True)
    for link in ("bin", "sbin", "lib"):
        (root / link).symlink_to(f"usr/{link}")
    log(name, f"unpacking {len(root_debs)} Debian packages into the lab root")
    for deb in root_debs:
        unpack_deb(paths[deb.name], root)
        listing.append(f"deb {deb.name} {deb.version} {deb.arch} sha256:{deb.sha256}")
    for d in ("doc", "man", "info", "locale", "lintian"):  # as Debian's minimized images leave out
        shutil.rmtree(root / "usr/share" / d, ignore_errors=True)
    # What maintainer scripts would have made.
    for f in ("passwd", "group"):
        shutil.copyfile(root / f"usr/share/base-passwd/{f}.master", root / "etc" / f)
    for d in ("proc", "sys", "dev", "run", "tmp", "root", "mnt", "etc"):
        (root / d).mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / ".pyvmm-lab-init.sh").write_bytes(b"")  # bind-mount target when overlayfs is unavailable
    (root / ".pyvmm-lab-init.sh").chmod(0o755)
    # The kernel modules, with a modules.dep for modprobe.
    mroot = root / "lib/modules" / kver
    for m in modules:
        rel = m.relative_to(moddir)
        (mroot / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(m, mroot / rel)
    shutil.copy2(moddir / "modules.builtin", mroot / "modules.builtin")
    dep_lines = []
    for m in modules:
        deps = module_closure(moddir, [m.name[:-3].replace("-", "_")])[:-1]
        dep_lines.append(
            f"{m.relative_to(moddir)}: {' '.join(str(d.relative_to(moddir)) for d in reversed(deps))}"
        )
    (mroot / "modules.dep").write_text("\n".join(dep_lines) + "\n")
    # PyPI wheels.
    log(
        name, f"pip {pip_version()}: installing {', '.join(f'{n}=={v}' for n, v, _ in PYPI_WHEELS)} (aarch64)"
    )
    pip_install(root / SITE_PACKAGES, dest)
    listing += [f"wheel {n} {v} sha256:{h}" for n, v, h in PYPI_WHEELS]
    log(name, "byte-compiling the lab root's Python files")
    byte_compile(root, name)
    check_lab_root(root)
    shutil.rmtree(kdir)
    (lab / "packages.txt").write_text("\n".join(listing) + "\n")
    size_mb = sum(p.lstat().st_size for p in root.rglob("*")) / 1e6
    log(name, f"lab root: {size_mb:.0f} MB")


def install_root(cached: Path, digest: str, force: bool) -> None:
    """Copy <cache>/root to images/out/arm64/lab/root unless lab/root.stamp already names this build.

    The new tree replaces the old one by a rename; the old one is kept as lab/root.old until the next
    install, so that a lab running on it (QEMU serves the directory it opened) is not pulled out from
    under.
    """
    dst = OUT / "lab" / "root"
    stamp = OUT / "lab" / "root.stamp"
    if not force and dst.is_dir() and stamp.is_file() and stamp.read_text().strip() == digest:
        log("arm64-lab", f"up to date: images/out/{OUT_SUB}/lab/root/ (hash {digest})")
        return
    tmp = dst.with_name("root.tmp")
    old = dst.with_name("root.old")
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    run(["cp", "-a", "--reflink=auto", cached / "root", tmp])
    if dst.exists():
        dst.replace(old)
    tmp.replace(dst)
    stamp.write_text(digest + "\n")
    log("arm64-lab", f"installed: images/out/{OUT_SUB}/lab/root/ (hash {digest})")


# --------------------------------------------------------------------------- targets and driver


def out(*names: str) -> dict[str, str]:
    return {n: f"{OUT_SUB}/{n}" for n in names}


KERNEL = Target(
    "arm64-kernel",
    kernel_inputs,
    build_kernel,
    {"Image": f"{OUT_SUB}/Image", "config": f"{OUT_SUB}/config-arm64"},
)
USERSPACE = Target("arm64-userspace", userspace_inputs, build_userspace, out("initrd.cpio.gz", "rootfs.ext4"))
LAB = Target(
    "arm64-lab",
    functools.cache(lab_inputs),
    build_lab,
    out("lab/vmlinuz", "lab/config", "lab/initrd.cpio.gz", "lab/packages.txt"),
)
TARGETS: dict[str, list[Target]] = {"guest": [KERNEL, USERSPACE], "lab": [LAB]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached output exists")
    parser.add_argument("target", nargs="?", default="all", choices=[*TARGETS, "all"])
    args = parser.parse_args(argv)
    names = list(TARGETS) if args.target == "all" else [args.target]
    (OUT / "lab").mkdir(parents=True, exist_ok=True)
    try:
        for name in names:
            for target in TARGETS[name]:
                start = time.monotonic()
                build_target(target, args.force)
                if target is LAB:
                    digest = input_hash(target.inputs())
                    install_root(cache_root() / f"{target.name}-{digest}", digest, args.force)
                log(target.name, f"done in {time.monotonic() - start:.1f}s")
    except BuildError as exc:
        print(f"images/arm64.py: error: {exc}", file=sys.stderr)
        return 1
    log("arm64", "done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
