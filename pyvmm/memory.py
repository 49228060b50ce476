"""Guest physical memory: anonymous ``mmap`` regions at guest-physical addresses.

Every device touches guest RAM only through :class:`GuestMemory`, which is passed in, so device code runs
the same on a plain anonymous mapping in tests as on the mapping registered with KVM.

A region of at least 2 MiB starts on a 2 MiB boundary of the host's address space (the mapping is made
2 MiB longer and the region placed at its first boundary) and is advised ``MADV_HUGEPAGE``: where the host
has transparent huge pages, KVM can then map the guest's memory with 2 MiB second-level page-table
entries (the guest-physical and host-virtual addresses agree modulo 2 MiB), which saves a nested page
fault per 4 KiB page the guest touches and TLB misses after (QEMU and Firecracker do the same).
``huge_pages=False`` leaves the default 4 KiB mappings, for measurements.

All accessors check bounds: an access must lie entirely inside one region, otherwise
:class:`~pyvmm.errors.GuestMemoryError` is raised.  Devices catch it and answer the guest with an error
status; it never escapes into the VMM.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import struct

from pyvmm.errors import GuestMemoryError
from pyvmm.statictypes import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # numpy is imported when a view is first asked for: `pyvmm run` starts without it
    import numpy as np
    import numpy.typing as npt

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class MemoryRegion(NamedTuple):
    """One contiguous piece of guest RAM: ``size`` bytes at guest-physical ``gpa``; ``buf`` is exactly those
    bytes (a view into ``mapping``, which may be longer for its alignment)."""

    gpa: int
    size: int
    buf: memoryview
    mapping: mmap.mmap

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def host_addr(self) -> int:
        """Host virtual address of the mapping (handed to KVM_SET_USER_MEMORY_REGION)."""
        return ctypes.addressof(ctypes.c_char.from_buffer(self.buf))


class GuestMemory:
    """Bounds-checked access to guest RAM made of one or more :class:`MemoryRegion`."""

    def __init__(self, layout: list[tuple[int, int]], *, huge_pages: bool = True) -> None:
        """Map anonymous memory for each ``(gpa, size)`` in ``layout`` (sizes page-aligned, no overlap)."""
        regions: list[MemoryRegion] = []
        for gpa, size in sorted(layout):
            if size <= 0 or size % mmap.PAGESIZE or gpa % mmap.PAGESIZE:
                raise GuestMemoryError(f"memory region {gpa:#x}+{size:#x} is not page-aligned")
            if regions and gpa < regions[-1].end:
                raise GuestMemoryError(f"memory region at {gpa:#x} overlaps the previous one")
            regions.append(_map_region(gpa, size, huge_pages))
        self.regions: tuple[MemoryRegion, ...] = tuple(regions)
        self._views = tuple(r.buf for r in regions)
        if not regions:
            raise GuestMemoryError("guest memory needs at least one region")
        self._base0, self._size0, self._view0 = regions[0].gpa, regions[0].size, self._views[0]

    @classmethod
    def single(cls, size: int, gpa: int = 0) -> GuestMemory:
        """One region: handy for tests and fake guests."""
        return cls([(gpa, size)])

    def close(self) -> None:
        for r in self.regions:
            # A view (numpy array, memoryview slice) may still be alive somewhere: then the mapping
            # goes when the last one does.
            with contextlib.suppress(BufferError):
                r.buf.release()
                r.mapping.close()

    # -- address translation ------------------------------------------------------------------------
    def _locate(self, gpa: int, length: int) -> tuple[memoryview, int]:
        # Hot path (every ring access of every virtqueue request): try the first region, which holds
        # all RAM below the device hole, with one comparison chain before the general search.
        off = gpa - self._base0
        if off >= 0 and length >= 0 and off + length <= self._size0:
            return self._view0, off
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest access {gpa:#x}+{length:#x}")
        for region, view in zip(self.regions, self._views, strict=True):
            if region.gpa <= gpa < region.end or (length == 0 and gpa == region.end):
                off = gpa - region.gpa
                if off + length > region.size:
                    break
                return view, off
        raise GuestMemoryError(f"guest access {gpa:#x}+{length:#x} is outside guest RAM")

    def contains(self, gpa: int, length: int) -> bool:
        try:
            self._locate(gpa, length)
        except GuestMemoryError:
            return False
        return True

    # -- bulk access --------------------------------------------------------------------------------
    def view(self, gpa: int, length: int) -> memoryview:
        """A writable memoryview of guest RAM (no copy): for ``os.preadv`` / ``os.pwritev``."""
        view, off = self._locate(gpa, length)
        return view[off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        view, off = self._locate(gpa, length)
        return bytes(view[off : off + length])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        view, off = self._locate(gpa, len(data))
        view[off : off + len(data)] = data

    def fill(self, gpa: int, length: int, value: int = 0) -> None:
        view, off = self._locate(gpa, length)
        view[off : off + length] = bytes([value & 0xFF]) * length

    def array(self, gpa: int, length: int, dtype: npt.DTypeLike = "u1") -> npt.NDArray[np.generic]:
        """A numpy view of ``length`` bytes at ``gpa`` (no copy)."""
        import numpy as np  # deferred: most runs never need a view

        view, off = self._locate(gpa, length)
        return np.frombuffer(view, dtype=np.uint8, count=length, offset=off).view(dtype)

    # -- scalar access (little-endian, as both our guest architectures are) -------------------------
    def read_u16(self, gpa: int) -> int:
        view, off = self._locate(gpa, 2)
        return int(_U16.unpack_from(view, off)[0])

    def read_u32(self, gpa: int) -> int:
        view, off = self._locate(gpa, 4)
        return int(_U32.unpack_from(view, off)[0])

    def read_u64(self, gpa: int) -> int:
        view, off = self._locate(gpa, 8)
        return int(_U64.unpack_from(view, off)[0])

    def write_u16(self, gpa: int, value: int) -> None:
        view, off = self._locate(gpa, 2)
        _U16.pack_into(view, off, value & 0xFFFF)

    def write_u64(self, gpa: int, value: int) -> None:
        view, off = self._locate(gpa, 8)
        _U64.pack_into(view, off, value & 0xFFFFFFFFFFFFFFFF)

    def unpack_from(self, fmt: struct.Struct, gpa: int) -> tuple[int, ...]:
        """``fmt.unpack_from`` at ``gpa`` with the bounds check: the fast path for ring structures."""
        view, off = self._locate(gpa, fmt.size)
        return fmt.unpack_from(view, off)

    def pack_into(self, fmt: struct.Struct, gpa: int, *values: int) -> None:
        view, off = self._locate(gpa, fmt.size)
        fmt.pack_into(view, off, *values)


_MAP_NORESERVE: int = getattr(mmap, "MAP_NORESERVE", 0x4000)
HUGE_PAGE = 2 << 20  # a transparent huge page on x86_64 and on aarch64 with 4 KiB pages


def mapping_length(size: int, huge_pages: bool = True) -> int:
    """How long the host mapping of a region of ``size`` bytes is."""
    return size + HUGE_PAGE if _huge(size, huge_pages) else size


def is_guest_ram_vma(vma_size: int, ram_size: int) -> bool:
    """Whether a mapping of ``vma_size`` bytes in /proc/PID/smaps can be the guest RAM of ``ram_size``
    bytes: the advised part of the mapping is a VMA of its own, of exactly the RAM's size, where the
    host took MADV_HUGEPAGE; else the whole mapping, alignment slack included."""
    return vma_size in (ram_size, mapping_length(ram_size))


def _huge(size: int, huge_pages: bool) -> bool:
    return huge_pages and size >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE")


def _map_region(gpa: int, size: int, huge_pages: bool) -> MemoryRegion:
    """Anonymous memory for one region: on a 2 MiB boundary and advised MADV_HUGEPAGE when ``huge_pages``
    and it is at least that big (the extra 2 MiB of address space is never touched, so costs no RAM)."""
    huge = _huge(size, huge_pages)
    length = mapping_length(size, huge_pages)
    mapping = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
    start = 0
    if huge:
        start = -ctypes.addressof(ctypes.c_char.from_buffer(mapping)) % HUGE_PAGE
        with contextlib.suppress(OSError):  # EINVAL: a host kernel without transparent huge pages
            mapping.madvise(mmap.MADV_HUGEPAGE, start, size)
    return MemoryRegion(gpa, size, memoryview(mapping)[start:start + size], mapping)
