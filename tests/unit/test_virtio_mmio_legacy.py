"""The legacy virtio-mmio transport (virtio 1.2 §4.2.4, version 1): its register file, the page-based
queue layout of §2.7.2, the legacy initialisation without FEATURES_OK (§3.1.2), and virtio-blk over it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.devices.virtio import block as b
from pyvmm.devices.virtio import device as d
from pyvmm.devices.virtio import mmio as m
from pyvmm.devices.virtio.disk import RawDisk
from pyvmm.interrupt import CountingIrq
from pyvmm.memory import GuestMemory
from pyvmm.testing.driverqueue import DriverQueue, setup_device, setup_legacy_device
from tests.unit.test_virtio_blk import HDR, QSIZE, SECTORS, pattern, request_buffers
from tests.unit.test_virtio_mmio import FEATURE_X, Rig

PAGE = 4096


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig(version=1)
    yield r
    r.mem.close()


def test_identification_and_features(rig: Rig) -> None:
    assert rig.r(m.REG_MAGIC_VALUE) == 0x74726976
    assert rig.r(m.REG_VERSION) == 1
    assert rig.r(m.REG_DEVICE_ID) == 42
    rig.w(m.REG_DEVICE_FEATURES_SEL, 0)
    assert rig.r(m.REG_DEVICE_FEATURES) == FEATURE_X | d.VIRTIO_F_EVENT_IDX
    rig.w(m.REG_DEVICE_FEATURES_SEL, 1)
    assert rig.r(m.REG_DEVICE_FEATURES) == 0  # a legacy device does not offer VIRTIO_F_VERSION_1 (bit 32)


def test_version_2_registers_do_not_exist_in_version_1(rig: Rig) -> None:
    for off in (m.REG_QUEUE_READY, m.REG_SHM_LEN_LOW, m.REG_SHM_BASE_HIGH, m.REG_CONFIG_GENERATION,
                m.REG_QUEUE_RESET):
        assert rig.r(off) == 0
    rig.w(m.REG_QUEUE_SEL, 0)
    rig.w(m.REG_QUEUE_DESC_LOW, 0x10000)
    rig.w(m.REG_QUEUE_READY, 1)
    assert not rig.t.queues[0].ready and rig.t.queues[0].desc_addr == 0


def test_legacy_registers_do_not_exist_in_version_2() -> None:
    rig = Rig(version=2)  # the same rig with the version 2 transport
    rig.w(m.REG_GUEST_PAGE_SIZE, PAGE)
    rig.w(m.REG_QUEUE_SEL, 0)
    rig.w(m.REG_QUEUE_PFN, 0x10)
    assert rig.r(m.REG_QUEUE_PFN) == 0 and not rig.t.queues[0].ready and rig.t.guest_page_size == 0
    rig.mem.close()


def test_legacy_setup_places_the_rings_from_the_page_number(rig: Rig) -> None:
    features = setup_legacy_device(rig.t, [rig.q0, rig.q1])
    assert features == FEATURE_X | d.VIRTIO_F_EVENT_IDX
    assert rig.r(m.REG_STATUS) == m.STATUS_ACKNOWLEDGE | m.STATUS_DRIVER | m.STATUS_DRIVER_OK  # no FEATURES_OK
    assert rig.dev.activations == [features]
    for i, dq in enumerate((rig.q0, rig.q1)):
        q = rig.t.queues[i]
        assert (q.desc_addr, q.avail_addr, q.used_addr) == (dq.desc_addr, dq.avail_addr, dq.used_addr)
        assert q.ready and q.event_idx
        rig.w(m.REG_QUEUE_SEL, i)
        assert rig.r(m.REG_QUEUE_PFN) == dq.desc_addr // PAGE


def test_requests_flow_through_a_legacy_queue(rig: Rig) -> None:
    setup_legacy_device(rig.t, [rig.q0, rig.q1])
    heads = [rig.q1.add_chain([(b"hello", False), (16, True)]) for _ in range(3)]
    rig.w(m.REG_QUEUE_NOTIFY, 1)
    assert [u.head for u in rig.q1.get_used()] == heads
    assert rig.irq.count == 1 and rig.r(m.REG_INTERRUPT_STATUS) == m.INT_USED_BUFFER


@pytest.mark.parametrize(("size", "align", "used"), [(16, 4096, 0x1000), (16, 16, 0x130), (8, 64, 0xC0),
                                                     (4, 4, 0x50)])
def test_used_ring_alignment_follows_queue_align(rig: Rig, size: int, align: int, used: int) -> None:
    # §2.7.2: the used ring starts at the first multiple of QueueAlign after desc[size] and avail (6 + 2 * size)
    rig.w(m.REG_GUEST_PAGE_SIZE, PAGE)
    rig.w(m.REG_QUEUE_SEL, 0)
    rig.w(m.REG_QUEUE_NUM, size)
    rig.w(m.REG_QUEUE_ALIGN, align)
    rig.w(m.REG_QUEUE_PFN, 0x30)
    q = rig.t.queues[0]
    assert q.ready and q.desc_addr == 0x30000 and q.avail_addr == 0x30000 + 16 * size
    assert q.used_addr == 0x30000 + used


def test_guest_page_size_sets_the_unit_of_the_page_number(rig: Rig) -> None:
    rig.w(m.REG_GUEST_PAGE_SIZE, 1 << 16)
    rig.w(m.REG_QUEUE_SEL, 1)
    rig.w(m.REG_QUEUE_PFN, 3)
    assert rig.t.queues[1].desc_addr == 3 << 16 and rig.t.queues[1].ready


def test_queue_pfn_0_stops_the_queue(rig: Rig) -> None:
    setup_legacy_device(rig.t, [rig.q0, rig.q1])
    rig.w(m.REG_QUEUE_SEL, 0)
    rig.w(m.REG_QUEUE_PFN, 0)
    assert rig.r(m.REG_QUEUE_PFN) == 0 and not rig.t.queues[0].ready
    rig.q0.add_chain([(b"x", False)])
    rig.w(m.REG_QUEUE_NOTIFY, 0)
    assert rig.q0.get_used() == [] and rig.dev.processed == []


@pytest.mark.parametrize(("page", "align", "pfn", "num"), [
    (0, 4096, 0x10, 16), (3000, 4096, 0x10, 16), (4096, 0, 0x10, 16), (4096, 100, 0x10, 16),
    (4096, 4096, 0xFFFFF, 16), (4096, 4096, 0xFF, 16), (4096, 4096, 0x10, 32), (4096, 4096, 0x10, 12)])
def test_bad_queue_setups_leave_the_queue_unused(rig: Rig, page: int, align: int, pfn: int, num: int) -> None:
    """GuestPageSize or QueueAlign not a power of two, an area outside guest RAM (1 MiB here), a queue size
    above QueueNumMax (16) or not a power of two: the queue stays unused, QueuePFN reads 0, nothing raises."""
    rig.w(m.REG_GUEST_PAGE_SIZE, page)
    rig.w(m.REG_QUEUE_SEL, 0)
    rig.w(m.REG_QUEUE_NUM, num)
    rig.w(m.REG_QUEUE_ALIGN, align)
    rig.w(m.REG_QUEUE_PFN, pfn)
    assert rig.r(m.REG_QUEUE_PFN) == 0 and not rig.t.queues[0].ready


def test_reset_clears_queues_and_keeps_the_page_size(rig: Rig) -> None:
    setup_legacy_device(rig.t, [rig.q0, rig.q1])
    rig.w(m.REG_STATUS, 0)
    assert rig.r(m.REG_STATUS) == 0 and rig.dev.resets >= 1
    for i in (0, 1):
        rig.w(m.REG_QUEUE_SEL, i)
        assert rig.r(m.REG_QUEUE_PFN) == 0 and not rig.t.queues[i].ready
    assert rig.t.guest_page_size == PAGE  # Linux writes it once, before its first reset
    rig.w(m.REG_QUEUE_SEL, 0)
    rig.w(m.REG_QUEUE_PFN, rig.q0.desc_addr // PAGE)
    assert rig.t.queues[0].ready


def test_no_new_queue_after_driver_ok(rig: Rig) -> None:
    setup_legacy_device(rig.t, [rig.q0])  # queue 1 left unused
    rig.w(m.REG_QUEUE_SEL, 1)
    rig.w(m.REG_QUEUE_PFN, rig.q1.desc_addr // PAGE)
    assert not rig.t.queues[1].ready and rig.r(m.REG_QUEUE_PFN) == 0


def test_version_2_queue_setup_makes_no_legacy_queue_live(rig: Rig) -> None:
    """A driver that programs a version 1 device with the version 2 queue registers gets no live queue."""
    setup_device(rig.t, [rig.q0])
    assert not rig.t.queues[0].ready
    rig.q0.add_chain([(b"x", False)])
    rig.w(m.REG_QUEUE_NOTIFY, 0)
    assert rig.q0.get_used() == [] and rig.dev.processed == []


def test_virtio_blk_over_the_legacy_transport(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"".join(pattern(s) for s in range(SECTORS)))
    disk = RawDisk(image, readonly=False)
    dev = b.VirtioBlock(disk, serial="legacy", discard=True, queue_size=QSIZE)
    mem = GuestMemory.single(1 << 20)
    t = m.VirtioMmioTransport(dev, mem, CountingIrq(), version=1)
    q = DriverQueue(mem, 0x1000, QSIZE, data_size=512 << 10)
    try:
        features = setup_legacy_device(t, [q])
        assert not features & (d.VIRTIO_F_VERSION_1 & 0xFFFFFFFF)
        # the capacity in the legacy config space (§5.2.4, little-endian on this guest)
        assert int.from_bytes(bytes(t.read(m.REG_CONFIG + i, 1) for i in range(8)), "little") == SECTORS
        head = q.add_chain(request_buffers(b.VIRTIO_BLK_T_IN, 5, in_len=512))
        t.write(m.REG_QUEUE_NOTIFY, 4, 0)
        used = q.get_used()
        assert [u.head for u in used] == [head] and used[0].length == 513
        assert q.read_buffer(head, 1) == pattern(5)
        head = q.add_chain(request_buffers(b.VIRTIO_BLK_T_OUT, 7, out=b"\xab" * 512))
        t.write(m.REG_QUEUE_NOTIFY, 4, 0)
        assert [u.head for u in q.get_used()] == [head]
        assert image.read_bytes()[7 * 512:8 * 512] == b"\xab" * 512
        assert HDR.size == 16
    finally:
        dev.close()
        mem.close()


def test_features_the_device_did_not_offer_are_not_negotiated(rig: Rig) -> None:
    """A legacy driver has no FEATURES_OK step that could refuse them (§3.1.2): the device is activated
    with what it offered of what the driver accepted, VIRTIO_F_VERSION_1 never among them."""
    rig.w(m.REG_STATUS, m.STATUS_ACKNOWLEDGE | m.STATUS_DRIVER)
    rig.w(m.REG_DRIVER_FEATURES_SEL, 0)
    rig.w(m.REG_DRIVER_FEATURES, 0xFFFFFFFF)
    rig.w(m.REG_DRIVER_FEATURES_SEL, 1)
    rig.w(m.REG_DRIVER_FEATURES, 0xFFFFFFFF)
    rig.w(m.REG_STATUS, m.STATUS_ACKNOWLEDGE | m.STATUS_DRIVER | m.STATUS_DRIVER_OK)
    assert rig.dev.activations == [FEATURE_X | d.VIRTIO_F_EVENT_IDX]
    assert rig.t.negotiated_features == FEATURE_X | d.VIRTIO_F_EVENT_IDX
