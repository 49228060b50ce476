"""The arm64 KVM lab (images/arm64.py ``lab``): the Debian arm64 kernel, initramfs and Python root that
pyvmm's arm64 tests run in, under qemu-system-aarch64 with emulated EL2.

Outputs (in images/out/arm64/lab/):
  vmlinuz          Debian's stock arm64 kernel (linux-image-6.1.0-*-arm64, bookworm's current one), an
                   uncompressed Image
  config           its .config
  initrd.cpio.gz   arm64 busybox-static, the 9p/overlay modules, /init = images/lab-arm64-init.sh,
                   /lab-init.sh = pyvmm/lab/init.sh
  root/            the lab's root directory (served read-only over 9p): Debian arm64 python3 (3.11), dash,
                   coreutils, util-linux, mount, grep, sed, the same kernel modules, and numpy, pyelftools,
                   pexpect, ptyprocess, lz4, zstandard from PyPI's aarch64 wheels in
                   /usr/local/lib/python3.11/dist-packages
  packages.txt     what lab/ is made of: kernel, Debian packages, wheels (versions, sha256)

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

One cache entry, arm64-lab-<hash> (about a minute; 62 MB of downloads): its key holds the exact version
and sha256 of every .deb as resolved from the mirror's current indexes, the wheels, pip's and Python's
versions, the init scripts, and the code (this module, images/imagelib's tree and modules code).  root/ is
a directory: it is copied into images/out/arm64/lab/root when the hash recorded in lab/root.stamp differs,
the previous one kept as lab/root.old until the next copy (about 210 MB).

Choices:
- The lab kernel is Debian's stock arm64 kernel rather than one cross-built here: it saves CI a second
  kernel build; it has KVM built in (VHE) and was measured to boot under the QEMU above.  What the lab
  needs that it has as modules (virtio_mmio too: =m there; 9pnet, 9pnet_virtio, netfs, fscache, 9p,
  overlay) is taken from the same package; the load order comes from each module's .modinfo `depends=`
  (images/imagelib/modules.py).
- The root: Debian packages unpacked onto merged-/usr symlinks (/bin, /sbin, /lib -> usr/...), as
  mmdebstrap's `extract` variant does (images/imagelib/debian.py).  No maintainer script runs (no
  qemu-user/binfmt needed); the few things they would have made are made here (/etc/passwd and
  /etc/group from base-passwd's masters, a modules.dep).
- The lab's Python packages are PyPI's manylinux aarch64 wheels (pinned below with their sha256),
  installed with `pip install --target ... --platform manylinux_2_{17..36}_aarch64 --only-binary=:all:
  --python-version 3.11 --implementation cp --require-hashes` (the pip of the Python running this script:
  run it with the project's .venv/bin/python).  Debian's python3-numpy would need the BLAS/LAPACK
  alternatives symlinks that only its maintainer scripts create.  The same versions as the host's .venv.
- The whole lab root is byte-compiled here (unchecked-hash .pyc, when this script runs on Python 3.11,
  the lab's version): the root is read-only, so otherwise every lab boot would compile the standard
  library and numpy again, under TCG.
"""

from __future__ import annotations

import compileall
import functools
import os
import py_compile
import re
import shutil
import sys
from pathlib import Path

import arm64_guest
from arm64_guest import APT, OUT_SUB, arm64_busybox, arm64_tree, busybox_deb
from imagelib import debian, modules
from imagelib.cache import BuildError, Target, code_inputs, dpkg_version, log, run
from imagelib.debian import SUITE, Deb, unpack_deb
from imagelib.elf import EM_AARCH64, elf_machine, elf_needed
from imagelib.modules import module_closure, modules_dep
from imagelib.tree import CONSOLE_NODES, Entry, write_initrd

IMAGES = Path(__file__).resolve().parent
REPO = IMAGES.parent
LAB_INITRD_INIT = IMAGES / "lab-arm64-init.sh"
LAB_INIT = REPO / "pyvmm" / "lab" / "init.sh"
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


@functools.cache
def lab_debs() -> tuple[Deb, list[Deb]]:
    """(the linux-image-6.1.0-*-arm64 package, the lab root's packages)."""
    kernel = [
        d for d in APT.resolve([LAB_KERNEL_META]) if re.fullmatch(r"linux-image-[\d.]+-\d+-arm64", d.name)
    ]
    if len(kernel) != 1:
        raise BuildError(f"{LAB_KERNEL_META} resolves to no single linux-image-*-arm64: {kernel}")
    return kernel[0], APT.resolve(LAB_ROOT_PACKAGES)


def pip_version() -> str:
    try:
        return run([sys.executable, "-m", "pip", "--version"]).split()[1]
    except BuildError as exc:
        raise BuildError(
            f"{sys.executable} has no pip, needed for the lab's wheels: run this script with the project's "
            ".venv/bin/python (or apt-get install python3-pip)"
        ) from exc


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
    mods = module_closure(moddir, LAB_MODULES)
    log(name, f"kernel {kver}; modules in load order: {' '.join(m.name[:-3] for m in mods)}")
    listing.append(f"kernel {kver} {kernel_deb.name} {kernel_deb.version} sha256:{kernel_deb.sha256}")
    listing.append("modules " + " ".join(m.name[:-3] for m in mods))

    # The initramfs.
    entries = arm64_tree(
        arm64_busybox(),
        LAB_INITRD_INIT.read_bytes(),
        [
            *CONSOLE_NODES,
            Entry("lab-init.sh", "file", 0o755, LAB_INIT.read_bytes()),
            *(Entry(d, "dir", 0o755) for d in ("lower", "upper", "newroot")),
            *(Entry(f"lib/modules/{m.name}", "file", 0o644, m.read_bytes()) for m in mods),
            Entry("lib/modules/load-order", "file", 0o644, "".join(f"{m.name}\n" for m in mods).encode()),
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
    for m in mods:
        rel = m.relative_to(moddir)
        (mroot / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(m, mroot / rel)
    shutil.copy2(moddir / "modules.builtin", mroot / "modules.builtin")
    (mroot / "modules.dep").write_text(modules_dep(moddir, mods))
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


def install_root(cached: Path, digest: str, force: bool, out: Path) -> None:
    """Copy <cache>/root to ``out``/lab/root (images/out/arm64/lab/root) unless lab/root.stamp already names
    this build.

    The new tree replaces the old one by a rename; the old one is kept as lab/root.old until the next
    install, so that a lab running on it (QEMU serves the directory it opened) is not pulled out from
    under.
    """
    dst = out / "lab" / "root"
    stamp = out / "lab" / "root.stamp"
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


def lab_inputs() -> dict[str, bytes]:
    kernel, root = lab_debs()
    return {
        **code_inputs(*arm64_guest.TREE_CODE, modules, debian.unpack_deb, sys.modules[__name__]),
        "lab-arm64-init.sh": LAB_INITRD_INIT.read_bytes(),
        "pyvmm/lab/init.sh": LAB_INIT.read_bytes(),
        **dict(d.key() for d in (kernel, busybox_deb(), *root)),
        f"dpkg:{arm64_guest.HOST_BUSYBOX_PKG}": dpkg_version(arm64_guest.HOST_BUSYBOX_PKG).encode(),
        "pip": pip_version().encode(),
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}".encode(),
    }


LAB = Target(
    "arm64-lab",
    functools.cache(lab_inputs),
    build_lab,
    arm64_guest.out("lab/vmlinuz", "lab/config", "lab/initrd.cpio.gz", "lab/packages.txt"),
)
