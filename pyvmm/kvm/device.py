"""A KVM device fd (``KVM_CREATE_DEVICE``, kvm.h "Device control API"; api.rst 4.80 and
Documentation/virt/kvm/devices/): the in-kernel devices that are configured through attributes, such as
the arm vGIC."""

from __future__ import annotations

import ctypes
import os

from pyvmm.kvm import abi
from pyvmm.kvm.ioctl import call


class DeviceFd:
    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name  # for error messages: "vGICv3"

    def set_attr(self, group: int, attr: int, value: ctypes.c_uint32 | ctypes.c_uint64 | None, what: str) -> None:
        """``KVM_SET_DEVICE_ATTR``: ``value`` is passed by address (None: address 0, for control attributes)."""
        arg = abi.kvm_device_attr(group=group, attr=attr, addr=ctypes.addressof(value) if value is not None else 0)
        call(self.fd, abi.KVM_SET_DEVICE_ATTR, arg, f"{self.name} {what}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
