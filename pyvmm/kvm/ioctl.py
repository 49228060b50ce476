"""ioctl request numbers, the one ctypes helper every KVM call goes through, and the one place its
errors become :class:`~pyvmm.errors.KvmError` (:func:`call`).  Only ``pyvmm/kvm/`` issues ioctls: the rest
of pyvmm holds typed objects (``Kvm`` -> ``VmFd`` -> ``VcpuFd``/``DeviceFd``) and calls their methods.

Request encoding follows include/uapi/asm-generic/ioctl.h (x86_64 and aarch64 share it):
``dir << 30 | size << 16 | type << 8 | nr`` with ``_IOC_WRITE = 1`` and ``_IOC_READ = 2``.

Why not ``fcntl.ioctl``: it copies the argument into a temporary buffer (at most 1024 bytes) and, from
Python 3.14, retries ``EINTR`` — which would swallow the signal that kicks a vCPU out of ``KVM_RUN``.
ctypes calls release the GIL, so a vCPU thread blocked in ``KVM_RUN`` does not stall the VMM.
"""

from __future__ import annotations

import ctypes
import os

from pyvmm.errors import KvmError
from pyvmm.statictypes import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2

KVMIO = 0xAE  # include/uapi/linux/kvm.h


def _ioc(direction: int, typ: int, nr: int, size: int) -> int:
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument too large: {size}")
    return (direction << _IOC_DIRSHIFT) | (size << _IOC_SIZESHIFT) | (typ << _IOC_TYPESHIFT) | nr


def _size(struct: type[ctypes._CData] | int) -> int:
    return struct if isinstance(struct, int) else ctypes.sizeof(struct)


def io(typ: int, nr: int) -> int:
    return _ioc(_IOC_NONE, typ, nr, 0)


def ior(typ: int, nr: int, struct: type[ctypes._CData] | int) -> int:
    return _ioc(_IOC_READ, typ, nr, _size(struct))


def iow(typ: int, nr: int, struct: type[ctypes._CData] | int) -> int:
    return _ioc(_IOC_WRITE, typ, nr, _size(struct))


def iowr(typ: int, nr: int, struct: type[ctypes._CData] | int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, typ, nr, _size(struct))


# The libc this process already runs on (dlopen(NULL)); ctypes.util.find_library would run ldconfig as a
# subprocess at every start-up.
_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.restype = ctypes.c_int
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]

# The same libc ioctl without argtypes, for KVM_RUN on the vCPU loop's hot path: converting three
# arguments through argtypes costs about a quarter of a microsecond per call.  The caller passes an int
# fd, the request as a prebuilt ctypes.c_ulong and None, and reads errno (ctypes.get_errno()) itself on
# a negative result.  Like every ctypes call into a CDLL it releases the GIL.
ioctl_raw = _libc["ioctl"]  # indexing makes a new function object: _ioctl's argtypes stay its own
ioctl_raw.restype = ctypes.c_int


def ioctl(fd: int, request: int, arg: Any = None) -> int:
    """Call ``ioctl(fd, request, arg)``; return its non-negative result or raise ``OSError``.

    ``arg`` is ``None``, an ``int`` (passed by value), or a ctypes object (passed by reference; the
    caller keeps it alive for as long as the kernel uses it).  ``EINTR`` is *not* retried.
    """
    if arg is None:
        ptr: Any = None
    elif isinstance(arg, int):
        ptr = arg
    else:
        ptr = ctypes.addressof(arg)
    ret = _ioctl(fd, request, ptr)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def call(fd: int, request: int, arg: Any, what: str) -> int:
    """:func:`ioctl`, with a failure raised as ``KvmError("<what> failed: <strerror> (errno N)")`` carrying
    the errno: every KVM object's methods go through here."""
    try:
        return ioctl(fd, request, arg)
    except OSError as err:
        raise KvmError(f"{what} failed: {err.strerror} (errno {err.errno})", err.errno) from err

