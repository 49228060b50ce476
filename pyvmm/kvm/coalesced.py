"""The coalesced MMIO/PIO ring: guest writes KVM recorded instead of exiting, read back in order.

Layout from include/uapi/linux/kvm.h (``struct kvm_coalesced_mmio_ring``: ``__u32 first, last;`` then
``struct kvm_coalesced_mmio coalesced_mmio[]``, each ``{__u64 phys_addr; __u32 len; union {__u32 pad;
__u32 pio;}; __u8 data[8];}``), behaviour from virt/kvm/coalesced_mmio.c and api.rst 4.116
("KVM_(UN)REGISTER_COALESCED_MMIO"):

- the ring is one page of the vCPU mapping, at the page offset ``KVM_CHECK_EXTENSION(
  KVM_CAP_COALESCED_MMIO)`` returns (2 on x86), and every vCPU of the VM shares it;
- it holds ``(PAGE_SIZE - 8) / 24`` entries (170 with 4 KiB pages); the kernel writes the entry at
  ``last`` and then advances ``last``; it keeps one slot free, and when the ring is full the write exits
  to userspace as usual (so the VMM must replay the ring before handling such an exit);
- userspace consumes entries from ``first`` and advances ``first``.

The parser reads and writes the page with ``struct`` at fixed offsets (derived from the ctypes structs in
:mod:`pyvmm.kvm.abi`), so it runs on the real mapping and on a ``bytearray`` in tests alike.  It takes no
lock: callers that may take from several threads serialise :meth:`CoalescedRing.take_runs` themselves.
Memory ordering: the kernel publishes an entry before ``last`` (``smp_wmb``); on x86 (TSO) reading
``last`` and then the entry needs no barrier, which is where pyvmm uses the ring (the UART's port).
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import struct

from pyvmm.kvm import abi
from pyvmm.statictypes import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

_HEADER = abi.unpacker(abi.kvm_coalesced_mmio_ring)  # first, last
_ENTRY = abi.unpacker(abi.kvm_coalesced_mmio, ints=("data",))  # phys_addr, len, pio, data (as an integer)
_FIRST = struct.Struct("<I")  # ring.first alone, for writing it back
_HEADER_SIZE = ctypes.sizeof(abi.kvm_coalesced_mmio_ring)
_ENTRY_SIZE = ctypes.sizeof(abi.kvm_coalesced_mmio)
_FIRST_OFFSET = abi.kvm_coalesced_mmio_ring.first.offset
assert abi.kvm_coalesced_mmio_ring.first.size == _FIRST.size
_DATA_SIZE = abi.kvm_coalesced_mmio.data.size
_DATA_OFFSET = abi.kvm_coalesced_mmio.data.offset
# An entry without its data (phys_addr, len, pio): what a run of writes to one register has in common.
_HEAD = struct.Struct(f"<QII{_ENTRY_SIZE - _DATA_OFFSET}x")
assert (abi.kvm_coalesced_mmio.phys_addr.offset, abi.kvm_coalesced_mmio.len.offset,
        abi.kvm_coalesced_mmio.pio.offset, _DATA_OFFSET) == (0, 8, 12, 16)
assert _ENTRY_SIZE == 24, "kvm_coalesced_mmio is three u64 words (_uniform reads it so)"
_MASK = [(1 << (8 * n)) - 1 for n in range(_DATA_SIZE + 1)]


class CoalescedRing:
    """The ring at ``offset`` in ``buf`` (the vCPU mapping, or any writable buffer of a page)."""

    def __init__(self, buf: Any, offset: int, page_size: int = mmap.PAGESIZE) -> None:
        if len(memoryview(buf)) < offset + page_size:
            raise ValueError(f"buffer of {len(memoryview(buf))} bytes holds no ring page at {offset:#x}")
        self._buf = buf
        self._header = offset
        self._first = offset + _FIRST_OFFSET
        self._entries = offset + _HEADER_SIZE
        self.capacity = (page_size - _HEADER_SIZE) // _ENTRY_SIZE  # KVM_COALESCED_MMIO_MAX
        self.drained = 0  # entries replayed so far (statistics)

    def take_runs(self) -> list[tuple[int, int, bool, list[int]]]:
        """Every waiting entry, oldest first, grouped into runs of consecutive writes of one length to one
        address: ``(address, length, is_pio, values)``, each value masked to its length (the bytes of
        ``data`` past it are stale).  The common case, a console line of one-byte writes to the UART's
        THR, is decoded without a Python step per byte (a strided slice of the data bytes).

        ``first`` is advanced past them before this returns, so each entry is handed out once, even to a
        caller that takes again (re-entrantly, from what it delivers).  One read of the indices: entries
        the kernel adds meanwhile (another vCPU) wait for the next call.  Nothing for indices the kernel
        never leaves (it then stops coalescing: writes exit)."""
        buf, cap = self._buf, self.capacity
        first, last = _HEADER.unpack_from(buf, self._header)
        if first == last or first >= cap or last >= cap:
            return []
        view = memoryview(buf)
        runs: list[tuple[int, int, bool, list[int]]] = []
        for lo, hi in ((first, last),) if first < last else ((first, cap), (0, last)):
            if lo == hi:  # wrapped exactly at the end of the ring
                continue
            seg = view[self._entries + lo * _ENTRY_SIZE:self._entries + hi * _ENTRY_SIZE]
            # The common case, one register written throughout, is found without a Python step per entry.
            heads = [(_HEAD.unpack_from(seg), hi - lo)] if _uniform(seg, hi - lo) else [
                (head, len(list(group))) for head, group in itertools.groupby(_HEAD.iter_unpack(seg))]
            at = 0
            for (addr, length, pio), n in heads:
                length = min(length, _DATA_SIZE)
                if length == 1:
                    values = list(seg[at * _ENTRY_SIZE + _DATA_OFFSET:(at + n) * _ENTRY_SIZE:_ENTRY_SIZE])
                else:
                    values = [e[3] & _MASK[length]
                              for e in _ENTRY.iter_unpack(seg[at * _ENTRY_SIZE:(at + n) * _ENTRY_SIZE])]
                if runs and runs[-1][:3] == (addr, length, pio != 0):
                    runs[-1][3].extend(values)  # one run across the end of the ring
                else:
                    runs.append((addr, length, pio != 0, values))
                at += n
        _FIRST.pack_into(buf, self._first, last)
        self.drained += (last - first) % cap
        return runs


def _uniform(seg: memoryview, n: int) -> bool:
    """Whether the ``n`` entries in ``seg`` all write to one address with one length and kind: the first
    16 bytes of each (``phys_addr``, ``len``, ``pio``; two u64 words of the three an entry has) compared as
    two strided byte strings."""
    words = seg.cast("Q")  # _ENTRY_SIZE is three words (checked at import)
    addrs, kinds = words[0::3], words[1::3]
    return addrs.tobytes() == addrs[:1].tobytes() * n and kinds.tobytes() == kinds[:1].tobytes() * n
