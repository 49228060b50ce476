"""arm64 Image loading (Documentation/arch/arm64/booting.rst section 4) and initrd placement, on synthetic
Images built here: header fields, compressed forms, the errors a person sees, and where bytes land."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.arch.aarch64 import layout
from pyvmm.arch.aarch64.image import (
    CMDLINE_SIZE,
    IMAGE_MAGIC,
    LEGACY_TEXT_OFFSET,
    load_image,
    load_image_data,
    load_initrd_aarch64,
    parse_image_header,
    place_initrd_aarch64,
)
from pyvmm.errors import LoaderError
from pyvmm.memory import GuestMemory
from pyvmm.testing.kernels import EM_AARCH64, compress, make_bzimage, make_elf

MiB = 1 << 20
GiB = 1 << 30
RAM = layout.RAM_START
# flags: little-endian, 4K pages (1 << 1), may be placed anywhere (1 << 3): what a v6.x defconfig has
FLAGS_4K_ANYWHERE = 0b1010


def make_image(
    body: bytes = bytes(range(256)) * 16,
    *,
    text_offset: int = 0,
    image_size: int | None = None,
    flags: int = FLAGS_4K_ANYWHERE,
    magic: int = IMAGE_MAGIC,
) -> bytes:
    """A 64-byte arm64 Image header (booting.rst section 4) followed by ``body``."""
    total = 64 + len(body)
    size = total + 0x3000 if image_size is None else image_size  # some "bss" by default
    header = struct.pack(
        "<IIQQQQQQII", 0x91005A4D, 0x14000000, text_offset, size, flags, 0, 0, 0, magic, 0x40
    )
    return header + body


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.single(64 * MiB, gpa=RAM)
    yield m
    m.close()


def test_image_is_loaded_at_the_ram_base_plus_text_offset(mem: GuestMemory) -> None:
    image = make_image(text_offset=0x80000)
    mem.fill(RAM, 8 * MiB, 0xAA)  # stale RAM: the bss must come back zeroed
    k = load_image_data(mem, image, "Image")
    assert k.entry == k.kernel_start == RAM + 0x80000
    assert mem.read(k.entry, len(image)) == image
    size = len(image) + 0x3000
    assert k.kernel_end == k.entry + size
    assert mem.read(k.entry + len(image), size - len(image)) == bytes(size - len(image))
    assert mem.read(k.kernel_end, 1) == b"\xaa"  # nothing past the footprint touched
    assert mem.read(RAM, 1) == b"\xaa"  # nor below text_offset
    assert k.format == "Image"
    assert k.setup_header is None and k.protocol is None
    assert k.cmdline_size == CMDLINE_SIZE == 2047
    assert k.initrd_addr_max == RAM + 32 * GiB - 1  # the 1 GiB aligned 32 GiB window from the kernel


def test_header_fields() -> None:
    hdr = parse_image_header(make_image(text_offset=0x1000, image_size=0x5000, flags=FLAGS_4K_ANYWHERE))
    assert (hdr.text_offset, hdr.image_size) == (0x1000, 0x5000)
    assert hdr.page_size == 4096 and hdr.place_anywhere and not hdr.big_endian
    hdr = parse_image_header(make_image(flags=0b0110))
    assert hdr.page_size == 64 * 1024 and not hdr.place_anywhere
    assert parse_image_header(make_image(flags=0)).page_size is None


def test_legacy_image_size_zero_means_text_offset_0x80000(mem: GuestMemory) -> None:
    # Before v3.17 text_offset was in the kernel's endianness and image_size 0: ignore the field.
    image = make_image(text_offset=0x0000080000000000, image_size=0, flags=0xFF)
    assert parse_image_header(image).text_offset == LEGACY_TEXT_OFFSET
    k = load_image_data(mem, image)
    assert k.entry == RAM + 0x80000
    assert k.kernel_end == k.entry + 0x1000 * ((len(image) + 0xFFF) // 0x1000)


def test_signed_image_longer_than_image_size_still_loads(mem: GuestMemory) -> None:
    image = make_image(image_size=64 + 1000) + b"signature" * 100  # sbsign appends to the file
    k = load_image_data(mem, image)
    assert mem.read(k.entry, len(image)) == image
    assert k.kernel_end >= k.entry + len(image)


def test_image_gz(mem: GuestMemory, tmp_path: Path) -> None:
    image = make_image()
    path = tmp_path / "Image.gz"
    path.write_bytes(gzip.compress(image))
    k = load_image(mem, path)
    assert k.format == "Image (gzip)"
    assert mem.read(k.entry, len(image)) == image


@pytest.mark.parametrize("fmt", ["zstd", "xz", "lz4", "bzip2"])
def test_other_image_compressions(mem: GuestMemory, fmt: str) -> None:
    image = make_image()
    k = load_image_data(mem, compress(fmt, image))  # with Linux's appended size, as Image.<fmt> has
    assert k.format == f"Image ({fmt})"
    assert mem.read(k.entry, len(image)) == image


def test_efi_zboot_image(mem: GuestMemory) -> None:
    image = make_image()
    payload = gzip.compress(image)
    off = 0x200
    head = bytearray(off)
    head[0:8] = b"MZ\0\0zimg"
    struct.pack_into("<II", head, 8, off, len(payload))
    head[24:29] = b"gzip\0"
    k = load_image_data(mem, bytes(head) + payload + b"\0" * 64)
    assert k.format == "EFI zboot (gzip)"
    assert mem.read(k.entry, len(image)) == image


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x00" * 4096, "not an arm64 Image"),
        (make_image(magic=0x41524D64), "not an arm64 Image"),
        (make_elf([(0x1000000, b"\x90" * 64, 64)], 0x1000000), "x86_64 ELF file, not an arm64 Image"),
        (make_elf([(0x1000000, b"\0" * 64, 64)], 0x1000000, machine=EM_AARCH64), "AArch64 ELF vmlinux"),
        (make_bzimage(compress("gzip", b"\x7fELF" + b"\0" * 60)), "x86 bzImage"),
        (b"MZ" + b"\0" * 200, "PE/EFI binary"),
        (gzip.compress(b"\0" * 4096), "gzip data that is not an arm64 Image"),
        (make_image(flags=0b1011), "big-endian"),
        (make_image()[:40], "too short for the 64-byte arm64 Image header"),
        (gzip.compress(make_image())[:100], "truncated gzip"),
        (gzip.compress(make_image()[:50]), "too short"),
    ],
)
def test_errors(mem: GuestMemory, data: bytes, match: str) -> None:
    with pytest.raises(LoaderError, match=match):
        load_image_data(mem, data, "kernel")


def test_image_size_that_does_not_fit_below_the_device_tree(mem: GuestMemory) -> None:
    room = layout.fdt_addr(64 * MiB) - RAM
    load_image_data(mem, make_image(image_size=room))  # exactly fits
    with pytest.raises(LoaderError, match="give the guest more memory"):
        load_image_data(mem, make_image(image_size=room + 1))
    with pytest.raises(LoaderError, match="bss included"):
        load_image_data(mem, make_image(text_offset=0x80000, image_size=room))


def test_gzip_output_is_bounded_by_the_room_in_ram() -> None:
    small = GuestMemory.single(8 * MiB, gpa=RAM)  # the tree at RAM + 6 MiB: 6 MiB for the kernel
    try:
        bomb = gzip.compress(make_image(b"\0" * (7 * MiB)))
        with pytest.raises(LoaderError, match=r"decompressed kernel is larger than the 6\.0 MiB"):
            load_image_data(small, bomb)
    finally:
        small.close()


def test_file_errors_name_the_path(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="no such file"):
        load_image(mem, tmp_path / "missing")
    bad = tmp_path / "vmlinux"
    bad.write_bytes(b"\x7fELF" + b"\0" * 100)
    with pytest.raises(LoaderError, match=f"{bad}: .*ELF"):
        load_image(mem, bad)


def test_no_ram_at_ram_start() -> None:
    low = GuestMemory.single(16 * MiB, gpa=0)
    try:
        with pytest.raises(LoaderError, match="no RAM at 0x40000000"):
            load_image_data(low, make_image())
    finally:
        low.close()


# -- the initrd -------------------------------------------------------------------------------------
def test_initrd_goes_just_below_the_device_tree(mem: GuestMemory, tmp_path: Path) -> None:
    k = load_image_data(mem, make_image())
    fdt = layout.fdt_addr(64 * MiB)
    data = bytes(range(251)) * 4001  # not a page multiple
    path = tmp_path / "initrd.cpio.gz"
    path.write_bytes(data)
    start, end = load_initrd_aarch64(mem, path, k.kernel_end, fdt)
    assert start % 4096 == 0 and end == start + len(data)
    assert fdt - 4096 < end <= fdt  # as high as page alignment allows, below the tree
    assert start >= k.kernel_end
    assert mem.read(start, len(data)) == data


def test_initrd_above_the_device_tree_when_ram_is_large() -> None:
    fdt = layout.fdt_addr(4 * GiB)  # the tree stays below 512 MiB
    kernel_end = RAM + 40 * MiB
    ram_end = RAM + 4 * GiB
    assert place_initrd_aarch64(100 * MiB, kernel_end, fdt, ram_end) == fdt - 100 * MiB
    big = 600 * MiB  # cannot fit below the tree: the top of RAM instead
    assert place_initrd_aarch64(big, kernel_end, fdt, ram_end) == ram_end - big


def test_initrd_that_does_not_fit(mem: GuestMemory, tmp_path: Path) -> None:
    fdt = layout.fdt_addr(64 * MiB)
    with pytest.raises(LoaderError, match="the guest needs at least 72 MiB of RAM"):
        place_initrd_aarch64(60 * MiB, RAM + 10 * MiB, fdt, RAM + 64 * MiB)
    with pytest.raises(LoaderError, match="no such file"):
        load_initrd_aarch64(mem, tmp_path / "nope", RAM + MiB, fdt)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(LoaderError, match="empty"):
        load_initrd_aarch64(mem, empty, RAM + MiB, fdt)
