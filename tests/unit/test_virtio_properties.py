"""Property tests: whatever the driver puts in the rings, the virtio device model holds its invariants.

* random descriptor tables, ring indices, flags, lengths and addresses (inside and beyond RAM,
  overlapping, pointing at the rings themselves, indirect tables of garbage) never raise out of the
  transport, every head used was published at least as often, and the device writes only into
  device-writable buffers the driver offered (and its own used ring);
* well-formed random requests are each used exactly once, with a valid status;
* random register access sequences never raise out of the transport.

The number of examples per test comes from PYVMM_HYPOTHESIS_EXAMPLES (default 300).
"""

from __future__ import annotations

import itertools
import os
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyvmm.devices.virtio import block as b
from pyvmm.devices.virtio import device as d
from pyvmm.devices.virtio import mmio as m
from pyvmm.devices.virtio.disk import RawDisk
from pyvmm.devices.virtio.queue import DescriptorChain
from pyvmm.interrupt import CountingIrq
from pyvmm.memory import GuestMemory
from pyvmm.testing.driverqueue import (
    DriverQueue,
    PackedDriverQueue,
    UsedElement,
    setup_device,
    setup_legacy_device,
)
from tests.conftest import count_example

EXAMPLES = int(os.environ.get("PYVMM_HYPOTHESIS_EXAMPLES", "300"))
PROPS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

MEM_SIZE = 256 << 10
QSIZE = 8
SECTORS = 64
QBASE = 0x1000
SLOT = 1024
NSLOTS = 8
# Room for every buffer of the longest request list (2*QSIZE requests of up to ~2.2 KiB) without the
# DriverQueue's allocator wrapping over buffers still in flight.
DATA_SIZE = 64 << 10
DESC = struct.Struct("<QIHH")
HDR = struct.Struct("<IIQ")
SEG = struct.Struct("<QII")
TYPES = [b.VIRTIO_BLK_T_IN, b.VIRTIO_BLK_T_OUT, b.VIRTIO_BLK_T_FLUSH, b.VIRTIO_BLK_T_GET_ID,
         b.VIRTIO_BLK_T_DISCARD, b.VIRTIO_BLK_T_WRITE_ZEROES, 7, 0xFFFFFFFF]  # fmt: skip
OPTIONAL_FEATURES = [d.VIRTIO_F_EVENT_IDX, d.VIRTIO_F_INDIRECT_DESC, b.VIRTIO_BLK_F_FLUSH,
                     b.VIRTIO_BLK_F_DISCARD, b.VIRTIO_BLK_F_WRITE_ZEROES]  # fmt: skip


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RawDisk]:
    path: Path = tmp_path_factory.mktemp("props") / "disk.img"
    path.write_bytes(bytes(i * 13 & 0xFF for i in range(SECTORS * 512)))
    with RawDisk(path) as d:
        yield d


class Rig:
    """virtio-blk over virtio-mmio ``version`` 2, or the legacy 1 (same rings, set up through QueuePFN)."""

    def __init__(self, disk: RawDisk, features_off: int, version: int = 2, layout: str = "split") -> None:
        self.mem = GuestMemory.single(MEM_SIZE)
        self.dev = b.VirtioBlock(disk, serial="prop", queue_size=QSIZE)
        self.irq = CountingIrq()
        self.t = m.VirtioMmioTransport(self.dev, self.mem, self.irq, version=version)
        queue = PackedDriverQueue if layout == "packed" and version == 2 else DriverQueue
        self.q: DriverQueue | PackedDriverQueue = queue(self.mem, QBASE, QSIZE, data_size=DATA_SIZE)
        if version == 2:
            self.features = setup_device(self.t, [self.q], mask=~features_off)
        else:
            assert isinstance(self.q, DriverQueue)
            self.features = setup_legacy_device(self.t, [self.q], mask=~features_off)

    def slot(self, k: int) -> int:
        return self.q.data_base + k * SLOT


# -- strategy: arbitrary ring contents ---------------------------------------------------------------
def _layout() -> tuple[int, int]:
    mem = GuestMemory.single(MEM_SIZE)
    q = DriverQueue(mem, QBASE, QSIZE, data_size=DATA_SIZE)
    mem.close()
    return q.data_base, q.used_addr


DATA_BASE, USED_ADDR = _layout()
# Biased towards the plausible (buffers in the data slots, short lengths, valid indices) so that many
# chains get past parsing, with the pathological kept in every draw's reach.
in_slot = st.builds(
    lambda k, off: DATA_BASE + k * SLOT + off,
    st.integers(0, NSLOTS - 1),
    st.sampled_from([0, 0, 0, 16, 1, 511]),
)
addresses = st.one_of(
    in_slot,
    in_slot,
    in_slot,
    st.sampled_from([QBASE, QBASE + 16 * QSIZE, USED_ADDR, USED_ADDR + 4, 0]),  # the rings themselves
    st.integers(MEM_SIZE - 600, MEM_SIZE + 16),  # straddling the end of RAM
    st.integers(0, 2**64 - 1),
)
descriptors = st.tuples(
    addresses,
    st.one_of(st.sampled_from([0, 1, 15, 16, 17, 32, 48, 512, 513, 1024]), st.integers(0, 2**32 - 1)),
    st.sampled_from([0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]),
    st.one_of(st.integers(0, QSIZE - 1), st.integers(0, QSIZE + 1)),
)


Desc = tuple[int, int, int, int]


@dataclass
class Garbage:
    features_off: int
    table: list[Desc]
    ring: list[int]
    avail_idx: int
    used_event: int
    slots: list[tuple[int, int, list[tuple[int, int, int]]] | list[Desc]]  # a request or an indirect table
    notifies: int


@st.composite
def garbage(draw: st.DrawFn) -> Garbage:
    slots: list[tuple[int, int, list[tuple[int, int, int]]] | list[Desc]] = []
    for _ in range(NSLOTS):
        if draw(st.booleans()):
            segs = st.tuples(st.integers(0, SECTORS + 2), st.integers(0, 9), st.integers(0, 3))
            rtype, sector = draw(st.sampled_from(TYPES)), draw(st.integers(0, SECTORS + 2))
            slots.append((rtype, sector, draw(st.lists(segs, max_size=3))))
        else:
            slots.append(draw(st.lists(descriptors, min_size=1, max_size=6)))
    return Garbage(
        features_off=draw(st.sets(st.sampled_from(OPTIONAL_FEATURES)).map(sum)),
        table=draw(st.lists(descriptors, min_size=QSIZE, max_size=QSIZE)),
        ring=draw(st.lists(st.integers(0, QSIZE + 1), min_size=QSIZE, max_size=QSIZE)),
        avail_idx=draw(st.one_of(st.integers(1, QSIZE), st.integers(0, QSIZE + 2), st.integers(0, 0xFFFF))),
        used_event=draw(st.integers(0, 0xFFFF)),
        slots=slots,
        notifies=draw(st.integers(1, 3)),
    )


def _writable_regions(mem_before: bytes, table: list[Desc]) -> list[tuple[int, int]]:
    """Every device-writable buffer the driver offered: direct ones and those in indirect tables."""
    regions = []
    for addr, length, flags, _ in table:
        if flags & 4:
            if length % 16 == 0 and 0 < length <= 16 * 1024 and addr + length <= MEM_SIZE:
                for i in range(length // 16):
                    a, n, f, _ = DESC.unpack_from(mem_before, addr + 16 * i)
                    if f & 2:
                        regions.append((a, a + n))
        elif flags & 2:
            regions.append((addr, addr + length))
    return regions


VERSIONS = st.sampled_from(m.MMIO_VERSIONS)


@PROPS
@given(g=garbage(), version=VERSIONS)
def test_garbage_rings_never_escape(disk: RawDisk, g: Garbage, version: int) -> None:
    count_example("garbage_rings_never_escape")
    rig = Rig(disk, g.features_off, version)
    mem, q = rig.mem, rig.q
    try:
        for k, slot in enumerate(g.slots):
            base = rig.slot(k)
            if isinstance(slot, tuple):
                rtype, sector, segs = slot
                mem.write(base, HDR.pack(rtype, 0, sector))
                for i, seg in enumerate(segs):
                    mem.write(base + 16 + 16 * i, SEG.pack(*seg))
            else:
                for i, d in enumerate(slot):
                    mem.pack_into(DESC, base + 16 * i, *d)
        for i, d in enumerate(g.table):
            q.write_desc(i, *d)
        for i, head in enumerate(g.ring):
            mem.write_u16(q.avail_addr + 4 + 2 * i, head)
        q.set_used_event(g.used_event)
        q.set_avail_idx(g.avail_idx)
        before = mem.read(0, MEM_SIZE)
        # Record what the device returns as it returns it: a writable buffer the driver placed over
        # the used ring lets the device's own data overwrite the ring, so reading the ring back
        # afterwards would not tell what the device did.
        pushed: list[int] = []
        vq = rig.t.queues[0]
        real_push = vq.push_used

        def spy(mem_: GuestMemory, head: int, written_len: int) -> None:
            pushed.append(head)
            real_push(mem_, head, written_len)

        vq.push_used = spy  # type: ignore[method-assign]
        # Likewise the buffers as the device copied them when it popped each chain: a writable
        # buffer over the descriptor table lets one request rewrite the next chain's descriptors.
        offered: list[tuple[int, int]] = []
        real_pop = vq.pop

        def pop_spy(mem_: GuestMemory) -> DescriptorChain | None:
            chain = real_pop(mem_)
            if chain is not None:
                offered.extend((d.addr, d.addr + d.length) for d in chain.descriptors if d.writable)
            return chain

        vq.pop = pop_spy  # type: ignore[method-assign]

        for _ in range(g.notifies):
            rig.t.notify(0)

        after = mem.read(0, MEM_SIZE)
        used_idx = len(pushed)
        assert used_idx <= QSIZE * g.notifies
        # every used head was published (at least as many times as it is used): §2.7.8 "the
        # device MUST NOT" return a descriptor the driver did not make available.  A writable buffer
        # the driver placed over its own available ring lets the device's data rewrite ring entries
        # before it reads them: what the ring held at the end was published too.
        published = Counter(g.ring[i % QSIZE] for i in range(min(g.avail_idx, QSIZE)))
        final_ring = [mem.read_u16(q.avail_addr + 4 + 2 * i) for i in range(QSIZE)]
        published |= Counter(final_ring[i % QSIZE] for i in range(min(g.avail_idx, QSIZE)))
        used = Counter(pushed)
        assert not used - published
        event("needs reset" if rig.t.read(m.REG_STATUS, 4) & m.STATUS_DEVICE_NEEDS_RESET else "no reset")
        event(f"used {min(used_idx, 3)}{'+' if used_idx > 3 else ''}")
        # the device wrote only into offered writable buffers and its used ring (incl. avail_event)
        changed = np.flatnonzero(np.frombuffer(before, np.uint8) != np.frombuffer(after, np.uint8))
        allowed = [*_writable_regions(before, g.table), *offered, (q.used_addr, q.used_addr + 6 + 8 * QSIZE)]
        for pos in changed:
            assert any(lo <= pos < hi for lo, hi in allowed), f"write at {pos:#x} outside offered buffers"
    finally:
        mem.close()


# -- strategy: well-formed requests ---------------------------------------------------------------
def _split(data_len: int, cuts: list[int]) -> list[int]:
    points = sorted({c % (data_len + 1) for c in cuts} | {0, data_len})
    return [b - a for a, b in itertools.pairwise(points) if b > a]


request = st.tuples(
    st.sampled_from(TYPES),
    st.integers(0, SECTORS + 1),  # sector
    st.sampled_from([0, 512, 1024, 2048, 100, 16, 20]),  # data length
    st.lists(st.integers(0, 4096), max_size=3),  # where to cut the data into descriptors
    st.booleans(),  # indirect
    st.integers(0, 2),  # discard segment flags
)


@pytest.mark.parametrize("layout", ["split", "packed"])
@PROPS
@given(
    reqs=st.lists(request, min_size=1, max_size=2 * QSIZE),
    off=st.sets(st.sampled_from(OPTIONAL_FEATURES)).map(sum),
    version=VERSIONS,
)
def test_well_formed_requests_used_exactly_once(
    disk: RawDisk, reqs: list[tuple[int, int, int, list[int], bool, int]], off: int, version: int, layout: str
) -> None:
    """Over the split ring (§2.7) and the packed one (§2.8), as many examples each; a split ring through
    either transport version (the legacy one has split queues only)."""
    count_example(f"well_formed_requests_used_exactly_once[{layout}]")
    rig = Rig(disk, off, 2 if layout == "packed" else version, layout)
    q = rig.q
    shadow = bytearray(os.pread(disk.fd, SECTORS * 512, 0))  # the disk as the requests should see it
    unknown: set[int] = set()  # discarded sectors: contents unspecified (§5.2.6.2 "MAY deallocate")
    pending: list[tuple[int, int, int, int, int]] = []  # head, type, sector, length, buffers

    def reap() -> None:
        rig.t.notify(0)
        assert not rig.t.read(m.REG_STATUS, 4) & m.STATUS_DEVICE_NEEDS_RESET
        used = q.get_used()
        # one queue served in order: every pending head exactly once, in submission order
        assert [u.head for u in used] == [p[0] for p in pending]
        for u, (_, rtype, sector, length, nbufs) in zip(used, pending, strict=True):
            check(u, rtype, sector, length, nbufs)
        pending.clear()
        q.reset_data()

    def check(u: UsedElement, rtype: int, sector: int, length: int, nbufs: int) -> None:
        status = q.read_buffer(u.head, nbufs - 1)[0]
        assert status in (b.VIRTIO_BLK_S_OK, b.VIRTIO_BLK_S_IOERR, b.VIRTIO_BLK_S_UNSUPP)
        ok_io = length % 512 == 0 and sector + length // 512 <= SECTORS
        lo, hi = sector * 512, sector * 512 + length
        sectors = set(range(sector, sector + length // 512))
        if rtype in (b.VIRTIO_BLK_T_IN, b.VIRTIO_BLK_T_OUT):
            assert (status == b.VIRTIO_BLK_S_OK) == ok_io
        if rtype not in TYPES[:6]:
            assert status == b.VIRTIO_BLK_S_UNSUPP
        if status != b.VIRTIO_BLK_S_OK:
            # §2.7.8.2: len counts the written prefix of the writable part; after a failure only the status
            # byte is written, which counts only when no writable data buffer lies before it.
            writable_data = length if rtype in (b.VIRTIO_BLK_T_IN, b.VIRTIO_BLK_T_GET_ID) else 0
            assert u.length == (0 if writable_data else 1)
        elif rtype == b.VIRTIO_BLK_T_IN:
            assert u.length == length + 1
            got = b"".join(q.read_buffer(u.head, i) for i in range(1, nbufs - 1))
            if not sectors & unknown:
                assert got == bytes(shadow[lo:hi])
        elif rtype == b.VIRTIO_BLK_T_OUT:
            shadow[lo:hi] = b"\x5a" * length
            unknown.difference_update(sectors)
        elif rtype == b.VIRTIO_BLK_T_WRITE_ZEROES:
            shadow[lo : lo + length // 512 * 512] = bytes(length // 512 * 512)
            unknown.difference_update(sectors)
        elif rtype == b.VIRTIO_BLK_T_DISCARD:
            unknown.update(sectors)

    try:
        for rtype, sector, length, cuts, indirect, flags in reqs:
            bufs: list[tuple[bytes | int, bool]] = [(HDR.pack(rtype, 0, sector), False)]
            writable = rtype in (b.VIRTIO_BLK_T_IN, b.VIRTIO_BLK_T_GET_ID)
            if rtype in (b.VIRTIO_BLK_T_DISCARD, b.VIRTIO_BLK_T_WRITE_ZEROES):
                bufs.append((SEG.pack(sector, length // 512, flags), False))
            else:
                bufs += [((n if writable else bytes([0x5A]) * n), writable) for n in _split(length, cuts)]
            bufs.append((b"\xee", True))
            use_indirect = indirect and bool(rig.features & d.VIRTIO_F_INDIRECT_DESC)
            if q.free_descriptors < (1 if use_indirect else len(bufs)) or len(pending) == QSIZE // 2:
                reap()  # as a driver waits for used buffers when its ring or memory runs short
            head = q.add_chain(bufs, indirect=use_indirect)
            pending.append((head, rtype, sector, length, len(bufs)))
        reap()
    finally:
        rig.mem.close()


# -- strategy: register sequences ---------------------------------------------------------------
REGISTERS = [v for k, v in vars(m).items() if k.startswith("REG_")]
access = st.tuples(
    st.sampled_from(["r", "w", "notify"]),
    st.one_of(
        st.sampled_from(REGISTERS),
        st.integers(0, 0x1FF),
        st.sampled_from([m.REG_CONFIG + i for i in range(0, 80, 4)]),
    ),
    st.sampled_from([1, 2, 4, 8]),
    st.one_of(st.sampled_from([0, 1, 2, 3, 4, 8, 15, 0x40, 0x80, 0xFF]), st.integers(0, 2**32 - 1)),
)


@PROPS
@given(ops=st.lists(access, max_size=40), configured=st.booleans(), version=VERSIONS)
def test_register_sequences_never_raise(
    disk: RawDisk, ops: list[tuple[str, int, int, int]], configured: bool, version: int
) -> None:
    count_example("register_sequences_never_raise")
    rig = Rig(disk, 0, version) if configured else None
    if rig is None:
        mem = GuestMemory.single(MEM_SIZE)
        t = m.VirtioMmioTransport(b.VirtioBlock(disk, queue_size=QSIZE), mem, CountingIrq(), version=version)
        DriverQueue(mem, QBASE, QSIZE, data_size=DATA_SIZE)
    else:
        mem, t = rig.mem, rig.t
        rig.q.add_chain([(HDR.pack(0, 0, 1), False), (512, True), (1, True)])
    try:
        for kind, offset, size, value in ops:
            if kind == "r":
                v = t.read(offset, size)
                assert 0 <= v < 1 << (8 * size)
            elif kind == "w":
                t.write(offset, size, value)
            else:
                t.notify(value % 4)
        status = t.read(m.REG_STATUS, 4)
        feats = t.negotiated_features
        if t.legacy:  # §3.1.2: a legacy device is no virtio 1.x device, and it has no FEATURES_OK step
            assert not feats & d.VIRTIO_F_VERSION_1
        else:
            if status & m.STATUS_FEATURES_OK:
                assert feats & d.VIRTIO_F_VERSION_1 and not feats & ~t.device.device_features
            if status & m.STATUS_DRIVER_OK:
                assert status & m.STATUS_FEATURES_OK
    finally:
        mem.close()
