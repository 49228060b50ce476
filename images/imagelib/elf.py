"""The few ELF facts the image scripts check, read with ``struct`` (System V gABI; ELF64 little-endian).

- ``elf_notes``: the notes of the PT_NOTE segments (the x86 guest's PVH entry note).
- ``elf_machine``: e_machine (is a binary really aarch64?).
- ``elf_section``: one section's bytes by name (``.modinfo``, ``.dynamic``, ``.dynstr``).
- ``elf_needed``: the DT_NEEDED shared libraries.
"""

from __future__ import annotations

import struct
from pathlib import Path

from imagelib.cache import BuildError

EM_AARCH64 = 183
PT_NOTE = 4
DT_NULL, DT_NEEDED = 0, 1
XEN_ELFNOTE_PHYS32_ENTRY = 18  # include/xen/interface/elfnote.h


def elf_notes(path: Path) -> list[tuple[str, int, bytes]]:
    """(owner, type, desc) of every note in the PT_NOTE segments of an ELF64 little-endian file."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BuildError(f"{path} is not an ELF64 little-endian file")
    (e_phoff,) = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    notes = []
    for i in range(e_phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, e_phoff + i * e_phentsize
        )
        if p_type != PT_NOTE:
            continue
        off, end = p_offset, p_offset + p_filesz
        while off + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, off)
            off += 12
            name = data[off : off + namesz].rstrip(b"\0").decode(errors="replace")
            off += (namesz + 3) & ~3
            desc = data[off : off + descsz]
            off += (descsz + 3) & ~3
            notes.append((name, ntype, desc))
    return notes


def elf_machine(data: bytes) -> int | None:
    if data[:4] != b"\x7fELF" or len(data) < 20:
        return None
    machine: int = struct.unpack_from("<H", data, 18)[0]
    return machine


def elf_section(data: bytes, wanted: str) -> bytes:
    """The contents of one section of an ELF64 little-endian file (b"" if there is none)."""
    (e_shoff,) = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
    strtab_off = headers[e_shstrndx][4]
    for sh_name, _type, _flags, _addr, off, size in headers:
        end = data.index(b"\0", strtab_off + sh_name)
        if data[strtab_off + sh_name : end].decode() == wanted:
            return data[off : off + size]
    return b""


def elf_needed(data: bytes) -> list[str]:
    """The DT_NEEDED entries (shared libraries) of an ELF64 little-endian file."""
    dynamic, dynstr = elf_section(data, ".dynamic"), elf_section(data, ".dynstr")
    needed = []
    for off in range(0, len(dynamic) - 15, 16):
        tag, val = struct.unpack_from("<qQ", dynamic, off)
        if tag == DT_NULL:
            break
        if tag == DT_NEEDED:
            needed.append(dynstr[val : dynstr.index(b"\0", val)].decode())
    return needed
