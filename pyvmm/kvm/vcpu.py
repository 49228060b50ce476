"""The vCPU fd and its shared ``struct kvm_run`` page.

``run()`` issues ``KVM_RUN`` and returns the exit reason; the exit itself is read from ``self.run_view``
(the mapping as bytes) at the offsets of :mod:`pyvmm.kvm.exits`, or, off the hot path, through
``self.run_state`` (a ctypes ``kvm_run`` over the same mapping).  ``kick()`` (from any thread) sets
``immediate_exit`` so the next or current ``KVM_RUN`` returns ``EINTR``; the caller also signals the
thread so a ``KVM_RUN`` already in the guest comes back.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Callable

from pyvmm.errors import KvmError
from pyvmm.kvm import abi
from pyvmm.kvm.coalesced import CoalescedRing
from pyvmm.kvm.exits import EXIT_REASON_OFFSET
from pyvmm.kvm.ioctl import call, ioctl_raw

_KVM_RUN = ctypes.c_ulong(abi.KVM_RUN)
_U32_INDEX = EXIT_REASON_OFFSET // 4
assert EXIT_REASON_OFFSET % 4 == 0


class VcpuFd:
    def __init__(self, fd: int, index: int, mmap_size: int) -> None:
        self.fd = fd
        self.index = index
        # lifetime: the kvm_run page is shared with the kernel for as long as the vCPU fd is open.
        self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_state = abi.kvm_run.from_buffer(self._map)
        self.run_view = memoryview(self._map)
        self._u32 = self.run_view.cast("I")  # the exit reason, read without ctypes
        self.mmap_size = mmap_size

    def run(self) -> int:
        """One ``KVM_RUN``; return the exit reason (``KVM_EXIT_INTR`` when interrupted by a signal)."""
        if ioctl_raw(self.fd, _KVM_RUN, None) < 0:
            return self._run_failed()
        return self._u32[_U32_INDEX]

    def run_args(self) -> tuple[Callable[[int, ctypes.c_ulong, None], int], int, ctypes.c_ulong,
                                Callable[[], int], memoryview, int]:
        """What :meth:`run` is made of, for a loop that inlines it (one Python call less per exit):
        ``enter, fd, request, run_failed, reasons, index``, used as ``reason = reasons[index] if
        enter(fd, request, None) >= 0 else run_failed()``."""
        return ioctl_raw, self.fd, _KVM_RUN, self._run_failed, self._u32, _U32_INDEX

    def _run_failed(self) -> int:
        err = ctypes.get_errno()
        if err in (errno.EINTR, errno.EAGAIN):
            return abi.KVM_EXIT_INTR
        raise KvmError(f"KVM_RUN on vCPU {self.index} failed: {os.strerror(err)} (errno {err})")

    def coalesced_ring(self, page_offset: int) -> CoalescedRing:
        """The VM's coalesced MMIO/PIO ring: page ``page_offset`` of this mapping (what
        ``KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_MMIO)`` returned; every vCPU maps the same ring).
        Usable until :meth:`close`."""
        if (page_offset + 1) * mmap.PAGESIZE > self.mmap_size:
            raise KvmError(f"vCPU mapping of {self.mmap_size} bytes has no page {page_offset}")
        return CoalescedRing(self.run_view, page_offset * mmap.PAGESIZE, mmap.PAGESIZE)

    def kick(self) -> None:
        self.run_state.immediate_exit = 1

    def call(self, what: str, request: int, arg: ctypes.Structure | int | None = None) -> int:
        """A vCPU ioctl; its result (``KVM_SET_MSRS``: how many were set), or KvmError naming the vCPU."""
        return call(self.fd, request, arg, f"{what} on vCPU {self.index}")

    def get(self, what: str, request: int, struct: ctypes.Structure) -> None:
        self.call(what, request, struct)

    set = get  # same mechanics: the struct goes in by reference

    def close(self) -> None:
        del self.run_state
        self._u32.release()
        self.run_view.release()
        self._map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
