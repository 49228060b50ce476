"""x86_64 vCPU state for the Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst, "64-bit
BOOT PROTOCOL"): long mode with an identity map, a flat GDT with __BOOT_CS = 0x10 and __BOOT_DS = 0x18,
interrupts off, ``rsi`` = the zero page.  Also CPUID, MSRs and the local APIC's LINT pins.
"""

from __future__ import annotations

import ctypes
import errno
import struct

from pyvmm.arch.x86_64 import layout
from pyvmm.arch.x86_64.pagewalk import CR0_PG, CR4_PAE, EFER_LMA
from pyvmm.arch.x86_64.pagewalk import PAGE_SIZE_BIT as PTE_PS
from pyvmm.arch.x86_64.pagewalk import PRESENT as PTE_PRESENT
from pyvmm.errors import KvmError
from pyvmm.kvm import abi_x86_64 as x86
from pyvmm.kvm.system import Kvm
from pyvmm.kvm.vcpu import VcpuFd
from pyvmm.memory import GuestMemory

# --- control registers (Intel SDM vol. 3, 2.5) ----------------------------------------------------------
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_AM = 1 << 18
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
RFLAGS_RESERVED1 = 1 << 1
RFLAGS_AC = 1 << 18

# page-table entry bits (SDM vol. 3, 4.5)
PTE_RW = 1 << 1

# --- GDT (boot.rst: __BOOT_CS 0x10, __BOOT_DS 0x18) -------------------------------------------------------
BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20
# Descriptor layout: SDM vol. 3, 3.4.5.  flags/access packed as the Linux GDT_ENTRY() macro does.
GDT_CODE64 = 0x00AF9B000000FFFF  # present, DPL0, code exec/read accessed, L=1, G=1
GDT_DATA = 0x00CF93000000FFFF  # present, DPL0, data read/write accessed, D/B=1, G=1
GDT_TSS = 0x008F8B000000FFFF  # present, busy 32/64-bit TSS


def write_gdt(mem: GuestMemory) -> None:
    entries = [0, 0, GDT_CODE64, GDT_DATA, GDT_TSS]
    mem.write(layout.GDT_ADDR, struct.pack(f"<{len(entries)}Q", *entries))
    mem.write(layout.IDT_ADDR, bytes(8))


GDT_LIMIT = 5 * 8 - 1


def write_identity_page_tables(mem: GuestMemory) -> None:
    """Identity-map the first 4 GiB with 2 MiB pages: PML4[0] -> PDPT, PDPT[0..3] -> 4 PDs."""
    mem.fill(layout.PML4_ADDR, 0x1000)
    mem.fill(layout.PDPT_ADDR, 0x1000)
    mem.write_u64(layout.PML4_ADDR, layout.PDPT_ADDR | PTE_PRESENT | PTE_RW)
    for i in range(4):
        pd = layout.PD_ADDR + i * 0x1000
        mem.write_u64(layout.PDPT_ADDR + 8 * i, pd | PTE_PRESENT | PTE_RW)
    flags = PTE_PRESENT | PTE_RW | PTE_PS
    mem.write(layout.PD_ADDR, struct.pack(f"<{4 * 512}Q", *((i << 21) | flags for i in range(4 * 512))))


def _segment(selector: int, *, code: bool) -> x86.kvm_segment:
    return x86.kvm_segment(
        base=0,
        limit=0xFFFFFFFF,
        selector=selector,
        type=0xB if code else 0x3,
        present=1,
        dpl=0,
        db=0 if code else 1,
        s=1,
        l=1 if code else 0,
        g=1,
    )


def setup_long_mode(vcpu: VcpuFd) -> None:
    sregs = x86.kvm_sregs()
    vcpu.get("KVM_GET_SREGS", x86.KVM_GET_SREGS, sregs)
    sregs.cs = _segment(BOOT_CS, code=True)
    data = _segment(BOOT_DS, code=False)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = x86.kvm_segment(base=0, limit=0xFFFF, selector=BOOT_TSS, type=0xB, present=1, s=0, g=0)
    sregs.gdt.base, sregs.gdt.limit = layout.GDT_ADDR, GDT_LIMIT
    sregs.idt.base, sregs.idt.limit = layout.IDT_ADDR, 0
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG
    sregs.cr3 = layout.PML4_ADDR
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA
    vcpu.set("KVM_SET_SREGS", x86.KVM_SET_SREGS, sregs)


def setup_boot_regs(vcpu: VcpuFd, entry: int, zero_page: int) -> None:
    regs = x86.kvm_regs(rip=entry, rsi=zero_page, rsp=layout.BOOT_STACK_ADDR, rbp=layout.BOOT_STACK_ADDR,
                        rflags=RFLAGS_RESERVED1)
    vcpu.set("KVM_SET_REGS", x86.KVM_SET_REGS, regs)


def setup_fpu(vcpu: VcpuFd) -> None:
    fpu = x86.kvm_fpu(fcw=0x37F, mxcsr=0x1F80)  # power-on values (SDM vol. 1, 8.1.5 and 10.2.3.1)
    vcpu.set("KVM_SET_FPU", x86.KVM_SET_FPU, fpu)


# --- MSRs (SDM vol. 4) ----------------------------------------------------------------------------------
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WB = 6


def boot_msrs() -> list[tuple[int, int]]:
    return [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WB),
    ]


def set_msrs(vcpu: VcpuFd, msrs: list[tuple[int, int]]) -> None:
    cls = x86.kvm_msrs(len(msrs))
    arg = cls()
    arg.nmsrs = len(msrs)
    for i, (index, value) in enumerate(msrs):
        arg.entries[i].index = index
        arg.entries[i].data = value
    done = vcpu.call("KVM_SET_MSRS", x86.KVM_SET_MSRS, arg)
    if done != len(msrs):
        bad = msrs[done][0]
        raise KvmError(f"KVM_SET_MSRS on vCPU {vcpu.index}: MSR {bad:#x} was refused")


# --- CPUID ------------------------------------------------------------------------------------------------
CPUID_1_ECX_X2APIC = 1 << 21
CPUID_1_ECX_XSAVE = 1 << 26
CPUID_1_ECX_OSXSAVE = 1 << 27
CPUID_1_ECX_AVX = 1 << 28
CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_1_EDX_HTT = 1 << 28
CPUID_7_EBX_AVX2 = 1 << 5
CPUID_7_EBX_AVX512F = 1 << 16


def get_supported_cpuid(kvm: Kvm) -> list[x86.kvm_cpuid_entry2]:
    n = 64
    while True:
        cls = x86.kvm_cpuid2(n)
        arg = cls()
        arg.nent = n
        try:
            kvm.get("KVM_GET_SUPPORTED_CPUID", x86.KVM_GET_SUPPORTED_CPUID, arg)
        except KvmError as err:
            if err.errno == errno.E2BIG and n < 4096:
                n *= 2
                continue
            raise
        nent = int(arg.nent)
        return [x86.kvm_cpuid_entry2.from_buffer_copy(arg.entries[i]) for i in range(nent)]


# KVM paravirtual features, CPUID 0x40000001 EAX (Documentation/virt/kvm/x86/cpuid.rst).  The three
# that Linux uses only with more than one CPU; on the software-emulating host KVM (hosts.md) a
# two-vCPU guest stalls right after "Switched to clocksource kvm-clock" with them and boots without.
KVM_CPUID_FEATURES = 0x40000001
KVM_FEATURE_PV_TLB_FLUSH = 1 << 9
KVM_FEATURE_PV_SEND_IPI = 1 << 11
KVM_FEATURE_PV_SCHED_YIELD = 1 << 13
KVM_FEATURES_SMP_PV = KVM_FEATURE_PV_TLB_FLUSH | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD


def guest_cpuid(
    supported: list[x86.kvm_cpuid_entry2], cpu_index: int, cpu_count: int, *, hide_xsave: bool,
    hide_smp_pv: bool = False,
) -> list[x86.kvm_cpuid_entry2]:
    """The fix-ups every KVM VMM makes to the supported CPUID for one vCPU.

    Leaf 1: APIC id in EBX[31:24], logical-processor count in EBX[23:16], the hypervisor bit;
    leaves 0xB/0x1F: replaced by our topology (one package, ``cpu_count`` cores of one thread, APIC id =
    vCPU index); leaf 4: cores per package; AMD leaves 0x80000008 (NC) and 0x8000001E (core id).
    ``hide_xsave`` clears XSAVE and everything that depends on it (AVX*), used on hosts that cannot
    emulate XSAVE; ``hide_smp_pv`` clears the SMP-only KVM PV features (PV IPIs, TLB flush, yield).
    """
    out = []
    for src in supported:
        e = x86.kvm_cpuid_entry2.from_buffer_copy(src)
        if e.function in (0xB, 0x1F):
            if e.index == 0:
                out += topology_leaf(e.function, cpu_index, cpu_count)
            continue
        if e.function == KVM_CPUID_FEATURES and hide_smp_pv:
            e.eax &= ~KVM_FEATURES_SMP_PV
        elif e.function == 0x80000008:
            e.ecx = (e.ecx & ~0xFF) | (cpu_count - 1)  # NC: cores per package - 1 (AMD APM vol. 3, E.4.7)
        elif e.function == 0x8000001E:
            # AMD APM vol. 3 E.4.15: EAX extended APIC id, EBX[7:0] core id, EBX[15:8] threads per core - 1
            e.eax, e.ebx, e.ecx = cpu_index, cpu_index & 0xFF, 0
        elif e.function == 1:
            e.ebx = (e.ebx & 0x0000FFFF) | (cpu_index << 24) | (max(cpu_count, 1) << 16)
            e.ecx |= CPUID_1_ECX_HYPERVISOR
            e.edx |= CPUID_1_EDX_HTT if cpu_count > 1 else 0
            if hide_xsave:
                e.ecx &= ~(CPUID_1_ECX_XSAVE | CPUID_1_ECX_OSXSAVE | CPUID_1_ECX_AVX)
        elif e.function == 4:
            e.eax = (e.eax & 0x03FFFFFF) | ((cpu_count - 1) << 26)
        elif e.function == 7 and e.index == 0 and hide_xsave:
            e.ebx &= ~(CPUID_7_EBX_AVX2 | CPUID_7_EBX_AVX512F)
        elif e.function == 0xD and hide_xsave:
            e.eax = e.ebx = e.ecx = e.edx = 0
        out.append(e)
    return out


# Leaf 0xB / 0x1F (SDM vol. 2A, CPUID "V2 Extended Topology Enumeration"): ECX[15:8] level type.
TOPO_LEVEL_INVALID = 0
TOPO_LEVEL_SMT = 1
TOPO_LEVEL_CORE = 2


def topology_leaf(function: int, cpu_index: int, cpu_count: int) -> list[x86.kvm_cpuid_entry2]:
    """Subleaves of leaf 0xB/0x1F for one package of ``cpu_count`` single-thread cores.

    Per level: EAX[4:0] = bits to shift the x2APIC id right to get the next level's id, EBX = logical
    processors at this level, ECX = level number | type << 8, EDX = this CPU's x2APIC id.  Linux
    (arch/x86/kernel/cpu/topology.c) walks the subleaves up to the first with type 0.
    """
    core_shift = max(cpu_count - 1, 0).bit_length()
    levels = [(0, 1, TOPO_LEVEL_SMT), (core_shift, cpu_count, TOPO_LEVEL_CORE), (0, 0, TOPO_LEVEL_INVALID)]
    out = []
    for sub, (shift, count, kind) in enumerate(levels):
        out.append(x86.kvm_cpuid_entry2(function=function, index=sub, flags=x86.KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                                        eax=shift, ebx=count, ecx=(kind << 8) | sub, edx=cpu_index))
    return out


def set_cpuid(vcpu: VcpuFd, entries: list[x86.kvm_cpuid_entry2]) -> None:
    cls = x86.kvm_cpuid2(len(entries))
    arg = cls()
    arg.nent = len(entries)
    for i, e in enumerate(entries):
        arg.entries[i] = e
    vcpu.set("KVM_SET_CPUID2", x86.KVM_SET_CPUID2, arg)


# --- local APIC LINT pins (SDM vol. 3, 10.5.1) --------------------------------------------------------
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def setup_lapic(vcpu: VcpuFd) -> None:
    """LINT0 = ExtINT (the PIC), LINT1 = NMI: what a PC BIOS leaves behind."""
    state = x86.kvm_lapic_state()
    vcpu.get("KVM_GET_LAPIC", x86.KVM_GET_LAPIC, state)
    raw = ctypes.cast(ctypes.addressof(state), ctypes.POINTER(ctypes.c_uint32 * 256)).contents
    for reg, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        v = raw[reg // 4]
        raw[reg // 4] = (v & ~0x700) | (mode << 8)
    vcpu.set("KVM_SET_LAPIC", x86.KVM_SET_LAPIC, state)
