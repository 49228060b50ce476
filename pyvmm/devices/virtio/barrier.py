"""Memory barriers for the virtqueue, emitted from Python.

The driver (another CPU, running the guest) and the device (this process) share the rings, and each side
orders its accesses with barriers that pair with the other's (virtio 1.2 §2.7.7, §2.7.10, §2.7.13; Linux's
drivers/virtio/virtio_ring.c on the driver side, drivers/vhost/vhost.c on the device side):

- :func:`rmb` after reading ``avail.idx``, before reading the ring entry and the descriptors it publishes
  (pairs with the driver's write barrier between filling them and writing ``avail.idx``; vhost's
  ``smp_rmb()`` in ``vhost_get_vq_desc``);
- :func:`wmb` after writing a used element, before writing ``used.idx`` (pairs with the driver's read
  barrier after reading ``used.idx``; vhost's ``smp_wmb()`` in ``vhost_add_used_n``);
- :func:`mb` between the device's stores (used idx, ``avail_event``) and its loads of the driver's
  suppression fields (``used_event``, flags, ``avail.idx`` again): a store/load order that even x86
  does not keep by itself (vhost's ``smp_mb()`` in ``vhost_notify`` and ``vhost_enable_notify``).

How, from Python:

- **x86-64** is TSO: loads are not reordered with older loads, stores not with older stores, so ``rmb``
  and ``wmb`` need no instruction (Linux's are compiler barriers there too; in Python every access is an
  opaque C call, which the C compiler cannot move across another).  ``mb`` needs a locked instruction:
  taking and releasing a ``threading.Lock`` runs one (an atomic read-modify-write with a ``lock`` prefix
  in glibc's mutex), a full fence.
- **aarch64** is weakly ordered, and a lock's acquire/release pair is not a full barrier.  Each barrier
  is two instructions of machine code (``dmb ishld`` / ``dmb ishst`` / ``dmb ish``, then ``ret``; Arm ARM
  C6.2.81 DMB) written into an anonymous page that is then made executable, and called through ctypes.
  The call costs about as much as any ctypes call; it releases the GIL, which does not matter here.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import threading
from collections.abc import Callable

# Arm ARM C6.2.81: DMB <option>; ISHLD = 0b1001, ISHST = 0b1010, ISH = 0b1011 in CRm (bits 11:8)
DMB_ISHLD = 0xD50339BF
DMB_ISHST = 0xD5033ABF
DMB_ISH = 0xD5033BBF
RET = 0xD65F03C0  # C6.2.219 RET (X30)

_lock = threading.Lock()


def _locked_fence() -> None:
    with _lock:
        pass


def _nothing() -> None:
    pass


class _Code:
    """Machine code in an executable anonymous page (kept alive as long as the functions are)."""

    def __init__(self, words: list[list[int]]) -> None:
        self.page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        offsets = []
        pos = 0
        for seq in words:
            offsets.append(pos)
            code = struct.pack(f"<{len(seq)}I", *seq)
            self.page[pos:pos + len(code)] = code
            pos += len(code)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.page))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        # W^X: written while writable, then read + execute.  On arm64 making a user page executable
        # makes the kernel synchronise the instruction cache with what was written (set_pte_at ->
        # __sync_icache_dcache).
        if libc.mprotect(self.base, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mprotect(PROT_EXEC) for the barrier code: {os.strerror(err)}")
        proto = ctypes.CFUNCTYPE(None)
        self.functions: list[Callable[[], None]] = [proto(self.base + off) for off in offsets]


def _select() -> tuple[str, Callable[[], None], Callable[[], None], Callable[[], None], _Code | None]:
    machine = os.uname().machine
    if machine == "aarch64":
        code = _Code([[DMB_ISHLD, RET], [DMB_ISHST, RET], [DMB_ISH, RET]])
        rmb_, wmb_, mb_ = code.functions
        return "dmb", rmb_, wmb_, mb_, code
    # x86-64 (and anything else this runs on for the unit tests): TSO orders load/load and store/store.
    return "tso", _nothing, _nothing, _locked_fence, None


KIND, rmb, wmb, mb, _code = _select()


def code_bytes() -> bytes:
    """The machine code behind the barriers (empty on x86-64), as it sits in the executable page."""
    if _code is None:
        return b""
    return ctypes.string_at(_code.base, 3 * 8)
