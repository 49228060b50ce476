from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
import pytest

from pyvmm.arch.x86_64 import layout
from pyvmm.bus import Bus
from pyvmm.errors import GuestMemoryError
from pyvmm.memory import GuestMemory


def test_layout_splits_around_the_hole() -> None:
    assert layout.ram_layout(512 << 20) == [(0, 512 << 20)]
    big = layout.ram_layout(5 << 30)
    assert big == [(0, layout.MMIO_HOLE_START), (1 << 32, (5 << 30) - layout.MMIO_HOLE_START)]


def test_guest_memory_bounds_and_regions() -> None:
    mem = GuestMemory([(0, 0x10000), (0x100000, 0x10000)])
    mem.write(0xFFF0, b"x" * 16)
    with pytest.raises(GuestMemoryError):
        mem.write(0xFFF8, b"y" * 16)  # runs off the end of region 0
    with pytest.raises(GuestMemoryError):
        mem.read(0x20000, 1)  # the gap
    mem.write_u64(0x100000, 0x1122334455667788)
    assert mem.read_u32(0x100004) == 0x11223344
    assert mem.read_u16(0x100000) == 0x7788
    v = mem.view(0x100000, 8)
    v[0] = 0xAA
    assert mem.read(0x100000, 1) == b"\xaa"
    arr = mem.array(0x100000, 16, np.uint64)
    assert arr.shape == (2,)
    fmt = struct.Struct("<HH")
    mem.pack_into(fmt, 0x100010, 1, 2)
    assert mem.unpack_from(fmt, 0x100010) == (1, 2)
    assert mem.contains(0x10000 - 1, 1) and not mem.contains(0x10000 - 1, 2)
    mem.close()


def test_guest_memory_rejects_bad_layouts() -> None:
    with pytest.raises(GuestMemoryError):
        GuestMemory([(0, 0x1001)])
    with pytest.raises(GuestMemoryError):
        GuestMemory([(0, 0x2000), (0x1000, 0x1000)])


class Reg:
    def __init__(self) -> None:
        self.log: list[tuple[str, int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size, 0))
        return 0x12

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))


def test_bus_dispatch_overlap_and_unclaimed() -> None:
    bus = Bus("pio", unclaimed_read=0xFFFFFFFF)
    a, b = Reg(), Reg()
    bus.add(0x3F8, 8, a, "com1")
    bus.add(0x60, 5, b, "kbd")
    with pytest.raises(ValueError, match="overlaps"):
        bus.add(0x3FC, 8, Reg(), "bad")
    with pytest.raises(ValueError, match="overlaps"):
        bus.add(0x3F0, 9, Reg(), "bad")
    assert bus.read(0x3FD, 1) == 0x12
    bus.write(0x64, 1, 0xFE)
    assert a.log == [("r", 5, 1, 0)] and b.log == [("w", 4, 1, 0xFE)]
    assert bus.read(0x1234, 2) == 0xFFFF
    bus.write(0x1234, 1, 1)
    assert bus.unclaimed == 2


def test_bus_dispatch_table_makes_each_entry_on_first_use() -> None:
    """The vCPU loop's table: address -> the device's read/write with the offset bound in, made when the
    address is first looked up (nothing at start-up); ranges too big for a table and unclaimed addresses
    give None and are not stored (the loop falls back to Bus.read/Bus.write)."""
    bus = Bus("mmio")
    a, big = Reg(), Reg()
    bus.add(0xD000_0000, 0x200, a, "virtio")
    bus.add(0x1_0000_0000, Bus.TABLE_MAX_RANGE + 1, big, "big")
    readers, writers = bus.handlers()
    assert len(readers) == len(writers) == 0
    assert readers[0xD000_0070](4) == 0x12
    writers[0xD000_0050](4, 7)
    assert a.log == [("r", 0x70, 4, 0), ("w", 0x50, 4, 7)]
    assert set(readers) == {0xD000_0070} and set(writers) == {0xD000_0050}
    assert readers[0xD000_0070] is readers[0xD000_0070]  # made once
    assert readers[0xD000_0200] is None and readers[0x1_0000_0000] is None and writers[0x42] is None
    assert set(readers) == {0xD000_0070} and set(writers) == {0xD000_0050}
    assert bus.read(0x1_0000_0008, 4) == 0x12
    bus.add(0x60, 1, Reg(), "late")
    assert bus.handlers()[0][0x60] is not None  # a device added later shows


def test_bus_dispatch_table_takes_a_device_register_reader() -> None:
    class Polled(Reg):
        def register_reader(self, offset: int) -> Callable[[int], int] | None:
            return (lambda size: 0x60) if offset == 5 else None

    bus = Bus("pio")
    dev = Polled()
    bus.add(0x3F8, 8, dev, "com1")
    readers, _ = bus.handlers()
    assert readers[0x3FD](1) == 0x60 and dev.log == []  # the device's own reader, not read()
    assert readers[0x3FA](1) == 0x12 and dev.log == [("r", 2, 1, 0)]


def _vm_flags(addr: int) -> list[str]:
    """The VmFlags /proc/self/smaps shows for the mapping holding ``addr``."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"{addr:#x} is in no mapping")


def test_guest_ram_sits_on_2mib_boundaries_advised_for_huge_pages() -> None:
    mem = GuestMemory([(0, 64 << 20), (1 << 32, 6 << 20)])
    try:
        for r in mem.regions:
            assert r.host_addr % (2 << 20) == 0 and len(r.buf) == r.size
            assert "hg" in _vm_flags(r.host_addr)  # MADV_HUGEPAGE
        mem.write(0x1FF_FFF8, b"12345678")
        mem.write((1 << 32) + (6 << 20) - 8, b"abcdefgh")
        assert mem.read(0x1FF_FFF8, 8) == b"12345678" and mem.read((1 << 32) + (6 << 20) - 8, 8) == b"abcdefgh"
        with pytest.raises(GuestMemoryError):
            mem.read((1 << 32) + (6 << 20) - 4, 8)  # the alignment slack is not guest memory
    finally:
        mem.close()


def test_small_regions_and_the_knob_keep_plain_pages() -> None:
    small, plain = GuestMemory.single(0x10000), GuestMemory.single(8 << 20)
    off = GuestMemory([(0, 8 << 20)], huge_pages=False)
    try:
        assert "hg" not in _vm_flags(small.regions[0].host_addr)
        assert "hg" not in _vm_flags(off.regions[0].host_addr) and len(off.regions[0].mapping) == 8 << 20
        assert "hg" in _vm_flags(plain.regions[0].host_addr)
    finally:
        for m in (small, plain, off):
            m.close()


def test_the_soak_sampler_finds_guest_ram_by_its_mapping() -> None:
    """The soak test leaves guest RAM out of pyvmm's RSS: it must recognise the (aligned) mapping."""
    import os
    import time

    from pyvmm.testing.soak import process_sample

    mem = GuestMemory.single(64 << 20)
    try:
        mem.fill(0, 32 << 20, 1)  # the guest touched half its RAM
        t0 = time.monotonic()
        whole, without = process_sample(os.getpid(), t0), process_sample(os.getpid(), t0, guest_ram=64 << 20)
        assert whole is not None and without is not None
        assert whole.rss - without.rss >= 30 << 20
    finally:
        mem.close()
