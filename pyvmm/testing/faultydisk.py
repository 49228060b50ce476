"""A disk backend that fails on purpose: fault injection for virtio-blk's error paths.

:class:`FaultyDisk` wraps any :class:`~pyvmm.devices.virtio.disk.Disk` and makes chosen requests fail the
way a host disk fails: ``EIO`` on a read, a write or a flush, ``ENOSPC`` on a write, or a slow request.
A fault matches an operation and a byte range; it can let the first ``after`` matching requests through
and fail only ``times`` of them.  What a failed request did to the image is what a real failure could
leave: nothing (the wrapper raises before passing the request on).  Used by the unit tests on the real
:class:`~pyvmm.devices.virtio.block.VirtioBlock` and, through :func:`install`, by a lab test in which a
real guest's root disk starts failing its writes.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pyvmm.devices.virtio.disk import Buffers, Disk

KINDS = {"eio": errno.EIO, "enospc": errno.ENOSPC, "slow": 0}
OPS = ("read", "write", "flush", "discard", "write_zeroes")


@dataclass
class Fault:
    op: str  # one of OPS
    kind: str  # "eio", "enospc" or "slow"
    start: int = 0  # byte range [start, end) the request must touch (flush: always matches)
    end: int = 1 << 63
    after: int = 0  # matching requests let through first
    times: int | None = None  # matching requests that fail after those (None: all)
    delay_s: float = 0.1  # "slow": how long each matching request takes longer
    # If set, the fault is off until a read touches this byte range: the guest arms it when it chooses
    # (e.g. `dd if=/dev/vda skip=...`), after its boot's own writes went through.
    armed_by: tuple[int, int] | None = None
    seen: int = field(default=0, init=False)
    fired: int = field(default=0, init=False)
    armed: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.op not in OPS or self.kind not in KINDS:
            raise ValueError(f"bad fault {self.op}:{self.kind}")
        self.armed = self.armed_by is None

    def matches(self, op: str, offset: int, length: int) -> bool:
        if not self.armed and op == "read" and self.armed_by is not None:
            lo, hi = self.armed_by
            self.armed = offset < hi and offset + length > lo
            return False
        if not self.armed or op != self.op or (
                op != "flush" and not (offset < self.end and offset + length > self.start)):
            return False
        self.seen += 1
        if self.seen <= self.after or (self.times is not None and self.fired >= self.times):
            return False
        self.fired += 1
        return True


class FaultyDisk:
    """``disk`` with ``faults`` applied, checked in order for every request (thread-safe)."""

    def __init__(self, disk: Disk, faults: Sequence[Fault]) -> None:
        self.inner = disk
        self.faults = list(faults)
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def readonly(self) -> bool:
        return self.inner.readonly

    def _check(self, op: str, offset: int = 0, length: int = 0) -> None:
        with self._lock:
            hits = [f for f in self.faults if f.matches(op, offset, length)]
        for f in hits:
            if f.kind == "slow":
                time.sleep(f.delay_s)
            else:
                raise OSError(KINDS[f.kind], f"injected {f.kind} on {op} at byte {offset}")

    def readv_into(self, offset: int, buffers: Buffers) -> int:
        self._check("read", offset, sum(len(b) for b in buffers))
        return self.inner.readv_into(offset, buffers)

    def writev(self, offset: int, buffers: Buffers) -> int:
        self._check("write", offset, sum(len(b) for b in buffers))
        return self.inner.writev(offset, buffers)

    def flush(self) -> None:
        self._check("flush")
        self.inner.flush()

    def discard(self, offset: int, length: int) -> None:
        self._check("discard", offset, length)
        self.inner.discard(offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._check("write_zeroes", offset, length)
        self.inner.write_zeroes(offset, length, unmap)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


def install(faults: Sequence[Fault]) -> None:
    """Put every disk a VirtioBlock made from now on in this process behind a :class:`FaultyDisk` with
    ``faults`` (for a script that runs pyvmm.cli.main afterwards, as the lab test does)."""
    from pyvmm.devices.virtio import block

    init = block.VirtioBlock.__init__

    def faulty_init(self: block.VirtioBlock, disk: Disk, **kw: Any) -> None:
        init(self, FaultyDisk(disk, faults), **kw)

    block.VirtioBlock.__init__ = faulty_init  # type: ignore[method-assign]
