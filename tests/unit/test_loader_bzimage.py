"""bzImage loading: header parsing and validation, host-side extraction per compressor, the 64-bit
boot protocol load, and (when built) the real default kernel."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from pyvmm.arch.x86_64.bootparams import LOADED_HIGH, XLF_KERNEL_64
from pyvmm.arch.x86_64.bzimage import parse_header
from pyvmm.arch.x86_64.kernel import load_kernel
from pyvmm.arch.x86_64.layout import HIMEM_START, INITRD_ADDR_MAX_DEFAULT
from pyvmm.errors import LoaderError
from pyvmm.loader.formats import is_bzimage
from pyvmm.memory import GuestMemory
from pyvmm.testing.kernels import EM_AARCH64, compress, make_bzimage, make_elf

MiB = 1 << 20
TEXT = bytes(range(256)) * 64
SEGMENTS = [(0x1000000, TEXT, len(TEXT)), (0x1400000, b"\x11" * 100, 0x2000)]
ENTRY = 0x1000000
VMLINUX = make_elf(SEGMENTS, ENTRY, pvh_entry=0x1000080)
FORMATS = ["gzip", "bzip2", "xz", "lzma", "lz4", "zstd"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.single(64 * MiB)
    yield m
    m.close()


def _write(tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "bzImage"
    p.write_bytes(data)
    return p


def test_parse_header() -> None:
    image = make_bzimage(compress("gzip", VMLINUX), setup_sects=0, init_size=0x1234000)
    assert is_bzimage(image)
    h = parse_header(image)
    assert h.setup_sects == 4 and h.setup_size == 5 * 512  # 0 means 4
    assert (h.protocol, h.xloadflags & XLF_KERNEL_64, h.loadflags & LOADED_HIGH) == (0x020F, 1, 1)
    assert (h.payload_offset, h.init_size, h.pref_address) == (0x300, 0x1234000, 0x1000000)
    assert (h.kernel_alignment, h.relocatable_kernel, h.cmdline_size) == (0x200000, True, 2047)
    assert h.raw[0] == 0 and len(h.raw) == 0x26C - 0x1F1


def test_old_protocol_defaults() -> None:
    h = parse_header(make_bzimage(b"x", protocol=0x0202, initrd_addr_max=0x1234, cmdline_size=99))
    assert h.initrd_addr_max == INITRD_ADDR_MAX_DEFAULT
    assert h.cmdline_size == 255
    assert (h.xloadflags, h.payload_length, h.init_size, h.kernel_alignment) == (0, 0, 0, 0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_extract_and_load_elf(mem: GuestMemory, tmp_path: Path, fmt: str) -> None:
    path = _write(tmp_path, make_bzimage(compress(fmt, VMLINUX), setup_sects=27 if fmt == "gzip" else 4))
    k = load_kernel(mem, path, boot="elf")
    assert k.format == f"bzImage→elf ({fmt})"
    assert (k.entry, k.pvh_entry, k.kernel_start, k.kernel_end) == (ENTRY, 0x1000080, 0x1000000, 0x1402000)
    assert (k.protocol, k.cmdline_size, k.initrd_addr_max) == (0x020F, 2047, 0x7FFFFFFF)
    assert k.setup_header is not None and k.setup_header[0x202 - 0x1F1 :][:4] == b"HdrS"
    assert mem.read(0x1000000, len(TEXT)) == TEXT


def test_guest_boot_load(mem: GuestMemory, tmp_path: Path) -> None:
    image = make_bzimage(compress("lz4", VMLINUX), init_size=0x900000)
    k = load_kernel(mem, _write(tmp_path, image), boot="guest")
    pm = image[5 * 512 :]
    assert (k.format, k.entry, k.kernel_start) == ("bzImage", HIMEM_START + 0x200, HIMEM_START)
    assert k.kernel_end == 0x1000000 + 0x900000  # decompressed at pref_address, init_size bytes
    assert mem.read(HIMEM_START, len(pm)) == pm
    assert k.xloadflags & XLF_KERNEL_64


def test_guest_boot_needs_ram_for_init_size(tmp_path: Path) -> None:
    small = GuestMemory.single(16 * MiB)
    try:
        with pytest.raises(LoaderError, match="at least 25 MiB"):
            load_kernel(small, _write(tmp_path, make_bzimage(b"x", init_size=0x900000)), boot="guest")
    finally:
        small.close()


def test_old_protocol(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match=r"protocol 2\.11 is too old for the 64-bit entry"):
        load_kernel(mem, _write(tmp_path, make_bzimage(b"x", protocol=0x020B)), boot="guest")
    with pytest.raises(LoaderError, match=r"protocol 2\.07 is too old to locate the payload"):
        load_kernel(mem, _write(tmp_path, make_bzimage(compress("gzip", VMLINUX), protocol=0x0207)))
    with pytest.raises(LoaderError, match=r"protocol 1\.00 is too old"):
        load_kernel(mem, _write(tmp_path, make_bzimage(b"x", protocol=0x0100)))


def test_not_64bit(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="not a 64-bit kernel"):
        load_kernel(mem, _write(tmp_path, make_bzimage(b"x", xloadflags=0)), boot="guest")


def test_wrong_arch_payload(mem: GuestMemory, tmp_path: Path) -> None:
    arm = make_elf(SEGMENTS, ENTRY, machine=EM_AARCH64)
    with pytest.raises(LoaderError, match="is an AArch64 kernel"):
        load_kernel(mem, _write(tmp_path, make_bzimage(compress("zstd", arm))))


def test_payload_errors(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="bzImage: unknown compression"):
        load_kernel(mem, _write(tmp_path, make_bzimage(b"\x00\x01\x02\x03" * 50)))
    with pytest.raises(LoaderError, match="corrupt xz payload"):
        load_kernel(mem, _write(tmp_path, make_bzimage(compress("xz", VMLINUX)[:200])))
    with pytest.raises(LoaderError, match="payload is not an ELF"):
        load_kernel(mem, _write(tmp_path, make_bzimage(compress("gzip", b"not an elf"))))


def test_truncated(mem: GuestMemory, tmp_path: Path) -> None:
    image = make_bzimage(compress("gzip", VMLINUX))
    for cut in (0x300, 5 * 512 - 1, 5 * 512 + 0x400, len(image) - 40):
        with pytest.raises(LoaderError, match="truncated"):
            load_kernel(mem, _write(tmp_path, image[:cut]))


def test_not_a_kernel(mem: GuestMemory, tmp_path: Path) -> None:
    image = bytearray(make_bzimage(b"x"))
    image[0x202:0x206] = b"HdrX"
    with pytest.raises(LoaderError, match="not a Linux kernel"):
        load_kernel(mem, _write(tmp_path, bytes(image)))
    with pytest.raises(LoaderError, match="not a Linux kernel"):
        load_kernel(mem, _write(tmp_path, b"\x55\xaa" * 10))


# --- the real default kernel, when images/ has built it ---------------------------------------------
def _real(name: str) -> Path:
    p = REPO / "images" / "out" / name
    if not p.is_file():
        pytest.skip(f"{p.relative_to(REPO)} not built (make images)")
    return p


def test_real_bzimage_extraction_matches_vmlinux() -> None:
    bz, vmlinux = _real("bzImage"), _real("vmlinux")
    mem_bz, mem_elf = GuestMemory.single(1024 * MiB), GuestMemory.single(1024 * MiB)
    try:
        kb = load_kernel(mem_bz, bz, boot="elf")
        ke = load_kernel(mem_elf, vmlinux)
        assert kb.format.startswith("bzImage→elf (")
        assert (kb.entry, kb.kernel_start, kb.kernel_end, kb.pvh_entry) == (
            ke.entry,
            ke.kernel_start,
            ke.kernel_end,
            ke.pvh_entry,
        )
        with open(vmlinux, "rb") as f:
            for seg in ELFFile(f).iter_segments():
                if seg["p_type"] == "PT_LOAD":
                    paddr, memsz = seg["p_paddr"], seg["p_memsz"]
                    assert mem_bz.read(paddr, memsz) == mem_elf.read(paddr, memsz), hex(paddr)
        assert kb.protocol is not None and kb.protocol >= 0x020C
    finally:
        mem_bz.close()
        mem_elf.close()


def test_real_bzimage_guest_load() -> None:
    bz = _real("bzImage")
    mem = GuestMemory.single(1024 * MiB)
    try:
        k = load_kernel(mem, bz, boot="guest")
        h = parse_header(bz.read_bytes())
        assert k.entry == HIMEM_START + 0x200 and k.kernel_end >= h.pref_address + h.init_size
        assert mem.read(HIMEM_START, 4096) == bz.read_bytes()[h.setup_size :][:4096]
    finally:
        mem.close()
