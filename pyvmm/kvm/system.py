"""``/dev/kvm``: the system fd (API version, capabilities, VM creation)."""

from __future__ import annotations

import ctypes
import errno
import os

from pyvmm.errors import KvmError
from pyvmm.kvm import abi
from pyvmm.kvm.ioctl import call, ioctl
from pyvmm.kvm.vm import VmFd, check_extension

KVM_DEVICE = "/dev/kvm"


def _open_hint(path: str, err: OSError) -> str:
    if err.errno == errno.ENOENT:
        return (
            f"{path} does not exist: this machine offers no KVM (enable virtualization in the firmware, "
            "load the kvm_intel/kvm_amd module, or run nested inside a VM that exposes VT-x/AMD-V)"
        )
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to open {path}: add yourself to the 'kvm' group (then log in again) or run as root"
    return f"cannot open {path}: {err.strerror}"


class Kvm:
    """The KVM system fd."""

    def __init__(self, path: str | None = None) -> None:
        path = path or KVM_DEVICE
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise KvmError(_open_hint(path, err)) from err
        try:
            version = ioctl(self.fd, abi.KVM_GET_API_VERSION)
        except OSError as err:
            os.close(self.fd)
            raise KvmError(f"KVM_GET_API_VERSION on {path} failed: {err.strerror}") from err
        if version != abi.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError(f"{path} speaks KVM API {version}, pyvmm needs {abi.KVM_API_VERSION}")
        self.path = path

    def check_extension(self, cap: int) -> int:
        return check_extension(self.fd, cap)

    def vcpu_mmap_size(self) -> int:
        return call(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE, None, "KVM_GET_VCPU_MMAP_SIZE")

    def create_vm(self) -> VmFd:
        """A new VM (close it before this fd; the caller owns it)."""
        return VmFd(call(self.fd, abi.KVM_CREATE_VM, 0, "KVM_CREATE_VM"), vcpu_mmap_size=self.vcpu_mmap_size())

    def get(self, what: str, request: int, struct: ctypes.Structure) -> int:
        """A system ioctl that fills ``struct`` (``KVM_GET_SUPPORTED_CPUID``, ...): KvmError with its errno."""
        return call(self.fd, request, struct, what)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
