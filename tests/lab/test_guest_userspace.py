"""The default guest in user space: /init runs, writes reach the virtio-blk disk, a read-only disk
refuses writes, and the guest reads what the host put into its image.  Needs a KVM that runs guest user
space (marker ``lab``: hardware, or inside the KVM lab)."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.lab.conftest import BOOT_S, Guest, bound_for, vm_timeout

ROOT_CMDLINE = "console=ttyS0 root=/dev/vda rw init=/init"
INIT_MARKERS = ("PYVMM-INIT: start", "PYVMM-INIT: uname ", "PYVMM-INIT: vda present", "PYVMM-INIT: done")
# The lines /init (images/init.sh) prints without a root disk: booted from the initramfs.
INITRD_INIT_MARKERS = tuple(m for m in INIT_MARKERS if m != "PYVMM-INIT: vda present")

# The VMs' timeouts: a boot to the end of /init and its reboot; test_default_guest_disk_io_in_user_space's script writes ~1.1 MB,
# hashes it, syncs and reads 300 kB back: about 20 s more in the lab.
BOOT_TIMEOUT_S = vm_timeout(BOOT_S)
DISK_IO_TIMEOUT_S = vm_timeout(BOOT_S + 20)

# Files the guest writes: name -> (line pattern, size); the content is the pattern repeated, cut at size.
GUEST_FILES = {"small": ("pyvmm small\n", 1000), "medium": ("pyvmm medium file\n", 70_001),
               "large": ("pyvmm large file, 1 MiB and a bit\n", (1 << 20) + 3)}
HOST_FILE = bytes((i * 7 + 3) & 0xFF for i in range(300_000))  # 300 kB the guest reads back

GUEST_SCRIPT = """\
mkdir -p /pyvmm-test
{writes}
sha256sum /pyvmm-test/* | sed 's/^/GUEST-SHA: /'
sync
if echo overwrite | dd of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null; then
    echo "RO-WRITE: accepted"
else
    echo "RO-WRITE: rejected"
fi
echo "RO-FLAG: $(blockdev --getro /dev/vdb)"
echo "HOST-FILE: $(sha256sum /etc/pyvmm-host-file)"
echo "HOST-TEXT: $(cat /etc/pyvmm-host-text)"
"""


def reached_user_space(console: str, *, root_disk: bool = True) -> bool:
    """The guest ran its /init to the end: each of its marker lines is on the console, in order (with
    ``root_disk``, also the line that says vda is there)."""
    positions = [console.find(m) for m in (INIT_MARKERS if root_disk else INITRD_INIT_MARKERS)]
    return all(p >= 0 for p in positions) and positions == sorted(positions)


def _content(pattern: str, size: int) -> bytes:
    return (pattern * (size // len(pattern) + 1)).encode()[:size]


def _debugfs(image: Path, *requests: str, write: bool = False) -> str:
    proc = subprocess.run(["debugfs", *(["-w"] if write else []), "-f", "-", str(image)],
                          input="\n".join(requests) + "\n", capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _debugfs_cat(image: Path, path: str) -> bytes:
    proc = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True)
    return proc.stdout


@pytest.fixture
def rootfs(images: Path, tmp_path: Path, e2fsprogs: None) -> Path:
    copy = tmp_path / "rootfs.ext4"
    shutil.copyfile(images / "rootfs.ext4", copy)
    return copy


@pytest.mark.lab(bound_s=bound_for(BOOT_TIMEOUT_S))
def test_default_guest_from_initrd(pyvmm_run: Callable[..., Guest], images: Path) -> None:
    g = pyvmm_run("--kernel", str(images / "vmlinux"), "--initrd", str(images / "initrd.cpio.gz"),
                  "--memory", "256M", "--cmdline", "console=ttyS0", timeout=BOOT_TIMEOUT_S)
    assert reached_user_space(g.console, root_disk=False), g.explain()
    assert "PYVMM-INIT: vda present" not in g.console, g.explain()
    assert g.status == 0, g.explain()


@pytest.mark.lab(bound_s=bound_for(DISK_IO_TIMEOUT_S))
def test_default_guest_disk_io_in_user_space(pyvmm_run: Callable[..., Guest], images: Path, rootfs: Path, tmp_path: Path) -> None:
    # The host puts a script, a binary file and a text file into the guest's root disk.
    writes = "\n".join(
        f"yes {pattern.rstrip(chr(10))!r} | head -c {size} > /pyvmm-test/{name}"
        for name, (pattern, size) in GUEST_FILES.items()
    )
    (tmp_path / "test.sh").write_text(GUEST_SCRIPT.format(writes=writes))
    (tmp_path / "host-file").write_bytes(HOST_FILE)
    (tmp_path / "host-text").write_text("put there by the host\n")
    _debugfs(rootfs, "cd /etc", f"write {tmp_path / 'test.sh'} pyvmm-test.sh",
             f"write {tmp_path / 'host-file'} pyvmm-host-file", f"write {tmp_path / 'host-text'} pyvmm-host-text",
             write=True)
    data = tmp_path / "data.img"
    data.write_bytes(bytes(range(256)) * 4096)  # 1 MiB, read-only for the guest
    data_digest = hashlib.sha256(data.read_bytes()).hexdigest()

    g = pyvmm_run("--kernel", str(images / "vmlinux"), "--memory", "256M", "--disk", f"path={rootfs}",
                  "--disk", f"path={data},readonly=on,serial=data0",
                  "--cmdline", f"{ROOT_CMDLINE} pyvmm.test=/etc/pyvmm-test.sh", timeout=DISK_IO_TIMEOUT_S)
    # The default guest reached user space from its root disk: /init ran to the end, in order, on x86_64,
    # and its reboot -f ended pyvmm with status 0.  (This boot serves every check of this module that
    # needs a root disk, so the lab tier boots once for them.)
    assert reached_user_space(g.console), g.explain()
    assert re.search(r"PYVMM-INIT: uname \S+ x86_64", g.console), g.explain()
    assert "PYVMM-INIT: test status 0" in g.console, g.explain()
    assert g.status == 0, g.explain()

    # What the guest computed matches what we expect ...
    expected = {name: _content(p, size) for name, (p, size) in GUEST_FILES.items()}
    for name, content in expected.items():
        assert f"GUEST-SHA: {hashlib.sha256(content).hexdigest()}  /pyvmm-test/{name}" in g.console, g.explain()
    # ... and what reached the disk, read on the host with e2fsprogs.
    for name, content in expected.items():
        assert _debugfs_cat(rootfs, f"/pyvmm-test/{name}") == content, name
    fsck = subprocess.run(["e2fsck", "-fn", str(rootfs)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    # The read-only disk refused the write, and its image is unchanged.
    assert "RO-WRITE: rejected" in g.console and "RO-FLAG: 1" in g.console, g.explain()
    assert hashlib.sha256(data.read_bytes()).hexdigest() == data_digest

    # The guest read the host's files.
    assert f"HOST-FILE: {hashlib.sha256(HOST_FILE).hexdigest()}  /etc/pyvmm-host-file" in g.console, g.explain()
    assert "HOST-TEXT: put there by the host" in g.console, g.explain()


SNAPSHOT_SCRIPT = """\
mkdir -p /pyvmm-test
yes 'pyvmm snapshot write' | head -c 300000 > /pyvmm-test/snap
sync
echo "SNAP-SHA: $(sha256sum /pyvmm-test/snap)"
"""


@pytest.mark.lab(bound_s=bound_for(BOOT_TIMEOUT_S))
def test_snapshot_root_disk_leaves_its_image_unchanged(pyvmm_run: Callable[..., Guest], images: Path,
                                                        rootfs: Path, tmp_path: Path) -> None:
    # The guest mounts its root read-write, writes and syncs a file; with snapshot=on all of that goes to
    # pyvmm's overlay and the image stays bit for bit what it was.
    (tmp_path / "snap.sh").write_text(SNAPSHOT_SCRIPT)
    _debugfs(rootfs, "cd /etc", f"write {tmp_path / 'snap.sh'} pyvmm-snap.sh", write=True)
    rootfs.chmod(0o444)  # nothing may open it for writing
    digest = hashlib.sha256(rootfs.read_bytes()).hexdigest()
    g = pyvmm_run("--kernel", str(images / "vmlinux"), "--memory", "256M", "--disk", f"path={rootfs},snapshot=on",
                  "--cmdline", f"{ROOT_CMDLINE} pyvmm.test=/etc/pyvmm-snap.sh", timeout=BOOT_TIMEOUT_S)
    assert reached_user_space(g.console), g.explain()
    assert "PYVMM-INIT: test status 0" in g.console, g.explain()
    written = _content("pyvmm snapshot write\n", 300000)
    assert f"SNAP-SHA: {hashlib.sha256(written).hexdigest()}  /pyvmm-test/snap" in g.console, g.explain()
    assert g.status == 0, g.explain()
    assert hashlib.sha256(rootfs.read_bytes()).hexdigest() == digest
