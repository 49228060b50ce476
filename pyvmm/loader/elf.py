"""Loading an ELF ``vmlinux`` (or any static x86_64 ELF executable) into guest RAM.

Each ``PT_LOAD`` segment goes to its physical address ``p_paddr``: ``p_filesz`` bytes copied and the
rest of ``p_memsz`` zeroed (System V ABI, "Program Loading").  For x86_64 vmlinux ``e_entry`` is
already physical: arch/x86/kernel/vmlinux.lds.S says ``ENTRY(phys_startup_64)``, with
``phys_startup_64 = ABSOLUTE(startup_64 - LOAD_OFFSET)``.  The PVH entry point, when the kernel has
one, is the ELF note ``Xen``/``XEN_ELFNOTE_PHYS32_ENTRY`` (include/xen/interface/elfnote.h).

The kernel's built-in parameters (``builtin_params``) are the names in its ``__param`` section: one
``struct kernel_param`` per ``module_param()`` of the kernel and of every driver built into it
(include/linux/moduleparam.h), whose first member points at the name, e.g. ``virtio_mmio.device``.
The builder reads them to know what a kernel takes on its command line.

The headers are read with ``struct`` (layouts: System V gABI, "ELF Header", "Program Header", "Section
Header"; include/uapi/linux/elf.h ``Elf64_Ehdr``/``Elf64_Phdr``/``Elf64_Shdr``): loading needs a few
fields of them, and a full ELF library costs more start-up time than the whole VM build.
"""

from __future__ import annotations

import mmap
import struct

from pyvmm.errors import LoaderError
from pyvmm.loader.formats import ELF_MAGIC
from pyvmm.loader.kernel import LoadedKernel
from pyvmm.memory import GuestMemory
from pyvmm.statictypes import NamedTuple

XEN_ELFNOTE_PHYS32_ENTRY = 18
# A vmlinux carries no cmdline_size of its own: use what header.S would say, COMMAND_LINE_SIZE - 1
# (arch/x86/include/asm/setup.h: 2048 bytes including the NUL).
X86_CMDLINE_SIZE = 2048 - 1
# arch/x86/boot/header.S: initrd_addr_max is 0x7fffffff for every kernel since protocol 2.03.
ELF_INITRD_ADDR_MAX = 0x7FFFFFFF

# e_machine values (gABI; include/uapi/linux/elf-em.h) named in errors about kernels of another kind.
EM_X86_64 = 62
_MACHINES = {3: "i386", 8: "MIPS", 20: "PowerPC", 21: "PowerPC 64", 22: "s390", 40: "ARM", 62: "x86_64",
             183: "AArch64", 243: "RISC-V", 258: "LoongArch"}
ET_EXEC = 2
ELFCLASS64 = 2
PT_LOAD, PT_NOTE = 1, 4
SHT_NOTE = 7
# Elf64_Ehdr after e_ident[16]: e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags, e_ehsize,
# e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
_EHDR = struct.Struct("<HHIQQQIHHHHHH")
# Elf64_Phdr: p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
_PHDR = struct.Struct("<IIQQQQQQ")
# Elf64_Shdr: sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info, sh_addralign,
# sh_entsize
_SHDR = struct.Struct("<IIQQQQIIQQ")
_EI_NIDENT = 16


class _Corrupt(Exception):
    """A header or table that points outside the file."""


class _Segment(NamedTuple):
    ptype: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int


# include/linux/moduleparam.h, struct kernel_param on a 64-bit kernel: const char *name; struct module *mod;
# const struct kernel_param_ops *ops; u16 perm; s8 level; u8 flags; (4 bytes of padding) union { void *arg;
# ... }: 40 bytes, aligned to the pointer size in the section "__param".
KERNEL_PARAM_SIZE = 40
PARAM_NAME_MAX = 256  # longer than any parameter name; a name without its NUL in that range is not one


_NOTE_HDR = struct.Struct("<III")  # namesz, descsz, type (Elf64_Nhdr)


def _machine_name(e_machine: int) -> str:
    return _MACHINES.get(e_machine, f"e_machine {e_machine}")


def _align4(n: int) -> int:
    return (n + 3) & ~3


def parse_pvh_note(notes: bytes) -> int | None:
    """The PVH entry point from the contents of a note segment/section, or None."""
    off = 0
    while off + _NOTE_HDR.size <= len(notes):
        namesz, descsz, ntype = _NOTE_HDR.unpack_from(notes, off)
        name_off = off + _NOTE_HDR.size
        desc_off = name_off + _align4(namesz)
        end = desc_off + _align4(descsz)
        if desc_off + descsz > len(notes):
            break
        name = notes[name_off : name_off + namesz].rstrip(b"\0")
        if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and descsz in (4, 8):
            # Linux emits it with _ASM_PTR (8 bytes on x86_64); the value is a 32-bit physical address.
            return int.from_bytes(notes[desc_off : desc_off + descsz], "little")
        off = end
    return None


def load_elf(mem: GuestMemory, image: bytes | mmap.mmap, name: str) -> LoadedKernel:
    """Place the ``PT_LOAD`` segments of the ELF ``image`` (from file ``name``; its bytes, or the file mapped)
    in guest RAM."""
    try:
        return _load(mem, image, name)
    except (_Corrupt, struct.error) as e:
        raise LoaderError(f"{name}: corrupt ELF file: {e}") from None


def _slice(image: bytes | mmap.mmap, offset: int, size: int, what: str) -> bytes:
    if offset < 0 or size < 0 or offset + size > len(image):
        raise _Corrupt(f"{what} at {offset:#x}+{size:#x} is past the end of the file ({len(image):#x} bytes)")
    return image[offset : offset + size]


def _table(image: bytes | mmap.mmap, offset: int, count: int, entsize: int, layout: struct.Struct,
           what: str) -> list[tuple[int, ...]]:
    if count and entsize < layout.size:
        raise _Corrupt(f"{what} entries of {entsize} bytes (at least {layout.size} expected)")
    raw = _slice(image, offset, count * entsize, what)
    return [layout.unpack_from(raw, i * entsize) for i in range(count)]


def _load(mem: GuestMemory, image: bytes | mmap.mmap, name: str) -> LoadedKernel:
    if image[:len(ELF_MAGIC)] != ELF_MAGIC:
        raise LoaderError(f"{name}: not an ELF file")
    ident = _slice(image, 0, _EI_NIDENT, "ELF identification")
    # e_machine sits at the same offset in both classes; read it in the file's byte order (EI_DATA).
    machine = int.from_bytes(_slice(image, 18, 2, "ELF header"), "big" if ident[5] == 2 else "little")
    if machine != EM_X86_64:
        raise LoaderError(f"{name}: is an {_machine_name(machine)} kernel; this VMM boots x86_64 kernels")
    if ident[4] != ELFCLASS64:
        raise LoaderError(f"{name}: is a 32-bit ELF; an x86_64 kernel is ELFCLASS64")
    (e_type, _machine, _version, entry, phoff, shoff, _flags, _ehsize, phentsize, phnum, shentsize, shnum,
     shstrndx) = _EHDR.unpack_from(_slice(image, _EI_NIDENT, _EHDR.size, "ELF header"))
    if e_type != ET_EXEC:
        raise LoaderError(f"{name}: is not an executable ELF (e_type {e_type})")

    segments = [_Segment(p[0], p[2], p[3], p[4], p[5], p[6])
                for p in _table(image, phoff, phnum, phentsize, _PHDR, "program header table")]
    loads, pvh_entry = [], None
    for seg in segments:
        if seg.ptype == PT_NOTE and pvh_entry is None:
            pvh_entry = parse_pvh_note(_slice(image, seg.offset, seg.filesz, "note segment"))
        if seg.ptype == PT_LOAD and seg.memsz > 0:
            if seg.filesz > seg.memsz:
                raise LoaderError(f"{name}: corrupt ELF file: PT_LOAD at {seg.paddr:#x} has p_filesz > p_memsz")
            loads.append(seg)
    if not loads:
        raise LoaderError(f"{name}: ELF file has no loadable segment")
    start = min(seg.paddr for seg in loads)
    end = max(seg.paddr + seg.memsz for seg in loads)
    # Check every segment before writing any, so the error can say how much RAM the kernel needs.
    for seg in loads:
        if not mem.contains(seg.paddr, seg.memsz):
            raise LoaderError(
                f"{name}: segment {seg.paddr:#x}-{seg.paddr + seg.memsz:#x} does not fit in guest RAM "
                f"(the kernel needs at least {_mib(end)} MiB)"
            )
    for seg in loads:
        if seg.offset + seg.filesz > len(image):
            raise LoaderError(f"{name}: truncated ELF file (segment at {seg.paddr:#x})")
        mem.write(seg.paddr, memoryview(image)[seg.offset : seg.offset + seg.filesz])
        mem.fill(seg.paddr + seg.filesz, seg.memsz - seg.filesz)
    sections = _table(image, shoff, shnum, shentsize, _SHDR, "section header table") if shnum else []
    if pvh_entry is None:
        for sh in sections:
            if sh[1] == SHT_NOTE:
                pvh_entry = parse_pvh_note(_slice(image, sh[4], sh[5], "note section"))
                if pvh_entry is not None:
                    break

    if not start <= entry < end:
        raise LoaderError(f"{name}: entry point {entry:#x} is outside the loaded segments")
    return LoadedKernel(
        entry=entry,
        format="elf",
        setup_header=None,
        protocol=None,
        kernel_start=start,
        kernel_end=end,
        initrd_addr_max=ELF_INITRD_ADDR_MAX,
        cmdline_size=X86_CMDLINE_SIZE,
        pvh_entry=pvh_entry,
        builtin_params=_builtin_params(image, sections, shstrndx, loads),
    )


def _builtin_params(image: bytes | mmap.mmap, sections: list[tuple[int, ...]], shstrndx: int,
                    loads: list[_Segment]) -> frozenset[str] | None:
    """The names in the ``__param`` section (module docstring); None when the file has no such section or
    its entries do not point at names in the loaded segments (not a Linux kernel, or a corrupt one)."""
    if not 0 < shstrndx < len(sections):
        return None
    names = sections[shstrndx]
    param = next((sh for sh in sections
                  if _c_string(image, names[4] + sh[0], min(names[5] - sh[0], PARAM_NAME_MAX)) == b"__param"),
                 None)
    if param is None or param[5] % KERNEL_PARAM_SIZE:
        return None
    table = _slice(image, param[4], param[5], "__param section")
    found = set()
    for at in range(0, len(table), KERNEL_PARAM_SIZE):
        pointer = int.from_bytes(table[at : at + 8], "little")
        seg = next((s for s in loads if s.vaddr <= pointer < s.vaddr + s.filesz), None)
        name = None if seg is None else _c_string(image, seg.offset + pointer - seg.vaddr,
                                                   min(seg.vaddr + seg.filesz - pointer, PARAM_NAME_MAX))
        if not name:
            return None
        found.add(name.decode("ascii", "replace"))
    return frozenset(found)


def _c_string(image: bytes | mmap.mmap, offset: int, limit: int) -> bytes | None:
    """The NUL-terminated string at ``offset``, if it ends within ``limit`` bytes and the file."""
    if offset < 0 or limit <= 0:
        return None
    raw = image[offset : offset + limit]
    end = raw.find(b"\0")
    return raw[:end] if end >= 0 else None


def _mib(n: int) -> int:
    return -(-n // (1 << 20))
