"""The coalesced MMIO/PIO ring parser (pyvmm/kvm/coalesced.py) on a fake ring in a bytearray, laid out as
include/uapi/linux/kvm.h's struct kvm_coalesced_mmio_ring: ``first``, ``last``, then entries of struct
kvm_coalesced_mmio.  The kernel writes entries at ``last`` and advances it; userspace consumes from
``first`` and advances it (virt/kvm/coalesced_mmio.c)."""

from __future__ import annotations

import ctypes
import random

import pytest

from pyvmm.kvm import abi
from pyvmm.kvm.coalesced import CoalescedRing

PAGE = 4096
CAPACITY = (PAGE - ctypes.sizeof(abi.kvm_coalesced_mmio_ring)) // ctypes.sizeof(abi.kvm_coalesced_mmio)


def _ring(base: int = 0) -> tuple[bytearray, abi.kvm_coalesced_mmio_ring]:
    buf = bytearray(base + PAGE)
    return buf, abi.kvm_coalesced_mmio_ring.from_buffer(buf, base)


def _put(buf: bytearray, base: int, slot: int, addr: int, data: bytes, *, pio: bool) -> None:
    off = base + ctypes.sizeof(abi.kvm_coalesced_mmio_ring) + slot * ctypes.sizeof(abi.kvm_coalesced_mmio)
    e = abi.kvm_coalesced_mmio.from_buffer(buf, off)
    e.phys_addr, e.len, e.pio = addr, len(data), int(pio)
    ctypes.memmove(ctypes.addressof(e.data), data, len(data))


def _kernel_push(buf: bytearray, hdr: abi.kvm_coalesced_mmio_ring, addr: int, data: bytes, *, pio: bool = True,
                 base: int = 0) -> None:
    """What coalesced_mmio_write() does: fill the entry at ``last``, then advance ``last``."""
    _put(buf, base, hdr.last, addr, data, pio=pio)
    hdr.last = (hdr.last + 1) % CAPACITY


def test_capacity_matches_the_kernel_formula() -> None:
    # KVM_COALESCED_MMIO_MAX = (PAGE_SIZE - sizeof(struct kvm_coalesced_mmio_ring)) / sizeof(entry)
    assert CAPACITY == 170
    buf, _ = _ring()
    assert CoalescedRing(buf, 0, PAGE).capacity == CAPACITY


def test_empty_ring_delivers_nothing() -> None:
    buf, _ = _ring()
    ring = CoalescedRing(buf, 0, PAGE)
    got: list[tuple[int, int, bool, int]] = []
    assert ring.pending() == 0
    assert ring.drain(lambda *e: got.append(e)) == 0
    assert got == []


def test_entries_come_out_in_order_and_first_catches_up() -> None:
    base = 2 * PAGE  # the ring sits at a page offset of the vCPU mapping
    buf, hdr = _ring(base)
    for ch in b"abc":
        _kernel_push(buf, hdr, 0x3F8, bytes([ch]), base=base)
    _kernel_push(buf, hdr, 0xD000_0050, (0xDEADBEEF).to_bytes(4, "little"), pio=False, base=base)
    ring = CoalescedRing(buf, base, PAGE)
    assert ring.pending() == 4
    got: list[tuple[int, int, bool, int]] = []
    assert ring.drain(lambda *e: got.append(e)) == 4
    assert got == [(0x3F8, 1, True, 0x61), (0x3F8, 1, True, 0x62), (0x3F8, 1, True, 0x63),
                   (0xD000_0050, 4, False, 0xDEADBEEF)]
    assert hdr.first == hdr.last == 4
    assert ring.pending() == 0


def test_wraparound() -> None:
    buf, hdr = _ring()
    hdr.first = hdr.last = CAPACITY - 2
    for i in range(5):
        _kernel_push(buf, hdr, 0x3F8, bytes([i]))
    assert hdr.last == 3
    ring = CoalescedRing(buf, 0, PAGE)
    assert ring.pending() == 5
    got: list[int] = []
    assert ring.drain(lambda addr, size, pio, value: got.append(value)) == 5
    assert got == [0, 1, 2, 3, 4]
    assert hdr.first == 3


def test_a_full_ring_drains_completely() -> None:
    buf, hdr = _ring()
    # The kernel refuses an entry that would make last == first: a full ring holds CAPACITY - 1.
    for i in range(CAPACITY - 1):
        _kernel_push(buf, hdr, 0x3F8, bytes([i & 0xFF]))
    ring = CoalescedRing(buf, 0, PAGE)
    got: list[int] = []
    assert ring.drain(lambda addr, size, pio, value: got.append(value)) == CAPACITY - 1
    assert got == [i & 0xFF for i in range(CAPACITY - 1)]


def test_an_entry_is_consumed_before_it_is_delivered() -> None:
    """A handler that raises does not leave its entry in the ring to be delivered again."""
    buf, hdr = _ring()
    for ch in b"xyz":
        _kernel_push(buf, hdr, 0x3F8, bytes([ch]))
    ring = CoalescedRing(buf, 0, PAGE)

    def boom(addr: int, size: int, pio: bool, value: int) -> None:
        raise RuntimeError("device bug")

    with pytest.raises(RuntimeError):
        ring.drain(boom)
    assert hdr.first == 1
    got: list[int] = []
    ring.drain(lambda addr, size, pio, value: got.append(value))
    assert got == [ord("y"), ord("z")]


def test_nonsense_indices_deliver_nothing() -> None:
    """``last`` is the kernel's; an index outside the ring must not make the parser read past it."""
    buf, hdr = _ring()
    hdr.last = CAPACITY + 5
    ring = CoalescedRing(buf, 0, PAGE)
    assert ring.drain(lambda *e: pytest.fail("delivered")) == 0


def test_entry_length_is_clamped_to_the_data_field() -> None:
    buf, hdr = _ring()
    _put(buf, 0, 0, 0x3F8, b"\x01" * 8, pio=True)
    abi.kvm_coalesced_mmio.from_buffer(buf, 8).len = 99
    hdr.last = 1
    got: list[tuple[int, int, bool, int]] = []
    CoalescedRing(buf, 0, PAGE).drain(lambda *e: got.append(e))
    assert got == [(0x3F8, 8, True, 0x0101010101010101)]


def test_a_handler_that_drains_again_sees_each_entry_once() -> None:
    """Replaying a write may end the VM, and the stop replays the ring again on the same thread."""
    buf, hdr = _ring()
    for ch in b"abcd":
        _kernel_push(buf, hdr, 0x3F8, bytes([ch]))
    ring = CoalescedRing(buf, 0, PAGE)
    got: list[int] = []

    def deliver(addr: int, size: int, pio: bool, value: int) -> None:
        got.append(value)
        if value == ord("b"):
            ring.drain(deliver)

    assert ring.drain(deliver) == 2  # a, b here; c, d in the nested call
    assert bytes(got) == b"abcd"
    assert ring.drained == 4 and ring.empty()


def test_take_hands_out_every_entry_once_in_order_across_the_wrap() -> None:
    buf, hdr = _ring()
    hdr.first = hdr.last = CAPACITY - 2  # the next entries wrap around the end of the page
    for ch in b"wxyz":
        _kernel_push(buf, hdr, 0x3F8, bytes([ch]))
    ring = CoalescedRing(buf, 0, PAGE)
    assert hdr.last == 2
    assert ring.take() == [(0x3F8, 1, True, ch) for ch in b"wxyz"]
    assert hdr.first == 2 and ring.empty() and ring.take() == [] and ring.drained == 4


def test_take_ignores_nonsense_indices() -> None:
    buf, hdr = _ring()
    hdr.last = CAPACITY + 5
    assert CoalescedRing(buf, 0, PAGE).take() == []


@pytest.mark.parametrize("seed", range(40))
def test_take_runs_is_take_grouped(seed: int) -> None:
    """Runs of consecutive writes with one address, length and kind, in ring order, across the wrap,
    with stale bytes past each entry's length masked off; the same entries take() gives one by one."""
    rng = random.Random(seed)
    twin = []
    for _ in range(2):
        buf, hdr = _ring()
        twin.append((buf, hdr, CoalescedRing(buf, 0, PAGE)))
    start = rng.randrange(CAPACITY)
    for _, hdr, _ in twin:
        hdr.first = hdr.last = start
    for _ in range(rng.randrange(CAPACITY)):
        addr = rng.choice([0x3F8, 0x3F8, 0x3F8, 0x3F9, 0xD000_0050])
        data = bytes(rng.randrange(256) for _ in range(rng.choice([1, 1, 1, 2, 4, 8])))
        for buf, hdr, _ in twin:
            _put(buf, 0, hdr.last, addr, data + bytes([0xEE] * (8 - len(data))), pio=addr < 0x10000)
            abi.kvm_coalesced_mmio.from_buffer(buf, 8 + hdr.last * ctypes.sizeof(abi.kvm_coalesced_mmio)).len = len(data)
            hdr.last = (hdr.last + 1) % CAPACITY
    one_by_one = twin[0][2].take()
    runs = twin[1][2].take_runs()
    assert [(a, n, p, v) for a, n, p, vs in runs for v in vs] == one_by_one
    assert all(runs[i][:3] != runs[i + 1][:3] for i in range(len(runs) - 1))
    assert twin[1][2].empty() and twin[1][2].drained == len(one_by_one)
