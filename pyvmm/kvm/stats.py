"""KVM's binary statistics: ``KVM_GET_STATS_FD`` on a VM or vCPU fd.

The kernel's own counters (exits it handled without us, halts, page faults taken and fixed, injected
interrupts, signal exits, ...) are how one tells a vCPU that is busy inside ``KVM_RUN`` from one that is
blocked, and a guest that runs from one that never gets to run.  Layout: include/uapi/linux/kvm.h,
``struct kvm_stats_header`` / ``struct kvm_stats_desc`` and Documentation/virt/kvm/api.rst section
"KVM_GET_STATS_FD": a header at offset 0, ``num_desc`` descriptors of ``sizeof(kvm_stats_desc) +
name_size`` bytes each at ``desc_offset``, and the values (``size`` u64 each) at ``data_offset +
desc.offset``.  The descriptors never change for the life of the fd, so they are read once.
"""

from __future__ import annotations

import os
import struct

from pyvmm.kvm.ioctl import KVMIO, io, ioctl
from pyvmm.statictypes import NamedTuple

KVM_CAP_BINARY_STATS_FD = 203
KVM_GET_STATS_FD = io(KVMIO, 0xCE)

# struct kvm_stats_header: flags, name_size, num_desc, id_offset, desc_offset, data_offset (6 x u32)
_HEADER = struct.Struct("<6I")
# struct kvm_stats_desc without its name: flags u32, exponent s16, size u16, offset u32, bucket_size u32
_DESC = struct.Struct("<IhHII")

# desc.flags: KVM_STATS_TYPE_* in bits 0-3
KVM_STATS_TYPE_MASK = 0xF
KVM_STATS_TYPE_CUMULATIVE = 0
KVM_STATS_TYPE_INSTANT = 1
KVM_STATS_TYPE_PEAK = 2


class StatDesc(NamedTuple):
    name: str
    kind: int  # KVM_STATS_TYPE_*
    size: int  # number of u64 values (1 for a counter, more for a histogram)
    offset: int  # from the header's data_offset


class StatsFd:
    """One stats fd; :meth:`read` returns the scalar counters by name (histograms are summed)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        head = os.pread(fd, _HEADER.size, 0)
        _flags, name_size, num_desc, _id_off, desc_off, self._data_off = _HEADER.unpack(head)
        step = _DESC.size + name_size
        raw = os.pread(fd, step * num_desc, desc_off)
        descs = []
        for i in range(num_desc):
            flags, _exp, size, offset, _bucket = _DESC.unpack_from(raw, i * step)
            name = raw[i * step + _DESC.size: (i + 1) * step].split(b"\0", 1)[0].decode()
            descs.append(StatDesc(name, flags & KVM_STATS_TYPE_MASK, size, offset))
        self.descs: tuple[StatDesc, ...] = tuple(descs)
        self._by_name = {d.name: d for d in descs}
        self._span = max((d.offset + 8 * d.size for d in descs), default=0)

    @classmethod
    def open(cls, fd: int) -> StatsFd | None:
        """The stats fd of a VM or vCPU fd, or None where the kernel has none (older than 5.14)."""
        try:
            return cls(ioctl(fd, KVM_GET_STATS_FD))
        except OSError:
            return None

    def read(self) -> dict[str, int]:
        data = os.pread(self.fd, self._span, self._data_off)
        out = {}
        for d in self.descs:
            values = struct.unpack_from(f"<{d.size}Q", data, d.offset)
            out[d.name] = sum(values)
        return out

    def value(self, name: str) -> int | None:
        """One counter, read on its own (None when this kernel has no such counter)."""
        d = self._by_name.get(name)
        if d is None:
            return None
        return int(sum(struct.unpack(f"<{d.size}Q", os.pread(self.fd, 8 * d.size, self._data_off + d.offset))))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The counters that changed between two reads (instant and peak values: their latest value)."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
