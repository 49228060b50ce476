"""x86_64 KVM uapi structs, transcribed from arch/x86/include/uapi/asm/kvm.h (Linux 6.1), and the
ioctls that take them (include/uapi/linux/kvm.h).  Sizes checked at import and against the installed
header by tests/unit/test_kvm_abi_cc.py.
"""

from __future__ import annotations

import ctypes
import functools

from pyvmm.kvm.abi import AbiStruct, checked, s32, u8, u16, u32, u64
from pyvmm.kvm.ioctl import KVMIO, io, ior, iow, iowr

KVM_NR_INTERRUPTS = 256
# The coalesced ring's page in the vCPU mapping (asm/kvm.h); KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_MMIO)
# returns the same number, and pyvmm uses what the kernel returns.
KVM_COALESCED_MMIO_PAGE_OFFSET = 2


@checked(144)
class kvm_regs(AbiStruct):
    __slots__ = ()
    _fields_ = [
        (name, u64)
        for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
                     "r12", "r13", "r14", "r15", "rip", "rflags")
    ]


@checked(24)
class kvm_segment(AbiStruct):
    __slots__ = ()
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


@checked(16)
class kvm_dtable(AbiStruct):
    __slots__ = ()
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


@checked(312)
class kvm_sregs(AbiStruct):
    __slots__ = ()
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


@checked(416)
class kvm_fpu(AbiStruct):
    __slots__ = ()
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


@checked(40)
class kvm_cpuid_entry2(AbiStruct):
    __slots__ = ()
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # (sic) kvm.h spelling


@checked(8)
class kvm_cpuid2_header(AbiStruct):
    __slots__ = ()
    _fields_ = [("nent", u32), ("padding", u32)]


@functools.cache
def kvm_cpuid2(n: int) -> type[AbiStruct]:
    """struct kvm_cpuid2 with a flexible array of ``n`` entries."""

    class _Cpuid2(AbiStruct):
        __slots__ = ()
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * n)]

    _Cpuid2.__name__ = f"kvm_cpuid2[{n}]"
    return _Cpuid2


@checked(16)
class kvm_msr_entry(AbiStruct):
    __slots__ = ()
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


@checked(8)
class kvm_msrs_header(AbiStruct):
    __slots__ = ()
    _fields_ = [("nmsrs", u32), ("pad", u32)]


@checked(4)
class kvm_msr_list_header(AbiStruct):  # struct kvm_msr_list (KVM_GET_MSR_INDEX_LIST): u32 indices[] follow
    __slots__ = ()
    _fields_ = [("nmsrs", u32)]


@functools.cache
def kvm_msrs(n: int) -> type[AbiStruct]:
    """struct kvm_msrs with a flexible array of ``n`` entries."""

    class _Msrs(AbiStruct):
        __slots__ = ()
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * n)]

    _Msrs.__name__ = f"kvm_msrs[{n}]"
    return _Msrs


@checked(1024)
class kvm_lapic_state(AbiStruct):
    __slots__ = ()
    _fields_ = [("regs", ctypes.c_char * 1024)]


@checked(64)
class kvm_pit_config(AbiStruct):
    __slots__ = ()
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1


class _vcpu_events_exception(AbiStruct):
    __slots__ = ()
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8), ("error_code", u32)]


class _vcpu_events_interrupt(AbiStruct):
    __slots__ = ()
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _vcpu_events_nmi(AbiStruct):
    __slots__ = ()
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _vcpu_events_smi(AbiStruct):
    __slots__ = ()
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


@checked(64)
class kvm_vcpu_events(AbiStruct):
    __slots__ = ()
    _fields_ = [
        ("exception", _vcpu_events_exception),
        ("interrupt", _vcpu_events_interrupt),
        ("nmi", _vcpu_events_nmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", _vcpu_events_smi),
        ("triple_fault_pending", u8),  # struct { __u8 pending; } triple_fault
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4
KVM_VCPUEVENT_VALID_SMM = 0x8
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10


@checked(4096)
class kvm_xsave(AbiStruct):
    """The XSAVE image in standard format (SDM vol. 1, 13.4): the FXSAVE legacy area (MXCSR at byte
    24), the XSAVE header (XSTATE_BV at byte 512), then the extended components.  Unlike kvm_fpu,
    this is how KVM exposes MXCSR: KVM_GET_FPU/KVM_SET_FPU ignore kvm_fpu.mxcsr."""

    __slots__ = ()
    _fields_ = [("region", u32 * 1024)]  # the header's flexible extra[] is for KVM_GET_XSAVE2 only


@checked(24)
class kvm_translation(AbiStruct):
    __slots__ = ()
    _fields_ = [
        ("linear_address", u64),
        ("physical_address", u64),
        ("valid", u8),
        ("writeable", u8),
        ("usermode", u8),
        ("pad", u8 * 5),
    ]


@checked(4)
class kvm_mp_state(AbiStruct):
    __slots__ = ()
    _fields_ = [("mp_state", u32)]


# KVM_SET_GUEST_DEBUG and KVM_EXIT_DEBUG (linux/kvm.h struct kvm_guest_debug; asm/kvm.h for x86: the
# debug registers DR0-DR7, of which KVM uses DR0-3 and DR7, and the exit's exception vector and DR6/DR7)
KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000
KVM_GUESTDBG_INJECT_DB = 0x00040000
KVM_GUESTDBG_INJECT_BP = 0x00080000
KVM_GUESTDBG_BLOCKIRQ = 0x00100000


@checked(64)
class kvm_guest_debug_arch(AbiStruct):
    __slots__ = ()
    _fields_ = [("debugreg", u64 * 8)]


@checked(72)
class kvm_guest_debug(AbiStruct):
    __slots__ = ()
    _fields_ = [("control", u32), ("pad", u32), ("arch", kvm_guest_debug_arch)]


@checked(32)
class kvm_debug_exit_arch(AbiStruct):
    __slots__ = ()
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


@checked(48)
class kvm_clock_data(AbiStruct):
    """KVM_GET_CLOCK/KVM_SET_CLOCK: the VM's kvmclock in nanoseconds (api.rst 4.62/4.63)."""

    __slots__ = ()
    _fields_ = [("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64), ("host_tsc", u64),
                ("pad", u32 * 4)]


_ = s32  # re-exported type alias used by callers building flexible arrays

KVM_GET_MSR_INDEX_LIST = iowr(KVMIO, 0x02, kvm_msr_list_header)
KVM_GET_SUPPORTED_CPUID = iowr(KVMIO, 0x05, kvm_cpuid2_header)
KVM_SET_TSS_ADDR = io(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = iow(KVMIO, 0x48, u64)
KVM_CREATE_PIT2 = iow(KVMIO, 0x77, kvm_pit_config)
KVM_GET_REGS = ior(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = iow(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = ior(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = iow(KVMIO, 0x84, kvm_sregs)
KVM_TRANSLATE = iowr(KVMIO, 0x85, kvm_translation)
KVM_GET_MSRS = iowr(KVMIO, 0x88, kvm_msrs_header)
KVM_SET_MSRS = iow(KVMIO, 0x89, kvm_msrs_header)
KVM_GET_FPU = ior(KVMIO, 0x8C, kvm_fpu)
KVM_SET_FPU = iow(KVMIO, 0x8D, kvm_fpu)
KVM_GET_LAPIC = ior(KVMIO, 0x8E, kvm_lapic_state)
KVM_SET_LAPIC = iow(KVMIO, 0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = iow(KVMIO, 0x90, kvm_cpuid2_header)
KVM_GET_MP_STATE = ior(KVMIO, 0x98, kvm_mp_state)
KVM_SET_MP_STATE = iow(KVMIO, 0x99, kvm_mp_state)
KVM_GET_XSAVE = ior(KVMIO, 0xA4, kvm_xsave)
KVM_SET_XSAVE = iow(KVMIO, 0xA5, kvm_xsave)
KVM_SET_CLOCK = iow(KVMIO, 0x7B, kvm_clock_data)
KVM_GET_CLOCK = ior(KVMIO, 0x7C, kvm_clock_data)
KVM_SET_GUEST_DEBUG = iow(KVMIO, 0x9B, kvm_guest_debug)
KVM_GET_VCPU_EVENTS = ior(KVMIO, 0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = iow(KVMIO, 0xA0, kvm_vcpu_events)
