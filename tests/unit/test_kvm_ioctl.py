"""ioctl request encoding (include/uapi/asm-generic/ioctl.h), pinned to literal values from
<linux/kvm.h> as compiled on x86_64, so a mistake in a struct or in _IOC shows without a compiler."""

from __future__ import annotations

import pytest

from pyvmm.kvm import abi, ioctl
from pyvmm.kvm import abi_x86_64 as x86


@pytest.mark.parametrize(
    ("number", "value"),
    [
        (abi.KVM_GET_API_VERSION, 0xAE00),
        (abi.KVM_RUN, 0xAE80),
        (abi.KVM_SET_USER_MEMORY_REGION, 0x4020AE46),
        (abi.KVM_IRQFD, 0x4020AE76),
        (abi.KVM_IOEVENTFD, 0x4040AE79),
        (x86.KVM_GET_SUPPORTED_CPUID, 0xC008AE05),
        (x86.KVM_SET_CPUID2, 0x4008AE90),
        (x86.KVM_GET_REGS, 0x8090AE81),
        (x86.KVM_SET_SREGS, 0x4138AE84),
        (x86.KVM_SET_VCPU_EVENTS, 0x4040AEA0),
        (x86.KVM_GET_MSR_INDEX_LIST, 0xC004AE02),
    ],
)
def test_request_numbers(number: int, value: int) -> None:
    assert number == value, f"{number:#x} != {value:#x}"


def test_ioc_fields() -> None:
    r = ioctl.iowr(0xAE, 0x05, 8)
    assert r >> 30 == 3 and (r >> 16) & 0x3FFF == 8 and (r >> 8) & 0xFF == 0xAE and r & 0xFF == 0x05
    with pytest.raises(ValueError):
        ioctl.iow(0xAE, 0, 1 << 14)
