"""Reading kernel and initrd files with one-line errors that name the path."""

from __future__ import annotations

import mmap
import os
import stat

from pyvmm.errors import LoaderError


def check_file(path: str | os.PathLike[str], what: str) -> int:
    """The size of the regular, non-empty file ``path``; LoaderError naming ``what`` and the path if not."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise LoaderError(f"{what} {p}: no such file") from None
    except OSError as e:
        raise LoaderError(f"{what} {p}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise LoaderError(f"{what} {p}: is a directory, not a file")
    if st.st_size == 0:
        raise LoaderError(f"{what} {p}: file is empty")
    return st.st_size


def read_file(path: str | os.PathLike[str], what: str) -> bytes:
    """The whole content of ``path`` (checked with :func:`check_file`)."""
    check_file(path, what)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise LoaderError(f"{what} {path}: cannot read: {e.strerror}") from None


def map_file(path: str | os.PathLike[str], what: str) -> mmap.mmap:
    """``path`` mapped read-only (checked with :func:`check_file`): a large kernel is then copied once, from
    the page cache into guest RAM, and only the parts that are loaded.  Close it when done."""
    check_file(path, what)
    try:
        with open(path, "rb", buffering=0) as f:
            return mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    except (OSError, ValueError) as e:  # ValueError: the file became empty
        raise LoaderError(f"{what} {path}: cannot read: {getattr(e, 'strerror', None) or e}") from None


def read_into(path: str | os.PathLike[str], what: str, buf: memoryview) -> None:
    """Fill ``buf`` exactly from the start of ``path`` (no intermediate copy of large initrds)."""
    try:
        with open(path, "rb", buffering=0) as f:
            done = 0
            while done < len(buf):
                n = f.readinto(buf[done:])
                if not n:
                    raise LoaderError(f"{what} {path}: file shrank while being read")
                done += n
    except OSError as e:
        raise LoaderError(f"{what} {path}: cannot read: {e.strerror}") from None
