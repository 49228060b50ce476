"""Kernel symbols for reports: a guest address -> ``name+0xoffset``.

Where the names come from, in this order:

- the kernel file itself, when it is an ELF with a ``.symtab`` (an unstripped ``vmlinux``; the symbol table
  layout is the System V gABI's ``Elf64_Sym``): functions, data objects and untyped symbols (assembler
  labels such as ``startup_64``) defined in an allocated section;
- a ``System.map`` next to the kernel file: ``System.map`` in the same directory, or ``System.map-VERSION``
  beside ``vmlinuz-VERSION`` / ``vmlinux-VERSION`` (Debian's ``/boot``).  Its lines are ``nm -n`` output,
  ``ADDRESS TYPE NAME``; absolute (``A``) symbols name no code and are left out.

Nothing is read until a report asks (:class:`KernelSymbols`): a vmlinux has tens of thousands of symbols
and start-up must not pay for them.

An address belongs to the nearest symbol at or below it, up to the next symbol (for ELF also the end of
the symbol's section), as kallsyms decides for the kernel's own oops messages.  Of several symbols at one
address the name kept is the one scripts/kallsyms.c's ``compare_symbols()`` sorts first: a strong symbol
before a weak one, a name the linker script made up (``__start_*``, ``*_end`` ...) last, then fewer leading
underscores (so ``startup_64``, not ``_text``).  Symbols below ``_text`` (the x86_64 per-CPU area, linked
at 0) are left out.

Until the kernel switches to its virtual mapping it runs at physical addresses (pyvmm enters a vmlinux at
its physical entry point), so an address no symbol covers is tried once more, translated to the kernel's
virtual address: through the ``PT_LOAD`` program headers (``p_paddr`` -> ``p_vaddr``) of an ELF, or, for a
System.map, by the distance between ``startup_64`` and ``phys_startup_64`` (arch/x86/kernel/vmlinux.lds.S:
``phys_startup_64 = ABSOLUTE(startup_64 - LOAD_OFFSET)``).
"""

from __future__ import annotations

import bisect
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pyelftools is imported when symbols are first read (a stop report), not at start-up
    from elftools.elf.elffile import ELFFile

ELF_MAGIC = b"\x7fELF"
_ELF64_SYM = struct.Struct("<IBBHQQ")  # st_name, st_info, st_other, st_shndx, st_value, st_size
_STT_NOTYPE, _STT_OBJECT, _STT_FUNC = 0, 1, 2
_STB_WEAK = 2
_SHN_LORESERVE = 0xFF00  # UNDEF is 0; ABS, COMMON, XINDEX ... lie at and above this
_SHF_ALLOC = 0x2
_MAP_SKIP = frozenset("AaUN?")  # System.map types: absolute, undefined, debugging, unknown
_MAP_WEAK = frozenset("WwVv")

# (address, name, weak, end of its section or None)
Entry = tuple[int, str, bool, int | None]


def _linker_provided(name: str) -> bool:
    """scripts/kallsyms.c may_be_linker_script_provide_symbol(): a guess from the name alone."""
    if len(name) < 8 or not name.startswith("__"):
        return False
    return name.startswith(("__start_", "__stop_", "__end_")) or name.endswith(("_start", "_end"))


def _rank(name: str, weak: bool) -> tuple[bool, bool, int]:
    return weak, _linker_provided(name), len(name) - len(name.lstrip("_"))


class SymbolTable:
    """Sorted, non-overlapping ``[start, end)`` ranges, each with one name."""

    def __init__(self, starts: list[int], ends: list[int], names: list[str], by_name: dict[str, int],
                 translations: list[tuple[int, int, int]]) -> None:
        self._starts = starts
        self._ends = ends
        self._names = names
        self._by_name = by_name
        self._translations = translations  # (physical start, size, virtual start)

    @classmethod
    def build(cls, entries: Iterable[Entry | tuple[int, str]], *, end: int | None = None,
              translations: Iterable[tuple[int, int, int]] = ()) -> SymbolTable:
        """A table from ``(address, name[, weak, section end])``; ``end`` bounds the last symbol (without it
        or a section end, the last symbol covers its own address only)."""
        full = [e if len(e) == 4 else (e[0], e[1], False, None) for e in entries]
        text = next((e[0] for e in full if e[1] == "_text"), None)
        if text is not None:
            full = [e for e in full if e[0] >= text]
        by_name: dict[str, int] = {}
        for addr, name, *_ in full:
            by_name.setdefault(name, addr)
        order = sorted(range(len(full)), key=lambda i: (full[i][0], _rank(full[i][1], full[i][2]), i))
        starts: list[int] = []
        names: list[str] = []
        limits: list[int | None] = []
        for i in order:
            addr, name, _, limit = full[i]
            if starts and starts[-1] == addr:
                continue  # an alias: the first in kallsyms order was kept
            starts.append(addr)
            names.append(name)
            limits.append(limit)
        ends = []
        for k, (addr, limit) in enumerate(zip(starts, limits, strict=True)):
            nxt = starts[k + 1] if k + 1 < len(starts) else end
            bounds = [b for b in (nxt, limit) if b is not None]
            ends.append(min(bounds) if bounds else addr + 1)
        return cls(starts, ends, names, by_name, list(translations))

    def __len__(self) -> int:
        return len(self._starts)

    def address(self, name: str) -> int | None:
        """The address of the symbol ``name`` (aliases included), or None."""
        return self._by_name.get(name)

    def lookup(self, addr: int) -> str | None:
        """``name+0xoffset`` for ``addr`` (a virtual address, or a physical one inside the kernel image)."""
        hit = self._find(addr)
        if hit is None:
            for phys, size, virt in self._translations:
                if phys <= addr < phys + size:
                    hit = self._find(addr - phys + virt)
                    break
        return None if hit is None else f"{hit[0]}+{hit[1]:#x}"

    def _find(self, addr: int) -> tuple[str, int] | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0 or addr >= self._ends[i]:
            return None
        return self._names[i], addr - self._starts[i]


def read_system_map(path: str | os.PathLike[str]) -> SymbolTable:
    """The symbols of a ``System.map`` (``nm -n`` lines; others are skipped).  OSError if unreadable."""
    entries: list[Entry] = []
    absolute: dict[str, int] = {}
    with open(path, encoding="ascii", errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3 or len(parts[1]) != 1:
                continue
            try:
                addr = int(parts[0], 16)
            except ValueError:
                continue
            kind, name = parts[1], parts[2]
            if kind in "Aa":
                absolute[name] = addr
            if kind not in _MAP_SKIP:
                entries.append((addr, name, kind in _MAP_WEAK, None))
    translations = []
    startup = next((addr for addr, name, *_ in entries if name == "startup_64"), None)
    phys = absolute.get("phys_startup_64")
    if startup is not None and phys is not None and entries:
        top = max(addr for addr, *_ in entries)
        translations.append((phys, top - startup, startup))
    return SymbolTable.build(entries, translations=translations)


def read_elf_symbols(path: str | os.PathLike[str]) -> SymbolTable | None:
    """The symbols of an ELF64 little-endian file's ``.symtab``; None when the file is not such an ELF, has
    no symbol table (stripped) or cannot be read."""
    from elftools.common.exceptions import ELFError, ELFParseError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            if f.read(4) != ELF_MAGIC:
                return None
            f.seek(0)
            return _elf_table(ELFFile(f))
    except (OSError, ELFError, ELFParseError, struct.error, ValueError, IndexError):
        return None


def _elf_table(elf: ELFFile) -> SymbolTable | None:
    if elf.elfclass != 64 or not elf.little_endian:
        return None
    symtab = elf.get_section_by_name(".symtab")
    if symtab is None or symtab["sh_entsize"] != _ELF64_SYM.size:
        return None
    sections = [(s["sh_addr"], s["sh_size"], s["sh_flags"]) for s in elf.iter_sections()]
    strtab = elf.get_section(symtab["sh_link"]).data()
    entries: list[Entry] = []
    for st_name, st_info, _, shndx, value, _ in _ELF64_SYM.iter_unpack(symtab.data()):
        if st_info & 0xF not in (_STT_NOTYPE, _STT_OBJECT, _STT_FUNC) or not 0 < shndx < _SHN_LORESERVE:
            continue
        if shndx >= len(sections):
            continue
        sec_addr, sec_size, flags = sections[shndx]
        if not flags & _SHF_ALLOC or not sec_addr <= value < sec_addr + sec_size:
            continue  # not in memory, or a marker at its section's end (_etext, _edata, ...)
        name = strtab[st_name : strtab.find(b"\0", st_name)].decode(errors="replace")
        if name and not name.startswith(("$", ".L")):
            entries.append((value, name, st_info >> 4 == _STB_WEAK, sec_addr + sec_size))
    if not entries:
        return None
    translations = [(seg["p_paddr"], seg["p_memsz"], seg["p_vaddr"]) for seg in elf.iter_segments()
                    if seg["p_type"] == "PT_LOAD" and seg["p_paddr"] != seg["p_vaddr"]]
    return SymbolTable.build(entries, translations=translations)


def find_system_map(kernel: str | os.PathLike[str]) -> Path | None:
    """The System.map that belongs to the kernel file ``kernel``, if one lies next to it."""
    k = Path(kernel)
    candidates = [k.with_name("System.map-" + k.name[len(prefix):])
                  for prefix in ("vmlinuz-", "vmlinux-") if k.name.startswith(prefix)]
    candidates.append(k.with_name("System.map"))
    return next((p for p in candidates if p.is_file()), None)


class KernelSymbols:
    """The symbols of the kernel file ``kernel``, read on the first :meth:`lookup` (never before)."""

    def __init__(self, kernel: str | os.PathLike[str]) -> None:
        self.kernel = Path(kernel)
        self.source: str | None = None  # where the symbols came from, once loaded
        self._table: SymbolTable | None = None
        self._loaded = False

    def lookup(self, addr: int) -> str | None:
        table = self._load()
        return None if table is None else table.lookup(addr)

    def _load(self) -> SymbolTable | None:
        if not self._loaded:
            self._loaded = True
            self._table = read_elf_symbols(self.kernel)
            if self._table is not None:
                self.source = f"{self.kernel} (ELF symbol table)"
            else:
                sysmap = find_system_map(self.kernel)
                if sysmap is not None:
                    try:
                        table = read_system_map(sysmap)
                    except OSError:
                        table = None
                    if table is not None and len(table):
                        self._table, self.source = table, str(sysmap)
        return self._table
