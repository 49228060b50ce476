"""Loading an ELF ``vmlinux`` (or any static x86_64 ELF executable) into guest RAM.

Each ``PT_LOAD`` segment goes to its physical address ``p_paddr``: ``p_filesz`` bytes copied and the
rest of ``p_memsz`` zeroed (System V ABI, "Program Loading").  For x86_64 vmlinux ``e_entry`` is
already physical: arch/x86/kernel/vmlinux.lds.S says ``ENTRY(phys_startup_64)``, with
``phys_startup_64 = ABSOLUTE(startup_64 - LOAD_OFFSET)``.  The PVH entry point, when the kernel has
one, is the ELF note ``Xen``/``XEN_ELFNOTE_PHYS32_ENTRY`` (include/xen/interface/elfnote.h).
"""

from __future__ import annotations

import io
import struct

from elftools.common.exceptions import ELFError, ELFParseError
from elftools.elf.elffile import ELFFile

from pyvmm.errors import LoaderError
from pyvmm.loader.kernel import LoadedKernel
from pyvmm.memory import GuestMemory

ELF_MAGIC = b"\x7fELF"
XEN_ELFNOTE_PHYS32_ENTRY = 18
# A vmlinux carries no cmdline_size of its own: use what header.S would say, COMMAND_LINE_SIZE - 1
# (arch/x86/include/asm/setup.h: 2048 bytes including the NUL).
X86_CMDLINE_SIZE = 2048 - 1
# arch/x86/boot/header.S: initrd_addr_max is 0x7fffffff for every kernel since protocol 2.03.
ELF_INITRD_ADDR_MAX = 0x7FFFFFFF

_MACHINES = {
    "EM_X86_64": "x86_64",
    "EM_386": "i386",
    "EM_AARCH64": "AArch64",
    "EM_ARM": "ARM",
    "EM_RISCV": "RISC-V",
    "EM_PPC64": "PowerPC 64",
    "EM_PPC": "PowerPC",
    "EM_S390": "s390",
    "EM_MIPS": "MIPS",
    "EM_LOONGARCH": "LoongArch",
}
_NOTE_HDR = struct.Struct("<III")  # namesz, descsz, type (Elf64_Nhdr)


def _machine_name(e_machine: object) -> str:
    if isinstance(e_machine, int):
        return f"e_machine {e_machine}"
    return _MACHINES.get(str(e_machine), str(e_machine).removeprefix("EM_"))


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


def load_elf(mem: GuestMemory, image: bytes, name: str) -> LoadedKernel:
    """Place the ``PT_LOAD`` segments of the ELF ``image`` (from file ``name``) in guest RAM."""
    try:
        return _load(mem, image, name)
    except (ELFError, ELFParseError, struct.error) as e:
        raise LoaderError(f"{name}: corrupt ELF file: {e}") from None


def _load(mem: GuestMemory, image: bytes, name: str) -> LoadedKernel:
    if not image.startswith(ELF_MAGIC):
        raise LoaderError(f"{name}: not an ELF file")
    elf = ELFFile(io.BytesIO(image))
    machine = elf.header["e_machine"]
    if machine != "EM_X86_64":
        raise LoaderError(f"{name}: is an {_machine_name(machine)} kernel; this VMM boots x86_64 kernels")
    if elf.elfclass != 64:
        raise LoaderError(f"{name}: is a 32-bit ELF; an x86_64 kernel is ELFCLASS64")
    if elf.header["e_type"] != "ET_EXEC":
        raise LoaderError(f"{name}: is not an executable ELF ({elf.header['e_type']})")

    loads, pvh_entry = [], None
    for seg in elf.iter_segments():
        ptype = seg["p_type"]
        if ptype == "PT_NOTE" and pvh_entry is None:
            pvh_entry = parse_pvh_note(seg.data())
        if ptype == "PT_LOAD" and seg["p_memsz"] > 0:
            if seg["p_filesz"] > seg["p_memsz"]:
                raise LoaderError(
                    f"{name}: corrupt ELF file: PT_LOAD at {seg['p_paddr']:#x} has p_filesz > p_memsz"
                )
            loads.append(seg)
    if not loads:
        raise LoaderError(f"{name}: ELF file has no loadable segment")
    start = min(seg["p_paddr"] for seg in loads)
    end = max(seg["p_paddr"] + seg["p_memsz"] for seg in loads)
    # Check every segment before writing any, so the error can say how much RAM the kernel needs.
    for seg in loads:
        paddr, memsz = seg["p_paddr"], seg["p_memsz"]
        if not mem.contains(paddr, memsz):
            raise LoaderError(
                f"{name}: segment {paddr:#x}-{paddr + memsz:#x} does not fit in guest RAM "
                f"(the kernel needs at least {_mib(end)} MiB)"
            )
    for seg in loads:
        paddr, filesz, memsz = seg["p_paddr"], seg["p_filesz"], seg["p_memsz"]
        data = seg.data()
        if len(data) != filesz:
            raise LoaderError(f"{name}: truncated ELF file (segment at {paddr:#x})")
        mem.write(paddr, data)
        mem.fill(paddr + filesz, memsz - filesz)
    if pvh_entry is None:
        for sec in elf.iter_sections():
            if sec["sh_type"] == "SHT_NOTE":
                pvh_entry = parse_pvh_note(sec.data())
                if pvh_entry is not None:
                    break

    entry = elf.header["e_entry"]
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
    )


def _mib(n: int) -> int:
    return -(-n // (1 << 20))
