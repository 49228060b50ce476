"""The packed virtqueue (virtio 1.2 §2.8) behind virtio-blk over virtio-mmio, driven by the tests' own
packed driver (pyvmm.testing.driverqueue.PackedDriverQueue): negotiation, requests across many ring
wraps, chained and indirect buffers, event suppression, and hostile rings (DEVICE_NEEDS_RESET, never an
exception, never a write outside the rings and the buffers)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.devices.virtio import block as b
from pyvmm.devices.virtio import device as d
from pyvmm.devices.virtio import mmio as m
from pyvmm.devices.virtio.disk import RawDisk
from pyvmm.devices.virtio.packed import PackedVirtqueue
from pyvmm.interrupt import CountingIrq
from pyvmm.memory import GuestMemory
from pyvmm.testing.driverqueue import (
    EVENT_DESC,
    EVENT_DISABLE,
    EVENT_ENABLE,
    DriverQueue,
    PackedDriverQueue,
    SetupError,
    setup_device,
)
from tests.conftest import count_example
from tests.unit.test_virtio_blk import SECTORS, pattern, request_buffers
from tests.unit.test_virtio_properties import EXAMPLES

QBASE = 0x10000
PDESC = struct.Struct("<QIHH")


class Rig:
    def __init__(self, image: Path, *, size: int = 8, ring: str = "auto", features: int | None = None) -> None:
        self.disk = RawDisk(image, readonly=False)
        self.dev = b.VirtioBlock(self.disk, queue_size=size)
        self.mem = GuestMemory.single(2 << 20)
        self.irq = CountingIrq()
        self.events: list[str] = []
        self.t = m.VirtioMmioTransport(self.dev, self.mem, self.irq, ring=ring, trace=self.events.append)
        self.q = PackedDriverQueue(self.mem, QBASE, size, data_size=512 << 10)
        self.features = setup_device(self.t, [self.q], features=features)

    @property
    def needs_reset(self) -> bool:
        return bool(self.t.read(m.REG_STATUS, 4) & m.STATUS_DEVICE_NEEDS_RESET)

    def read(self, sector: int, *, indirect: bool = False) -> tuple[int, int, bytes]:
        head = self.q.add_chain(request_buffers(b.VIRTIO_BLK_T_IN, sector, in_len=512), indirect=indirect)
        self.t.notify(0)
        used = self.q.get_used()
        assert [u.head for u in used] == [head], used
        return self.mem.read(self.q.buffers[head][-1][0], 1)[0], used[0].length, self.q.read_buffer(head, 1)

    def close(self) -> None:
        self.dev.close()
        self.mem.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(b"".join(pattern(s) for s in range(SECTORS)))
    return path


@pytest.fixture
def rig(image: Path) -> Iterator[Rig]:
    r = Rig(image)
    yield r
    r.close()


def test_packed_negotiated_and_the_queue_is_packed(rig: Rig) -> None:
    assert rig.features & d.VIRTIO_F_RING_PACKED
    assert isinstance(rig.t.queues[0], PackedVirtqueue) and rig.t.queues[0].ready
    assert rig.events[0].startswith("ready queues=1 layout=packed")


def test_ring_modes(image: Path) -> None:
    mem = GuestMemory.single(2 << 20)
    try:
        for ring, offered in (("auto", True), ("packed", True), ("split", False)):
            t = m.VirtioMmioTransport(b.VirtioBlock(RawDisk(image, readonly=True)), mem, CountingIrq(), ring=ring)
            t.write(m.REG_DEVICE_FEATURES_SEL, 4, 1)
            assert bool(t.read(m.REG_DEVICE_FEATURES, 4) & 4) == offered, ring  # bit 34 = bit 2 of word 1
        # ring=packed: a driver that wants split queues is refused at FEATURES_OK (§2.2.1)
        t = m.VirtioMmioTransport(b.VirtioBlock(RawDisk(image, readonly=True)), mem, CountingIrq(), ring="packed")
        with pytest.raises(SetupError):
            setup_device(t, [DriverQueue(mem, QBASE, 8)])
        # a legacy device has no packed queues
        t = m.VirtioMmioTransport(b.VirtioBlock(RawDisk(image, readonly=True)), mem, CountingIrq(), version=1)
        t.write(m.REG_DEVICE_FEATURES_SEL, 4, 1)
        assert t.read(m.REG_DEVICE_FEATURES, 4) == 0
        with pytest.raises(ValueError):
            m.VirtioMmioTransport(b.VirtioBlock(RawDisk(image, readonly=True)), mem, CountingIrq(), ring="ring")
    finally:
        mem.close()


def test_a_read_through_the_packed_ring(rig: Rig) -> None:
    status, length, data = rig.read(9)
    assert (status, length, data) == (b.VIRTIO_BLK_S_OK, 513, pattern(9))
    assert rig.irq.count == 1
    assert any(e.startswith("used head=") and "slot=3 wrap=1" in e for e in rig.events)  # 3 slots taken


@pytest.mark.parametrize("indirect", [False, True])
def test_many_ring_wraps_each_request_used_once(rig: Rig, indirect: bool) -> None:
    """An 8-slot ring, chains of 3 slots (or 1 indirect): the counters wrap many times, every request comes
    back once with its data, and the buffer IDs are reused as the driver frees them."""
    for n in range(60):
        sector = (n * 7) % SECTORS
        assert rig.read(sector, indirect=indirect) == (b.VIRTIO_BLK_S_OK, 513, pattern(sector))
    q = rig.t.queues[0]
    assert isinstance(q, PackedVirtqueue) and not rig.needs_reset


def test_batches_that_fill_the_ring(rig: Rig) -> None:
    """Two chains of 3 and one of 2 fill all 8 slots; they complete in order; the next batch wraps."""
    for _ in range(5):
        heads = [rig.q.add_chain(request_buffers(b.VIRTIO_BLK_T_IN, s, in_len=512)) for s in (1, 2)]
        heads.append(rig.q.add_chain(request_buffers(b.VIRTIO_BLK_T_FLUSH)))
        rig.t.notify(0)
        used = rig.q.get_used()
        assert [u.head for u in used] == heads
        assert [u.length for u in used] == [513, 513, 1]


def test_writes_land_on_the_disk(rig: Rig, image: Path) -> None:
    head = rig.q.add_chain(request_buffers(b.VIRTIO_BLK_T_OUT, 4, out=b"\x5a" * 1024))
    rig.t.notify(0)
    assert [u.head for u in rig.q.get_used()] == [head]
    assert image.read_bytes()[4 * 512:6 * 512] == b"\x5a" * 1024


def test_event_suppression(image: Path) -> None:
    r = Rig(image, size=16)
    try:
        r.q.set_driver_event(EVENT_DISABLE)
        r.read(1)
        assert r.irq.count == 0  # "never"
        r.q.set_driver_event(EVENT_ENABLE)
        r.read(2)
        assert r.irq.count == 1  # "always"
        # EVENT_IDX: interrupt only once the used descriptor at slot 12 (this wrap) is written
        r.q.set_driver_event(EVENT_DESC, off=12, wrap=True)
        r.read(3)  # used slot 6 -> 9
        assert r.irq.count == 1
        r.read(4)  # 9 -> 12
        assert r.irq.count == 1
        r.read(5)  # 12 -> 15: slot 12 written
        assert r.irq.count == 2
    finally:
        r.close()


def _raw(rig: Rig, slot: int, addr: int, length: int, buffer_id: int, flags: int) -> None:
    rig.mem.pack_into(PDESC, rig.q.desc_addr + 16 * slot, addr, length, buffer_id, flags)


AVAIL = 1 << 7  # with the device's avail wrap counter at 1: AVAIL set, USED clear


@pytest.mark.parametrize("case", ["loop", "nested-indirect", "outside-ram", "read-after-write", "id-twice"])
def test_hostile_rings_need_a_reset(rig: Rig, case: str) -> None:
    buf = rig.q.alloc(512)
    if case == "loop":  # every slot says NEXT: a chain longer than the ring
        for s in range(8):
            _raw(rig, s, buf, 16, 0, AVAIL | 1)
    elif case == "nested-indirect":
        table = rig.q.alloc(32)
        rig.mem.pack_into(PDESC, table, buf, 16, 0, 4)  # INDIRECT inside the table
        _raw(rig, 0, table, 32, 0, AVAIL | 4)
    elif case == "outside-ram":
        _raw(rig, 0, 0x7000_0000, 512, 0, AVAIL)
    elif case == "read-after-write":
        _raw(rig, 0, buf, 16, 0, AVAIL | 1 | 2)
        _raw(rig, 1, buf, 16, 0, AVAIL)
    else:  # the same buffer ID made available twice before it was used
        rig.dev.process_queue = lambda index, mem: bool(rig.t.queues[0].pop(mem)) and bool(  # type: ignore[method-assign]
            rig.t.queues[0].pop(mem))
        _raw(rig, 0, buf, 16, 5, AVAIL)
        _raw(rig, 1, buf, 16, 5, AVAIL)
    rig.t.notify(0)  # never raises
    assert rig.needs_reset
    rig.t.write(m.REG_STATUS, 4, 0)  # and a reset brings the device back
    assert rig.t.read(m.REG_STATUS, 4) == 0 and isinstance(rig.t.queues[0], type(rig.t.queues[0]))


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(slots=st.lists(st.tuples(st.integers(0, (2 << 20) + 0x1000), st.integers(0, 1 << 16),
                                st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)), min_size=1, max_size=8))
def test_garbage_rings_never_escape(image: Path, slots: list[tuple[int, int, int, int]]) -> None:
    """Random descriptors in the ring: the device answers with used descriptors or DEVICE_NEEDS_RESET,
    never an exception; it never writes the driver's event suppression structure, and a used descriptor
    names a buffer ID that was made available.  As many examples as the split ring's garbage test."""
    count_example("packed_garbage_rings_never_escape")
    r = Rig(image)
    try:
        for i, (addr, length, buffer_id, flags) in enumerate(slots):
            _raw(r, i, addr, length, buffer_id, flags)
        r.q.set_driver_event(EVENT_ENABLE)
        driver_area = r.mem.read(r.q.avail_addr, 4)
        # the IDs in the ring (a chain's ID is its last descriptor's, which may be a zeroed slot)
        offered = {r.mem.unpack_from(PDESC, r.q.desc_addr + 16 * i)[2] for i in range(8)}
        r.t.notify(0)
        assert r.mem.read(r.q.avail_addr, 4) == driver_area
        if not r.needs_reset:
            used_id, used_flags = r.mem.unpack_from(struct.Struct("<HH"), r.q.desc_addr + 12)
            if used_flags & (1 << 15) and used_flags & (1 << 7):  # slot 0 holds a used descriptor
                assert used_id in offered
    finally:
        r.close()


def test_disk_ring_option() -> None:
    from pyvmm.config import DiskConfig
    from pyvmm.errors import ConfigError

    assert DiskConfig.parse("path=x.img").ring == "auto"
    assert DiskConfig.parse("path=x.img,ring=packed").ring == "packed"
    assert DiskConfig.parse("x.img,ring=split").ring == "split"
    with pytest.raises(ConfigError, match="bad ring layout 'round'"):
        DiskConfig.parse("path=x.img,ring=round")


def test_used_descriptors_out_of_order(rig: Rig) -> None:
    """A device may return buffers in any order (§2.8.9): the used descriptor carries the buffer ID, and
    the driver frees each chain's slots by its ID, whatever slot the answer landed in."""
    q = rig.t.queues[0]
    assert isinstance(q, PackedVirtqueue)
    heads = [rig.q.add_chain([(b"x" * 16, False), (8, True)]) for _ in range(3)]  # 2 slots each
    chains = [q.pop(rig.mem) for _ in range(3)]
    assert [c.head for c in chains if c is not None] == heads
    for c in reversed(chains):
        assert c is not None
        q.push_used(rig.mem, c.head, 8)
    assert [u.head for u in rig.q.get_used()] == heads[::-1]
    # all six slots are the driver's again: three more chains fit, the ring wraps, nothing is lost
    more = [rig.q.add_chain([(b"y" * 16, False), (8, True)]) for _ in range(3)]
    for _ in range(3):
        c = q.pop(rig.mem)
        assert c is not None
        q.push_used(rig.mem, c.head, 8)
    assert [u.head for u in rig.q.get_used()] == more and q.used_wrap is False


def test_activation_checks_that_the_ring_and_both_event_structures_are_in_ram() -> None:
    mem = GuestMemory.single(1 << 20)
    try:
        q = PackedVirtqueue(64)
        q.size, q.desc_addr, q.avail_addr, q.used_addr = 64, 0x1000, 0x2000, 0x3000
        assert q.activate(mem) is None
        q.desc_addr = (1 << 20) - 16 * 64 + 16  # the last descriptor past the end of RAM
        assert "descriptor ring" in (q.activate(mem) or "")
        q.desc_addr, q.used_addr = 0x1000, 1 << 20  # aligned, but just past the end
        assert "device area" in (q.activate(mem) or "")
        q.used_addr, q.avail_addr = 0x3000, 1 << 30
        assert "driver area" in (q.activate(mem) or "")
    finally:
        mem.close()
