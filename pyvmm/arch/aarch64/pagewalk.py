"""Guest virtual -> guest physical translation on aarch64: a walk of the EL1&0 stage-1 tables in guest RAM.

Follows the Arm ARM (DDI 0487), chapter D8 "The AArch64 Virtual Memory System Architecture": with
SCTLR_EL1.M clear the MMU is off and addresses are physical; otherwise bit 55 of the address selects
TTBR1_EL1 (the upper, kernel range) or TTBR0_EL1, TCR_EL1 gives that range's size (T0SZ/T1SZ, bits 5:0 and
21:16), its granule (TG0 bits 15:14: 0 = 4 KiB, 1 = 64 KiB, 2 = 16 KiB; TG1 bits 31:30: 1 = 16 KiB,
2 = 4 KiB, 3 = 64 KiB) and whether the top byte is ignored (TBI0 bit 37, TBI1 bit 38).  Each level
resolves ``granule_bits - 3`` bits of the address; a descriptor's bits 1:0 are 0b11 for a table (or, at
the last level, a page) and 0b01 for a block; output addresses are bits 47:granule of the descriptor
(48-bit physical addresses: the 52-bit formats are not read).  Permissions are not checked: the gdb server
reads and writes what the guest maps.
"""

from __future__ import annotations

from pyvmm.errors import GuestMemoryError
from pyvmm.memory import GuestMemory
from pyvmm.statictypes import NamedTuple

SCTLR_M = 1 << 0
TCR_EPD0 = 1 << 7
TCR_EPD1 = 1 << 23
TCR_TBI0 = 1 << 37
TCR_TBI1 = 1 << 38
PA_MASK = (1 << 48) - 1
_TG0_BITS = {0b00: 12, 0b01: 16, 0b10: 14}
_TG1_BITS = {0b10: 12, 0b11: 16, 0b01: 14}
DESC_VALID = 0b01
DESC_TABLE = 0b11  # a table above the last level, a page at it


class TranslationFault(GuestMemoryError):
    """The virtual address is not mapped (or a table lies outside guest RAM)."""


class Translation(NamedTuple):
    """The registers that decide the EL1&0 translation."""

    sctlr: int
    tcr: int
    ttbr0: int
    ttbr1: int


def translate(mem: GuestMemory, regs: Translation, vaddr: int) -> int:
    if not regs.sctlr & SCTLR_M:
        return vaddr & PA_MASK
    upper = bool(vaddr >> 55 & 1)
    tcr = regs.tcr
    if upper:
        txsz, granule, epd, tbi, ttbr = (tcr >> 16 & 0x3F, _TG1_BITS.get(tcr >> 30 & 3), tcr & TCR_EPD1,
                                         tcr & TCR_TBI1, regs.ttbr1)
    else:
        txsz, granule, epd, tbi, ttbr = tcr & 0x3F, _TG0_BITS.get(tcr >> 14 & 3), tcr & TCR_EPD0, tcr & TCR_TBI0, regs.ttbr0
    if granule is None:
        raise TranslationFault(f"virtual {vaddr:#x}: TCR_EL1 {tcr:#x} names a reserved granule")
    if epd:
        raise TranslationFault(f"virtual {vaddr:#x}: walks of the {'upper' if upper else 'lower'} range are disabled")
    bits = 64 - txsz
    # Every bit above the range must equal bit 55 (the top byte is left out where TBI says so).
    top = (vaddr & ((1 << 56) - 1)) if tbi else vaddr
    high = top >> bits
    expected = ((1 << ((56 if tbi else 64) - bits)) - 1) if upper else 0
    if not 12 <= bits <= 52 or high != expected:
        raise TranslationFault(f"virtual {vaddr:#x}: outside the {bits}-bit {'upper' if upper else 'lower'} range")
    stride = granule - 3
    level = 3 - (bits - granule - 1) // stride  # the first level that resolves the top bits
    table = ttbr & PA_MASK & ~1  # BADDR; bit 0 is CnP
    while True:
        shift = granule + stride * (3 - level)
        width = min(stride, bits - shift)
        index = (vaddr >> shift) & ((1 << width) - 1)
        desc = mem.read_u64(table + 8 * index)
        if not desc & DESC_VALID:
            raise TranslationFault(f"virtual {vaddr:#x}: level-{level} descriptor {desc:#x} is invalid")
        out = desc & PA_MASK & ~((1 << granule) - 1)
        if level == 3:
            if desc & 0b11 != DESC_TABLE:
                raise TranslationFault(f"virtual {vaddr:#x}: level-3 descriptor {desc:#x} is reserved")
            return out | (vaddr & ((1 << granule) - 1))
        if desc & 0b11 != DESC_TABLE:  # a block: the rest of the address is the offset into it
            mask = (1 << shift) - 1
            return (desc & PA_MASK & ~mask) | (vaddr & mask)
        table = out
        level += 1
