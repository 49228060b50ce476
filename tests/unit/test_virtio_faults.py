"""virtio-blk when the host disk fails: a FaultyDisk (pyvmm/testing/faultydisk.py) in front of a real image
drives the real VirtioBlock through virtio-mmio.  The guest gets VIRTIO_BLK_S_IOERR for the failed
request, the device stays live (no NEEDS_RESET: the request was well formed), what completed before the
fault is intact, and the next requests work.  Short transfers from the host are retried until complete."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.devices.virtio import block as b
from pyvmm.devices.virtio import disk as disk_mod
from pyvmm.devices.virtio import mmio as m
from pyvmm.devices.virtio.disk import RawDisk
from pyvmm.interrupt import CountingIrq
from pyvmm.memory import GuestMemory
from pyvmm.testing.driverqueue import DriverQueue, setup_device
from pyvmm.testing.faultydisk import Fault, FaultyDisk
from tests.unit.test_virtio_blk import QSIZE, SECTORS, pattern, request_buffers


class Rig:
    def __init__(self, tmp: Path, faults: list[Fault]) -> None:
        self.image = tmp / "disk.img"
        self.image.write_bytes(b"".join(pattern(s) for s in range(SECTORS)))
        self.disk = FaultyDisk(RawDisk(self.image), faults)
        self.dev = b.VirtioBlock(self.disk, queue_size=QSIZE)
        self.mem = GuestMemory.single(1 << 20)
        self.irq = CountingIrq()
        self.t = m.VirtioMmioTransport(self.dev, self.mem, self.irq)
        self.q = DriverQueue(self.mem, 0x1000, QSIZE, data_size=256 << 10)
        setup_device(self.t, [self.q])

    def request(self, rtype: int, sector: int = 0, out: bytes = b"", in_len: int = 0) -> tuple[int, int, bytes]:
        bufs = request_buffers(rtype, sector, out, in_len)
        head = self.q.add_chain(bufs)
        self.t.notify(0)
        (used,) = self.q.get_used()
        assert used.head == head
        status = self.mem.read(self.q.buffers[head][-1][0], 1)[0]
        data = self.q.read_buffer(head, len(bufs) - 2) if in_len else b""
        self.q.reset_data()
        return status, used.length, data

    @property
    def live(self) -> bool:
        return not self.t.read(m.REG_STATUS, 4) & m.STATUS_DEVICE_NEEDS_RESET

    def close(self) -> None:
        self.dev.close()
        self.mem.close()


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[type[Rig]]:
    rigs: list[Rig] = []

    def make(faults: list[Fault]) -> Rig:
        rig = Rig(tmp_path, faults)
        rigs.append(rig)
        return rig

    yield make  # type: ignore[misc]
    for r in rigs:
        r.close()


@pytest.mark.parametrize("kind", ["eio", "enospc"])
def test_failing_writes(make_rig: type[Rig], kind: str) -> None:
    rig = make_rig([Fault("write", kind, after=1, times=2)])
    a, c = b"A" * 1024, b"C" * 512
    assert rig.request(b.VIRTIO_BLK_T_OUT, 4, out=a)[:2] == (b.VIRTIO_BLK_S_OK, 1)  # let through
    assert rig.request(b.VIRTIO_BLK_T_OUT, 8, out=b"B" * 512)[:2] == (b.VIRTIO_BLK_S_IOERR, 1)
    assert rig.request(b.VIRTIO_BLK_T_OUT, 4, out=b"X" * 512)[:2] == (b.VIRTIO_BLK_S_IOERR, 1)
    assert rig.request(b.VIRTIO_BLK_T_OUT, 12, out=c)[:2] == (b.VIRTIO_BLK_S_OK, 1)  # the fault has passed
    assert rig.live and rig.dev.errors == 2
    image = rig.image.read_bytes()
    assert image[4 * 512 : 6 * 512] == a and image[12 * 512 : 13 * 512] == c  # completed writes intact
    assert image[8 * 512 : 9 * 512] == pattern(8)  # the failed one changed nothing
    status, used, data = rig.request(b.VIRTIO_BLK_T_IN, 4, in_len=1024)
    assert (status, used, data) == (b.VIRTIO_BLK_S_OK, 1025, a)


def test_failing_reads_in_a_range(make_rig: type[Rig]) -> None:
    rig = make_rig([Fault("read", "eio", start=10 * 512, end=11 * 512)])
    assert rig.request(b.VIRTIO_BLK_T_IN, 9, in_len=512)[:2] == (b.VIRTIO_BLK_S_OK, 513)
    status, used, _ = rig.request(b.VIRTIO_BLK_T_IN, 9, in_len=1024)  # touches sector 10
    assert (status, used) == (b.VIRTIO_BLK_S_IOERR, 0)  # §2.7.8.2: no data written, the status lies after it
    assert rig.request(b.VIRTIO_BLK_T_IN, 11, in_len=512)[2] == pattern(11)
    assert rig.live


def test_failing_flush(make_rig: type[Rig]) -> None:
    rig = make_rig([Fault("flush", "eio", times=1)])
    assert rig.request(b.VIRTIO_BLK_T_FLUSH)[0] == b.VIRTIO_BLK_S_IOERR
    assert rig.request(b.VIRTIO_BLK_T_FLUSH)[0] == b.VIRTIO_BLK_S_OK
    assert rig.live


def test_a_slow_disk_still_completes(make_rig: type[Rig]) -> None:
    rig = make_rig([Fault("write", "slow", delay_s=0.2)])
    t0 = time.monotonic()
    assert rig.request(b.VIRTIO_BLK_T_OUT, 1, out=b"S" * 512)[0] == b.VIRTIO_BLK_S_OK
    assert time.monotonic() - t0 >= 0.2
    assert rig.image.read_bytes()[512:1024] == b"S" * 512


def test_short_host_transfers_are_retried(make_rig: type[Rig], monkeypatch: pytest.MonkeyPatch) -> None:
    # The host's preadv/pwritev move at most 100 bytes per call (a network filesystem, a signal): every
    # request must still move all its bytes.
    calls = {"read": 0, "write": 0}
    preadv, pwritev = os.preadv, os.pwritev

    def short_preadv(fd: int, bufs: list[memoryview], offset: int) -> int:
        calls["read"] += 1
        return preadv(fd, [bufs[0][:100]], offset)

    def short_pwritev(fd: int, bufs: list[memoryview], offset: int) -> int:
        calls["write"] += 1
        return pwritev(fd, [bufs[0][:100]], offset)

    rig = make_rig([])
    monkeypatch.setattr(disk_mod.os, "preadv", short_preadv)
    monkeypatch.setattr(disk_mod.os, "pwritev", short_pwritev)
    data = bytes(range(256)) * 8  # 2048 bytes
    assert rig.request(b.VIRTIO_BLK_T_OUT, 20, out=data)[:2] == (b.VIRTIO_BLK_S_OK, 1)
    status, used, back = rig.request(b.VIRTIO_BLK_T_IN, 20, in_len=2048)
    assert (status, used, back) == (b.VIRTIO_BLK_S_OK, 2049, data)
    assert calls["write"] >= 21 and calls["read"] >= 21


def test_fault_matching() -> None:
    f = Fault("write", "eio", start=1000, end=2000, after=1, times=1)
    assert not f.matches("read", 1000, 10) and not f.matches("write", 0, 1000)  # other op, other range
    assert not f.matches("write", 1999, 1)  # first match let through
    assert f.matches("write", 500, 600)  # overlaps
    assert not f.matches("write", 1500, 1)  # times used up
    with pytest.raises(ValueError):
        Fault("write", "boom")
    armed = Fault("write", "eio", armed_by=(4096, 8192))
    assert not armed.matches("write", 0, 512) and not armed.matches("read", 0, 4096)  # not yet
    assert not armed.matches("read", 8000, 512)  # this read arms it
    assert armed.matches("write", 0, 512)
