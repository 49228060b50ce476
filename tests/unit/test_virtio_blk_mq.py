"""virtio-blk with several request queues (VIRTIO_BLK_F_MQ, virtio 1.2 §5.2.3-§5.2.5): what the device
offers, requests in flight on two queues at the same time, each used exactly once, and the threads that
serve one queue each."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from pyvmm.buildparts import QueueWorker
from pyvmm.config import DiskConfig
from pyvmm.devices.virtio import block as b
from pyvmm.devices.virtio import mmio as m
from pyvmm.devices.virtio.disk import RawDisk
from pyvmm.errors import ConfigError
from pyvmm.interrupt import CountingIrq, EventFd
from pyvmm.memory import GuestMemory
from pyvmm.testing.driverqueue import DriverQueue, setup_device
from tests.unit.test_virtio_blk import QSIZE, SECTORS, pattern, request_buffers

NUM_QUEUES_OFFSET = 34  # §5.2.4: le16 num_queues after capacity..writeback, unused0


class GatedDisk(RawDisk):
    """Reads of ``gated_sector`` wait for ``gate``: a request that stays in flight."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, readonly=False)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.gated_sector = -1

    def readv_into(self, offset: int, buffers: Sequence[memoryview]) -> int:
        if offset == self.gated_sector * 512:
            self.entered.set()
            assert self.gate.wait(10)
        return super().readv_into(offset, buffers)


class Rig:
    def __init__(self, tmp: Path, num_queues: int = 2) -> None:
        image = tmp / "disk.img"
        image.write_bytes(b"".join(pattern(s) for s in range(SECTORS)))
        self.disk = GatedDisk(image)
        self.dev = b.VirtioBlock(self.disk, queue_size=QSIZE, num_queues=num_queues)
        self.mem = GuestMemory.single(4 << 20)
        self.irq = CountingIrq()
        self.t = m.VirtioMmioTransport(self.dev, self.mem, self.irq)
        self.queues = [DriverQueue(self.mem, 0x10000 + i * 0x100000, QSIZE, data_size=256 << 10)
                       for i in range(num_queues)]
        self.features = setup_device(self.t, self.queues)

    def close(self) -> None:
        self.disk.gate.set()
        self.dev.close()
        self.mem.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def test_mq_offered_with_the_queue_count(rig: Rig) -> None:
    assert rig.features & b.VIRTIO_BLK_F_MQ
    assert int.from_bytes(rig.dev.config_bytes()[NUM_QUEUES_OFFSET:NUM_QUEUES_OFFSET + 2], "little") == 2
    assert all(q.ready for q in rig.t.queues) and len(rig.t.queues) == 2
    rig.t.write(m.REG_QUEUE_SEL, 4, 2)
    assert rig.t.read(m.REG_QUEUE_NUM_MAX, 4) == 0  # no third queue


def test_one_queue_offers_no_mq(tmp_path: Path) -> None:
    r = Rig(tmp_path, num_queues=1)
    try:
        assert not r.features & b.VIRTIO_BLK_F_MQ
        assert int.from_bytes(r.dev.config_bytes()[NUM_QUEUES_OFFSET:NUM_QUEUES_OFFSET + 2], "little") == 1
    finally:
        r.close()
    with pytest.raises(ValueError):
        b.VirtioBlock(RawDisk(tmp_path / "disk.img", readonly=True), num_queues=0)


def test_two_queues_in_flight_at_once_each_request_used_once(rig: Rig) -> None:
    """Queue 0's read is held inside the disk while queue 1's requests are served to the end: the queues
    do not wait for each other, and every request comes back exactly once, on its own queue."""
    q0, q1 = rig.queues
    rig.disk.gated_sector = 3
    slow = q0.add_chain(request_buffers(b.VIRTIO_BLK_T_IN, 3, in_len=512))
    worker = threading.Thread(target=rig.t.notify, args=(0,))
    worker.start()
    assert rig.disk.entered.wait(5)
    fast = [q1.add_chain(request_buffers(b.VIRTIO_BLK_T_IN, s, in_len=512)) for s in (5, 6, 7)]
    rig.t.notify(1)  # returns while queue 0's request is still in flight
    used1 = q1.get_used()
    assert [u.head for u in used1] == fast and worker.is_alive() and q0.get_used() == []
    assert [q1.read_buffer(h, 1) for h in fast] == [pattern(s) for s in (5, 6, 7)]
    rig.disk.gate.set()
    worker.join(5)
    used0 = q0.get_used()
    assert [u.head for u in used0] == [slow] and q0.read_buffer(slow, 1) == pattern(3)
    assert q0.get_used() == [] and q1.get_used() == []  # nothing twice


def test_concurrent_writes_on_both_queues_land(rig: Rig, tmp_path: Path) -> None:
    q0, q1 = rig.queues
    heads: list[list[int]] = [[], []]

    def submit(qi: int) -> None:
        q = rig.queues[qi]
        for k in range(4):
            sector = 16 * qi + k
            heads[qi].append(q.add_chain(request_buffers(b.VIRTIO_BLK_T_OUT, sector, out=bytes([qi * 16 + k]) * 512)))
            rig.t.notify(qi)

    threads = [threading.Thread(target=submit, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(u.head for u in q0.get_used()) == sorted(heads[0])
    assert sorted(u.head for u in q1.get_used()) == sorted(heads[1])
    data = (tmp_path / "disk.img").read_bytes()
    for qi in (0, 1):
        for k in range(4):
            sector = 16 * qi + k
            assert data[sector * 512:(sector + 1) * 512] == bytes([qi * 16 + k]) * 512


def test_queue_worker_serves_its_eventfd_until_closed() -> None:
    calls: list[tuple[int, str | None]] = []

    class Transport:
        def notify(self, index: int, *, via: str | None = None) -> None:
            calls.append((index, via))

    efd = EventFd()
    worker = QueueWorker(efd, Transport(), 3, "vda.q3", None)  # type: ignore[arg-type]
    worker.start()
    efd.write(1)
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.close()
    efd.close()
    assert calls == [(3, "ioeventfd")]


def test_queue_worker_failure_stops_the_vm() -> None:
    stops: list[str] = []

    class Broken:
        def notify(self, index: int, *, via: str | None = None) -> None:
            raise RuntimeError("device bug")

    efd = EventFd()
    worker = QueueWorker(efd, Broken(), 0, "vda.q0", lambda status, why: stops.append(why))  # type: ignore[arg-type]
    worker.start()
    efd.write(1)
    deadline = time.monotonic() + 5
    while not stops and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.close()
    efd.close()
    assert stops and "device bug" in stops[0]


@pytest.mark.parametrize(("spec", "queues"), [("path=x.img", None), ("path=x.img,queues=4", 4), ("x.img,queues=1", 1)])
def test_disk_queues_option(spec: str, queues: int | None) -> None:
    assert DiskConfig.parse(spec).queues == queues


@pytest.mark.parametrize("bad", ["0", "65", "two", "-1"])
def test_disk_queues_option_refuses_bad_counts(bad: str) -> None:
    with pytest.raises(ConfigError, match="queue count"):
        DiskConfig.parse(f"path=x.img,queues={bad}")
