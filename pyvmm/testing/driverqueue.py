"""The guest driver's half of a split virtqueue (virtio 1.2 §2.7), for tests and benchmarks.

:class:`DriverQueue` lays out a descriptor table, available ring and used ring in an area of a
:class:`~pyvmm.memory.GuestMemory`, allocates data buffers after them, publishes chains (direct or
through an indirect table, §2.7.5.3) and reads used elements back, as a guest's virtio driver does.
:func:`setup_device` drives a virtio-mmio transport's registers through the initialisation sequence
of §3.1.1 / §4.2.3.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pyvmm.memory import GuestMemory

# Mirrors of the device-side definitions (§2.7.5, §2.7.6, §2.7.8); duplicated on purpose so that the
# driver model does not share the code it tests.
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
AVAIL_F_NO_INTERRUPT = 1

Buffer = tuple[bytes | int, bool]  # contents (or a length to allocate zeroed), device-writable?


@dataclass(frozen=True)
class UsedElement:
    head: int
    length: int


class DriverQueue:
    """A driver-side split virtqueue of ``size`` entries at guest address ``base``.

    Layout: descriptor table at ``base``, available ring after it, used ring at the next 4 KiB
    boundary, then a data area of ``data_size`` bytes served by a bump allocator (reset with
    :meth:`reset_data`).
    """

    def __init__(self, mem: GuestMemory, base: int, size: int, *, data_size: int = 1 << 20) -> None:
        if size < 1 or size & (size - 1):
            raise ValueError("queue size must be a power of two")
        self.mem = mem
        self.size = size
        self.desc_addr = base
        self.avail_addr = base + 16 * size
        used = self.avail_addr + 6 + 2 * size
        self.used_addr = (used + 4095) & ~4095
        self.ring_end = self.used_addr + 6 + 8 * size
        self.data_base = (self.ring_end + 4095) & ~4095
        self.data_end = self.data_base + data_size
        if not mem.contains(base, self.data_end - base):
            raise ValueError("DriverQueue area does not fit in guest memory")
        mem.fill(base, self.ring_end - base)
        self.avail_idx = 0
        self.last_used_idx = 0
        self._free = list(range(size))
        self._chains: dict[int, list[int]] = {}  # head -> descriptor indices it holds
        self.buffers: dict[int, list[tuple[int, int, bool]]] = {}  # head -> (gpa, len, writable)
        self.reset_data()

    @property
    def free_descriptors(self) -> int:
        return len(self._free)

    # -- data buffers ------------------------------------------------------------------------------
    def reset_data(self) -> None:
        self._next_data = self.data_base

    def alloc(self, length: int, align: int = 16) -> int:
        addr = (self._next_data + align - 1) // align * align
        if addr + length > self.data_end:
            self.reset_data()  # wrap: callers that keep buffers across a wrap must copy them first
            addr = self.data_base
            if addr + length > self.data_end:
                raise ValueError(f"buffer of {length} bytes does not fit in the data area")
        self._next_data = addr + length
        return addr

    # -- publishing --------------------------------------------------------------------------------
    def write_desc(self, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.pack_into(_DESC, self.desc_addr + 16 * index, addr, length, flags, nxt)

    def add_chain(self, buffers: Sequence[Buffer], *, indirect: bool = False, publish: bool = True) -> int:
        """Place ``buffers`` in data memory, chain them, and (if ``publish``) make the head available."""
        placed: list[tuple[int, int, bool]] = []
        for content, writable in buffers:
            if isinstance(content, int):
                addr = self.alloc(content)
                self.mem.fill(addr, content)
                placed.append((addr, content, writable))
            else:
                addr = self.alloc(len(content))
                self.mem.write(addr, content)
                placed.append((addr, len(content), writable))
        return self.add_raw_chain(placed, indirect=indirect, publish=publish)

    def add_raw_chain(
        self, placed: Sequence[tuple[int, int, bool]], *, indirect: bool = False, publish: bool = True
    ) -> int:
        """Chain buffers the caller placed itself: ``(gpa, len, writable)`` each."""
        if indirect:
            table = self.alloc(16 * len(placed), align=16)
            for i, (addr, length, writable) in enumerate(placed):
                flags = (F_WRITE if writable else 0) | (F_NEXT if i + 1 < len(placed) else 0)
                self.mem.pack_into(_DESC, table + 16 * i, addr, length, flags, i + 1 if flags & F_NEXT else 0)
            entries = [(table, 16 * len(placed), F_INDIRECT)]
        else:
            entries = [(a, n, F_WRITE if w else 0) for a, n, w in placed]
        if len(entries) > len(self._free):
            raise ValueError("not enough free descriptors")
        indices = [self._free.pop() for _ in entries]
        for i, (addr, length, flags) in enumerate(entries):
            last = i + 1 == len(entries)
            self.write_desc(
                indices[i], addr, length, flags | (0 if last else F_NEXT), 0 if last else indices[i + 1]
            )
        head = indices[0]
        self._chains[head] = indices
        self.buffers[head] = list(placed)
        if publish:
            self.publish(head)
        return head

    def publish(self, head: int) -> None:
        """Put ``head`` in the next available slot, then advance avail idx (§2.7.13)."""
        self.mem.pack_into(_U16, self.avail_addr + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.pack_into(_U16, self.avail_addr + 2, self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        """Write avail idx directly (for tests that publish garbage)."""
        self.avail_idx = idx & 0xFFFF
        self.mem.pack_into(_U16, self.avail_addr + 2, self.avail_idx)

    # -- notification suppression (§2.7.7, §2.7.10) ------------------------------------------------
    def set_no_interrupt(self, on: bool) -> None:
        self.mem.pack_into(_U16, self.avail_addr, AVAIL_F_NO_INTERRUPT if on else 0)

    def set_used_event(self, idx: int) -> None:
        self.mem.pack_into(_U16, self.avail_addr + 4 + 2 * self.size, idx & 0xFFFF)

    @property
    def avail_event(self) -> int:
        return int(self.mem.unpack_from(_U16, self.used_addr + 4 + 8 * self.size)[0])

    # -- the used ring -----------------------------------------------------------------------------
    @property
    def used_idx(self) -> int:
        return int(self.mem.unpack_from(_U16, self.used_addr + 2)[0])

    def get_used(self) -> list[UsedElement]:
        """Used elements the device added since the last call; their descriptors become free."""
        out: list[UsedElement] = []
        used_idx = self.used_idx
        while self.last_used_idx != used_idx:
            slot = self.last_used_idx % self.size
            head, length = self.mem.unpack_from(_USED_ELEM, self.used_addr + 4 + 8 * slot)
            out.append(UsedElement(head, length))
            self._free.extend(self._chains.pop(head, []))
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
        return out

    def read_buffer(self, head: int, index: int) -> bytes:
        addr, length, _ = self.buffers[head][index]
        return self.mem.read(addr, length)


# The packed layout (§2.8.13 struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; },
# §2.8.10 struct pvirtq_event_suppress { le16 desc; le16 flags; }), again mirrored.
_PDESC = struct.Struct("<QIHH")
_EVENT = struct.Struct("<HH")
P_AVAIL, P_USED = 1 << 7, 1 << 15
EVENT_ENABLE, EVENT_DISABLE, EVENT_DESC = 0, 1, 2


class PackedDriverQueue:
    """A driver-side packed virtqueue (§2.8) of ``size`` descriptors at guest address ``base``: the
    descriptor ring, then the driver's event suppression structure (the driver area), the device's (the
    device area), and a data area as :class:`DriverQueue` has.  Buffer IDs are handed out from a free
    list, so completions may come back in any order; every descriptor of a chain carries its ID, and the
    first descriptor's flags are written last (§2.8.21), so the device never sees half a chain."""

    packed = True

    def __init__(self, mem: GuestMemory, base: int, size: int, *, data_size: int = 1 << 20) -> None:
        if not 1 <= size <= 32768:
            raise ValueError("queue size must be 1..32768")
        self.mem = mem
        self.size = size
        self.desc_addr = base
        self.avail_addr = base + 16 * size  # driver area (§2.8.10: the driver's event suppression)
        self.used_addr = self.avail_addr + 4  # device area (the device's)
        self.ring_end = self.used_addr + 4
        self.data_base = (self.ring_end + 4095) & ~4095
        self.data_end = self.data_base + data_size
        if not mem.contains(base, self.data_end - base):
            raise ValueError("PackedDriverQueue area does not fit in guest memory")
        mem.fill(base, self.ring_end - base)
        self.next_avail = 0
        self.avail_wrap = True  # §2.8.1: both counters start at 1
        self.next_used = 0
        self.used_wrap = True
        self._free_ids = list(range(size - 1, -1, -1))
        self._free_slots = size
        self._slots: dict[int, int] = {}  # buffer ID -> ring slots its chain took
        self.buffers: dict[int, list[tuple[int, int, bool]]] = {}
        self.reset_data()

    @property
    def free_descriptors(self) -> int:
        return self._free_slots

    def reset_data(self) -> None:
        self._next_data = self.data_base

    def alloc(self, length: int, align: int = 16) -> int:
        addr = (self._next_data + align - 1) // align * align
        if addr + length > self.data_end:
            self.reset_data()
            addr = self.data_base
            if addr + length > self.data_end:
                raise ValueError(f"buffer of {length} bytes does not fit in the data area")
        self._next_data = addr + length
        return addr

    def add_chain(self, buffers: Sequence[Buffer], *, indirect: bool = False, publish: bool = True) -> int:
        placed: list[tuple[int, int, bool]] = []
        for content, writable in buffers:
            length = content if isinstance(content, int) else len(content)
            addr = self.alloc(length)
            if isinstance(content, int):
                self.mem.fill(addr, length)
            else:
                self.mem.write(addr, content)
            placed.append((addr, length, writable))
        return self.add_raw_chain(placed, indirect=indirect)

    def add_raw_chain(self, placed: Sequence[tuple[int, int, bool]], *, indirect: bool = False,
                      publish: bool = True) -> int:
        if indirect:
            table = self.alloc(16 * len(placed), align=16)
            for i, (addr, length, writable) in enumerate(placed):  # §2.8.8: no NEXT inside the table
                self.mem.pack_into(_PDESC, table + 16 * i, addr, length, 0, F_WRITE if writable else 0)
            entries = [(table, 16 * len(placed), F_INDIRECT)]
        else:
            entries = [(a, n, F_WRITE if w else 0) for a, n, w in placed]
        if len(entries) > self._free_slots or not self._free_ids:
            raise ValueError("not enough free descriptors")
        buffer_id = self._free_ids.pop()
        first_slot, first_flags = self.next_avail, 0
        for i, (addr, length, flags) in enumerate(entries):
            flags |= F_NEXT if i + 1 < len(entries) else 0
            flags |= P_AVAIL if self.avail_wrap else P_USED  # AVAIL = wrap, USED = !wrap (§2.8.1)
            at = self.desc_addr + 16 * self.next_avail
            if i == 0:
                self.mem.pack_into(_PDESC, at, addr, length, buffer_id, 0)  # flags last, below
                first_flags = flags
            else:
                self.mem.pack_into(_PDESC, at, addr, length, buffer_id, flags)
            self.next_avail += 1
            if self.next_avail == self.size:
                self.next_avail, self.avail_wrap = 0, not self.avail_wrap
        self.mem.pack_into(_U16, self.desc_addr + 16 * first_slot + 14, first_flags)
        self._slots[buffer_id] = len(entries)
        self._free_slots -= len(entries)
        self.buffers[buffer_id] = list(placed)
        return buffer_id

    # -- notification suppression (§2.8.10) -------------------------------------------------------
    def set_driver_event(self, flags: int, off: int = 0, wrap: bool = True) -> None:
        self.mem.pack_into(_EVENT, self.avail_addr, (off & 0x7FFF) | (int(wrap) << 15), flags)

    def set_no_interrupt(self, on: bool) -> None:
        self.set_driver_event(EVENT_DISABLE if on else EVENT_ENABLE)

    @property
    def device_event(self) -> tuple[int, int]:
        off_wrap, flags = self.mem.unpack_from(_EVENT, self.used_addr)
        return int(off_wrap), int(flags)

    # -- used descriptors -------------------------------------------------------------------------
    def get_used(self) -> list[UsedElement]:
        """Used descriptors the device wrote since the last call (AVAIL == USED == our used wrap counter)."""
        out: list[UsedElement] = []
        while self._slots:
            _, length, buffer_id, flags = self.mem.unpack_from(_PDESC, self.desc_addr + 16 * self.next_used)
            if bool(flags & P_AVAIL) != self.used_wrap or bool(flags & P_USED) != self.used_wrap:
                break
            slots = self._slots.pop(buffer_id)  # KeyError: the device returned an ID it was not given
            out.append(UsedElement(buffer_id, length))
            self._free_ids.append(buffer_id)
            self._free_slots += slots
            self.next_used += slots
            if self.next_used >= self.size:
                self.next_used -= self.size
                self.used_wrap = not self.used_wrap
        return out

    def read_buffer(self, head: int, index: int) -> bytes:
        addr, length, _ = self.buffers[head][index]
        return self.mem.read(addr, length)


class MmioTransport(Protocol):
    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


# virtio-mmio register offsets (§4.2.2), again mirrored rather than imported.
_STATUS, _DEV_FEAT, _DEV_FEAT_SEL, _DRV_FEAT, _DRV_FEAT_SEL = 0x70, 0x10, 0x14, 0x20, 0x24
_QSEL, _QNUM_MAX, _QNUM, _QREADY = 0x30, 0x34, 0x38, 0x44
_QDESC, _QDRIVER, _QDEVICE = 0x80, 0x90, 0xA0
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8
F_RING_PACKED = 1 << 34  # §6: a driver accepts it only if it drives packed queues


class SetupError(Exception):
    """The device refused the driver's initialisation (e.g. FEATURES_OK not accepted)."""


def setup_device(
    transport: MmioTransport, queues: Sequence[DriverQueue | PackedDriverQueue], *, features: int | None = None,
    mask: int = -1,
) -> int:
    """Initialise a device as a driver does (§3.1.1) and return the negotiated features.

    ``features`` forces the driver's feature word; otherwise it accepts ``device_features & mask``.
    """
    transport.write(_STATUS, 4, 0)
    transport.write(_STATUS, 4, ACKNOWLEDGE)
    transport.write(_STATUS, 4, ACKNOWLEDGE | DRIVER)
    offered = 0
    for sel in (0, 1):
        transport.write(_DEV_FEAT_SEL, 4, sel)
        offered |= transport.read(_DEV_FEAT, 4) << (32 * sel)
    accepted = offered & mask if features is None else features
    packed = [getattr(q, "packed", False) for q in queues]
    if features is None and not all(packed):
        accepted &= ~F_RING_PACKED  # this driver lays its queues out split (§2.7)
    if any(packed) and not accepted & F_RING_PACKED:
        raise SetupError("packed queues, but VIRTIO_F_RING_PACKED is not negotiated")
    for sel in (0, 1):
        transport.write(_DRV_FEAT_SEL, 4, sel)
        transport.write(_DRV_FEAT, 4, (accepted >> (32 * sel)) & 0xFFFFFFFF)
    transport.write(_STATUS, 4, ACKNOWLEDGE | DRIVER | FEATURES_OK)
    if not transport.read(_STATUS, 4) & FEATURES_OK:
        raise SetupError(f"device refused features {accepted:#x}")
    for i, q in enumerate(queues):
        transport.write(_QSEL, 4, i)
        if transport.read(_QNUM_MAX, 4) < q.size:
            raise SetupError(f"queue {i}: device maximum is below {q.size}")
        transport.write(_QNUM, 4, q.size)
        for reg, addr in ((_QDESC, q.desc_addr), (_QDRIVER, q.avail_addr), (_QDEVICE, q.used_addr)):
            transport.write(reg, 4, addr & 0xFFFFFFFF)
            transport.write(reg + 4, 4, addr >> 32)
        transport.write(_QREADY, 4, 1)
    transport.write(_STATUS, 4, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
    return accepted


# Legacy virtio-mmio (version 1) registers (§4.2.4), mirrored as well.
_GUEST_PAGE_SIZE, _QALIGN, _QPFN = 0x28, 0x3C, 0x40


def setup_legacy_device(transport: MmioTransport, queues: Sequence[DriverQueue], *, page_size: int = 4096,
                        mask: int = -1) -> int:
    """Initialise a legacy (version 1) virtio-mmio device as a legacy driver does (§4.2.4, §3.1.2: no
    FEATURES_OK) and return the features it accepted.  Each queue's area must start on a page and use
    the layout of §2.7.2 with its used ring aligned to 4096 (what :class:`DriverQueue` lays out)."""
    transport.write(_STATUS, 4, 0)
    transport.write(_STATUS, 4, ACKNOWLEDGE)
    transport.write(_STATUS, 4, ACKNOWLEDGE | DRIVER)
    transport.write(_DEV_FEAT_SEL, 4, 0)
    accepted = transport.read(_DEV_FEAT, 4) & mask & 0xFFFFFFFF
    transport.write(_DRV_FEAT_SEL, 4, 0)
    transport.write(_DRV_FEAT, 4, accepted)
    transport.write(_GUEST_PAGE_SIZE, 4, page_size)
    for i, q in enumerate(queues):
        if q.desc_addr % page_size:
            raise SetupError(f"queue {i}: area at {q.desc_addr:#x} is not on a {page_size}-byte page")
        transport.write(_QSEL, 4, i)
        if transport.read(_QPFN, 4) != 0:
            raise SetupError(f"queue {i} is already in use")
        if transport.read(_QNUM_MAX, 4) < q.size:
            raise SetupError(f"queue {i}: device maximum is below {q.size}")
        transport.write(_QNUM, 4, q.size)
        transport.write(_QALIGN, 4, 4096)
        transport.write(_QPFN, 4, q.desc_addr // page_size)
    transport.write(_STATUS, 4, ACKNOWLEDGE | DRIVER | DRIVER_OK)
    return accepted
