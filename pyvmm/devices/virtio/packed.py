"""The device's half of a packed virtqueue (virtio 1.2 §2.8), behind the same interface as the split one.

A packed queue is one ring of descriptors that both sides write: the driver makes a descriptor chain
available in place, and the device overwrites the first of its slots with a used descriptor.  Which side
a slot belongs to is in its flags, read against a wrap counter each side keeps (§2.8.1, §2.8.2):

* ``struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; }`` (§2.8.13), 16 bytes;
* flags NEXT (1), WRITE (2), INDIRECT (4), AVAIL (1 << 7), USED (1 << 15);
* a slot is available when its AVAIL bit equals the device's avail wrap counter and its USED bit does
  not (§2.8.1); the device writes a used descriptor with both bits equal to its used wrap counter;
* a chain occupies consecutive slots (NEXT on all but the last, §2.8.6), wrapping at the end of the ring
  (which flips the counter); its buffer ID is in its last descriptor; an indirect descriptor (§2.8.8)
  names a table of ``len / 16`` descriptors, all part of the buffer, with no NEXT flags;
* after returning a chain the device's used position moves on by the number of slots the chain took
  (QEMU and Linux do the same), so used descriptors fill the ring in the order chains were completed;
* notification suppression (§2.8.10): the driver area holds the driver's ``struct pvirtq_event_suppress
  { le16 desc; le16 flags; }``, which says when the device interrupts: flags 0 always, 1 never, 2 (with
  VIRTIO_F_EVENT_IDX) when the used descriptor at offset ``desc & 0x7fff`` with wrap ``desc >> 15`` is
  written.  The device area holds the device's: pyvmm leaves it at "always notify" (0), as written by
  the driver.

As for the split queue, a chain is copied out of guest RAM once and validated completely before the device
sees it: its length is bounded by the ring (or the indirect table), an indirect table is 16-byte granular
and holds no INDIRECT descriptor, device-writable buffers follow device-readable ones, and every buffer lies
in guest RAM.  A violation raises :class:`~.queue.VirtqueueError` (the transport answers it with
DEVICE_NEEDS_RESET).
"""

from __future__ import annotations

import struct

from pyvmm.devices.virtio.barrier import mb, rmb, wmb
from pyvmm.devices.virtio.queue import (
    MAX_INDIRECT_ENTRIES,
    MAX_QUEUE_SIZE,
    Descriptor,
    DescriptorChain,
    VirtqueueError,
)
from pyvmm.errors import GuestMemoryError
from pyvmm.memory import GuestMemory

# §2.8.13 struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; }
PDESC = struct.Struct("<QIHH")
# §2.8.10 struct pvirtq_event_suppress { le16 desc (off_wrap); le16 flags; }
EVENT = struct.Struct("<HH")
U16 = struct.Struct("<H")
LEN_ID = struct.Struct("<IH")  # a used descriptor's len and id, written before its flags

F_NEXT = 1
F_WRITE = 2
F_INDIRECT = 4
F_AVAIL = 1 << 7
F_USED = 1 << 15
# pvirtq_event_suppress.flags (§2.8.10)
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2

_U32_MAX = 0xFFFFFFFF


def _need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class PackedVirtqueue:
    """One packed virtqueue, configured by the transport (desc ring, driver area, device area), driven by
    a device exactly like :class:`~.queue.Virtqueue`; ``pop`` returns chains whose ``head`` is the buffer ID."""

    layout = "packed"

    def __init__(self, max_size: int) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE:
            raise ValueError(f"virtqueue max size {max_size} not in 1..{MAX_QUEUE_SIZE}")
        self.max_size = max_size
        self.event_idx = False
        self.indirect = False
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0  # the descriptor ring
        self.avail_addr = 0  # driver area: the driver's event suppression structure
        self.used_addr = 0  # device area: the device's event suppression structure
        self.next_avail = 0
        self.avail_wrap = True  # §2.8.1: both wrap counters start at 1
        self.used_idx = 0  # the next slot a used descriptor goes to
        self.used_wrap = True
        self._slots: dict[int, int] = {}  # buffer ID -> ring slots its chain took (returned with it)
        self._signalled = 0
        self._signalled_valid = False

    def validate(self) -> str | None:
        if not 1 <= self.size <= self.max_size:
            return f"queue size {self.size} not in 1..{self.max_size}"
        # §2.8.14 (alignment): descriptor ring 16, event suppression structures 4
        if self.desc_addr % 16 or self.avail_addr % 4 or self.used_addr % 4:
            return "misaligned ring address"
        return None

    def activate(self, mem: GuestMemory) -> str | None:
        """QueueReady=1: why this configuration cannot be used, or None.  Beyond :meth:`validate`, the
        descriptor ring (16 bytes per entry) and the two event suppression structures (4 bytes each,
        §2.8.10) must lie in guest RAM: checked here, once."""
        problem = self.validate()
        if problem is not None:
            return problem
        for what, addr, length in (("descriptor ring", self.desc_addr, 16 * self.size),
                                   ("driver area", self.avail_addr, 4), ("device area", self.used_addr, 4)):
            if not mem.contains(addr, length):
                return f"{what} {addr:#x}+{length:#x} outside guest RAM"
        return None

    # -- the available side ------------------------------------------------------------------------
    def _flags(self, mem: GuestMemory, slot: int) -> int:
        return int(mem.unpack_from(U16, self.desc_addr + 16 * slot + 14)[0])

    def _is_available(self, flags: int) -> bool:
        return bool(flags & F_AVAIL) == self.avail_wrap and bool(flags & F_USED) != self.avail_wrap

    def has_available(self, mem: GuestMemory) -> bool:
        return self._is_available(self._flags(mem, self.next_avail))

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """The next available chain, or None; :class:`VirtqueueError` for anything unparseable."""
        try:
            if not self.has_available(mem):
                return None
            rmb()  # the rest of the descriptors after the flags that made them available (§2.8.21)
            chain, slots = self._read_chain(mem)
        except GuestMemoryError as err:
            raise VirtqueueError(f"ring access outside guest RAM: {err}") from err
        if chain.head in self._slots:
            raise VirtqueueError(f"buffer ID {chain.head} made available again before it was used")
        self._slots[chain.head] = slots
        self.next_avail += slots
        if self.next_avail >= self.size:
            self.next_avail -= self.size
            self.avail_wrap = not self.avail_wrap
        return chain

    def _read_chain(self, mem: GuestMemory) -> tuple[DescriptorChain, int]:
        descs: list[Descriptor] = []
        readable = writable = 0
        slot = self.next_avail
        slots = 0
        while True:
            if slots == self.size:
                raise VirtqueueError(f"descriptor chain at slot {self.next_avail} is longer than the ring")
            addr, length, buffer_id, flags = mem.unpack_from(PDESC, self.desc_addr + 16 * slot)
            slots += 1
            if flags & F_INDIRECT:
                if not self.indirect:
                    raise VirtqueueError("INDIRECT descriptor without VIRTIO_F_INDIRECT_DESC")
                if flags & F_NEXT:
                    raise VirtqueueError("descriptor has both INDIRECT and NEXT (§2.8.8)")
                if descs:
                    raise VirtqueueError("INDIRECT descriptor inside a chain (§2.8.8)")
                if length == 0 or length % 16 or length // 16 > MAX_INDIRECT_ENTRIES:
                    raise VirtqueueError(f"indirect table length {length} is not 16..16*1024 in steps of 16")
                if not mem.contains(addr, length):
                    raise VirtqueueError(f"indirect table {addr:#x}+{length:#x} outside guest RAM")
                for i in range(length // 16):
                    t_addr, t_len, _, t_flags = mem.unpack_from(PDESC, addr + 16 * i)
                    if t_flags & F_INDIRECT:
                        raise VirtqueueError("indirect table contains an INDIRECT descriptor (§2.8.8)")
                    readable, writable = self._add(mem, descs, t_addr, t_len, t_flags, readable, writable)
                break
            readable, writable = self._add(mem, descs, addr, length, flags, readable, writable)
            if not flags & F_NEXT:
                break
            slot += 1
            if slot == self.size:
                slot = 0
        if readable + writable > _U32_MAX:
            raise VirtqueueError("descriptor chain longer than 2^32 bytes")
        return DescriptorChain(buffer_id, descs, readable, writable), slots

    @staticmethod
    def _add(mem: GuestMemory, descs: list[Descriptor], addr: int, length: int, flags: int, readable: int,
             writable: int) -> tuple[int, int]:
        if not length:
            return readable, writable
        if not mem.contains(addr, length):
            raise VirtqueueError(f"buffer {addr:#x}+{length:#x} outside guest RAM")
        if flags & F_WRITE:
            descs.append(Descriptor(addr, length, True))
            return readable, writable + length
        if writable:
            raise VirtqueueError("device-readable buffer after a device-writable one (§2.8.6)")
        descs.append(Descriptor(addr, length, False))
        return readable + length, writable

    # -- the used side -----------------------------------------------------------------------------
    def push_used(self, mem: GuestMemory, head: int, written_len: int) -> None:
        """Return buffer ``head`` with ``written_len`` bytes written: a used descriptor at the next used
        slot, its flags (which hand the slot back) stored last."""
        slots = self._slots.pop(head, None)
        if slots is None:
            raise VirtqueueError(f"buffer ID {head} returned but never made available")
        at = self.desc_addr + 16 * self.used_idx
        wrap = F_AVAIL | F_USED if self.used_wrap else 0
        try:
            mem.pack_into(LEN_ID, at + 8, written_len & _U32_MAX, head)
            wmb()  # id and len before the flags that publish them
            mem.pack_into(U16, at + 14, wrap | (F_WRITE if written_len else 0))
        except GuestMemoryError as err:
            raise VirtqueueError(f"used descriptor outside guest RAM: {err}") from err
        self.used_idx += slots
        if self.used_idx >= self.size:
            self.used_idx -= self.size
            self.used_wrap = not self.used_wrap

    def enable_notification(self, mem: GuestMemory) -> bool:
        """The device area stays at "always notify": only re-check for buffers that arrived meanwhile."""
        mb()
        try:
            return self.has_available(mem)
        except GuestMemoryError as err:
            raise VirtqueueError(f"ring access outside guest RAM: {err}") from err

    def needs_interrupt(self, mem: GuestMemory) -> bool:
        """Whether the used descriptors written since the last call warrant an interrupt (§2.8.10)."""
        old, new = self._signalled, self.used_idx
        valid = self._signalled_valid
        self._signalled, self._signalled_valid = new, True
        mb()  # our used descriptors before the driver's suppression structure (pairs with its barrier)
        try:
            off_wrap, flags = mem.unpack_from(EVENT, self.avail_addr)
        except GuestMemoryError as err:
            raise VirtqueueError(f"driver area outside guest RAM: {err}") from err
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx or not valid:
            return True
        off = off_wrap & 0x7FFF
        if bool(off_wrap >> 15) != self.used_wrap:
            off -= self.size
        return _need_event(off, new, old)
