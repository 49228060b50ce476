"""The guest kernel finds pyvmm's virtio-blk disks and mounts its root from one.

This runs on the software-emulating host KVM too: probing the device, reading the partition table and
the superblock, replaying and writing the journal and superblock on a read-write mount are all kernel
work.  The host then checks the image with e2fsprogs.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.boot.conftest import Boot

pytestmark = pytest.mark.boot

ROOT_ARGS = "console=ttyS0 root=/dev/vda init=/init"


def _mount_count(image: Path) -> int:
    out = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"^Mount count:\s+(\d+)", out, re.MULTILINE)
    assert m, out
    return int(m.group(1))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def rootfs(images: Path, tmp_path: Path) -> Path:
    if shutil.which("dumpe2fs") is None or shutil.which("e2fsck") is None:
        pytest.skip("e2fsprogs (dumpe2fs, e2fsck) is not installed")
    copy = tmp_path / "rootfs.ext4"
    shutil.copyfile(images / "rootfs.ext4", copy)
    return copy


def test_root_on_virtio_blk_read_write(boot: Callable[..., Boot], images: Path, rootfs: Path,
                                       software_kvm: bool) -> None:
    before = _mount_count(rootfs)
    data = rootfs.parent / "data.img"
    data.write_bytes(b"\0" * (1 << 20))
    b = boot("--kernel", str(images / "vmlinux"), "--memory", "256M",
             "--disk", f"path={rootfs}", "--disk", f"path={data},readonly=on,serial=data0",
             "--cmdline", f"{ROOT_ARGS} rw")
    assert re.search(r"virtio_blk virtio0: \[vda\] 131072 512-byte logical blocks", b.console), b.explain()
    assert re.search(r"virtio_blk virtio1: \[vdb\] 2048 512-byte logical blocks", b.console), b.explain()
    assert "EXT4-fs (vda): mounted filesystem" in b.console, b.explain()
    assert re.search(r"VFS: Mounted root \(ext4 filesystem\) on device 254:0", b.console), b.explain()
    assert "Run /init as init process" in b.console, b.explain()
    if not software_kvm:
        assert "PYVMM-INIT: vda present" in b.console and b.status == 0, b.explain()
    # The kernel's writes reached the image: the superblock's mount count went up, and the
    # filesystem is consistent.
    assert _mount_count(rootfs) == before + 1
    fsck = subprocess.run(["e2fsck", "-fn", str(rootfs)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_read_only_disk_mounts_read_only(boot: Callable[..., Boot], images: Path, rootfs: Path) -> None:
    digest = _sha256(rootfs)
    b = boot("--kernel", str(images / "vmlinux"), "--memory", "256M",
             "--disk", f"path={rootfs},readonly=on", "--cmdline", f"{ROOT_ARGS} rw")
    assert re.search(r"VFS: Mounted root \(ext4 filesystem\) readonly on device 254:0", b.console), b.explain()
    assert "Run /init as init process" in b.console, b.explain()
    assert _sha256(rootfs) == digest  # not one byte written
