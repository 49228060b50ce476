"""Page walks and the assist's instruction decoding, on fake guest memory (no KVM)."""

from __future__ import annotations

import pytest

from pyvmm.arch.x86_64 import assist, cpu, layout
from pyvmm.arch.x86_64.pagewalk import PageFault, PagingMode, read_linear, translate
from pyvmm.kvm import abi_x86_64 as x86
from pyvmm.memory import GuestMemory

LONG = PagingMode(cr0=cpu.CR0_PG | cpu.CR0_PE, cr3=layout.PML4_ADDR, cr4=cpu.CR4_PAE, efer=cpu.EFER_LMA | cpu.EFER_LME)


@pytest.fixture
def mem() -> GuestMemory:
    m = GuestMemory.single(16 << 20)
    cpu.write_identity_page_tables(m)
    return m


def test_identity_map_translates_2m_pages(mem: GuestMemory) -> None:
    assert translate(mem, LONG, 0x123456) == 0x123456
    assert translate(mem, LONG, 0xFFFF_FFFF) == 0xFFFF_FFFF


def test_4k_mapping_and_not_present(mem: GuestMemory) -> None:
    # Map linear 0xffffffff80000000 -> physical 0x300000 via a 4 KiB page table (higher-half kernel).
    pml4, pdpt, pd, pt = 0x400000, 0x401000, 0x402000, 0x403000
    mem.write_u64(pml4 + 8 * 511, pdpt | 3)
    mem.write_u64(pdpt + 8 * 510, pd | 3)
    mem.write_u64(pd + 0, pt | 3)
    mem.write_u64(pt + 8 * 1, 0x300000 | 3)
    mode = PagingMode(LONG.cr0, pml4, LONG.cr4, LONG.efer)
    assert translate(mem, mode, 0xFFFF_FFFF_8000_1234) == 0x300234
    with pytest.raises(PageFault):
        translate(mem, mode, 0xFFFF_FFFF_8000_2000)
    mem.write(0x300FFE, b"\xaa\xbb")
    mem.write_u64(pt + 8 * 2, 0x500000 | 3)
    mem.write(0x500000, b"\xcc")
    # An instruction that crosses into a page mapped somewhere else entirely.
    assert read_linear(mem, mode, 0xFFFF_FFFF_8000_1FFE, 3) == b"\xaa\xbb\xcc"


def test_paging_off_is_physical(mem: GuestMemory) -> None:
    assert translate(mem, PagingMode(0, 0, 0, 0), 0x1234) == 0x1234


def _regs(**kw: int) -> x86.kvm_regs:
    return x86.kvm_regs(**kw)


@pytest.mark.parametrize(
    ("insn", "regs", "ea", "length"),
    [
        (bytes.fromhex("0fae5008"), {"rax": 0x1000}, 0x1008, 4),  # ldmxcsr 0x8(%rax)
        (bytes.fromhex("0fae142500200000"), {}, 0x2000, 8),  # ldmxcsr 0x2000 (SIB, no base)
        (bytes.fromhex("410fae5c2410"), {"r12": 0x3000}, 0x3010, 6),  # stmxcsr 0x10(%r12)
        (bytes.fromhex("0fae1510000000"), {"rip": 0x100000}, 0x100000 + 7 + 0x10, 7),  # rip-relative
        (bytes.fromhex("0fae54c8f0"), {"rax": 0x100, "rcx": 2}, 0x100 + 16 - 16, 5),  # (%rax,%rcx,8)-16
    ],
)
def test_modrm_effective_address(insn: bytes, regs: dict[str, int], ea: int, length: int) -> None:
    d = assist._decode_prefixes(insn)
    assist._decode_modrm(insn, d, _regs(**regs), x86.kvm_sregs(), opcode_len=2)
    assert (d.ea, d.length) == (ea, length)


def test_gs_override_adds_the_segment_base() -> None:
    insn = bytes.fromhex("650fae142500010000")  # ldmxcsr %gs:0x100
    sregs = x86.kvm_sregs()
    sregs.gs.base = 0xFFFF_8880_0000_0000
    d = assist._decode_prefixes(insn)
    assist._decode_modrm(insn, d, _regs(), sregs, opcode_len=2)
    assert d.ea == 0xFFFF_8880_0000_0100


def test_register_operand_has_no_address() -> None:
    insn = bytes.fromhex("f3480fb8c1")  # popcnt %rcx,%rax
    d = assist._decode_prefixes(insn)
    assert d.prefixes == b"\xf3" and d.rex == 0x48
    assist._decode_modrm(insn, d, _regs(), x86.kvm_sregs(), opcode_len=2)
    assert d.ea is None and d.length == 5
