"""Architecture-neutral KVM uapi structs and constants, transcribed from include/uapi/linux/kvm.h
(Linux 6.1).  Sizes are checked at import; tests/unit/test_kvm_abi_cc.py compares sizes, offsets and
request numbers with the installed header.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable, Iterable

from pyvmm.kvm.ioctl import KVMIO, io, iow, iowr
from pyvmm.statictypes import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import TypeVar

    _T = TypeVar("_T", bound=type)


class AbiStruct(ctypes.Structure):
    """Base of every uapi struct: subclasses declare ``__slots__ = ()`` so a misspelt field raises."""

    __slots__ = ()


class AbiUnion(ctypes.Union):
    __slots__ = ()


def checked(size: int) -> Callable[[_T], _T]:
    """Class decorator: fail at import if ``sizeof(cls)`` differs from the header's size."""

    def check(cls: _T) -> _T:
        actual = ctypes.sizeof(cls)
        if actual != size:
            raise AssertionError(f"{cls.__name__}: sizeof is {actual}, the kernel header says {size}")
        if "__slots__" not in cls.__dict__:
            raise AssertionError(f"{cls.__name__} must declare __slots__ = ()")
        return cls

    return check


u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
s32 = ctypes.c_int32

_SCALAR_CODES: dict[type, str] = {u8: "B", u16: "H", u32: "I", u64: "Q", s32: "i"}
_INT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


def unpacker(cls: type[ctypes.Structure], *, ints: Iterable[str] = ()) -> struct.Struct:
    """A :class:`struct.Struct` that decodes ``cls``'s fields from a buffer in one call.

    Built from the ctypes declaration, not typed by hand: each field at its ctypes offset (gaps become
    pad bytes), little-endian (x86_64 and aarch64 both are).  A ``u8[N]`` field decodes as ``bytes``, or,
    when named in ``ints``, as one little-endian integer of N bytes (N = 1, 2, 4 or 8).  For hot paths
    that must not go through ctypes attribute access: ``Struct.unpack_from(buf, offset)`` is one C call.
    """
    as_int = set(ints)
    fmt, pos = "<", 0
    for name, ftype, *_ in cls._fields_:
        desc = getattr(cls, name)
        if desc.offset < pos:
            raise TypeError(f"{cls.__name__}.{name}: overlapping fields (a union) cannot be unpacked")
        if desc.offset > pos:
            fmt += f"{desc.offset - pos}x"
        if name in as_int:
            code = _INT_CODES[desc.size]
        elif ftype in _SCALAR_CODES:
            code = _SCALAR_CODES[ftype]
        elif issubclass(ftype, ctypes.Array) and getattr(ftype, "_type_", None) is u8:
            code = f"{desc.size}s"
        else:
            raise TypeError(f"{cls.__name__}.{name}: no struct code for {ftype.__name__}")
        fmt += code
        pos = desc.offset + desc.size
    result = struct.Struct(fmt)
    assert result.size == pos, (cls.__name__, fmt)
    return result

KVM_API_VERSION = 12

# --- exit reasons (kvm.h "KVM_EXIT_*") -----------------------------------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

EXIT_NAMES = {v: k for k, v in globals().items() if k.startswith("KVM_EXIT_") and isinstance(v, int)}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

# --- capabilities (kvm.h "KVM_CAP_*") ------------------------------------------------------------------
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_PIT2 = 33
KVM_CAP_IRQFD = 32
KVM_CAP_IOEVENTFD = 36
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_IMMEDIATE_EXIT = 136
# KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_MMIO) returns the page offset of the coalesced ring in the vCPU
# mapping (0: no ring); KVM_CAP_COALESCED_PIO says a zone may be a port range (api.rst 4.116
# "KVM_(UN)REGISTER_COALESCED_MMIO").
KVM_CAP_COALESCED_MMIO = 15
KVM_CAP_COALESCED_PIO = 162
KVM_CAP_SPLIT_IRQCHIP = 121
KVM_CAP_ONE_REG = 70
KVM_CAP_DEVICE_CTRL = 89
# Guest debugging (api.rst 4.59 "KVM_SET_GUEST_DEBUG"): GUEST_DEBUG2 returns the control flags this KVM
# supports; the aarch64 ones return how many hardware breakpoints and watchpoints it has.
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_GUEST_DEBUG_HW_BPS = 119
KVM_CAP_GUEST_DEBUG_HW_WPS = 120
KVM_CAP_SET_GUEST_DEBUG2 = 195

# kvm_guest_debug.control, the flags every architecture has (the others are in abi_x86_64/abi_aarch64)
KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


@checked(32)
class kvm_userspace_memory_region(AbiStruct):
    __slots__ = ()
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


@checked(8)
class kvm_irq_level(AbiStruct):
    __slots__ = ()
    _fields_ = [("irq", u32), ("level", u32)]  # irq is a union with s32 status


@checked(32)
class kvm_irqfd(AbiStruct):
    __slots__ = ()
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


@checked(64)
class kvm_ioeventfd(AbiStruct):
    __slots__ = ()
    _fields_ = [
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", s32),
        ("flags", u32),
        ("pad", u8 * 36),
    ]


@checked(16)
class kvm_enable_cap_args(AbiStruct):  # helper only; kvm_enable_cap below embeds args[4]
    __slots__ = ()
    _fields_ = [("a", u64), ("b", u64)]


@checked(104)
class kvm_enable_cap(AbiStruct):
    __slots__ = ()
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


@checked(16)
class kvm_one_reg(AbiStruct):  # KVM_GET/SET_ONE_REG: addr points at the value (its size is in the id)
    __slots__ = ()
    _fields_ = [("id", u64), ("addr", u64)]


@checked(12)
class kvm_create_device(AbiStruct):  # KVM_CREATE_DEVICE (kvm.h "Device control API")
    __slots__ = ()
    _fields_ = [("type", u32), ("fd", u32), ("flags", u32)]


@checked(24)
class kvm_device_attr(AbiStruct):  # KVM_SET/GET/HAS_DEVICE_ATTR on a device fd; addr points at the value
    __slots__ = ()
    _fields_ = [("flags", u32), ("group", u32), ("attr", u64), ("addr", u64)]


# --- coalesced MMIO/PIO (kvm.h "for KVM_REGISTER_COALESCED_MMIO / KVM_UNREGISTER_COALESCED_MMIO") --------
# Writes inside a registered zone do not exit: the kernel appends them to a ring of
# kvm_coalesced_mmio entries in a page shared by every vCPU of the VM (virt/kvm/coalesced_mmio.c), and
# the VMM replays them later.  Reads still exit.
@checked(16)
class kvm_coalesced_mmio_zone(AbiStruct):
    __slots__ = ()
    # union { __u32 pad; __u32 pio; }: pio = 1 makes the zone a port range
    _fields_ = [("addr", u64), ("size", u32), ("pio", u32)]


@checked(24)
class kvm_coalesced_mmio(AbiStruct):
    __slots__ = ()
    # union { __u32 pad; __u32 pio; }: copied from the zone the write hit
    _fields_ = [("phys_addr", u64), ("len", u32), ("pio", u32), ("data", u8 * 8)]


@checked(8)
class kvm_coalesced_mmio_ring(AbiStruct):
    """The ring's header: ``struct kvm_coalesced_mmio coalesced_mmio[]`` follows (a flexible array).
    The kernel fills the entry at ``last`` and advances ``last``; userspace consumes at ``first``."""

    __slots__ = ()
    _fields_ = [("first", u32), ("last", u32)]


# --- struct kvm_run (kvm.h), mapped from the vCPU fd ----------------------------------------------------
class kvm_run_io(AbiStruct):
    __slots__ = ()
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class kvm_run_mmio(AbiStruct):
    __slots__ = ()
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_internal(AbiStruct):
    __slots__ = ()
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_system_event(AbiStruct):
    __slots__ = ()
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_fail_entry(AbiStruct):
    __slots__ = ()
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_ex(AbiStruct):
    __slots__ = ()
    _fields_ = [("exception", u32), ("error_code", u32)]


@checked(256)
class kvm_run_exit(AbiUnion):
    __slots__ = ()
    _fields_ = [
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("internal", kvm_run_internal),
        ("system_event", kvm_run_system_event),
        ("fail_entry", kvm_run_fail_entry),
        ("ex", kvm_run_ex),
        ("padding", ctypes.c_char * 256),
    ]


@checked(2352)
class kvm_run(AbiStruct):
    __slots__ = ()
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", kvm_run_exit),  # the anonymous union in the header
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", ctypes.c_char * 2048),
    ]


KVM_RUN_EXIT_OFFSET = kvm_run.exit.offset  # 32

# --- ioctl request numbers (kvm.h) ----------------------------------------------------------------------
KVM_GET_API_VERSION = io(KVMIO, 0x00)
KVM_CREATE_VM = io(KVMIO, 0x01)
KVM_CHECK_EXTENSION = io(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = io(KVMIO, 0x04)
KVM_CREATE_VCPU = io(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = iow(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_CREATE_IRQCHIP = io(KVMIO, 0x60)
KVM_IRQ_LINE = iow(KVMIO, 0x61, kvm_irq_level)
KVM_REGISTER_COALESCED_MMIO = iow(KVMIO, 0x67, kvm_coalesced_mmio_zone)
KVM_UNREGISTER_COALESCED_MMIO = iow(KVMIO, 0x68, kvm_coalesced_mmio_zone)
KVM_IRQFD = iow(KVMIO, 0x76, kvm_irqfd)
KVM_IOEVENTFD = iow(KVMIO, 0x79, kvm_ioeventfd)
KVM_RUN = io(KVMIO, 0x80)
KVM_ENABLE_CAP = iow(KVMIO, 0xA3, kvm_enable_cap)
KVM_GET_ONE_REG = iow(KVMIO, 0xAB, kvm_one_reg)
KVM_SET_ONE_REG = iow(KVMIO, 0xAC, kvm_one_reg)
KVM_CREATE_DEVICE = iowr(KVMIO, 0xE0, kvm_create_device)
KVM_SET_DEVICE_ATTR = iow(KVMIO, 0xE1, kvm_device_attr)
KVM_GET_DEVICE_ATTR = iow(KVMIO, 0xE2, kvm_device_attr)
KVM_HAS_DEVICE_ATTR = iow(KVMIO, 0xE3, kvm_device_attr)

__all__ = [name for name in globals() if name.isupper() or name.startswith("kvm_")]
__all__ += ["AbiStruct", "AbiUnion", "checked", "iowr", "unpacker"]
