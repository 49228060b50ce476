"""SnapshotDisk (``--disk path=IMG,snapshot=on``): the guest writes to a private overlay, IMG never changes.

The model is a bytearray: whatever sequence of writes, write-zeroes and reads at unaligned offsets and
with scattered buffers, the disk reads back like the bytearray, and the image keeps its sha256.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.config import DiskConfig
from pyvmm.devices.virtio import block as b
from pyvmm.devices.virtio import mmio as m
from pyvmm.devices.virtio.disk import RawDisk
from pyvmm.devices.virtio.snapshot import BLOCK_SIZE, SnapshotDisk
from pyvmm.errors import DeviceError
from pyvmm.interrupt import CountingIrq
from pyvmm.memory import GuestMemory
from pyvmm.testing.driverqueue import DriverQueue, setup_device
from tests.unit.test_virtio_blk import request_buffers


def _content(size: int, seed: int = 1) -> bytes:
    return bytes((i * 31 + seed + (i >> 9)) & 0xFF for i in range(size))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fds_on(path: Path) -> list[int]:
    """The ``flags:`` of every descriptor of this process open on ``path`` (/proc/self/fdinfo, octal)."""
    target = str(path.resolve())
    flags = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") != target:
                continue
            with open(f"/proc/self/fdinfo/{name}") as f:
                line = next(x for x in f if x.startswith("flags:"))
        except (OSError, StopIteration):
            continue
        flags.append(int(line.split()[1], 8))
    return flags


def _fds_under(directory: Path) -> list[str]:
    prefix = str(directory.resolve()) + "/"
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if link.startswith(prefix):
            out.append(link)
    return out


def _split(data: bytes | bytearray, cuts: list[int]) -> list[memoryview]:
    """``data`` as a list of memoryviews cut at ``cuts`` (positions, any order, duplicates allowed)."""
    view = memoryview(data)
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [view[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@pytest.fixture(autouse=True)
def _overlays_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Overlays go to $TMPDIR: keep this module's in its own temporary directory."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "base.img"
    p.write_bytes(_content(16 * BLOCK_SIZE))
    return p


# -- the model property ------------------------------------------------------------------------------
# Image sizes: one sector, under one block, whole blocks, a trailing partial block, and more than one
# byte of the bitmap; the +100 is a trailing partial sector, which is not exposed (as with RawDisk).
IMAGE_SIZES = [512, 1536, 2 * BLOCK_SIZE, 3 * BLOCK_SIZE + 1024, 3 * BLOCK_SIZE + 1024 + 100,
               21 * BLOCK_SIZE + 1024]
OPS = st.lists(
    st.tuples(
        st.sampled_from(["write", "read", "zero", "zero-unmap", "flush"]),
        st.integers(0, 1 << 20),  # offset (taken modulo the size)
        st.integers(0, 12 * BLOCK_SIZE),  # length (clipped to the end)
        st.lists(st.integers(0, 12 * BLOCK_SIZE), max_size=3),  # where the buffers are cut
        st.integers(0, 255),  # the byte pattern of a write
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(file_size=st.sampled_from(IMAGE_SIZES), ops=OPS)
def test_reads_follow_the_model_and_the_image_never_changes(
    file_size: int, ops: list[tuple[str, int, int, list[int], int]]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "base.img"
        original = _content(file_size, seed=file_size)
        path.write_bytes(original)
        digest = _sha(path)
        with SnapshotDisk(path, overlay_dir=Path(tmp)) as disk:
            size = file_size - file_size % 512
            assert disk.size == size and not disk.readonly
            model = bytearray(original[:size])
            for kind, raw_offset, raw_length, cuts, fill in ops:
                offset = raw_offset % size
                length = min(raw_length, size - offset)
                if kind == "write":
                    data = bytes((fill + i) & 0xFF for i in range(length))
                    assert disk.writev(offset, _split(data, cuts)) == length
                    model[offset : offset + length] = data
                elif kind == "read":
                    buf = bytearray(b"\xee" * length)
                    assert disk.readv_into(offset, _split(buf, cuts)) == length
                    assert buf == model[offset : offset + length], (kind, offset, length)
                elif kind.startswith("zero"):
                    disk.write_zeroes(offset, length, unmap=kind == "zero-unmap")
                    model[offset : offset + length] = bytes(length)
                else:
                    disk.flush()
            whole = bytearray(size)
            disk.readv_into(0, [memoryview(whole)])
            assert whole == model
        assert _sha(path) == digest
        assert os.listdir(tmp) == ["base.img"]  # no overlay file left behind


@settings(max_examples=100, deadline=None)
@given(runs=st.lists(st.integers(1, 20), max_size=8), start=st.integers(0, 40 * BLOCK_SIZE - 1), data=st.data())
def test_reads_across_any_pattern_of_written_blocks(runs: list[int], start: int, data: st.DataObject) -> None:
    """Runs of written and unwritten blocks (alternating, of the drawn lengths), longer and shorter than a
    bitmap byte, read in one request."""
    end = data.draw(st.integers(start + 1, 40 * BLOCK_SIZE))
    blocks: set[int] = set()
    pos = 0
    for i, run in enumerate(runs):
        if i % 2:
            blocks.update(range(pos, min(pos + run, 40)))
        pos += run
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "base.img"
        path.write_bytes(_content(40 * BLOCK_SIZE))
        model = bytearray(_content(40 * BLOCK_SIZE))
        with SnapshotDisk(path, overlay_dir=Path(tmp)) as disk:
            for block in blocks:
                chunk = bytes([block + 1]) * BLOCK_SIZE
                disk.writev(block * BLOCK_SIZE, [memoryview(chunk)])
                model[block * BLOCK_SIZE : (block + 1) * BLOCK_SIZE] = chunk
            buf = bytearray(end - start)
            disk.readv_into(start, [memoryview(buf)])
            assert buf == model[start:end]


# -- opening, locking, the overlay ---------------------------------------------------------------------
def test_image_is_opened_read_only(image: Path) -> None:
    """Tests run as root, which may open a 0444 file for writing: the open flags are what counts."""
    image.chmod(0o444)
    for direct in (False, True):
        with SnapshotDisk(image, direct=direct) as disk:
            flags = _fds_on(image)
            assert flags, "the image is not open"
            assert all(f & os.O_ACCMODE == os.O_RDONLY for f in flags), [oct(f) for f in flags]
            disk.writev(0, [memoryview(b"w" * 1024)])
            disk.write_zeroes(8192, 4096, unmap=True)
            disk.flush()
        assert _fds_on(image) == []


def test_image_is_never_locked_for_writing(image: Path) -> None:
    with SnapshotDisk(image) as first, SnapshotDisk(image) as second, RawDisk(image, readonly=True):
        first.writev(0, [memoryview(b"1" * 512)])
        second.writev(0, [memoryview(b"2" * 512)])
        buf = bytearray(512)
        first.readv_into(0, [memoryview(buf)])
        assert buf == b"1" * 512  # each snapshot has its own overlay
        with pytest.raises(DeviceError, match="locked"):
            RawDisk(image)  # the image must not change under a snapshot
    with RawDisk(image), pytest.raises(DeviceError, match="locked by a writer"):
        SnapshotDisk(image)


def test_overlay_is_sparse_anonymous_and_in_tmpdir(image: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(64 << 20)
    with SnapshotDisk(big) as disk:
        (overlay,) = _fds_under(tmpdir)
        assert overlay.endswith("(deleted)")  # unlinked: nothing to clean up, even after SIGKILL
        assert os.listdir(tmpdir) == []
        disk.writev(32 << 20, [memoryview(b"x" * 512)])
        st_ = os.fstat(disk.overlay_fd)
        assert st_.st_size == 64 << 20 and st_.st_blocks * 512 <= 1 << 20
    assert _fds_under(tmpdir) == []


def test_overlay_directory_without_tmpdir(monkeypatch: pytest.MonkeyPatch) -> None:
    """/var/tmp when it is writable, else the system's temporary directory (e.g. a read-only root)."""
    from pyvmm.devices.virtio import snapshot

    monkeypatch.delenv("TMPDIR")
    if os.path.isdir("/var/tmp"):
        monkeypatch.setattr(snapshot.os, "access", lambda path, mode: True)
        assert snapshot.overlay_directory() == "/var/tmp"
    monkeypatch.setattr(snapshot.os, "access", lambda path, mode: False)  # as on a read-only filesystem
    assert snapshot.overlay_directory() == tempfile.gettempdir()


def test_overlay_dir_that_cannot_hold_files_is_one_line(image: Path, tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="overlay") as info:
        SnapshotDisk(image, overlay_dir=tmp_path / "missing")
    assert "\n" not in str(info.value) and str(image) in str(info.value)


def test_sizes_and_open_errors_like_raw_disks(tmp_path: Path) -> None:
    small = tmp_path / "small.img"
    small.write_bytes(b"x" * 100)
    with pytest.raises(DeviceError, match="smaller than one 512-byte sector"):
        SnapshotDisk(small)
    with pytest.raises(DeviceError, match="does not exist"):
        SnapshotDisk(tmp_path / "nope.img")
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"y" * 1500)
    with SnapshotDisk(odd) as disk, RawDisk(odd, readonly=True) as raw:
        assert disk.size == raw.size == 1024


def test_discard_reads_old_data_or_zeros_and_frees_the_overlay(image: Path) -> None:
    digest = _sha(image)
    with SnapshotDisk(image) as disk:
        data = b"D" * (8 * BLOCK_SIZE)
        disk.writev(0, [memoryview(data)])
        used = os.fstat(disk.overlay_fd).st_blocks
        disk.discard(512, 6 * BLOCK_SIZE)  # whole blocks 1..5, parts of blocks 0 and 6
        buf = bytearray(8 * BLOCK_SIZE)
        disk.readv_into(0, [memoryview(buf)])
        assert buf[:512] == data[:512] and buf[512 + 6 * BLOCK_SIZE :] == data[512 + 6 * BLOCK_SIZE :]
        for i in range(512, 512 + 6 * BLOCK_SIZE, 512):
            assert buf[i : i + 512] in (data[:512], bytes(512)), i
        assert os.fstat(disk.overlay_fd).st_blocks < used
    assert _sha(image) == digest


# -- behind the virtio-blk device ----------------------------------------------------------------------
def _device(disk: SnapshotDisk | RawDisk) -> tuple[b.VirtioBlock, m.VirtioMmioTransport, DriverQueue, int]:
    mem = GuestMemory.single(1 << 20)
    dev = b.VirtioBlock(disk, queue_size=16)
    t = m.VirtioMmioTransport(dev, mem, CountingIrq())
    q = DriverQueue(mem, 0x1000, 16, data_size=256 << 10)
    return dev, t, q, setup_device(t, [q])


def _request(t: m.VirtioMmioTransport, q: DriverQueue, rtype: int, sector: int, out: bytes = b"",
             in_len: int = 0) -> tuple[int, bytes]:
    bufs = request_buffers(rtype, sector, out, in_len)
    head = q.add_chain(bufs)
    t.notify(0)
    (used,) = q.get_used()
    assert used.head == head
    status = q.read_buffer(head, len(bufs) - 1)[0]
    return status, q.read_buffer(head, len(bufs) - 2) if in_len else b""


def test_device_sees_a_writable_disk_and_the_image_stays_unchanged(image: Path) -> None:
    digest = _sha(image)
    dev, t, q, features = _device(SnapshotDisk(image))
    try:
        assert not features & b.VIRTIO_BLK_F_RO
        assert features & b.VIRTIO_BLK_F_FLUSH and features & b.VIRTIO_BLK_F_WRITE_ZEROES
        data = bytes(range(256)) * 6
        assert _request(t, q, b.VIRTIO_BLK_T_OUT, 7, out=data)[0] == b.VIRTIO_BLK_S_OK
        assert _request(t, q, b.VIRTIO_BLK_T_FLUSH, 0)[0] == b.VIRTIO_BLK_S_OK
        status, read = _request(t, q, b.VIRTIO_BLK_T_IN, 6, in_len=2560)
        assert status == b.VIRTIO_BLK_S_OK
        assert read == _content(16 * BLOCK_SIZE)[6 * 512 : 7 * 512] + data + _content(16 * BLOCK_SIZE)[10 * 512 : 11 * 512]
        seg = struct.pack("<QII", 8, 1, 1)
        assert _request(t, q, b.VIRTIO_BLK_T_WRITE_ZEROES, 0, out=seg)[0] == b.VIRTIO_BLK_S_OK
        assert _request(t, q, b.VIRTIO_BLK_T_IN, 8, in_len=512)[1] == bytes(512)
    finally:
        dev.close()
    assert _sha(image) == digest


def test_from_config_picks_the_backend(image: Path) -> None:
    cfg = DiskConfig.parse(f"path={image},snapshot=on")
    assert cfg.snapshot
    dev = b.VirtioBlock.from_config(cfg)
    try:
        assert isinstance(dev.disk, SnapshotDisk) and not dev.readonly
    finally:
        dev.close()
    # snapshot=on with readonly=on: nothing can be written, so it is simply a read-only disk
    dev = b.VirtioBlock.from_config(DiskConfig.parse(f"path={image},snapshot=on,readonly=on"))
    try:
        assert isinstance(dev.disk, RawDisk) and dev.readonly and dev.device_features & b.VIRTIO_BLK_F_RO
    finally:
        dev.close()


def test_close_is_idempotent(image: Path) -> None:
    disk = SnapshotDisk(image)
    disk.close()
    disk.close()
    assert _fds_on(image) == []
