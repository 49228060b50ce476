"""The VM fd: memory slots, irqchip, irqfd, ioeventfd, vCPU and device creation.  Verbs are named after the
ioctls they issue; every failure becomes a :class:`KvmError` that names the call and its arguments.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

from pyvmm.errors import KvmError
from pyvmm.kvm import abi
from pyvmm.kvm.device import DeviceFd
from pyvmm.kvm.ioctl import call, ioctl
from pyvmm.kvm.vcpu import VcpuFd


def check_extension(fd: int, cap: int) -> int:
    """``KVM_CHECK_EXTENSION`` on the system or a VM fd (the VM's answer can be narrower): 0 when absent."""
    try:
        return ioctl(fd, abi.KVM_CHECK_EXTENSION, cap)
    except OSError:
        return 0


class VmFd:
    """Made by :meth:`pyvmm.kvm.system.Kvm.create_vm`, which tells it the size of a vCPU's mapping."""

    def __init__(self, fd: int, *, vcpu_mmap_size: int) -> None:
        self.fd = fd
        self.vcpu_mmap_size = vcpu_mmap_size

    def _call(self, what: str, request: int, arg: object = None) -> int:
        return call(self.fd, request, arg, what)

    def check_extension(self, cap: int) -> int:
        return check_extension(self.fd, cap)

    def require(self, caps: Mapping[str, int]) -> None:
        """KvmError naming every capability of ``caps`` (name -> KVM_CAP_*) this VM lacks."""
        missing = [name for name, cap in caps.items() if not self.check_extension(cap)]
        if missing:
            raise KvmError(f"this host's KVM lacks {', '.join(missing)}")

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        region = abi.kvm_userspace_memory_region(
            slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size, userspace_addr=host_addr
        )
        # lifetime: the kernel keeps host_addr (not the struct); the caller keeps the mapping alive
        # until this VM fd is closed.
        self._call(f"KVM_SET_USER_MEMORY_REGION slot={slot} gpa={gpa:#x} size={size:#x}",
                   abi.KVM_SET_USER_MEMORY_REGION, region)

    def create_irqchip(self) -> None:
        self._call("KVM_CREATE_IRQCHIP", abi.KVM_CREATE_IRQCHIP)

    def irqfd(self, eventfd: int, gsi: int, *, deassign: bool = False) -> None:
        arg = abi.kvm_irqfd(fd=eventfd, gsi=gsi, flags=abi.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0)
        self._call(f"KVM_IRQFD gsi={gsi}", abi.KVM_IRQFD, arg)

    def ioeventfd(
        self,
        eventfd: int,
        addr: int,
        length: int,
        *,
        datamatch: int | None = None,
        pio: bool = False,
        deassign: bool = False,
    ) -> None:
        flags = 0
        if datamatch is not None:
            flags |= abi.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= abi.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= abi.KVM_IOEVENTFD_FLAG_DEASSIGN
        arg = abi.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=eventfd, flags=flags)
        self._call(f"KVM_IOEVENTFD addr={addr:#x} len={length}", abi.KVM_IOEVENTFD, arg)

    def register_coalesced_mmio(self, addr: int, size: int, *, pio: bool = False) -> None:
        """``KVM_REGISTER_COALESCED_MMIO``: guest writes inside ``[addr, addr+size)`` (ports when ``pio``)
        go to the coalesced ring instead of exiting (api.rst 4.116).  A port zone needs
        ``KVM_CAP_COALESCED_PIO``; an older kernel would take ``pio`` for padding and coalesce MMIO."""
        zone = abi.kvm_coalesced_mmio_zone(addr=addr, size=size, pio=int(pio))
        self._call(f"KVM_REGISTER_COALESCED_MMIO {'pio' if pio else 'mmio'} addr={addr:#x} size={size}",
                   abi.KVM_REGISTER_COALESCED_MMIO, zone)

    def create_vcpu(self, index: int) -> VcpuFd:
        """vCPU ``index`` with its ``kvm_run`` mapping (close it before this fd)."""
        return VcpuFd(self._call(f"KVM_CREATE_VCPU {index}", abi.KVM_CREATE_VCPU, index), index, self.vcpu_mmap_size)

    def create_device(self, dev_type: int, name: str) -> DeviceFd:
        """``KVM_CREATE_DEVICE`` (KvmError, with its errno, where the host cannot make one of that type)."""
        arg = abi.kvm_create_device(type=dev_type)
        self._call(f"KVM_CREATE_DEVICE {name}", abi.KVM_CREATE_DEVICE, arg)
        return DeviceFd(int(arg.fd), name)

    def call(self, what: str, request: int, arg: ctypes.Structure | int | None = None) -> int:
        """An architecture's own VM ioctl (``arch/`` uses it: KVM_SET_TSS_ADDR, KVM_ARM_PREFERRED_TARGET, ...),
        with the same error handling as the verbs above."""
        return self._call(what, request, arg)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
