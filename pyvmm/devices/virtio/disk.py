"""Raw disk image backends for virtio-blk (§5.2): a :class:`Disk` protocol and :class:`RawDisk`.

:class:`RawDisk` opens a raw image (``O_RDONLY`` for a read-only disk, ``O_RDWR`` otherwise; with
``O_DIRECT`` for ``cache=none`` where the filesystem allows it), locks it with ``flock`` (shared for
readers, exclusive for writers, non-blocking: a second VM writing the same image is refused) and
moves data with ``preadv``/``pwritev`` straight between the file and memoryviews of guest RAM.

``O_DIRECT`` needs buffer addresses and lengths aligned to the logical block size.  Guest RAM is
page-aligned, but a request's buffers need not be 512-aligned; such requests go through a bounce
buffer, and anything ``O_DIRECT`` still refuses (``EINVAL``) goes through a second, buffered
descriptor of the same file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import stat
from collections.abc import Callable, Sequence
from types import TracebackType

from pyvmm.config import DiskConfig
from pyvmm.errors import DeviceError
from pyvmm.log import get_logger
from pyvmm.statictypes import Protocol

log = get_logger(__name__)

SECTOR_SIZE = 512
_DIRECT_ALIGN = 512  # logical block size we align O_DIRECT to (a 4Kn device falls back on EINVAL)
_ZERO_CHUNK = 1 << 20

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)  # this process's own libc (dlopen(NULL))
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

Buffers = Sequence[memoryview]
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class Disk(Protocol):
    """What virtio-blk needs from a backend; offsets and lengths are in bytes."""

    @property
    def size(self) -> int: ...

    @property
    def readonly(self) -> bool: ...

    def readv_into(self, offset: int, buffers: Buffers) -> int: ...

    def writev(self, offset: int, buffers: Buffers) -> int: ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None: ...

    def close(self) -> None: ...


def _fallocate_call(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _aligned(buffers: Buffers) -> bool:
    for b in buffers:
        if len(b) % _DIRECT_ALIGN:
            return False
        if not len(b):
            continue
        try:
            addr = ctypes.addressof(ctypes.c_char.from_buffer(b))
        except TypeError:  # a read-only buffer: cannot take its address this way, so bounce it
            return False
        if addr % _DIRECT_ALIGN:
            return False
    return True


class RawDisk:
    """A raw image file opened for a virtio-blk device."""

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False, direct: bool = False) -> None:
        self.path = os.fspath(path)
        self._readonly = readonly
        self.fd = -1
        self._buffered_fd = -1  # for requests O_DIRECT refuses; the same as fd when not direct
        self.direct = False
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise DeviceError(f"disk image {self.path} does not exist") from None
        except OSError as err:
            raise DeviceError(f"disk image {self.path}: {err.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            raise DeviceError(f"disk image {self.path} is a directory")
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = self._buffered_fd = os.open(self.path, flags)
        except OSError as err:
            mode = "reading" if readonly else "writing (readonly=on?)"
            raise DeviceError(f"cannot open disk image {self.path} for {mode}: {err.strerror}") from None
        try:
            self._lock()
            size = os.lseek(self.fd, 0, os.SEEK_END)
            if size < SECTOR_SIZE:
                raise DeviceError(f"disk image {self.path} is {size} bytes: smaller than one 512-byte sector")
            if size % SECTOR_SIZE:
                log.warning("disk image %s: the trailing partial sector is not exposed", self.path)
            self._size = size - size % SECTOR_SIZE
            if direct:
                self._open_direct(flags)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_config(cls, config: DiskConfig) -> RawDisk:
        return cls(config.path, readonly=config.readonly, direct=config.cache == "none")

    def _lock(self) -> None:
        kind = fcntl.LOCK_SH if self._readonly else fcntl.LOCK_EX
        try:
            fcntl.flock(self.fd, kind | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = "a writer" if self._readonly else "another user"
            raise DeviceError(
                f"disk image {self.path} is locked by {holder} (another VM using it?)"
            ) from None
        except OSError as err:
            raise DeviceError(f"cannot lock disk image {self.path}: {err.strerror}") from None

    def _open_direct(self, flags: int) -> None:
        try:
            direct_fd = os.open(self.path, flags | os.O_DIRECT)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise DeviceError(
                    f"cannot open disk image {self.path} with O_DIRECT: {err.strerror}"
                ) from None
            log.warning(
                "disk image %s: the filesystem does not support O_DIRECT (cache=none); using the page cache",
                self.path,
            )
            return
        # The flock lives on the buffered descriptor's open file description, which stays open.
        self.fd, self.direct = direct_fd, True

    # -- Disk protocol -----------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Exposed size in bytes (a multiple of 512)."""
        return self._size

    @property
    def sectors(self) -> int:
        return self._size // SECTOR_SIZE

    @property
    def readonly(self) -> bool:
        return self._readonly

    def readv_into(self, offset: int, buffers: Buffers) -> int:
        """Fill ``buffers`` from ``offset``; bytes past the end of the file read as zeros."""
        if self.direct and not _aligned(buffers):
            return self._bounce_read(offset, buffers)
        try:
            return preadv_all(self.fd, offset, list(buffers))
        except OSError as err:
            if not self.direct or err.errno != errno.EINVAL:
                raise
            return preadv_all(self._buffered_fd, offset, list(buffers))

    def writev(self, offset: int, buffers: Buffers) -> int:
        if self._readonly:
            raise OSError(errno.EROFS, "read-only disk")
        if self.direct and not _aligned(buffers):
            return self._bounce_write(offset, buffers)
        try:
            return pwritev_all(self.fd, offset, list(buffers))
        except OSError as err:
            if not self.direct or err.errno != errno.EINVAL:
                raise
            return pwritev_all(self._buffered_fd, offset, list(buffers))

    def _bounce_read(self, offset: int, buffers: Buffers) -> int:
        length = sum(len(b) for b in buffers)
        if length % _DIRECT_ALIGN:
            return preadv_all(self._buffered_fd, offset, list(buffers))
        with mmap.mmap(-1, max(length, mmap.PAGESIZE)) as bounce:
            view = memoryview(bounce)
            try:
                n = self.readv_into(offset, [view[:length]])
                pos = 0
                for b in buffers:
                    b[:] = view[pos : pos + len(b)]
                    pos += len(b)
            finally:
                view.release()
        return n

    def _bounce_write(self, offset: int, buffers: Buffers) -> int:
        length = sum(len(b) for b in buffers)
        if length % _DIRECT_ALIGN:
            return pwritev_all(self._buffered_fd, offset, list(buffers))
        with mmap.mmap(-1, max(length, mmap.PAGESIZE)) as bounce:
            view = memoryview(bounce)
            try:
                pos = 0
                for b in buffers:
                    view[pos : pos + len(b)] = b
                    pos += len(b)
                return self.writev(offset, [view[:length]])
            finally:
                view.release()

    def flush(self) -> None:
        if not self._readonly:
            os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range where the filesystem can; §5.2.6.2 lets a device ignore discard ("MAY")."""
        if self._readonly or length <= 0:
            return
        punch_hole(self.fd, offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make a range read as zeros (§5.2.6.2: a MUST, whether or not ``unmap`` is set)."""
        if self._readonly:
            raise OSError(errno.EROFS, "read-only disk")
        modes = [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
        if unmap:
            modes.insert(0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        zero_range(self.fd, offset, length, modes, self.writev)

    def close(self) -> None:
        # Whatever the guest wrote reaches stable storage before pyvmm lets go of the image, also
        # when the VM is stopped by a signal with writes the guest never flushed.
        if not self._readonly and self.fd >= 0:
            with contextlib.suppress(OSError):
                os.fdatasync(self.fd)
        for fd in {self.fd, self._buffered_fd} - {-1}:
            os.close(fd)  # closing the buffered descriptor drops the flock
        self.fd = self._buffered_fd = -1

    def __enter__(self) -> RawDisk:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def preadv_all(fd: int, offset: int, bufs: list[memoryview]) -> int:
    """Fill every buffer from ``offset`` (retrying short reads); bytes past the end of the file read as zeros."""
    total = 0
    while bufs:
        n = os.preadv(fd, bufs, offset)
        if n == 0:  # end of file (the image shrank under us): the rest reads as zeros
            for b in bufs:
                b[:] = bytes(len(b))
                total += len(b)
            return total
        total += n
        offset += n
        bufs = _advance(bufs, n)
    return total


def pwritev_all(fd: int, offset: int, bufs: list[memoryview]) -> int:
    """Write every buffer at ``offset`` (retrying short writes)."""
    total = 0
    while bufs:
        n = os.pwritev(fd, bufs, offset)
        if n == 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        total += n
        offset += n
        bufs = _advance(bufs, n)
    return total


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range of a file (it then reads as zeros); False where the filesystem cannot."""
    try:
        _fallocate_call(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    except OSError as err:
        if err.errno not in _UNSUPPORTED:
            raise
        return False
    return True


def zero_range(fd: int, offset: int, length: int, modes: Sequence[int],
               write: Callable[[int, Buffers], int]) -> None:
    """Make ``[offset, offset + length)`` of ``fd`` read as zeros: the first ``fallocate`` mode in ``modes``
    the filesystem supports, else ``write`` of zero buffers."""
    if length <= 0:
        return
    for mode in modes:
        try:
            _fallocate_call(fd, mode, offset, length)
            return
        except OSError as err:
            if err.errno not in _UNSUPPORTED:
                raise
    with mmap.mmap(-1, min(_ZERO_CHUNK, _round_up(length))) as zeros:
        view = memoryview(zeros)
        try:
            while length > 0:
                n = min(length, len(view))
                write(offset, [view[:n]])
                offset += n
                length -= n
        finally:
            view.release()


def _round_up(n: int) -> int:
    return (n + _DIRECT_ALIGN - 1) // _DIRECT_ALIGN * _DIRECT_ALIGN


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first ``n`` bytes from a buffer list (after a short transfer)."""
    i = 0
    while i < len(bufs) and n >= len(bufs[i]):
        n -= len(bufs[i])
        i += 1
    rest = bufs[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest
