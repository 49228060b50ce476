"""The vCPU fd and its shared ``struct kvm_run`` page.

``run()`` issues ``KVM_RUN`` and returns the exit reason; the typed view of the exit lives in
``self.run_state`` (a ``kvm_run`` over the mmap).  ``kick()`` (from any thread) sets
``immediate_exit`` so the next or current ``KVM_RUN`` returns ``EINTR``; the caller also signals the
thread so a ``KVM_RUN`` already in the guest comes back.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

from pyvmm.errors import KvmError
from pyvmm.kvm import abi
from pyvmm.kvm.ioctl import ioctl


class VcpuFd:
    def __init__(self, fd: int, index: int, mmap_size: int) -> None:
        self.fd = fd
        self.index = index
        # lifetime: the kvm_run page is shared with the kernel for as long as the vCPU fd is open.
        self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_state = abi.kvm_run.from_buffer(self._map)
        self.run_view = memoryview(self._map)

    def run(self) -> int:
        """One ``KVM_RUN``; return the exit reason (``KVM_EXIT_INTR`` when interrupted by a signal)."""
        try:
            ioctl(self.fd, abi.KVM_RUN)
        except OSError as err:
            if err.errno in (errno.EINTR, errno.EAGAIN):
                return abi.KVM_EXIT_INTR
            raise KvmError(f"KVM_RUN on vCPU {self.index} failed: {err.strerror} (errno {err.errno})") from err
        return int(self.run_state.exit_reason)

    def kick(self) -> None:
        self.run_state.immediate_exit = 1

    def get(self, what: str, request: int, struct: ctypes.Structure) -> None:
        try:
            ioctl(self.fd, request, struct)
        except OSError as err:
            raise KvmError(f"{what} on vCPU {self.index} failed: {err.strerror} (errno {err.errno})") from err

    set = get  # same mechanics: the struct goes in by reference

    def close(self) -> None:
        del self.run_state
        self.run_view.release()
        self._map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
