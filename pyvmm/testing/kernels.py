"""Synthetic kernel images for loader tests: a minimal ELF64 executable and a bzImage wrapping it.

Built with ``struct`` from the specs (System V gABI ELF header / program header / note layouts;
Documentation/arch/x86/boot.rst for the bzImage header), so no binaries live in git.  The compressors
reproduce what Linux's scripts/Makefile.lib does, including the 4-byte size appended to each payload
and the LZ4 *legacy* frame (``lz4 -l``).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
from collections.abc import Sequence

import lz4.block
import zstandard

from pyvmm.arch.x86_64.bootparams import (
    BOOT_FLAG_MAGIC,
    HDRS_MAGIC,
    LOADED_HIGH,
    SETUP_HEADER_OFFSET,
    XLF_CAN_BE_LOADED_ABOVE_4G,
    XLF_KERNEL_64,
    setup_header,
)

EM_X86_64 = 62
EM_AARCH64 = 183
EM_386 = 3
ET_EXEC = 2
PT_LOAD = 1
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18
LZ4_LEGACY_MAGIC = 0x184C2102

_EHDR64 = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR64 = struct.Struct("<IIQQQQQQ")
_EHDR32 = struct.Struct("<16sHHIIIIIHHHHHH")
_SHDR64 = struct.Struct("<IIQQQQIIQQ")
SHT_PROGBITS, SHT_STRTAB = 1, 3
KERNEL_PARAM_SIZE = 40  # include/linux/moduleparam.h struct kernel_param, 64-bit


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)

    return struct.pack("<III", len(name) + 1, len(desc), ntype) + pad(name + b"\0") + pad(desc)


def make_elf(
    segments: Sequence[tuple[int, bytes, int]],
    entry: int,
    *,
    machine: int = EM_X86_64,
    pvh_entry: int | None = None,
    pvh_desc_size: int = 8,
    e_type: int = ET_EXEC,
    params: Sequence[str] | None = None,
) -> bytes:
    """An ELF64 executable; ``segments`` are ``(paddr, file data, memsz)``, vaddr = paddr + 2 GiB.

    ``params``: a ``__param`` section (and the section header table that names it) whose entries point at
    these names, in one more segment after the others, as a kernel's built-in parameters."""
    if params is not None:
        names = b"".join(n.encode() + b"\0" for n in params)
        at = max(paddr + memsz for paddr, _, memsz in segments) if segments else 0x1000000
        at += -at % 0x1000
        segments = [*segments, (at, names, len(names))]
    notes = b""
    if pvh_entry is not None:
        notes = _note(b"Xen", 18, pvh_entry.to_bytes(pvh_desc_size, "little"))
        notes = _note(b"GNU", 3, b"\x01" * 20) + notes  # another note first, as in a real vmlinux
    nph = len(segments) + (1 if notes else 0)
    off = _EHDR64.size + nph * _PHDR64.size
    body = bytearray()
    phdrs = []
    for paddr, data, memsz in segments:
        off_aligned = off + (-off % 16)
        body += b"\0" * (off_aligned - off) + data
        phdrs.append(_PHDR64.pack(PT_LOAD, 7, off_aligned, paddr + (2 << 30), paddr, len(data), memsz, 16))
        off = off_aligned + len(data)
    if notes:
        phdrs.append(_PHDR64.pack(PT_NOTE, 4, off, 0, 0, len(notes), len(notes), 4))
        body += notes
        off += len(notes)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    shoff = shnum = shstrndx = 0
    if params is not None:
        # Section headers: [0] null, [1] __param, [2] .shstrtab; the tables follow the segments.
        vaddr = segments[-1][0] + (2 << 30)
        table, offset = bytearray(), 0
        for name in params:
            table += struct.pack("<Q", vaddr + offset) + bytes(KERNEL_PARAM_SIZE - 8)
            offset += len(name) + 1
        shstrtab = b"\0__param\0.shstrtab\0"
        param_off = off
        shstr_off = param_off + len(table)
        shoff = shstr_off + len(shstrtab) + (-(shstr_off + len(shstrtab)) % 8)
        body += bytes(table) + shstrtab + bytes(shoff - shstr_off - len(shstrtab))
        body += bytes(_SHDR64.size)
        body += _SHDR64.pack(1, SHT_PROGBITS, 2, 0, param_off, len(table), 0, 0, 8, 0)
        body += _SHDR64.pack(9, SHT_STRTAB, 0, 0, shstr_off, len(shstrtab), 0, 0, 1, 0)
        shnum, shstrndx = 3, 2
    ehdr = _EHDR64.pack(
        ident, e_type, machine, 1, entry, _EHDR64.size, shoff, 0, _EHDR64.size, _PHDR64.size, nph,
        _SHDR64.size, shnum, shstrndx
    )
    return ehdr + b"".join(phdrs) + bytes(body)


def make_elf32(entry: int = 0x100000, machine: int = EM_386) -> bytes:
    """A header-only ELF32 executable (for the wrong-class error)."""
    ident = b"\x7fELF" + bytes([1, 1, 1, 0]) + b"\0" * 8
    return _EHDR32.pack(ident, ET_EXEC, machine, 1, entry, 0, 0, 0, _EHDR32.size, 32, 0, 40, 0, 0)


def lz4_legacy(data: bytes, block_size: int = 8 << 20) -> bytes:
    """The LZ4 legacy frame: magic, then ``[le32 size][block]`` for each chunk of ``block_size``."""
    out = [struct.pack("<I", LZ4_LEGACY_MAGIC)]
    for i in range(0, len(data), block_size):
        block = lz4.block.compress(data[i : i + block_size], store_size=False, mode="high_compression")
        out.append(struct.pack("<I", len(block)) + block)
    return b"".join(out)


def compress(fmt: str, data: bytes, *, size_append: bool = True) -> bytes:
    """``data`` compressed as Linux's build does for a bzImage payload of format ``fmt``."""
    if fmt == "gzip":
        c = gzip.compress(data, 9)
    elif fmt == "bzip2":
        c = bz2.compress(data, 9)
    elif fmt == "xz":
        c = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    elif fmt == "lzma":
        c = lzma.compress(data, format=lzma.FORMAT_ALONE)
    elif fmt == "lz4":
        c = lz4_legacy(data)
    elif fmt == "zstd":
        c = zstandard.ZstdCompressor(level=19, write_checksum=True).compress(data)  # the zstd CLI's default
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return c + (struct.pack("<I", len(data)) if size_append else b"")


def make_bzimage(
    payload: bytes,
    *,
    protocol: int = 0x020F,
    setup_sects: int = 4,
    loadflags: int = LOADED_HIGH,
    xloadflags: int = XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G,
    relocatable: bool = True,
    kernel_alignment: int = 0x200000,
    pref_address: int = 0x1000000,
    init_size: int = 0x800000,
    initrd_addr_max: int = 0x7FFFFFFF,
    cmdline_size: int = 2047,
    payload_at: int = 0x300,
) -> bytes:
    """A bzImage: boot sector + setup header, ``setup_sects`` sectors, then the protected-mode part
    with ``payload`` at ``payload_at`` (offset inside the protected-mode part), then a CRC slot."""
    setup = bytearray((setup_sects or 4) * 512 + 512)
    pm = bytearray(b"\x90" * payload_at) + payload + b"\0\0\0\0"
    hdr = setup_header()
    hdr.setup_sects = setup_sects
    hdr.syssize = (len(pm) + 15) // 16
    hdr.boot_flag = BOOT_FLAG_MAGIC
    hdr.jump = 0xEB | ((0x26C - 0x202) << 8)  # jmp short over the header: its end is 0x202 + byte 0x201
    hdr.header = HDRS_MAGIC
    hdr.version = protocol
    hdr.kernel_version = 0x1000
    hdr.loadflags = loadflags
    hdr.code32_start = 0x100000
    hdr.initrd_addr_max = initrd_addr_max
    hdr.kernel_alignment = kernel_alignment
    hdr.relocatable_kernel = int(relocatable)
    hdr.min_alignment = 21
    hdr.xloadflags = xloadflags
    hdr.cmdline_size = cmdline_size
    hdr.payload_offset = payload_at
    hdr.payload_length = len(payload)
    hdr.pref_address = pref_address
    hdr.init_size = init_size
    raw = bytes(hdr)
    setup[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + len(raw)] = raw
    return bytes(setup) + bytes(pm)
