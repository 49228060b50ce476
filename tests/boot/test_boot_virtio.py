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
from pathlib import Path

import pytest

from pyvmm import VM
from pyvmm.pytest_plugin import PyvmmImages
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
def rootfs(pyvmm_images: PyvmmImages, images: Path, tmp_path: Path) -> Path:
    """A copy of the root disk under test (``--pyvmm-disk``, default images/out/rootfs.ext4)."""
    if shutil.which("dumpe2fs") is None or shutil.which("e2fsck") is None:
        pytest.skip("e2fsprogs (dumpe2fs, e2fsck) is not installed")
    copy = tmp_path / "rootfs.ext4"
    shutil.copyfile(pyvmm_images.disk or images / "rootfs.ext4", copy)
    return copy


def test_root_on_virtio_blk_read_write(boot: Boot, images: Path, rootfs: Path, software_kvm: bool) -> None:
    """The root disk offers the packed virtqueue (ring=auto) and the data disk does not (ring=split): the
    trace shows which layout each device's queues took."""
    before = _mount_count(rootfs)
    data = rootfs.parent / "data.img"
    data.write_bytes(b"\0" * (1 << 20))
    trace = rootfs.parent / "trace.txt"
    vm: VM = boot(initrd=None, memory="256M",  # the kernel under test: --pyvmm-kernel (default images/out/vmlinux)
                  disks=[f"path={rootfs}", f"path={data},readonly=on,serial=data0,ring=split"],
                  cmdline=f"{ROOT_ARGS} rw", extra_args=["--trace", "virtio.setup", "--trace-file", str(trace)])
    setups = trace.read_text()
    assert re.search(r"vda\s+setup\s+DRIVER_OK: 1 queue\(s\) live, packed virtqueue layout", setups), setups
    assert re.search(r"vdb\s+setup\s+DRIVER_OK: 1 queue\(s\) live, split virtqueue layout", setups), setups
    console = vm.console_text
    assert re.search(r"virtio_blk virtio0: \[vda\] 131072 512-byte logical blocks", console), vm.explain()
    assert re.search(r"virtio_blk virtio1: \[vdb\] 2048 512-byte logical blocks", console), vm.explain()
    assert "EXT4-fs (vda): mounted filesystem" in console, vm.explain()
    assert re.search(r"VFS: Mounted root \(ext4 filesystem\) on device 254:0", console), vm.explain()
    assert "Run /init as init process" in console, vm.explain()
    if not software_kvm:
        assert "PYVMM-INIT: vda present" in console and vm.status == 0, vm.explain()
    # The kernel's writes reached the image: the superblock's mount count went up, and the
    # filesystem is consistent.
    assert _mount_count(rootfs) == before + 1
    fsck = subprocess.run(["e2fsck", "-fn", str(rootfs)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_read_only_disk_mounts_read_only(boot: Boot, images: Path, rootfs: Path) -> None:
    digest = _sha256(rootfs)
    vm: VM = boot(initrd=None, memory="256M", disks=[f"path={rootfs},readonly=on"],
                  cmdline=f"{ROOT_ARGS} rw")
    assert re.search(r"VFS: Mounted root \(ext4 filesystem\) readonly on device 254:0", vm.console_text), \
        vm.explain()
    assert "Run /init as init process" in vm.console_text, vm.explain()
    assert _sha256(rootfs) == digest  # not one byte written


def test_root_on_the_legacy_virtio_mmio_transport(boot: Boot, images: Path, rootfs: Path,
                                                  software_kvm: bool) -> None:
    """The same read-write root on a version 1 (legacy, virtio 1.2 §4.2.4) device: Linux's virtio_mmio
    driver takes its legacy path (GuestPageSize, QueuePFN) from the Version register, and a device that
    answers only those registers works only if that path is right."""
    before = _mount_count(rootfs)
    vm: VM = boot(initrd=None, memory="256M", disks=[f"path={rootfs}"], cmdline=f"{ROOT_ARGS} rw",
                  extra_args=["--virtio-mmio-version", "1"])
    console = vm.console_text
    assert "(legacy virtio-mmio version 1)" in vm.log, vm.explain()
    assert re.search(r"virtio_blk virtio0: \[vda\] 131072 512-byte logical blocks", console), vm.explain()
    assert re.search(r"VFS: Mounted root \(ext4 filesystem\) on device 254:0", console), vm.explain()
    assert "Run /init as init process" in console, vm.explain()
    if not software_kvm:
        assert "PYVMM-INIT: vda present" in console and vm.status == 0, vm.explain()
    assert _mount_count(rootfs) == before + 1
    fsck = subprocess.run(["e2fsck", "-fn", str(rootfs)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
