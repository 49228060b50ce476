"""The coalesced MMIO/PIO ring parser (pyvmm/kvm/coalesced.py) on a fake ring in a bytearray, laid out as
include/uapi/linux/kvm.h's struct kvm_coalesced_mmio_ring: ``first``, ``last``, then entries of struct
kvm_coalesced_mmio.  The kernel writes entries at ``last`` and advances it; userspace consumes from
``first`` and advances it (virt/kvm/coalesced_mmio.c).  ``take_runs`` hands out what waits, grouped
into runs of writes to one register."""

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


def _flat(ring: CoalescedRing) -> list[tuple[int, int, bool, int]]:
    """What ``take_runs`` hands out, one ``(address, length, is_pio, value)`` per guest write."""
    return [(a, n, p, v) for a, n, p, values in ring.take_runs() for v in values]


def test_capacity_matches_the_kernel_formula() -> None:
    # KVM_COALESCED_MMIO_MAX = (PAGE_SIZE - sizeof(struct kvm_coalesced_mmio_ring)) / sizeof(entry)
    assert CAPACITY == 170
    buf, _ = _ring()
    assert CoalescedRing(buf, 0, PAGE).capacity == CAPACITY


def test_empty_ring_hands_out_nothing() -> None:
    buf, hdr = _ring()
    ring = CoalescedRing(buf, 0, PAGE)
    assert ring.take_runs() == [] and hdr.first == hdr.last == 0 and ring.drained == 0


def test_entries_come_out_in_order_and_first_catches_up() -> None:
    base = 2 * PAGE  # the ring sits at a page offset of the vCPU mapping
    buf, hdr = _ring(base)
    for ch in b"abc":
        _kernel_push(buf, hdr, 0x3F8, bytes([ch]), base=base)
    _kernel_push(buf, hdr, 0xD000_0050, (0xDEADBEEF).to_bytes(4, "little"), pio=False, base=base)
    ring = CoalescedRing(buf, base, PAGE)
    assert ring.take_runs() == [(0x3F8, 1, True, [0x61, 0x62, 0x63]), (0xD000_0050, 4, False, [0xDEADBEEF])]
    assert hdr.first == hdr.last == 4
    assert ring.take_runs() == [] and ring.drained == 4


def test_wraparound_is_one_run() -> None:
    buf, hdr = _ring()
    hdr.first = hdr.last = CAPACITY - 2  # the next entries wrap around the end of the page
    for i in range(5):
        _kernel_push(buf, hdr, 0x3F8, bytes([i]))
    assert hdr.last == 3
    ring = CoalescedRing(buf, 0, PAGE)
    assert ring.take_runs() == [(0x3F8, 1, True, [0, 1, 2, 3, 4])]
    assert hdr.first == 3 and ring.take_runs() == []


def test_a_full_ring_comes_out_completely() -> None:
    buf, hdr = _ring()
    # The kernel refuses an entry that would make last == first: a full ring holds CAPACITY - 1.
    for i in range(CAPACITY - 1):
        _kernel_push(buf, hdr, 0x3F8, bytes([i & 0xFF]))
    ring = CoalescedRing(buf, 0, PAGE)
    assert [v for _, _, _, v in _flat(ring)] == [i & 0xFF for i in range(CAPACITY - 1)]
    assert ring.drained == CAPACITY - 1


def test_nonsense_indices_hand_out_nothing() -> None:
    """``last`` is the kernel's; an index outside the ring must not make the parser read past it."""
    buf, hdr = _ring()
    hdr.last = CAPACITY + 5
    assert CoalescedRing(buf, 0, PAGE).take_runs() == []


def test_entry_length_is_clamped_to_the_data_field() -> None:
    buf, hdr = _ring()
    _put(buf, 0, 0, 0x3F8, b"\x01" * 8, pio=True)
    abi.kvm_coalesced_mmio.from_buffer(buf, 8).len = 99
    hdr.last = 1
    assert CoalescedRing(buf, 0, PAGE).take_runs() == [(0x3F8, 8, True, [0x0101010101010101])]


def _entries(buf: bytearray, first: int, last: int) -> list[tuple[int, int, bool, int]]:
    """The waiting entries read one by one through the ctypes struct: the reference for take_runs."""
    out = []
    i = first
    while i != last:
        e = abi.kvm_coalesced_mmio.from_buffer(buf, ctypes.sizeof(abi.kvm_coalesced_mmio_ring)
                                               + i * ctypes.sizeof(abi.kvm_coalesced_mmio))
        n = min(e.len, 8)
        out.append((e.phys_addr, n, bool(e.pio), int.from_bytes(bytes(e.data)[:n], "little")))
        i = (i + 1) % CAPACITY
    return out


@pytest.mark.parametrize("seed", range(40))
def test_take_runs_groups_the_entries_in_ring_order(seed: int) -> None:
    """Runs of consecutive writes with one address, length and kind, in ring order, across the wrap,
    with stale bytes past each entry's length masked off: the entries one by one, grouped."""
    rng = random.Random(seed)
    buf, hdr = _ring()
    hdr.first = hdr.last = start = rng.randrange(CAPACITY)
    for _ in range(rng.randrange(CAPACITY)):
        addr = rng.choice([0x3F8, 0x3F8, 0x3F8, 0x3F9, 0xD000_0050])
        data = bytes(rng.randrange(256) for _ in range(rng.choice([1, 1, 1, 2, 4, 8])))
        _put(buf, 0, hdr.last, addr, data + bytes([0xEE] * (8 - len(data))), pio=addr < 0x10000)
        abi.kvm_coalesced_mmio.from_buffer(buf, 8 + hdr.last * ctypes.sizeof(abi.kvm_coalesced_mmio)).len = len(data)
        hdr.last = (hdr.last + 1) % CAPACITY
    expected = _entries(buf, start, hdr.last)
    ring = CoalescedRing(buf, 0, PAGE)
    runs = ring.take_runs()
    assert [(a, n, p, v) for a, n, p, vs in runs for v in vs] == expected
    assert all(runs[i][:3] != runs[i + 1][:3] for i in range(len(runs) - 1))
    assert hdr.first == hdr.last and ring.drained == len(expected)


@pytest.mark.parametrize(("field", "value"), [("phys_addr", 0x3F9), ("phys_addr", 0x1_0000_03F8), ("len", 2),
                                              ("pio", 0)])
@pytest.mark.parametrize("where", [0, 7, 19])
def test_one_entry_that_differs_in_one_field_splits_the_run(field: str, value: int, where: int) -> None:
    """Twenty writes of one byte to port 0x3f8, one of them (first, middle or last) to another address,
    of another length or kind: three runs (two at the ends), never one."""
    buf, hdr = _ring()
    for _ in range(20):
        _kernel_push(buf, hdr, 0x3F8, b"x")
    entry = abi.kvm_coalesced_mmio.from_buffer(buf, 8 + where * ctypes.sizeof(abi.kvm_coalesced_mmio))
    setattr(entry, field, value)
    runs = CoalescedRing(buf, 0, PAGE).take_runs()
    assert [len(vs) for _, _, _, vs in runs] == [n for n in (where, 1, 19 - where) if n]
    odd = runs[0 if where == 0 else 1]
    assert odd[:3] == ((value, 1, True) if field == "phys_addr" else (0x3F8, 2, True) if field == "len"
                       else (0x3F8, 1, value != 0))
