"""Address-range dispatch of guest port I/O and MMIO to device register files.

A device on a bus implements :class:`BusDevice`: ``read``/``write`` get the offset into the device's
range and the access size (1, 2, 4 or 8 bytes).  Ranges are checked for overlap when added.  An access
no device claims is counted and logged (rate-limited) and otherwise ignored: reads return all ones
for PIO (as an empty ISA bus does) and zero for MMIO, writes are dropped.

:meth:`Bus.handlers` gives the vCPU loop its dispatch table, built once before the vCPUs start: one
dict lookup per exit instead of a search.
"""

from __future__ import annotations

import bisect
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pyvmm.devices.ratelimit import LogLimiter

log = logging.getLogger(__name__)


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> int:
        """Return the value of a ``size``-byte read at ``offset`` into the device's range."""

    def write(self, offset: int, size: int, value: int) -> None:
        """Handle a ``size``-byte write of ``value`` at ``offset`` into the device's range."""


@dataclass(frozen=True)
class _Range:
    base: int
    size: int
    device: BusDevice
    name: str


Reader = Callable[[int], int]  # size -> value
Writer = Callable[[int, int], None]  # size, value


class Bus:
    """A set of non-overlapping ``[base, base+size)`` ranges, each served by one device."""

    # Ranges up to this size get one table entry per address (a virtio-mmio window is 512 bytes, the
    # UART 8 ports); bigger ones are served by the search in read()/write().
    TABLE_MAX_RANGE = 0x10000

    def __init__(self, name: str, *, unclaimed_read: int = 0) -> None:
        self.name = name
        self._bases: list[int] = []
        self._ranges: list[_Range] = []
        self._unclaimed_read = unclaimed_read
        self.unclaimed = 0  # accesses no device claimed, for exit statistics
        self._unclaimed_log = LogLimiter()

    def add(self, base: int, size: int, device: BusDevice, name: str) -> None:
        if size <= 0:
            raise ValueError(f"{self.name}: empty range for {name}")
        i = bisect.bisect_right(self._bases, base)
        if i > 0 and self._ranges[i - 1].base + self._ranges[i - 1].size > base:
            raise ValueError(f"{self.name}: {name} at {base:#x} overlaps {self._ranges[i - 1].name}")
        if i < len(self._ranges) and base + size > self._ranges[i].base:
            raise ValueError(f"{self.name}: {name} at {base:#x} overlaps {self._ranges[i].name}")
        self._bases.insert(i, base)
        self._ranges.insert(i, _Range(base, size, device, name))

    def find(self, addr: int) -> tuple[BusDevice, int] | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            r = self._ranges[i]
            if addr < r.base + r.size:
                return r.device, addr - r.base
        return None

    def handlers(self) -> tuple[dict[int, Reader], dict[int, Writer]]:
        """The dispatch table: address -> the device's ``read``/``write`` with the offset bound in, for every
        address of every range up to :attr:`TABLE_MAX_RANGE` bytes.  An address not in it is either in a
        bigger range or unclaimed: :meth:`read`/:meth:`write` serve both.  A snapshot: a device added
        later appears in the next call's table."""
        readers: dict[int, Reader] = {}
        writers: dict[int, Writer] = {}
        for r in self._ranges:
            if r.size > self.TABLE_MAX_RANGE:
                continue
            for offset in range(r.size):
                readers[r.base + offset] = functools.partial(r.device.read, offset)
                writers[r.base + offset] = functools.partial(r.device.write, offset)
        return readers, writers

    def read(self, addr: int, size: int) -> int:
        hit = self.find(addr)
        if hit is None:
            self._note_unclaimed("read", addr, size)
            return self._unclaimed_read & ((1 << (8 * size)) - 1)
        device, offset = hit
        return device.read(offset, size)

    def write(self, addr: int, size: int, value: int) -> None:
        hit = self.find(addr)
        if hit is None:
            self._note_unclaimed("write", addr, size, value)
            return
        device, offset = hit
        device.write(offset, size, value)

    def _note_unclaimed(self, kind: str, addr: int, size: int, value: int | None = None) -> None:
        self.unclaimed += 1
        n = self.unclaimed
        if self._unclaimed_log.tick():  # a polling guest cannot flood the log
            extra = "" if value is None else f" value={value:#x}"
            log.debug("%s: unclaimed %s at %#x size=%d%s (%d so far)", self.name, kind, addr, size, extra, n)
