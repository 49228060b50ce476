"""``struct kvm_run`` decoding for the vCPU loop's hot path: offsets and ``struct.Struct`` decoders.

Everything here is derived from the ctypes declarations in :mod:`pyvmm.kvm.abi` (``kvm_run``,
``kvm_run_io``, ``kvm_run_mmio``: include/uapi/linux/kvm.h), not typed by hand, so the C-header test of
those structs covers these offsets too.  One ``unpack_from`` on the mapping replaces a chain of ctypes
attribute accesses (each one a descriptor call and an object) per exit.
"""

from __future__ import annotations

import struct

from pyvmm.kvm import abi
from pyvmm.statictypes import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

EXIT_REASON_OFFSET = abi.kvm_run.exit_reason.offset
_EXIT_REASON = struct.Struct("<I")
assert abi.kvm_run.exit_reason.size == _EXIT_REASON.size

# KVM_EXIT_IO: direction, size, port, count, data_offset (the port data is at data_offset in the mapping,
# count items of size bytes each)
IO_OFFSET = abi.kvm_run.exit.offset
IO = abi.unpacker(abi.kvm_run_io)

# KVM_EXIT_MMIO: phys_addr, data (the u8[8] as one little-endian integer), len, is_write
MMIO_OFFSET = abi.kvm_run.exit.offset
MMIO = abi.unpacker(abi.kvm_run_mmio, ints=("data",))
MMIO_DATA_OFFSET = abi.kvm_run.exit.offset + abi.kvm_run_mmio.data.offset
MMIO_DATA = struct.Struct("<Q")  # the whole data field: a read's answer goes here (KVM copies len bytes)
assert abi.kvm_run_mmio.data.size == MMIO_DATA.size

# Port data by access size, and masks by size (1, 2, 4, 8 bytes).
PIO_DATA: dict[int, struct.Struct] = {n: struct.Struct("<" + c) for n, c in ((1, "B"), (2, "H"), (4, "I"), (8, "Q"))}
MASK = [(1 << (8 * n)) - 1 for n in range(9)]


def exit_reason(run: Any) -> int:
    """The exit reason in a ``kvm_run`` buffer (the mapping, or any buffer laid out like it)."""
    return int(_EXIT_REASON.unpack_from(run, EXIT_REASON_OFFSET)[0])
