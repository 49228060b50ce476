"""The device side of the split virtqueue (virtio 1.2 §2.7), driven through DriverQueue."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pyvmm.devices.virtio.queue import (
    DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Descriptor,
    Virtqueue,
    VirtqueueError,
)
from pyvmm.memory import GuestMemory
from pyvmm.testing.driverqueue import DriverQueue

QSIZE = 8
MEM_SIZE = 1 << 20


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.single(MEM_SIZE)
    yield m
    m.close()


def make(
    mem: GuestMemory, *, event_idx: bool = False, indirect: bool = True
) -> tuple[Virtqueue, DriverQueue]:
    dq = DriverQueue(mem, 0x1000, QSIZE, data_size=64 << 10)
    vq = Virtqueue(QSIZE)
    vq.desc_addr, vq.avail_addr, vq.used_addr = dq.desc_addr, dq.avail_addr, dq.used_addr
    vq.event_idx, vq.indirect, vq.ready = event_idx, indirect, True
    assert vq.validate() is None
    return vq, dq


def test_empty_queue_pops_nothing(mem: GuestMemory) -> None:
    vq, _ = make(mem)
    assert vq.pop(mem) is None


def test_pop_copies_the_chain(mem: GuestMemory) -> None:
    vq, dq = make(mem)
    head = dq.add_chain([(b"h" * 16, False), (100, True), (1, True)])
    chain = vq.pop(mem)
    assert chain is not None and chain.head == head
    addrs = [a for a, _, _ in dq.buffers[head]]
    assert chain.descriptors == [
        Descriptor(addrs[0], 16, False),
        Descriptor(addrs[1], 100, True),
        Descriptor(addrs[2], 1, True),
    ]
    assert (chain.readable_len, chain.writable_len) == (16, 101)
    # copied once: rewriting the table afterwards changes nothing
    dq.write_desc(head, 0, 0, 0, 0)
    assert chain.descriptors[0].length == 16
    assert vq.pop(mem) is None


def test_indirect_chain_and_direct_prefix(mem: GuestMemory) -> None:
    vq, dq = make(mem)
    head = dq.add_chain([(b"x" * 16, False), (512, True), (1, True)], indirect=True)
    chain = vq.pop(mem)
    assert chain is not None and chain.head == head
    assert [d.length for d in chain.descriptors] == [16, 512, 1]
    # §2.7.5.3.2: zero or more direct descriptors followed by one INDIRECT
    table = dq.alloc(32)
    buf = dq.alloc(64)
    mem.pack_into(DESC, table, buf, 8, VIRTQ_DESC_F_NEXT, 1)
    mem.pack_into(DESC, table + 16, buf + 8, 8, VIRTQ_DESC_F_WRITE, 0)
    dq.write_desc(5, buf + 32, 4, VIRTQ_DESC_F_NEXT, 6)
    dq.write_desc(6, table, 32, VIRTQ_DESC_F_INDIRECT, 0)
    dq.publish(5)
    chain = vq.pop(mem)
    assert chain is not None and [d.length for d in chain.descriptors] == [4, 8, 8]


@pytest.mark.parametrize(
    "setup",
    [
        "loop",
        "next_out_of_range",
        "head_out_of_range",
        "buffer_outside_ram",
        "read_after_write",
        "indirect_not_negotiated",
        "nested_indirect",
        "indirect_bad_len",
        "indirect_zero_len",
        "indirect_and_next",
        "indirect_outside_ram",
        "indirect_loop",
        "avail_idx_too_far",
    ],
)
def test_malformed_chains_raise(mem: GuestMemory, setup: str) -> None:
    vq, dq = make(mem, indirect=setup != "indirect_not_negotiated")
    buf = dq.alloc(256)
    table = dq.alloc(64)
    d = DESC
    if setup == "loop":
        dq.write_desc(0, buf, 8, VIRTQ_DESC_F_NEXT, 1)
        dq.write_desc(1, buf, 8, VIRTQ_DESC_F_NEXT, 0)
        dq.publish(0)
    elif setup == "next_out_of_range":
        dq.write_desc(0, buf, 8, VIRTQ_DESC_F_NEXT, QSIZE)
        dq.publish(0)
    elif setup == "head_out_of_range":
        dq.publish(QSIZE + 3)
    elif setup == "buffer_outside_ram":
        dq.write_desc(0, MEM_SIZE - 4, 8, 0, 0)
        dq.publish(0)
    elif setup == "read_after_write":
        dq.write_desc(0, buf, 8, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 1)
        dq.write_desc(1, buf, 8, 0, 0)
        dq.publish(0)
    elif setup in ("indirect_not_negotiated", "nested_indirect", "indirect_and_next", "indirect_loop"):
        inner = VIRTQ_DESC_F_INDIRECT if setup == "nested_indirect" else 0
        if setup == "indirect_loop":
            mem.pack_into(d, table, buf, 8, VIRTQ_DESC_F_NEXT, 1)
            mem.pack_into(d, table + 16, buf, 8, VIRTQ_DESC_F_NEXT, 0)
        else:
            mem.pack_into(d, table, buf, 16 if inner else 8, inner, 0)
            mem.pack_into(d, table + 16, buf, 8, 0, 0)
        outer = VIRTQ_DESC_F_INDIRECT | (VIRTQ_DESC_F_NEXT if setup == "indirect_and_next" else 0)
        dq.write_desc(0, table, 32, outer, 1)
        dq.write_desc(1, buf, 8, 0, 0)
        dq.publish(0)
    elif setup in ("indirect_bad_len", "indirect_zero_len"):
        dq.write_desc(0, table, 24 if setup == "indirect_bad_len" else 0, VIRTQ_DESC_F_INDIRECT, 0)
        dq.publish(0)
    elif setup == "indirect_outside_ram":
        dq.write_desc(0, MEM_SIZE - 16, 32, VIRTQ_DESC_F_INDIRECT, 0)
        dq.publish(0)
    elif setup == "avail_idx_too_far":
        dq.set_avail_idx(QSIZE + 1)
    with pytest.raises(VirtqueueError):
        vq.pop(mem)


def test_chain_longer_than_four_gib_is_refused() -> None:
    big = GuestMemory.single(1 << 33)  # MAP_NORESERVE: never touched beyond the rings
    try:
        vq, dq = make(big)
        dq.write_desc(0, 1 << 32, 0xFFFFFFFF, VIRTQ_DESC_F_NEXT, 1)
        dq.write_desc(1, 1 << 32, 16, 0, 0)
        dq.publish(0)
        with pytest.raises(VirtqueueError, match="2\\^32"):
            vq.pop(big)
    finally:
        big.close()


def test_zero_length_descriptors_are_dropped(mem: GuestMemory) -> None:
    vq, dq = make(mem)
    dq.add_chain([(b"abcd", False), (0, True), (4, True)])
    chain = vq.pop(mem)
    assert chain is not None and [d.length for d in chain.descriptors] == [4, 4]


def test_push_used_and_index_wrap(mem: GuestMemory) -> None:
    vq, dq = make(mem)
    # start both sides just below the 16-bit wrap
    vq.last_avail_idx = vq.used_idx = 0xFFFE
    dq.last_used_idx = 0xFFFE
    dq.set_avail_idx(0xFFFE)
    dq.avail_idx = 0xFFFE
    heads = [dq.add_chain([(4, True)]) for _ in range(4)]
    got = []
    while (chain := vq.pop(mem)) is not None:
        got.append(chain.head)
        vq.push_used(mem, chain.head, 4)
    assert got == heads
    assert vq.used_idx == 2 and dq.used_idx == 2
    assert [(u.head, u.length) for u in dq.get_used()] == [(h, 4) for h in heads]


def test_no_interrupt_flag_without_event_idx(mem: GuestMemory) -> None:
    vq, dq = make(mem)
    vq.push_used(mem, 0, 0)
    assert vq.needs_interrupt(mem)
    assert not vq.needs_interrupt(mem)  # nothing new since
    dq.set_no_interrupt(True)
    vq.push_used(mem, 1, 0)
    assert not vq.needs_interrupt(mem)


def test_event_idx_used_event(mem: GuestMemory) -> None:
    vq, dq = make(mem, event_idx=True)
    dq.set_no_interrupt(True)  # ignored with EVENT_IDX (§2.7.10)
    dq.set_used_event(2)  # "interrupt me once used idx passes 2"
    vq.push_used(mem, 0, 0)  # idx 1
    assert not vq.needs_interrupt(mem)
    vq.push_used(mem, 1, 0)  # idx 2
    assert not vq.needs_interrupt(mem)
    vq.push_used(mem, 2, 0)  # idx 3: crossed used_event
    assert vq.needs_interrupt(mem)
    vq.push_used(mem, 3, 0)
    vq.push_used(mem, 4, 0)
    assert not vq.needs_interrupt(mem)  # used_event still 2: already signalled
    dq.set_used_event(5)
    vq.push_used(mem, 5, 0)  # 5 -> 6 crosses 5
    assert vq.needs_interrupt(mem)


def test_enable_notification_writes_avail_event(mem: GuestMemory) -> None:
    vq, dq = make(mem, event_idx=True)
    dq.add_chain([(4, True)])
    dq.add_chain([(4, True)])
    assert vq.pop(mem) is not None
    assert vq.enable_notification(mem)  # one still pending
    assert dq.avail_event == 1
    assert vq.pop(mem) is not None
    assert not vq.enable_notification(mem)
    assert dq.avail_event == 2


def test_validate_rejects_bad_configuration() -> None:
    vq = Virtqueue(16)
    vq.size = 12
    assert vq.validate() is not None
    vq.size = 32
    assert vq.validate() is not None
    vq.size, vq.desc_addr = 16, 8
    assert vq.validate() == "misaligned ring address"
    with pytest.raises(ValueError):
        Virtqueue(24)


def test_rings_outside_ram_raise_virtqueue_error(mem: GuestMemory) -> None:
    vq, _ = make(mem)
    vq.avail_addr = MEM_SIZE + 0x1000
    with pytest.raises(VirtqueueError):
        vq.pop(mem)
    vq.used_addr = MEM_SIZE
    with pytest.raises(VirtqueueError):
        vq.push_used(mem, 0, 0)
