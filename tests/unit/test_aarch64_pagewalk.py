"""aarch64 stage-1 translation (Arm ARM D8) over page tables built in guest RAM: MMU off, 4 KiB pages and
2 MiB blocks at 48 bits, the upper (TTBR1) range, a 64 KiB granule, top-byte-ignore, and faults."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pyvmm.arch.aarch64.pagewalk import SCTLR_M, TCR_EPD0, TCR_TBI1, Translation, TranslationFault, translate
from pyvmm.memory import GuestMemory

MiB = 1 << 20
TABLE, BLOCK, PAGE = 0b11, 0b01, 0b11
TCR_4K_48 = 16 | (16 << 16) | (0b10 << 30)  # T0SZ = T1SZ = 16, TG0 = 4K (0), TG1 = 4K (0b10)


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.single(64 * MiB)
    yield m
    m.close()


def _map_4k(mem: GuestMemory, root: int, va: int, pa: int, *, block_at_l2: bool = False) -> None:
    """Tables at root, root + 4K, ... for one address: L0 -> L1 -> L2 -> L3 page (or an L2 block)."""
    tables = [root + 0x1000 * i for i in range(4)]
    for level in range(3):
        shift = 12 + 9 * (3 - level)
        entry = tables[level] + 8 * ((va >> shift) & 0x1FF)
        if level == 2 and block_at_l2:
            mem.write_u64(entry, (pa & ~(2 * MiB - 1)) | BLOCK | 1 << 10)  # AF set, as Linux has it
            return
        mem.write_u64(entry, tables[level + 1] | TABLE)
    mem.write_u64(tables[3] + 8 * ((va >> 12) & 0x1FF), (pa & ~0xFFF) | PAGE | 1 << 10)


def test_mmu_off_is_identity(mem: GuestMemory) -> None:
    assert translate(mem, Translation(0, TCR_4K_48, 0, 0), 0x4008_0123) == 0x4008_0123


def test_4k_page_and_2m_block_in_the_lower_range(mem: GuestMemory) -> None:
    _map_4k(mem, 0x10_0000, 0x0000_1234_5678_9ABC, 0x0200_3000)
    regs = Translation(SCTLR_M, TCR_4K_48, 0x10_0000 | 1, 0)  # bit 0 (CnP) is not part of the base
    assert translate(mem, regs, 0x0000_1234_5678_9ABC) == 0x0200_3ABC
    _map_4k(mem, 0x20_0000, 0x0000_0000_4020_1234, 0x0160_0000, block_at_l2=True)
    regs = Translation(SCTLR_M, TCR_4K_48, 0x20_0000, 0)
    assert translate(mem, regs, 0x0000_0000_4020_1234) == 0x0160_0000 | 0x1234 | (0x4020_1234 & 0x1F_F000)


def test_upper_range_uses_ttbr1_and_top_byte_ignore(mem: GuestMemory) -> None:
    va = 0xFFFF_8000_0800_1000  # the kernel image's first pages (KIMAGE_VADDR on 48-bit arm64 6.1)
    _map_4k(mem, 0x30_0000, va, 0x4021_0000 & (64 * MiB - 1))
    regs = Translation(SCTLR_M, TCR_4K_48, 0, 0x30_0000)
    assert translate(mem, regs, va + 0x44) == (0x4021_0000 & (64 * MiB - 1)) + 0x44
    with pytest.raises(TranslationFault):  # a tag in the top byte, without TBI1
        translate(mem, regs, va & ~(0xF0 << 56) | 0x0F << 56)
    tagged = Translation(SCTLR_M, TCR_4K_48 | TCR_TBI1, 0, 0x30_0000)
    assert translate(mem, tagged, (va & ((1 << 56) - 1)) | 0xF3 << 56) == (0x4021_0000 & (64 * MiB - 1))


def test_64k_granule_42_bits(mem: GuestMemory) -> None:
    # TG0 = 64K (0b01), T0SZ = 22: levels 2 (13 bits, here 42 - 29 = 13) and 3 (13 bits), 64 KiB pages
    tcr = 22 | (0b01 << 14)
    va, pa, l2, l3 = 0x0123_4567_89AB, 0x0251_0000, 0x40_0000, 0x50_0000
    mem.write_u64(l2 + 8 * ((va >> 29) & 0x1FFF), l3 | TABLE)
    mem.write_u64(l3 + 8 * ((va >> 16) & 0x1FFF), pa | PAGE)
    assert translate(mem, Translation(SCTLR_M, tcr, l2, 0), va) == pa | (va & 0xFFFF)


def test_faults(mem: GuestMemory) -> None:
    regs = Translation(SCTLR_M, TCR_4K_48, 0x10_0000, 0)
    with pytest.raises(TranslationFault, match="level-0"):
        translate(mem, regs, 0x1000)  # empty tables: invalid level-0 descriptor
    with pytest.raises(TranslationFault, match="outside"):
        translate(mem, regs, 0x0001_0000_0000_0000)  # bit 48 set in the lower range
    with pytest.raises(TranslationFault, match="disabled"):
        translate(mem, Translation(SCTLR_M, TCR_4K_48 | TCR_EPD0, 0x10_0000, 0), 0x1000)
    _map_4k(mem, 0x10_0000, 0x5000, 0x6000)
    mem.write_u64(0x10_3000 + 8 * 5, 0x6000 | BLOCK)  # a "block" at level 3 is reserved
    with pytest.raises(TranslationFault, match="reserved"):
        translate(mem, regs, 0x5000)
