"""The device's half of a split virtqueue (virtio 1.2 §2.7).

A :class:`Virtqueue` holds what the transport's queue registers configured (size, ready, the guest
addresses of the descriptor table, the driver area = available ring and the device area = used ring)
plus the device's private ring positions.  :meth:`Virtqueue.pop` copies the next available descriptor
chain out of guest RAM once (the driver may rewrite descriptors at any time, so the device must not read
them twice) and validates it completely before the device looks at any data:

* every ring index and descriptor index is bounded by the queue size;
* a chain is at most ``size`` descriptors long (so a loop in ``next`` ends with an error, §2.7.5.2);
* an indirect table (§2.7.5.3) is 16-byte granular, bounded, and does not itself contain INDIRECT;
* device-writable descriptors follow all device-readable ones (§2.7.4.2);
* every buffer lies inside guest RAM and the chain's total length fits in 32 bits (§2.7.5.2).

A violation raises :class:`VirtqueueError`: the device cannot tell which buffers the driver meant, so
the transport answers it with DEVICE_NEEDS_RESET (§2.1.2), as QEMU does for a "bogus descriptor".
Request-level mistakes (a bad virtio-blk header, a wrong-direction data buffer) are *not* queue
errors: the device type completes those with an error status.

Notification suppression: VIRTQ_AVAIL_F_NO_INTERRUPT (§2.7.7) when VIRTIO_F_EVENT_IDX is not
negotiated, ``used_event`` / ``avail_event`` (§2.7.10) when it is.
"""

from __future__ import annotations

import struct

from pyvmm.devices.virtio.barrier import mb, rmb, wmb
from pyvmm.errors import GuestMemoryError
from pyvmm.memory import GuestMemory
from pyvmm.statictypes import NamedTuple

# Descriptor flags (§2.7.5).
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

# Available ring flags (§2.7.6) and used ring flags (§2.7.8).
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768  # §2.7: "The maximum Queue Size value is 32768"
# Entries an indirect table may hold.  The spec gives no number; Linux never builds one longer than the
# queue (it uses the table only when the chain fits); QEMU caps at 1024.  We take the larger of both.
MAX_INDIRECT_ENTRIES = 1024

# §2.7.5 struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }  (16 bytes, 16-aligned)
DESC = struct.Struct("<QIHH")
# §2.7.6 struct virtq_avail { le16 flags; le16 idx; le16 ring[size]; le16 used_event; }  (2-aligned)
U16 = struct.Struct("<H")  # avail ring[i], used_event; used idx, avail_event
# §2.7.8 struct virtq_used { le16 flags; le16 idx; struct virtq_used_elem ring[size]; le16 avail_event; }
# struct virtq_used_elem { le32 id; le32 len; }  (the ring is 4-aligned)
USED_ELEM = struct.Struct("<II")

_U32_MAX = 0xFFFFFFFF


class VirtqueueError(Exception):
    """The driver published something the device cannot parse: the device needs a reset (§2.1.2)."""


class Descriptor(NamedTuple):
    """One buffer of a chain, copied out of guest RAM."""

    addr: int
    length: int
    writable: bool


# Builds a Descriptor without the Python-level __new__ that NamedTuple generates (one frame less per
# descriptor on the request hot path); the fields are exactly (addr, length, writable).
_new_descriptor = tuple.__new__


class DescriptorChain:
    """A popped chain: its head index (what goes back in the used ring) and its buffers in order.

    ``readable`` descriptors (device reads them) come first, then ``writable`` ones; the lengths of
    both parts are precomputed because every device needs them.
    """

    __slots__ = ("descriptors", "head", "readable_len", "writable_len")

    def __init__(
        self, head: int, descriptors: list[Descriptor], readable_len: int, writable_len: int
    ) -> None:
        self.head = head
        self.descriptors = descriptors
        self.readable_len = readable_len
        self.writable_len = writable_len

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head}, r={self.readable_len}, w={self.writable_len}, "
            f"descriptors={self.descriptors!r})"
        )


def _need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """§2.7.10: notify if ``event_idx`` lies in ``[old_idx, new_idx)`` modulo 2^16 (vring_need_event)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class Virtqueue:
    """The device side of one split virtqueue; configured by the transport, driven by a device."""

    layout = "split"

    def __init__(self, max_size: int) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"virtqueue max size {max_size} is not a power of two in 1..32768")
        self.max_size = max_size
        self.event_idx = False
        self.indirect = False
        self.reset()

    def reset(self) -> None:
        """Back to the state after device reset (§2.4): not ready, addresses 0, ring positions 0."""
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.last_avail_idx = 0  # next avail ring slot the device will read
        self.used_idx = 0  # our copy of used->idx (the device is its only writer)
        self._signalled_used = 0  # used idx when the driver was last considered for an interrupt
        # The three ring parts as views of guest RAM, made when the queue is activated (see activate()).
        self._rings: tuple[memoryview, memoryview, memoryview] | None = None

    def validate(self) -> str | None:
        """Why the configuration cannot be made ready, or None (checked on QueueReady=1)."""
        if not 1 <= self.size <= self.max_size:
            return f"queue size {self.size} not in 1..{self.max_size}"
        if self.size & (self.size - 1):
            # Ring positions are free-running u16 counters taken modulo the size: only a power of two
            # divides 2^16, so §2.7 requires it for split queues.
            return f"queue size {self.size} is not a power of two"
        # §2.7 "Virtqueue Part Alignment": descriptor table 16, available ring 2, used ring 4.
        if self.desc_addr % 16 or self.avail_addr % 2 or self.used_addr % 4:
            return "misaligned ring address"
        return None

    def activate(self, mem: GuestMemory) -> str | None:
        """QueueReady=1 (or a legacy QueuePFN): why this configuration cannot be used, or None.  Beyond
        :meth:`validate`, each ring part must lie in guest RAM (§2.7: the descriptor table, 16 bytes per
        entry; the available ring, 6 + 2 * size; the used ring, 6 + 8 * size).  They are checked here once
        and then read and written through views of exactly those bytes, which cannot reach past them."""
        problem = self.validate()
        if problem is not None:
            return problem
        try:
            self._rings = self._map(mem)
        except GuestMemoryError as err:
            return f"ring outside guest RAM: {err}"
        return None

    def _map(self, mem: GuestMemory) -> tuple[memoryview, memoryview, memoryview]:
        size = self.size
        return (mem.view(self.desc_addr, 16 * size), mem.view(self.avail_addr, 6 + 2 * size),
                mem.view(self.used_addr, 6 + 8 * size))

    def _views(self, mem: GuestMemory) -> tuple[memoryview, memoryview, memoryview]:
        """The ring views; made now for a queue set ready without :meth:`activate` (a test's shortcut)."""
        if self._rings is None:
            try:
                self._rings = self._map(mem)
            except GuestMemoryError as err:
                raise VirtqueueError(f"ring outside guest RAM: {err}") from err
        return self._rings

    # -- the available side ------------------------------------------------------------------------
    def avail_idx(self, mem: GuestMemory) -> int:
        return int(U16.unpack_from(self._views(mem)[1], 2)[0])

    def has_available(self, mem: GuestMemory) -> bool:
        return self.avail_idx(mem) != self.last_avail_idx

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """Return the next available chain, or None if the driver published nothing new.

        Raises :class:`VirtqueueError` for anything the device cannot parse.
        """
        desc, avail, _ = self._rings or self._views(mem)
        avail_idx = U16.unpack_from(avail, 2)[0]
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            # The driver claims more buffers than the ring holds (QEMU: "Guest moved avail index").
            raise VirtqueueError(f"avail idx {avail_idx} is {pending} ahead of {self.last_avail_idx}")
        # The ring entry and the descriptors are read after the idx that published them (pairs with the
        # driver's write barrier before its avail.idx store; barrier.py).
        rmb()
        head = U16.unpack_from(avail, 4 + 2 * (self.last_avail_idx % self.size))[0]
        chain = self._read_chain(mem, head, desc)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        return chain

    def _read_chain(self, mem: GuestMemory, head: int, table: memoryview) -> DescriptorChain:
        """The chain at ``head`` of the descriptor table ``table`` (a view: an index inside it is inside
        the table; an indirect table becomes the view of its own bytes, checked once)."""
        size = self.size
        if head >= size:
            raise VirtqueueError(f"head index {head} >= queue size {size}")
        descs: list[Descriptor] = []
        readable = writable = 0
        index = head
        limit = size  # descriptors we may still follow in the current table
        in_indirect = False
        # Hot path (every request; profiled with bench/blk.py): a buffer inside the first RAM region (all
        # RAM below the device hole) is bounds-checked with two comparisons; anything else goes through
        # the general, equally checked, GuestMemory path.
        ram0 = mem.regions[0]
        lo, hi = ram0.gpa, ram0.gpa + ram0.size
        desc_unpack = DESC.unpack_from
        new_desc = _new_descriptor
        while True:
            if limit == 0:
                raise VirtqueueError(f"descriptor chain at head {head} is longer than its table (a loop?)")
            limit -= 1
            addr, length, flags, nxt = desc_unpack(table, 16 * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    raise VirtqueueError("indirect table contains an INDIRECT descriptor (§2.7.5.3.1)")
                if not self.indirect:
                    raise VirtqueueError("INDIRECT descriptor without VIRTIO_F_INDIRECT_DESC")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError("descriptor has both INDIRECT and NEXT (§2.7.5.3.1)")
                if length == 0 or length % 16 or length // 16 > MAX_INDIRECT_ENTRIES:
                    raise VirtqueueError(f"indirect table length {length} is not 16..16*1024 in steps of 16")
                try:
                    table = mem.view(addr, length)
                except GuestMemoryError:
                    raise VirtqueueError(f"indirect table {addr:#x}+{length:#x} outside guest RAM") from None
                # §2.7.5.3.2: the device ignores the WRITE flag of the descriptor naming the table.
                size, limit, index, in_indirect = length // 16, length // 16, 0, True
                continue
            if length:
                if not (lo <= addr and addr + length <= hi) and not mem.contains(addr, length):
                    raise VirtqueueError(f"buffer {addr:#x}+{length:#x} outside guest RAM")
                if flags & VIRTQ_DESC_F_WRITE:
                    writable += length
                    descs.append(new_desc(Descriptor, (addr, length, True)))
                else:
                    if writable:
                        raise VirtqueueError("device-readable buffer after a device-writable one (§2.7.4.2)")
                    readable += length
                    descs.append(new_desc(Descriptor, (addr, length, False)))
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if nxt >= size:
                raise VirtqueueError(f"next index {nxt} >= table size {size}")
            index = nxt
        if readable + writable > _U32_MAX:
            raise VirtqueueError("descriptor chain longer than 2^32 bytes (§2.7.5.2)")
        return DescriptorChain(head, descs, readable, writable)

    # -- the used side -----------------------------------------------------------------------------
    def push_used(self, mem: GuestMemory, head: int, written_len: int) -> None:
        """Return chain ``head`` to the driver with ``written_len`` bytes written (§2.7.8.2).

        The element is stored before the index that publishes it: the driver may read the element as
        soon as it sees the new idx.
        """
        used = (self._rings or self._views(mem))[2]
        USED_ELEM.pack_into(used, 4 + 8 * (self.used_idx % self.size), head, written_len & _U32_MAX)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        wmb()  # the element before the idx that publishes it (pairs with the driver's read barrier)
        U16.pack_into(used, 2, self.used_idx)

    def enable_notification(self, mem: GuestMemory) -> bool:
        """Ask the driver to notify us for the next buffer; True if buffers arrived meanwhile.

        With EVENT_IDX the device publishes ``avail_event`` = the next slot it will read (§2.7.10),
        then re-reads avail idx after a full barrier: a buffer the driver published before it saw our store
        would otherwise sit in the ring with no notification coming.  Without EVENT_IDX the device
        never sets VIRTQ_USED_F_NO_NOTIFY, so there is nothing to re-enable.
        """
        if self.event_idx:
            U16.pack_into(self._views(mem)[2], 4 + 8 * self.size, self.last_avail_idx)
            mb()  # our avail_event store before the avail.idx load (pairs with the driver's full barrier)
        return self.has_available(mem)

    def needs_interrupt(self, mem: GuestMemory) -> bool:
        """Whether the used buffers pushed since the last call warrant an interrupt (§2.7.7, §2.7.10)."""
        old, new = self._signalled_used, self.used_idx
        self._signalled_used = new
        if old == new:
            return False
        mb()  # our used idx store before the driver's suppression field load (pairs with its full barrier)
        avail = self._views(mem)[1]
        if self.event_idx:
            return _need_event(U16.unpack_from(avail, 4 + 2 * self.size)[0], new, old)
        return not U16.unpack_from(avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT
