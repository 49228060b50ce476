"""Loading an arm64 Linux ``Image`` (plain, compressed, or in an EFI zboot wrapper) and its initrd.

Follows Documentation/arch/arm64/booting.rst (Documentation/arm64/booting.rst before Linux 6.5),
section 4 "Call the kernel image": the decompressed Image starts with a 64-byte little-endian header::

    u32 code0, code1;    executable code (a branch to stext; "MZ" first when the EFI stub is built in)
    u64 text_offset;     @8:  image load offset from a 2 MiB aligned base
    u64 image_size;      @16: effective size, bss included; 0 before v3.17
    u64 flags;           @24: bit 0 big-endian, bits 1-2 page size, bit 3 physical placement
    u64 res2, res3, res4;
    u32 magic;           @56: 0x644d5241, "ARM\\x64"
    u32 res5;            @60: offset of the PE header (EFI stub)

"The Image must be placed text_offset bytes from a 2MB aligned base address anywhere in usable system
RAM and called there ... At least image_size bytes from the start of the image must be free".  We use
the base of RAM (``layout.RAM_START``, 2 MiB aligned), which also satisfies flag bit 3 = 0 ("as close
as possible to the base of DRAM").  booting.rst section 3: the kernel has no decompressor of its own, so
``Image.gz`` (and the other ``Image.*`` targets of arch/arm64/boot/Makefile) are decompressed here.

Where things go in RAM (see also layout.py): the kernel at the bottom, the device tree at
``layout.fdt_addr()``, the initrd page-aligned just below the device tree.  Putting the initrd high
rather than right after the kernel keeps the memory after the kernel free, which is what booting.rst
asks of loaders of kernels that do not state image_size, and it keeps kernel + initrd + tree inside the
1 GiB aligned window of at most 32 GiB that booting.rst requires to cover both kernel and initrd.
"""

from __future__ import annotations

import os
import struct
import zlib

from pyvmm.arch.aarch64 import layout
from pyvmm.errors import LoaderError
from pyvmm.loader._files import check_file, read_file, read_into
from pyvmm.loader.decompress import MAGICS, decompress
from pyvmm.loader.formats import is_bzimage
from pyvmm.loader.kernel import LoadedKernel
from pyvmm.memory import GuestMemory, MemoryRegion
from pyvmm.record import record

MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZE = 4096

# booting.rst section 4: the header, all fields little-endian.
IMAGE_HEADER = struct.Struct("<IIQQQQQQII")
IMAGE_MAGIC = 0x644D5241  # "ARM\x64"
IMAGE_MAGIC_OFFSET = 56
LEGACY_TEXT_OFFSET = 0x80000  # "Where image_size is zero, text_offset can be assumed to be 0x80000"
FLAG_BE = 1 << 0
FLAG_PAGE_SIZE_SHIFT = 1
FLAG_PAGE_SIZE_MASK = 0b11
FLAG_PHYS_BASE = 1 << 3  # "2MB aligned base may be anywhere in physical memory"
PAGE_SIZES = {0: None, 1: 4 * 1024, 2: 16 * 1024, 3: 64 * 1024}  # flags bits 1-2; 0 = unspecified
# booting.rst: the initrd "must reside entirely within a 1 GB aligned physical memory window of up to
# 32 GB in size that fully covers the kernel Image as well".
INITRD_WINDOW_ALIGN = 1 * GiB
INITRD_WINDOW_SIZE = 32 * GiB
# arch/arm64/include/uapi/asm/setup.h: COMMAND_LINE_SIZE 2048, including the NUL.
CMDLINE_SIZE = 2048 - 1

# drivers/firmware/efi/libstub/zboot-header.S: an EFI zboot image (vmlinuz.efi) starts "MZ\0\0" "zimg",
# then le32 payload offset @8 and le32 payload size @12; the payload is the compressed Image.
_ZBOOT_MAGIC = b"MZ\0\0zimg"
_ZBOOT_FIELDS = struct.Struct("<II")
_ZBOOT_FIELDS_OFFSET = 8
_ELF_MAGIC = b"\x7fELF"
_ELF_MACHINE = struct.Struct("<H")  # e_machine at offset 18 of an ELF header (little-endian files)
_ELF_MACHINES = {3: "i386", 62: "x86_64", 183: "AArch64", 40: "32-bit ARM", 243: "RISC-V"}


@record
class ImageHeader:
    """The fields of an arm64 Image header that a loader acts on (booting.rst section 4)."""

    text_offset: int  # already LEGACY_TEXT_OFFSET when image_size is 0
    image_size: int  # 0 for kernels before v3.17
    flags: int

    @property
    def big_endian(self) -> bool:
        return bool(self.flags & FLAG_BE)

    @property
    def page_size(self) -> int | None:
        """The kernel's page size, or None when the header leaves it unspecified."""
        return PAGE_SIZES[(self.flags >> FLAG_PAGE_SIZE_SHIFT) & FLAG_PAGE_SIZE_MASK]

    @property
    def place_anywhere(self) -> bool:
        return bool(self.flags & FLAG_PHYS_BASE)


def is_aarch64_image(data: bytes) -> bool:
    """True for an uncompressed arm64 Image: the magic at offset 56."""
    return (
        len(data) >= IMAGE_HEADER.size
        and struct.unpack_from("<I", data, IMAGE_MAGIC_OFFSET)[0] == IMAGE_MAGIC
    )


def parse_image_header(data: bytes, name: str = "kernel") -> ImageHeader:
    """The header of the uncompressed Image ``data``; LoaderError if it is not one we can boot."""
    if len(data) < IMAGE_HEADER.size:
        raise LoaderError(
            f"{name}: {len(data)} bytes is too short for the 64-byte arm64 Image header (truncated file?)"
        )
    if not is_aarch64_image(data):
        raise LoaderError(f"{name}: {_not_an_image(data)}")
    _, _, text_offset, image_size, flags, _, _, _, _, _ = IMAGE_HEADER.unpack_from(data, 0)
    if image_size == 0:
        # Before v3.17: flags did not exist and text_offset was in the kernel's endianness.
        return ImageHeader(text_offset=LEGACY_TEXT_OFFSET, image_size=0, flags=0)
    header = ImageHeader(text_offset=text_offset, image_size=image_size, flags=flags)
    if header.big_endian:
        raise LoaderError(
            f"{name}: a big-endian arm64 kernel (Image flags bit 0); pyvmm boots little-endian kernels only"
        )
    return header


def _not_an_image(data: bytes) -> str:
    """Why ``data`` is not an arm64 Image, naming what it looks like instead."""
    if data.startswith(_ELF_MAGIC):
        machine = _ELF_MACHINE.unpack_from(data, 18)[0] if len(data) >= 20 else -1
        arch = _ELF_MACHINES.get(machine, f"e_machine {machine}")
        if machine == 183:
            return "an AArch64 ELF vmlinux, not an Image: boot arch/arm64/boot/Image (or Image.gz) instead"
        return f"an {arch} ELF file, not an arm64 Image"
    if is_bzimage(data):
        return "an x86 bzImage, not an arm64 Image"
    if data.startswith(b"MZ"):
        return "a PE/EFI binary without the arm64 Image magic, not an arm64 Image"
    return f"not an arm64 Image (no magic 'ARM\\x64' at offset {IMAGE_MAGIC_OFFSET})"


def _gunzip_bounded(data: bytes, limit: int, name: str) -> bytes:
    d = zlib.decompressobj(wbits=31)  # a gzip container
    try:
        out = d.decompress(data, limit + 1)  # one byte more than fits tells "too big" from "exact"
    except zlib.error as e:
        raise LoaderError(f"{name}: corrupt gzip data: {e}") from None
    if len(out) > limit:
        raise LoaderError(
            f"{name}: the decompressed kernel is larger than the {limit / MiB:.1f} MiB of guest RAM "
            "available for it: give the guest more memory"
        )
    if not d.eof:
        raise LoaderError(f"{name}: truncated gzip data")
    return out


def unpack_image(data: bytes, name: str = "kernel", limit: int = 1 << 62) -> tuple[str, bytes]:
    """``(format, Image)``: ``data`` itself, or decompressed from ``Image.<comp>`` or an EFI zboot
    image.  Gzip, the common case, is decompressed to at most ``limit`` bytes."""
    if is_aarch64_image(data):
        return "Image", data
    fmt_prefix = "Image"
    payload = data
    if data.startswith(_ZBOOT_MAGIC) and len(data) >= _ZBOOT_FIELDS_OFFSET + _ZBOOT_FIELDS.size:
        off, size = _ZBOOT_FIELDS.unpack_from(data, _ZBOOT_FIELDS_OFFSET)
        if off + size > len(data):
            raise LoaderError(f"{name}: truncated EFI zboot image (payload runs past the end of the file)")
        fmt_prefix, payload = "EFI zboot", data[off : off + size]
    if not any(payload.startswith(m) for m, _ in MAGICS):
        if len(data) < IMAGE_HEADER.size:
            parse_image_header(data, name)  # raises: too short for the header (truncated)
        if fmt_prefix == "EFI zboot":
            raise LoaderError(f"{name}: EFI zboot image with an unknown compression (lzo is not supported)")
        raise LoaderError(f"{name}: {_not_an_image(data)}")
    if payload.startswith(b"\x1f\x8b"):
        fmt, out = "gzip", _gunzip_bounded(payload, limit, name)
    else:
        try:
            fmt, out = decompress(payload)
        except LoaderError as e:
            raise LoaderError(f"{name}: {e}") from None
        if len(out) > limit:
            raise LoaderError(
                f"{name}: the decompressed kernel is larger than the {limit / MiB:.1f} MiB of guest RAM "
                "available for it: give the guest more memory"
            )
    if len(out) >= IMAGE_HEADER.size and not is_aarch64_image(out):
        raise LoaderError(f"{name}: {fmt} data that is {_not_an_image(out)}")
    return f"{fmt_prefix} ({fmt})", out


def _ram_region(mem: GuestMemory, gpa: int) -> MemoryRegion:
    for r in mem.regions:
        if r.gpa <= gpa < r.end:
            return r
    raise LoaderError(f"guest memory has no RAM at {gpa:#x}")


def _align_up(n: int, align: int) -> int:
    return (n + align - 1) & ~(align - 1)


def load_image_data(mem: GuestMemory, data: bytes, name: str = "kernel") -> LoadedKernel:
    """Place the kernel ``data`` (Image, Image.gz, ...) at the 2 MiB aligned base of RAM + text_offset.

    The kernel's whole footprint (image_size, bss included) must end at or below the device tree's slot
    (``layout.fdt_addr``), so that the tree and the initrd can go above it.
    """
    region = _ram_region(mem, layout.RAM_START)
    base = _align_up(region.gpa, layout.KERNEL_ALIGN)
    limit = layout.fdt_addr(region.size)  # the kernel ends below the device tree
    room = max(limit - base, 0)
    fmt, image = unpack_image(data, name, limit=room)
    hdr = parse_image_header(image, name)
    load = base + hdr.text_offset
    # image_size 0: unknown footprint; booting.rst asks to keep memory after the image free, which
    # placing initrd and tree at the top does.
    # A file longer than image_size is normal for a signed kernel: sbsign appends the signature.
    footprint = max(hdr.image_size, _align_up(len(image), PAGE_SIZE))
    end = load + footprint
    if end > limit:
        raise LoaderError(
            f"{name}: the kernel needs {footprint / MiB:.1f} MiB (image_size, bss included) at {load:#x}, "
            f"but only {max(limit - load, 0) / MiB:.1f} MiB of RAM lie below the device tree at "
            f"{limit:#x}: give the guest more memory"
        )
    mem.write(load, image)
    if footprint > len(image):
        mem.fill(load + len(image), footprint - len(image))  # bss: "must be free"; zero it for a reused RAM
    window_start = load & ~(INITRD_WINDOW_ALIGN - 1)
    return LoadedKernel(
        entry=load,  # booting.rst: "placed text_offset bytes from a 2MB aligned base ... and called there"
        format=fmt,
        setup_header=None,
        protocol=None,
        kernel_start=load,
        kernel_end=end,
        initrd_addr_max=window_start + INITRD_WINDOW_SIZE - 1,
        cmdline_size=CMDLINE_SIZE,
    )


def load_image(mem: GuestMemory, path: str | os.PathLike[str]) -> LoadedKernel:
    """Read the arm64 kernel at ``path`` and place it in ``mem`` (see :func:`load_image_data`)."""
    return load_image_data(mem, read_file(path, "kernel"), os.fspath(path))


def place_initrd_aarch64(size: int, kernel_end: int, fdt_addr: int, ram_end: int) -> int:
    """Where an initrd of ``size`` bytes goes: page-aligned just below the device tree at ``fdt_addr``
    and above ``kernel_end``; failing that, at the top of RAM above the tree's slot (still inside the
    32 GiB window of booting.rst).  LoaderError if neither has room."""
    floor = _align_up(kernel_end, PAGE_SIZE)
    below = (fdt_addr - size) & ~(PAGE_SIZE - 1)
    if size <= fdt_addr and below >= floor:
        return below
    window_end = (layout.RAM_START & ~(INITRD_WINDOW_ALIGN - 1)) + INITRD_WINDOW_SIZE
    top = min(ram_end, window_end)
    above = (top - size) & ~(PAGE_SIZE - 1)
    if size <= top and above >= fdt_addr + layout.FDT_MAX_SIZE:
        return above
    needed = _align_up(floor - layout.RAM_START + _align_up(size, PAGE_SIZE) + layout.FDT_MAX_SIZE, 2 * MiB)
    raise LoaderError(
        f"initrd of {size / MiB:.1f} MiB does not fit in guest RAM between the kernel (ending at "
        f"{kernel_end:#x}) and the device tree at {fdt_addr:#x}: the guest needs at least "
        f"{needed // MiB} MiB of RAM"
    )


def load_initrd_aarch64(
    mem: GuestMemory, path: str | os.PathLike[str], kernel_end: int, fdt_addr: int
) -> tuple[int, int]:
    """Read the initrd at ``path`` into guest RAM (see :func:`place_initrd_aarch64`): ``(start, end)``,
    end exclusive, as ``/chosen/linux,initrd-start`` and ``linux,initrd-end`` want them."""
    size = check_file(path, "initrd")
    ram_end = _ram_region(mem, fdt_addr).end
    addr = place_initrd_aarch64(size, kernel_end, fdt_addr, ram_end)
    read_into(path, "initrd", mem.view(addr, size))
    return addr, addr + size
