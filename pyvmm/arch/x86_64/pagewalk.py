"""Guest linear -> guest physical translation by walking the guest's page tables in guest RAM.

Follows the SDM vol. 3, chapter 4: 32-bit paging (4.3), PAE paging (4.4), 4- and 5-level paging
(4.5).  Permissions are not checked: the callers only read instruction bytes and operands the
guest itself was about to access.
"""

from __future__ import annotations

from pyvmm.errors import GuestMemoryError
from pyvmm.kvm import abi_x86_64 as x86
from pyvmm.memory import GuestMemory
from pyvmm.statictypes import NamedTuple

# Control-register and page-table bits (SDM vol. 3, 2.5 and 4.5); cpu.py uses these too.
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LMA = 1 << 10
PRESENT = 1 << 0
PAGE_SIZE_BIT = 1 << 7
ADDR_MASK = 0x000F_FFFF_FFFF_F000  # bits 51:12 of a 64-bit entry


class PageFault(GuestMemoryError):
    """The linear address is not mapped (or a table lies outside guest RAM)."""


class PagingMode(NamedTuple):
    cr0: int
    cr3: int
    cr4: int
    efer: int

    @classmethod
    def from_sregs(cls, sregs: x86.kvm_sregs) -> PagingMode:
        """The vCPU's paging mode, from its KVM_GET_SREGS."""
        return cls(cr0=sregs.cr0, cr3=sregs.cr3, cr4=sregs.cr4, efer=sregs.efer)


def translate(mem: GuestMemory, mode: PagingMode, linear: int) -> int:
    if not mode.cr0 & CR0_PG:
        return linear & 0xFFFFFFFF
    if mode.efer & EFER_LMA:
        levels = 5 if mode.cr4 & CR4_LA57 else 4
        return _walk64(mem, mode.cr3 & ADDR_MASK, levels, linear)
    if mode.cr4 & CR4_PAE:
        pdpte = mem.read_u64((mode.cr3 & 0xFFFFFFE0) + 8 * ((linear >> 30) & 3))
        if not pdpte & PRESENT:
            raise PageFault(f"linear {linear:#x}: PDPTE not present")
        return _walk64(mem, pdpte & ADDR_MASK, 2, linear & 0x3FFFFFFF)
    return _walk32(mem, mode, linear)


def _walk64(mem: GuestMemory, table: int, levels: int, linear: int) -> int:
    for level in range(levels, 0, -1):
        shift = 12 + 9 * (level - 1)
        entry = mem.read_u64(table + 8 * ((linear >> shift) & 0x1FF))
        if not entry & PRESENT:
            raise PageFault(f"linear {linear:#x}: level-{level} entry not present")
        if level in (2, 3) and entry & PAGE_SIZE_BIT:
            page_mask = (1 << shift) - 1
            return (entry & ADDR_MASK & ~page_mask) | (linear & page_mask)
        table = entry & ADDR_MASK
    return table | (linear & 0xFFF)


def _walk32(mem: GuestMemory, mode: PagingMode, linear: int) -> int:
    pde = mem.read_u32((mode.cr3 & 0xFFFFF000) + 4 * ((linear >> 22) & 0x3FF))
    if not pde & PRESENT:
        raise PageFault(f"linear {linear:#x}: PDE not present")
    if pde & PAGE_SIZE_BIT and mode.cr4 & CR4_PSE:
        return (pde & 0xFFC00000) | (linear & 0x3FFFFF)
    pte = mem.read_u32((pde & 0xFFFFF000) + 4 * ((linear >> 12) & 0x3FF))
    if not pte & PRESENT:
        raise PageFault(f"linear {linear:#x}: PTE not present")
    return (pte & 0xFFFFF000) | (linear & 0xFFF)


def read_linear(mem: GuestMemory, mode: PagingMode, linear: int, length: int) -> bytes:
    """Read ``length`` bytes at a linear address, page by page (they may map anywhere)."""
    out = bytearray()
    while length > 0:
        chunk = min(length, 0x1000 - (linear & 0xFFF))
        out += mem.read(translate(mem, mode, linear), chunk)
        linear += chunk
        length -= chunk
    return bytes(out)


def write_linear(mem: GuestMemory, mode: PagingMode, linear: int, data: bytes) -> None:
    pos = 0
    while pos < len(data):
        chunk = min(len(data) - pos, 0x1000 - (linear & 0xFFF))
        mem.write(translate(mem, mode, linear), data[pos : pos + chunk])
        linear += chunk
        pos += chunk
