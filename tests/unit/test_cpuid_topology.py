"""CPUID fix-ups for SMP: APIC ids, the extended-topology leaves Linux reads, the SMP-only PV features."""

from __future__ import annotations

from pyvmm.arch.x86_64 import cpu
from pyvmm.kvm import abi_x86_64 as x86


def _supported() -> list[x86.kvm_cpuid_entry2]:
    e = x86.kvm_cpuid_entry2
    return [
        e(function=1, ebx=0x00020800, ecx=0x00200000),
        e(function=0xB, index=0, flags=1, edx=7),  # what the software host reports: all zero
        e(function=0x40000001, eax=0x1007EFB),
        e(function=0x80000008, ecx=0x7001),
        e(function=0x8000001E),
    ]


def _leaf(entries: list[x86.kvm_cpuid_entry2], fn: int, index: int = 0) -> x86.kvm_cpuid_entry2:
    return next(e for e in entries if e.function == fn and e.index == index)


def test_apic_ids_and_topology() -> None:
    for index in range(4):
        out = cpu.guest_cpuid(_supported(), index, 4, hide_xsave=False)
        assert _leaf(out, 1).ebx >> 24 == index
        smt, core, end = (_leaf(out, 0xB, i) for i in range(3))
        # SMT level: 1 thread, shift 0; core level: 4 cores, shift 2; then an invalid level ends the walk
        assert (smt.eax, smt.ebx, smt.ecx, smt.edx) == (0, 1, 0x100, index)
        assert (core.eax, core.ebx, core.ecx, core.edx) == (2, 4, 0x201, index)
        assert (end.ecx >> 8, end.edx) == (0, index)
        assert all(e.flags & x86.KVM_CPUID_FLAG_SIGNIFCANT_INDEX for e in (smt, core, end))
        assert _leaf(out, 0x80000008).ecx & 0xFF == 3
        assert (_leaf(out, 0x8000001E).eax, _leaf(out, 0x8000001E).ebx) == (index, index)


def test_core_shift_rounds_up() -> None:
    assert [cpu.topology_leaf(0xB, 0, n)[1].eax for n in (1, 2, 3, 4, 5, 64)] == [0, 1, 2, 2, 3, 6]


def test_smp_pv_features_hidden_on_request() -> None:
    kept = _leaf(cpu.guest_cpuid(_supported(), 0, 2, hide_xsave=False), 0x40000001).eax
    hidden = _leaf(cpu.guest_cpuid(_supported(), 0, 2, hide_xsave=True, hide_smp_pv=True), 0x40000001).eax
    assert kept == 0x1007EFB
    assert hidden == 0x1007EFB & ~cpu.KVM_FEATURES_SMP_PV
    assert hidden & 1  # kvm-clock stays
