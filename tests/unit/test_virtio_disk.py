"""RawDisk: opening, locking, vectored I/O, O_DIRECT with bounce buffers, discard and write zeroes."""

from __future__ import annotations

import logging
import mmap
import os
import tempfile
from pathlib import Path

import pytest

from pyvmm.config import DiskConfig
from pyvmm.devices.virtio.disk import RawDisk
from pyvmm.errors import DeviceError

SIZE = 64 << 10


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(i & 0xFF for i in range(SIZE)))
    return p


def test_open_errors_are_one_line(tmp_path: Path) -> None:
    small = tmp_path / "small.img"
    small.write_bytes(b"x" * 511)
    for path, what in (
        (tmp_path / "nope.img", "does not exist"),
        (tmp_path, "directory"),
        (small, "smaller"),
    ):
        with pytest.raises(DeviceError, match=what) as info:
            RawDisk(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_size_and_partial_sector(tmp_path: Path) -> None:
    p = tmp_path / "odd.img"
    p.write_bytes(b"x" * 1500)
    with RawDisk(p) as d:
        assert (d.size, d.sectors) == (1024, 2)


def test_second_writer_is_refused(image: Path) -> None:
    with RawDisk(image) as first:
        with pytest.raises(DeviceError, match="locked") as info:
            RawDisk(image)
        assert str(image) in str(info.value)
        with pytest.raises(DeviceError, match="locked"):
            RawDisk(image, readonly=True)
        first.close()
        RawDisk(image).close()  # the lock went with the descriptor


def test_readers_share(image: Path) -> None:
    with RawDisk(image, readonly=True) as a, RawDisk(image, readonly=True) as b:
        assert a.readonly and b.readonly
        with pytest.raises(DeviceError, match="locked"):
            RawDisk(image)
        with pytest.raises(OSError):
            a.writev(0, [memoryview(bytearray(512))])


def test_vectored_io(image: Path) -> None:
    with RawDisk(image) as d:
        bufs = [memoryview(bytearray(100)), memoryview(bytearray(412))]
        assert d.readv_into(1024, bufs) == 512
        assert bytes(bufs[0]) + bytes(bufs[1]) == bytes(i & 0xFF for i in range(1024, 1536))
        assert d.writev(0, [memoryview(b"ab"), memoryview(b"cd" * 255)]) == 512
        d.flush()
    assert image.read_bytes()[:6] == b"abcdcd"


def test_read_past_end_of_file_is_zeros(image: Path) -> None:
    with RawDisk(image) as d:
        buf = memoryview(bytearray(b"\xff" * 1024))
        assert d.readv_into(SIZE - 512, [buf]) == 1024
        assert bytes(buf[512:]) == bytes(512)


def test_discard_and_write_zeroes(image: Path) -> None:
    with RawDisk(image) as d:
        d.write_zeroes(4096, 8192, unmap=True)
        d.write_zeroes(20480, 1024, unmap=False)
        d.discard(32768, 4096)
    data = image.read_bytes()
    assert data[4096:12288] == bytes(8192) and data[20480:21504] == bytes(1024)
    assert data[12288] == 12288 & 0xFF and len(data) == SIZE


def test_write_zeroes_fallback_writes_zeros(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from pyvmm.devices.virtio import disk as diskmod

    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "nope")

    monkeypatch.setattr(diskmod, "_fallocate_call", unsupported)
    with RawDisk(image) as d:
        d.write_zeroes(512, 1536, unmap=True)
        d.discard(0, 512)  # a hint: silently ignored
    data = image.read_bytes()
    assert data[512:2048] == bytes(1536) and data[:512] == bytes(i & 0xFF for i in range(512))


def test_direct_io_aligned_and_bounced(image: Path) -> None:
    with RawDisk(image, direct=True) as d:
        if not d.direct:
            pytest.skip("filesystem of the temporary directory has no O_DIRECT")
        with mmap.mmap(-1, 8192) as area:
            view = memoryview(area)
            try:
                assert d.readv_into(512, [view[:1024]]) == 1024  # aligned: straight O_DIRECT
                assert bytes(view[:4]) == bytes([0, 1, 2, 3])
                # unaligned buffers go through the bounce buffer
                parts = [view[3000:3100], view[5001:5413]]
                assert d.readv_into(2048, parts) == 512
                assert bytes(parts[0][:2]) == bytes([0, 1])
                parts[0][:] = b"Q" * 100
                assert d.writev(4096, parts) == 512
                assert d.writev(8192, [memoryview(b"R" * 512)]) == 512  # read-only buffer: bounced
                d.flush()
                for p in parts:
                    p.release()
            finally:
                view.release()
    data = image.read_bytes()
    assert data[4096:4196] == b"Q" * 100 and data[8192:8704] == b"R" * 512


def test_direct_io_fallback_on_tmpfs(caplog: pytest.LogCaptureFixture) -> None:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as f:
        f.write(b"\0" * 4096)
        f.flush()
        with caplog.at_level(logging.WARNING), RawDisk(f.name, direct=True) as d:
            assert d.readv_into(0, [memoryview(bytearray(512))]) == 512
        if not d.direct:
            assert "O_DIRECT" in caplog.text


def test_from_config(image: Path) -> None:
    with RawDisk.from_config(DiskConfig.parse(f"path={image},readonly=on,cache=none")) as d:
        assert d.readonly and d.size == SIZE
