"""Copy-on-write disks (``--disk path=IMG,snapshot=on``): IMG is only read, the guest's writes go to a
private overlay that is gone when pyvmm exits.

IMG is opened by a read-only :class:`~.disk.RawDisk` (``O_RDONLY``, ``flock`` shared, as for
``readonly=on``): other readers and other snapshots may use it at the same time, a writer may not, so
IMG stays bit-for-bit what it was.

The overlay is a sparse file of the disk's size in ``$TMPDIR`` (else ``/var/tmp``, else the system's
temporary directory), created already unlinked (``O_TMPFILE`` where the filesystem has it), so nothing
is left behind however pyvmm ends, even after SIGKILL.  It is a file, not memory, so a guest that writes
gigabytes fills host disk rather than host RAM; a full overlay filesystem fails the guest's write with
VIRTIO_BLK_S_IOERR.

A bitmap keeps one bit per :data:`BLOCK_SIZE` block: set once the block's current contents are all in the
overlay.  Reads take each run of blocks from the overlay or from IMG according to its bit.  A write that
covers only part of a clean block first copies the rest of that block from IMG into the overlay ("copy
up"), so a set bit always means the whole block is there.

What the guest is promised is what virtio-blk promises while the VM runs (virtio 1.2 §5.2.6: a completed
write reads back), and nothing after it: FLUSH succeeds without doing anything, because nothing is meant
to persist.  The device still offers VIRTIO_BLK_F_FLUSH (§5.2.3), so the guest does not fall back to
write-through.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from types import TracebackType

from pyvmm.config import DiskConfig
from pyvmm.devices.virtio.disk import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    Buffers,
    RawDisk,
    preadv_all,
    punch_hole,
    pwritev_all,
    zero_range,
)
from pyvmm.errors import DeviceError

# Copy-up granularity: the page size, and the block size of the filesystems the overlay lives on, so a
# punched or written block maps onto whole filesystem blocks.
BLOCK_SIZE = 4096
_PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_ZERO = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE


def overlay_directory() -> str:
    """Where overlays go: ``$TMPDIR``, else ``/var/tmp`` (usually on disk, where ``/tmp`` may be RAM) if it
    is writable (it is not where ``/`` is mounted read-only, as inside the KVM lab), else the system's
    temporary directory."""
    tmpdir = os.environ.get("TMPDIR")
    if tmpdir:
        return tmpdir
    if os.path.isdir("/var/tmp") and os.access("/var/tmp", os.W_OK | os.X_OK):
        return "/var/tmp"
    import tempfile  # here, not at the top: only snapshot disks need it, and start-up time counts

    return tempfile.gettempdir()


class SnapshotDisk:
    """A :class:`~.disk.Disk` that reads IMG and keeps the guest's writes in an anonymous overlay."""

    def __init__(self, path: str | os.PathLike[str], *, direct: bool = False,
                 overlay_dir: str | os.PathLike[str] | None = None) -> None:
        self.path = os.fspath(path)
        self.overlay_fd = -1
        self._base = RawDisk(self.path, readonly=True, direct=direct)
        self._size = self._base.size  # whole sectors, as a RawDisk exposes
        try:
            self.overlay_fd = _create_overlay(self.path, overlay_dir or overlay_directory(), self._size)
        except BaseException:
            self._base.close()
            raise
        self._blocks = (self._size + BLOCK_SIZE - 1) // BLOCK_SIZE
        self._dirty = bytearray((self._blocks + 7) // 8)
        # The bitmap and the copy-up are read-modify-write: one request at a time, when a multiqueue
        # device serves its queues on several threads.
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: DiskConfig) -> SnapshotDisk:
        return cls(config.path, direct=config.cache == "none")

    # -- Disk protocol -----------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def readonly(self) -> bool:
        return False  # the guest may write; IMG never sees it

    def readv_into(self, offset: int, buffers: Buffers) -> int:
        with self._lock:
            return self._readv_into(offset, buffers)

    def _readv_into(self, offset: int, buffers: Buffers) -> int:
        bufs = list(buffers)
        length = sum(len(b) for b in bufs)
        for start, end, dirty in self._runs(offset, offset + length):
            part = _slice(bufs, start - offset, end - start)
            if dirty:
                preadv_all(self.overlay_fd, start, part)
            else:
                self._base.readv_into(start, part)
        return length

    def writev(self, offset: int, buffers: Buffers) -> int:
        with self._lock:
            return self._writev(offset, buffers)

    def _writev(self, offset: int, buffers: Buffers) -> int:
        bufs = list(buffers)
        length = sum(len(b) for b in bufs)
        self._check_range(offset, length)
        if not length:
            return 0
        self._copy_up_edges(offset, offset + length)
        n = pwritev_all(self.overlay_fd, offset, bufs)
        self._mark(offset, offset + length)
        return n

    def flush(self) -> None:
        """Nothing to make stable: the overlay is discarded at exit by design."""

    def discard(self, offset: int, length: int) -> None:
        """Drop whole blocks from the overlay (they then read as zeros, as a punched RawDisk range does).

        §5.2.6.2 lets a device ignore a discard, so the partial blocks at either end keep their data.
        """
        with self._lock:
            self._discard(offset, length)

    def _discard(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        end = offset + length
        first = -(-offset // BLOCK_SIZE) * BLOCK_SIZE
        last = self._size if end >= self._size else end // BLOCK_SIZE * BLOCK_SIZE
        if first >= last:
            return
        if punch_hole(self.overlay_fd, first, last - first):  # else: ignore the hint
            self._mark(first, last)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make a range read as zeros (§5.2.6.2: a MUST).  Whole blocks are punched out of the overlay
        whatever ``unmap`` says: the overlay's space is the host's business."""
        with self._lock:
            self._write_zeroes(offset, length)

    def _write_zeroes(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        if length <= 0:
            return
        self._copy_up_edges(offset, offset + length)
        zero_range(self.overlay_fd, offset, length, [_PUNCH, _ZERO], self._write_overlay)
        self._mark(offset, offset + length)

    def close(self) -> None:
        if self.overlay_fd >= 0:
            os.close(self.overlay_fd)  # the last reference to the unlinked overlay: its space is freed
            self.overlay_fd = -1
        self._base.close()

    def __enter__(self) -> SnapshotDisk:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the bitmap --------------------------------------------------------------------------------
    def _check_range(self, offset: int, length: int) -> None:
        # The device checks request ranges (§5.2.6.2); this keeps the bitmap in step with the overlay.
        if offset < 0 or length < 0 or offset + length > self._size:
            raise OSError(errno.EINVAL, f"range {offset}+{length} is outside the {self._size}-byte disk")

    def _is_dirty(self, block: int) -> bool:
        return block < self._blocks and bool(self._dirty[block >> 3] >> (block & 7) & 1)

    def _mark(self, start: int, end: int) -> None:
        """Set the bits of the blocks that ``[start, end)`` touches."""
        first, last = start // BLOCK_SIZE, (end - 1) // BLOCK_SIZE + 1
        while first < last and first & 7:
            self._dirty[first >> 3] |= 1 << (first & 7)
            first += 1
        whole = (last - first) >> 3
        self._dirty[first >> 3 : (first >> 3) + whole] = b"\xff" * whole
        first += whole << 3
        while first < last:
            self._dirty[first >> 3] |= 1 << (first & 7)
            first += 1

    def _runs(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """Split ``[start, end)`` into ``(start, end, in_overlay)`` runs of blocks with the same bit."""
        if start >= end:
            return
        block, last = start // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        run_start, state = start, self._is_dirty(block)
        block += 1
        while block <= last:
            byte = self._dirty[block >> 3] if block < self._blocks else 0
            if block & 7 == 0 and byte == (0xFF if state else 0) and block + 8 <= min(last + 1, self._blocks):
                block += 8  # eight blocks with the same bit at once
                continue
            if self._is_dirty(block) != state:
                yield run_start, block * BLOCK_SIZE, state
                run_start, state = block * BLOCK_SIZE, not state
            block += 1
        yield run_start, end, state

    def _copy_up_edges(self, start: int, end: int) -> None:
        """Before ``[start, end)`` is written: copy the rest of a clean first or last block from IMG."""
        first, last = start // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        if start % BLOCK_SIZE and not self._is_dirty(first):
            self._copy_up(first * BLOCK_SIZE, start)
        block_end = min((last + 1) * BLOCK_SIZE, self._size)  # the last block may be short
        if end < block_end and not self._is_dirty(last):
            self._copy_up(end, block_end)

    def _copy_up(self, start: int, end: int) -> None:
        buf = memoryview(bytearray(end - start))
        self._base.readv_into(start, [buf])
        pwritev_all(self.overlay_fd, start, [buf])

    def _write_overlay(self, offset: int, buffers: Buffers) -> int:
        return pwritev_all(self.overlay_fd, offset, list(buffers))


def _create_overlay(image: str, directory: str | os.PathLike[str], size: int) -> int:
    """An unlinked, sparse file of ``size`` bytes in ``directory``; returns its descriptor."""
    import tempfile  # here, not at the top: only snapshot disks need it, and start-up time counts

    try:
        # TemporaryFile uses O_TMPFILE where the filesystem has it, else creates and unlinks at once.
        with tempfile.TemporaryFile(dir=directory, buffering=0) as f:
            fd = os.dup(f.fileno())  # non-inheritable, like every descriptor Python makes
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
    except OSError as err:
        raise DeviceError(
            f"disk image {image}: cannot create its snapshot overlay in {directory}: {err.strerror or err}"
        ) from None
    return fd


def _slice(bufs: list[memoryview], skip: int, length: int) -> list[memoryview]:
    """The views covering bytes ``[skip, skip + length)`` of a buffer list."""
    out: list[memoryview] = []
    for b in bufs:
        if length <= 0:
            break
        if skip >= len(b):
            skip -= len(b)
            continue
        n = min(len(b) - skip, length)
        out.append(b[skip : skip + n])
        length -= n
        skip = 0
    return out
