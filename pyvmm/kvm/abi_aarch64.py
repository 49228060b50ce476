"""arm64 KVM uapi: structs and constants from arch/arm64/include/uapi/asm/kvm.h and the arm64 parts of
include/uapi/linux/kvm.h (Linux 6.1), plus the register ids of Documentation/virt/kvm/api.rst 4.68
(KVM_SET_ONE_REG, "ARM64 registers").  Sizes are checked at import;
tests/unit/test_kvm_abi_aarch64_cc.py compares sizes, offsets and constants with Debian's arm64 headers
(linux-libc-dev-arm64-cross) through the cross compiler.

Pure data: importing this module on an x86 host is fine (the unit tests do).
"""

from __future__ import annotations

import ctypes

from pyvmm.kvm.abi import AbiStruct, checked, u32, u64
from pyvmm.kvm.ioctl import KVMIO, ior, iow

# --- capabilities (linux/kvm.h) ---------------------------------------------------------------------
KVM_CAP_ARM_PSCI = 87
KVM_CAP_ARM_PSCI_0_2 = 102
KVM_CAP_ARM_VM_IPA_SIZE = 165

# --- vCPU init (asm/kvm.h) ----------------------------------------------------------------------------
KVM_ARM_VCPU_POWER_OFF = 0  # feature bits of kvm_vcpu_init.features[0]
KVM_ARM_VCPU_EL1_32BIT = 1
KVM_ARM_VCPU_PSCI_0_2 = 2
KVM_ARM_VCPU_PMU_V3 = 3

KVM_ARM_TARGET_GENERIC_V8 = 5


@checked(32)
class kvm_vcpu_init(AbiStruct):
    __slots__ = ()
    _fields_ = [("target", u32), ("features", u32 * 7)]


KVM_ARM_VCPU_INIT = iow(KVMIO, 0xAE, kvm_vcpu_init)
KVM_ARM_PREFERRED_TARGET = ior(KVMIO, 0xAF, kvm_vcpu_init)


# --- core registers (asm/kvm.h struct kvm_regs; asm/ptrace.h user_pt_regs, user_fpsimd_state) --------
class user_pt_regs(AbiStruct):
    __slots__ = ()
    _fields_ = [("regs", u64 * 31), ("sp", u64), ("pc", u64), ("pstate", u64)]


class user_fpsimd_state(AbiStruct):
    # vregs are __uint128_t[32] (16-byte aligned); the struct starts at a multiple of 16 in kvm_regs
    __slots__ = ()
    _fields_ = [("vregs", u64 * 64), ("fpsr", u32), ("fpcr", u32), ("reserved", u32 * 2)]


KVM_NR_SPSR = 5


@checked(864)
class kvm_regs(AbiStruct):
    __slots__ = ()
    _fields_ = [("regs", user_pt_regs), ("sp_el1", u64), ("elr_el1", u64), ("spsr", u64 * KVM_NR_SPSR),
                ("pad", u64),  # C aligns fp_regs (it holds __uint128_t) to 16 bytes
                ("fp_regs", user_fpsimd_state)]


# Register ids (linux/kvm.h KVM_REG_*; asm/kvm.h KVM_REG_ARM_CORE_REG: the offset into kvm_regs in
# 32-bit words).
KVM_REG_ARM64 = 0x6000_0000_0000_0000
KVM_REG_SIZE_SHIFT = 52  # an id's bits 55:52: log2 of the register's size in bytes
KVM_REG_SIZE_MASK = 0x00F0_0000_0000_0000
KVM_REG_SIZE_U32 = 0x0020_0000_0000_0000
KVM_REG_SIZE_U64 = 0x0030_0000_0000_0000
KVM_REG_SIZE_U128 = 0x0040_0000_0000_0000
KVM_REG_ARM_COPROC_SHIFT = 16
KVM_REG_ARM_CORE = 0x0010 << KVM_REG_ARM_COPROC_SHIFT

_REGS = kvm_regs.regs.offset


def reg_size(reg_id: int) -> int:
    """The register's size in bytes, from its id (linux/kvm.h KVM_REG_SIZE)."""
    return 1 << ((reg_id & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT)


def core_reg_id(offset: int) -> int:
    """The KVM_SET_ONE_REG id of the 64-bit core register at byte ``offset`` in ``struct kvm_regs``."""
    return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | (offset // 4)


def reg_x(n: int) -> int:
    """Id of general-purpose register ``Xn`` (0..30)."""
    if not 0 <= n <= 30:
        raise ValueError(f"no register X{n}")
    return core_reg_id(_REGS + user_pt_regs.regs.offset + 8 * n)


REG_PC = core_reg_id(_REGS + user_pt_regs.pc.offset)
REG_PSTATE = core_reg_id(_REGS + user_pt_regs.pstate.offset)
REG_SP = core_reg_id(_REGS + user_pt_regs.sp.offset)

# PSTATE at the kernel's entry (Documentation/arch/arm64/booting.rst: EL1h, all of D, A, I, F masked;
# asm/ptrace.h values).  KVM's vCPU reset already puts the vCPU there; we write it anyway.
PSR_MODE_EL1h = 0x5
PSR_F_BIT = 0x40
PSR_I_BIT = 0x80
PSR_A_BIT = 0x100
PSR_D_BIT = 0x200
BOOT_PSTATE = PSR_MODE_EL1h | PSR_D_BIT | PSR_A_BIT | PSR_I_BIT | PSR_F_BIT

REG_SP_EL1 = core_reg_id(kvm_regs.sp_el1.offset)
REG_ELR_EL1 = core_reg_id(kvm_regs.elr_el1.offset)
KVM_SPSR_EL1 = 0  # index of SPSR_EL1 in kvm_regs.spsr (asm/kvm.h)
REG_SPSR_EL1 = core_reg_id(kvm_regs.spsr.offset + 8 * KVM_SPSR_EL1)

# System registers (asm/kvm.h ARM64_SYS_REG: op0, op1, CRn, CRm, op2 in the low 16 bits of the id)
KVM_REG_ARM64_SYSREG = 0x0013 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM64_SYSREG_OP0_SHIFT = 14
KVM_REG_ARM64_SYSREG_OP1_SHIFT = 11
KVM_REG_ARM64_SYSREG_CRN_SHIFT = 7
KVM_REG_ARM64_SYSREG_CRM_SHIFT = 3
KVM_REG_ARM64_SYSREG_OP2_SHIFT = 0


def sys_reg_id(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    """The KVM_GET_ONE_REG id of a 64-bit system register, by its encoding (Arm ARM, "System registers")."""
    return (KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG | op0 << KVM_REG_ARM64_SYSREG_OP0_SHIFT
            | op1 << KVM_REG_ARM64_SYSREG_OP1_SHIFT | crn << KVM_REG_ARM64_SYSREG_CRN_SHIFT
            | crm << KVM_REG_ARM64_SYSREG_CRM_SHIFT | op2 << KVM_REG_ARM64_SYSREG_OP2_SHIFT)


# The ones the gdb server reads (translation) and writes (an exception taken to EL1), by the Arm ARM's
# encodings (also arch/arm64/include/asm/sysreg.h SYS_*_EL1).
REG_SCTLR_EL1 = sys_reg_id(3, 0, 1, 0, 0)
REG_TTBR0_EL1 = sys_reg_id(3, 0, 2, 0, 0)
REG_TTBR1_EL1 = sys_reg_id(3, 0, 2, 0, 1)
REG_TCR_EL1 = sys_reg_id(3, 0, 2, 0, 2)
REG_ESR_EL1 = sys_reg_id(3, 0, 5, 2, 0)
REG_FAR_EL1 = sys_reg_id(3, 0, 6, 0, 0)
REG_VBAR_EL1 = sys_reg_id(3, 0, 12, 0, 0)
KVM_REG_ARM_TIMER_CNT = sys_reg_id(3, 3, 14, 3, 2)  # the virtual counter (CNTVCT_EL0), as KVM names it

# --- guest debugging (linux/kvm.h struct kvm_guest_debug, KVM_EXIT_DEBUG; asm/kvm.h for arm64) ---------
KVM_ARM_MAX_DBG_REGS = 16
KVM_GUESTDBG_USE_SW_BP = 1 << 16  # BRK instructions exit to the VMM
KVM_GUESTDBG_USE_HW = 1 << 17  # the dbg_* registers below are the guest's breakpoints and watchpoints
KVM_DEBUG_ARCH_HSR_HIGH_VALID = 1 << 0


@checked(4 * 16 * 8)
class kvm_guest_debug_arch(AbiStruct):
    __slots__ = ()
    _fields_ = [("dbg_bcr", u64 * KVM_ARM_MAX_DBG_REGS), ("dbg_bvr", u64 * KVM_ARM_MAX_DBG_REGS),
                ("dbg_wcr", u64 * KVM_ARM_MAX_DBG_REGS), ("dbg_wvr", u64 * KVM_ARM_MAX_DBG_REGS)]


@checked(8 + 512)
class kvm_guest_debug(AbiStruct):
    __slots__ = ()
    _fields_ = [("control", u32), ("pad", u32), ("arch", kvm_guest_debug_arch)]


@checked(16)
class kvm_debug_exit_arch(AbiStruct):
    """kvm_run.debug.arch: the exception syndrome (ESR_EL2) of the debug exception and, for a watchpoint,
    the data address."""

    __slots__ = ()
    _fields_ = [("hsr", u32), ("hsr_high", u32), ("far", u64)]


KVM_SET_GUEST_DEBUG = iow(KVMIO, 0x9B, kvm_guest_debug)

# --- the vGIC (linux/kvm.h enum kvm_device_type; asm/kvm.h "Device Control API: ARM VGIC") ------------
KVM_DEV_TYPE_ARM_VGIC_V2 = 5
KVM_DEV_TYPE_ARM_VGIC_V3 = 7

KVM_DEV_ARM_VGIC_GRP_ADDR = 0
KVM_DEV_ARM_VGIC_GRP_NR_IRQS = 3
KVM_DEV_ARM_VGIC_GRP_CTRL = 4
KVM_DEV_ARM_VGIC_CTRL_INIT = 0

KVM_VGIC_V2_ADDR_TYPE_DIST = 0
KVM_VGIC_V2_ADDR_TYPE_CPU = 1
KVM_VGIC_V3_ADDR_TYPE_DIST = 2
KVM_VGIC_V3_ADDR_TYPE_REDIST = 3
KVM_VGIC_V2_DIST_SIZE = 0x1000
KVM_VGIC_V2_CPU_SIZE = 0x2000
KVM_VGIC_V3_DIST_SIZE = 0x1_0000
KVM_VGIC_V3_REDIST_SIZE = 0x2_0000

# KVM_IRQ_LINE's irq field on arm64 (asm/kvm.h): type << 24 | vcpu << 16 | number; an SPI is its INTID
KVM_ARM_IRQ_TYPE_SHIFT = 24
KVM_ARM_IRQ_TYPE_SPI = 1
VGIC_NR_PRIVATE_IRQS = 32  # SGIs + PPIs: SPI n is INTID 32 + n

__all__ = [name for name in globals() if name.isupper() or name.startswith(("kvm_", "user_"))]
__all__ += ["core_reg_id", "reg_size", "reg_x", "sys_reg_id"]

assert ctypes.sizeof(user_pt_regs) == 272 and kvm_regs.fp_regs.offset % 16 == 0
