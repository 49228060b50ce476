"""Address-range dispatch of guest port I/O and MMIO to device register files.

A device on a bus implements :class:`BusDevice`: ``read``/``write`` get the offset into the device's
range and the access size (1, 2, 4 or 8 bytes).  Ranges are checked for overlap when added.  An access
no device claims is counted and logged (rate-limited) and otherwise ignored: reads return all ones
for PIO (as an empty ISA bus does) and zero for MMIO, writes are dropped.

:meth:`Bus.handlers` gives the vCPU loop its dispatch tables: one dict lookup per exit instead of a search.
An entry is made the first time the guest touches its address (a search then), so building them costs
nothing at start-up (a virtio-mmio window alone is 4096 addresses).  A device may offer a cheaper reader
for one of its registers (``register_reader``, see :class:`FastRegisters`): a register a guest polls.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable

from pyvmm.devices.ratelimit import LogLimiter
from pyvmm.log import get_logger
from pyvmm.statictypes import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from typing import TypeVar

log = get_logger(__name__)


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> int:
        """Return the value of a ``size``-byte read at ``offset`` into the device's range."""

    def write(self, offset: int, size: int, value: int) -> None:
        """Handle a ``size``-byte write of ``value`` at ``offset`` into the device's range."""


class FastRegisters(Protocol):
    """Optional on a :class:`BusDevice`: for register ``offset``, a reader to put in the dispatch table
    instead of ``read`` with the offset bound in, or None.  The reader must behave exactly as ``read``."""

    def register_reader(self, offset: int) -> Reader | None: ...


class _Range(NamedTuple):
    base: int
    size: int
    device: BusDevice
    name: str


Reader = Callable[[int], int]  # size -> value
Writer = Callable[[int, int], None]  # size, value
if TYPE_CHECKING:
    Handler = TypeVar("Handler", Reader, Writer)


class DispatchTable(dict[int, "Handler | None"]):  # a string: Handler is the type checker's alone
    """address -> handler, filled on first use: ``table[addr]`` is the handler, or None where the bus must
    serve the access itself (an unclaimed address, or one in a range too big to tabulate; not stored, so
    a guest scanning addresses cannot grow the table).  Use ``table[addr]``, not ``get``."""

    __slots__ = ("_make",)

    def __init__(self, make: Callable[[int], Handler | None]) -> None:
        super().__init__()
        self._make: Callable[[int], Handler | None] = make

    def __missing__(self, addr: int) -> Handler | None:
        handler = self._make(addr)
        if handler is not None:
            self[addr] = handler
        return handler


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

    def _range_at(self, addr: int) -> _Range | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0 and addr < self._ranges[i].base + self._ranges[i].size:
            return self._ranges[i]
        return None

    def find(self, addr: int) -> tuple[BusDevice, int] | None:
        r = self._range_at(addr)
        return None if r is None else (r.device, addr - r.base)

    def handlers(self) -> tuple[DispatchTable[Reader], DispatchTable[Writer]]:
        """The dispatch tables: address -> the device's ``read``/``write`` with the offset bound in (or the
        device's own register reader), for the addresses of ranges up to :attr:`TABLE_MAX_RANGE` bytes,
        each made when first looked up.  None for an address in a bigger range or unclaimed:
        :meth:`read`/:meth:`write` serve both."""
        return DispatchTable(self._reader), DispatchTable(self._writer)

    def _reader(self, addr: int) -> Reader | None:
        r = self._range_at(addr)
        if r is None or r.size > self.TABLE_MAX_RANGE:
            return None
        fast = getattr(r.device, "register_reader", None)
        reader: Reader | None = fast(addr - r.base) if fast is not None else None
        return reader if reader is not None else functools.partial(r.device.read, addr - r.base)

    def _writer(self, addr: int) -> Writer | None:
        r = self._range_at(addr)
        if r is None or r.size > self.TABLE_MAX_RANGE:
            return None
        return functools.partial(r.device.write, addr - r.base)

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
