"""The zero page: struct layout against boot.rst / bootparam.h offsets, E820, what the loader writes,
plus initrd placement and the command-line builder."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.arch.x86_64 import bootparams as bp
from pyvmm.arch.x86_64.initrd import load_initrd, place_initrd
from pyvmm.arch.x86_64.layout import (
    CMDLINE_ADDR,
    CMDLINE_MAX,
    EBDA_START,
    HIGH_RAM_START,
    HIMEM_START,
    MMIO_HOLE_START,
    ZERO_PAGE_ADDR,
    GiB,
    MiB,
    ram_layout,
)
from pyvmm.errors import LoaderError
from pyvmm.loader import LoadedKernel
from pyvmm.loader.cmdline import Cmdline
from pyvmm.memory import GuestMemory
from pyvmm.record import replace

# boot.rst "The Real-Mode Kernel Header" / bootparam.h comments: offsets inside boot_params
HDR_OFFSETS = {
    "setup_sects": 0x1F1,
    "syssize": 0x1F4,
    "boot_flag": 0x1FE,
    "jump": 0x200,
    "header": 0x202,
    "version": 0x206,
    "type_of_loader": 0x210,
    "loadflags": 0x211,
    "code32_start": 0x214,
    "ramdisk_image": 0x218,
    "ramdisk_size": 0x21C,
    "heap_end_ptr": 0x224,
    "cmd_line_ptr": 0x228,
    "initrd_addr_max": 0x22C,
    "kernel_alignment": 0x230,
    "relocatable_kernel": 0x234,
    "xloadflags": 0x236,
    "cmdline_size": 0x238,
    "payload_offset": 0x248,
    "payload_length": 0x24C,
    "setup_data": 0x250,
    "pref_address": 0x258,
    "init_size": 0x260,
    "handover_offset": 0x264,
    "kernel_info_offset": 0x268,
}
BP_OFFSETS = {
    "screen_info": 0x000,
    "apm_bios_info": 0x040,
    "tboot_addr": 0x058,
    "acpi_rsdp_addr": 0x070,
    "ext_ramdisk_image": 0x0C0,
    "ext_ramdisk_size": 0x0C4,
    "ext_cmd_line_ptr": 0x0C8,
    "cc_blob_address": 0x13C,
    "edid_info": 0x140,
    "efi_info": 0x1C0,
    "e820_entries": 0x1E8,
    "sentinel": 0x1EF,
    "hdr": 0x1F1,
    "edd_mbr_sig_buffer": 0x290,
    "e820_table": 0x2D0,
    "eddbuf": 0xD00,
}


def test_sizes_and_offsets() -> None:
    assert ctypes.sizeof(bp.boot_params) == 4096
    assert ctypes.sizeof(bp.boot_e820_entry) == 20
    for name, off in BP_OFFSETS.items():
        assert getattr(bp.boot_params, name).offset == off, name
    for name, off in HDR_OFFSETS.items():
        assert 0x1F1 + getattr(bp.setup_header, name).offset == off, name


def test_misspelled_field_raises() -> None:
    with pytest.raises(AttributeError):
        bp.boot_params().hdr.cmdline_ptr = 1


def test_e820_512m() -> None:
    assert bp.build_e820(ram_layout(512 * MiB)) == [
        (0, EBDA_START, bp.E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, bp.E820_RESERVED),
        (HIMEM_START, 512 * MiB - HIMEM_START, bp.E820_RAM),
    ]


def test_e820_5g() -> None:
    assert bp.build_e820(ram_layout(5 * GiB)) == [
        (0, EBDA_START, bp.E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, bp.E820_RESERVED),
        (HIMEM_START, MMIO_HOLE_START - HIMEM_START, bp.E820_RAM),
        (HIGH_RAM_START, 5 * GiB - MMIO_HOLE_START, bp.E820_RAM),
    ]


ELF_KERNEL = LoadedKernel(
    entry=0x1000000,
    format="elf",
    setup_header=None,
    protocol=None,
    kernel_start=0x1000000,
    kernel_end=0x3000000,
    initrd_addr_max=0x7FFFFFFF,
    cmdline_size=2047,
)


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.single(128 * MiB)
    yield m
    m.close()


def _zero_page(mem: GuestMemory) -> bp.boot_params:
    return bp.boot_params.from_buffer_copy(mem.read(ZERO_PAGE_ADDR, 4096))


def test_write_elf_boot_params(mem: GuestMemory) -> None:
    e820 = bp.build_e820(ram_layout(128 * MiB))
    bp.write_boot_params(mem, ELF_KERNEL, b"console=ttyS0", (0x7000000, 0x123456), e820)
    z = _zero_page(mem)
    assert mem.read_u16(ZERO_PAGE_ADDR + 0x1FE) == 0xAA55
    assert mem.read(ZERO_PAGE_ADDR + 0x202, 4) == b"HdrS"
    assert mem.read_u16(ZERO_PAGE_ADDR + 0x206) == 0x020F
    assert mem.read(ZERO_PAGE_ADDR + 0x210, 1) == b"\xff"
    assert mem.read_u32(ZERO_PAGE_ADDR + 0x228) == CMDLINE_ADDR
    assert mem.read_u32(ZERO_PAGE_ADDR + 0x218) == 0x7000000
    assert mem.read_u32(ZERO_PAGE_ADDR + 0x21C) == 0x123456
    assert mem.read_u32(ZERO_PAGE_ADDR + 0x230) == bp.SYNTHETIC_KERNEL_ALIGNMENT
    assert mem.read(ZERO_PAGE_ADDR + 0x1E8, 1)[0] == len(e820) == 3
    assert mem.read_u64(ZERO_PAGE_ADDR + 0x2D0 + 20 * 2 + 8) == 127 * MiB
    assert z.hdr.loadflags & (bp.LOADED_HIGH | bp.CAN_USE_HEAP) == bp.LOADED_HIGH | bp.CAN_USE_HEAP
    assert z.hdr.cmdline_size == 2047 and z.ext_ramdisk_image == 0
    assert [(e.addr, e.size, e.type) for e in z.e820_table[: z.e820_entries]] == e820
    assert mem.read(CMDLINE_ADDR, 14) == b"console=ttyS0\0"


def test_write_bzimage_boot_params_copies_header(mem: GuestMemory) -> None:
    hdr = bp.setup_header(setup_sects=27, boot_flag=0xAA55, header=bp.HDRS_MAGIC, version=0x020F)
    hdr.kernel_version, hdr.init_size, hdr.xloadflags, hdr.type_of_loader = 0x3C0, 0x1234000, 3, 0
    hdr.loadflags = bp.LOADED_HIGH | bp.KEEP_SEGMENTS
    k = replace(ELF_KERNEL, format="bzImage", setup_header=bytes(hdr), protocol=0x020F, cmdline_size=2047)
    bp.write_boot_params(mem, k, b"", ((5 << 32) | 0x1000, 4096), [])
    z = _zero_page(mem)
    assert (z.hdr.setup_sects, z.hdr.kernel_version, z.hdr.init_size, z.hdr.xloadflags) == (
        27,
        0x3C0,
        0x1234000,
        3,
    )
    assert z.hdr.type_of_loader == 0xFF and z.hdr.heap_end_ptr == 0xDE00
    assert z.hdr.loadflags == bp.LOADED_HIGH | bp.CAN_USE_HEAP
    assert (z.hdr.ramdisk_image, z.ext_ramdisk_image) == (0x1000, 5)
    assert z.e820_entries == 0 and z.sentinel == 0
    assert mem.read(CMDLINE_ADDR, 1) == b"\0"


def test_cmdline_limits(mem: GuestMemory) -> None:
    short = replace(ELF_KERNEL, cmdline_size=10)
    bp.write_boot_params(mem, short, b"x" * 10, None, [])
    with pytest.raises(LoaderError, match="11 bytes; the limit is 10"):
        bp.write_boot_params(mem, short, b"x" * 11, None, [])
    big = replace(ELF_KERNEL, cmdline_size=1 << 20)
    with pytest.raises(LoaderError, match=f"the limit is {CMDLINE_MAX - 1}"):
        bp.write_boot_params(mem, big, b"x" * CMDLINE_MAX, None, [])
    with pytest.raises(LoaderError, match="NUL"):
        bp.write_boot_params(mem, ELF_KERNEL, b"a\0b", None, [])


# --- initrd placement ---------------------------------------------------------------------------------
def test_initrd_placed_high_and_aligned(mem: GuestMemory, tmp_path: Path) -> None:
    p = tmp_path / "initrd"
    p.write_bytes(b"\x07" * 10000)
    addr, size = load_initrd(mem, p, ELF_KERNEL, ram_layout(128 * MiB))
    assert size == 10000 and addr % 4096 == 0 and addr + size <= 128 * MiB and addr + 4096 + size > 128 * MiB
    assert mem.read(addr, size) == b"\x07" * 10000


def test_initrd_respects_initrd_addr_max() -> None:
    k = replace(ELF_KERNEL, initrd_addr_max=0x37FFFFFF)
    assert place_initrd(131072, k, ram_layout(2 * GiB)) == 0x37FE0000  # boot.rst's own example
    assert place_initrd(4096, ELF_KERNEL, ram_layout(5 * GiB)) == 0x7FFFF000  # never in high RAM


def test_initrd_too_big(tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="needs at least 148 MiB"):
        place_initrd(100 * MiB, ELF_KERNEL, ram_layout(128 * MiB))
    with pytest.raises(LoaderError, match="initrd limit"):
        place_initrd(3 * GiB, ELF_KERNEL, ram_layout(4 * GiB))


def test_initrd_file_errors(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match=r"initrd .*: no such file"):
        load_initrd(mem, tmp_path / "missing", ELF_KERNEL, ram_layout(128 * MiB))
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(LoaderError, match=r"initrd .*empty: file is empty"):
        load_initrd(mem, tmp_path / "empty", ELF_KERNEL, ram_layout(128 * MiB))
    with pytest.raises(LoaderError, match="is a directory"):
        load_initrd(mem, tmp_path, ELF_KERNEL, ram_layout(128 * MiB))


# --- command line ----------------------------------------------------------------------------------
def test_cmdline_builder() -> None:
    c = Cmdline(4095).extend("console=ttyS0 quiet -- single")
    c.add("reboot", "k").add("console", "hvc0", if_absent=True).add("panic", -1).add("root", "/dev/vda")
    assert c.has("console") and c.has("quiet") and not c.has("single")
    assert str(c) == "console=ttyS0 quiet reboot=k panic=-1 root=/dev/vda -- single"
    assert c.to_bytes() == str(c).encode()
    assert str(Cmdline(4095).add("dyndbg", "file a.c +p")) == 'dyndbg="file a.c +p"'


def test_cmdline_value_is_the_last_one_the_kernel_acts_on() -> None:
    c = Cmdline(4095).extend("acpi=on quiet acpi=off -- acpi=force")
    assert c.value("acpi") == "off"  # the last word wins; init's arguments are not the kernel's
    assert c.value("quiet") is None and c.value("root") is None
    assert Cmdline(4095).add("dyndbg", "file a.c +p").value("dyndbg") == "file a.c +p"


def test_cmdline_validation() -> None:
    with pytest.raises(LoaderError, match="NUL or newline"):
        Cmdline(4095).extend("a\nb")
    with pytest.raises(LoaderError, match="NUL or newline"):
        Cmdline(4095).add("a", "b\0")
    with pytest.raises(LoaderError, match="bad kernel parameter name"):
        Cmdline(4095).add("a=b")
    c = Cmdline(max_len=13).add("console", "ttyS0")
    with pytest.raises(LoaderError, match="limit is 13"):
        c.add("quiet")
    assert len(c) == 13  # unchanged after the failed add
    assert str(c) == "console=ttyS0"
