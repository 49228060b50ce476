"""ELF vmlinux loading: PT_LOAD placement, bss zeroing, PVH note, wrong-arch and file errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.arch.x86_64.kernel import load_kernel
from pyvmm.errors import LoaderError
from pyvmm.loader import LoadedKernel
from pyvmm.loader.elf import parse_pvh_note
from pyvmm.memory import GuestMemory
from pyvmm.testing.kernels import EM_AARCH64, make_elf, make_elf32

MiB = 1 << 20
TEXT = bytes(range(256)) * 16  # 4 KiB
DATA = b"\xd0" * 1000
SEGMENTS = [(0x1000000, TEXT, len(TEXT)), (0x1200000, DATA, 0x3000)]  # second one has 0x3000-1000 of bss
ENTRY = 0x1000000 + 0x40


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.single(64 * MiB)
    m.fill(0, 64 * MiB, 0xAA)  # so that zeroed bss is visible
    yield m
    m.close()


def _write(tmp_path: Path, data: bytes, name: str = "vmlinux") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("desc_size", [4, 8])
def test_loads_segments_and_pvh_note(mem: GuestMemory, tmp_path: Path, desc_size: int) -> None:
    image = make_elf(SEGMENTS, ENTRY, pvh_entry=0x1000100, pvh_desc_size=desc_size)
    k = load_kernel(mem, _write(tmp_path, image))
    assert isinstance(k, LoadedKernel)
    assert (k.format, k.entry, k.pvh_entry) == ("elf", ENTRY, 0x1000100)
    assert (k.kernel_start, k.kernel_end) == (0x1000000, 0x1203000)
    assert k.setup_header is None and k.protocol is None
    assert mem.read(0x1000000, len(TEXT)) == TEXT
    assert mem.read(0x1200000, len(DATA)) == DATA
    assert mem.read(0x1200000 + len(DATA), 0x3000 - len(DATA)) == bytes(0x3000 - len(DATA))
    assert mem.read(0x1203000, 16) == b"\xaa" * 16  # nothing written past p_memsz
    assert k.cmdline_size > 0 and k.initrd_addr_max == 0x7FFFFFFF


def test_no_pvh_note(mem: GuestMemory, tmp_path: Path) -> None:
    assert load_kernel(mem, _write(tmp_path, make_elf(SEGMENTS, ENTRY))).pvh_entry is None


@pytest.mark.parametrize("pvh", [None, 0x1000100])
def test_builtin_params_from_the_param_section(mem: GuestMemory, tmp_path: Path, pvh: int | None) -> None:
    names = ["panic", "virtio_mmio.device", "virtio_blk.queue_depth"]
    k = load_kernel(mem, _write(tmp_path, make_elf(SEGMENTS, ENTRY, pvh_entry=pvh, params=names)))
    assert k.builtin_params == frozenset(names)
    assert load_kernel(mem, _write(tmp_path, make_elf(SEGMENTS, ENTRY, params=[]))).builtin_params == frozenset()


def test_builtin_params_unknown_without_a_param_section(mem: GuestMemory, tmp_path: Path) -> None:
    assert load_kernel(mem, _write(tmp_path, make_elf(SEGMENTS, ENTRY))).builtin_params is None


def test_builtin_params_unknown_when_a_name_pointer_leads_nowhere(mem: GuestMemory, tmp_path: Path) -> None:
    image = bytearray(make_elf(SEGMENTS, ENTRY, params=["virtio_mmio.device"]))
    at = image.index(b"__param\0") - 40  # the one entry sits right before the section name table
    image[at : at + 8] = (0xFFFF_FFFF_DEAD_0000).to_bytes(8, "little")
    assert load_kernel(mem, _write(tmp_path, bytes(image))).builtin_params is None


def test_parse_pvh_note_skips_other_notes() -> None:
    assert parse_pvh_note(b"") is None
    assert parse_pvh_note(b"\x04\0\0\0\x04\0\0\0\x12\0\0\0Lin\0\x01\0\0\0") is None  # type 18, not Xen
    assert parse_pvh_note(b"\x04\0\0\0\x04\0\0\0\x12\0\0\0Xen\0\x78\x56\x34\x12") == 0x12345678


def test_wrong_arch(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="is an AArch64 kernel"):
        load_kernel(mem, _write(tmp_path, make_elf(SEGMENTS, ENTRY, machine=EM_AARCH64)))
    with pytest.raises(LoaderError, match="i386"):
        load_kernel(mem, _write(tmp_path, make_elf32()))


def test_not_executable(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="not an executable ELF"):
        load_kernel(mem, _write(tmp_path, make_elf(SEGMENTS, ENTRY, e_type=1)))


def test_segment_outside_ram(tmp_path: Path) -> None:
    small = GuestMemory.single(16 * MiB)
    try:
        with pytest.raises(
            LoaderError, match=r"does not fit in guest RAM \(the kernel needs at least 19 MiB\)"
        ):
            load_kernel(small, _write(tmp_path, make_elf(SEGMENTS, ENTRY)))
    finally:
        small.close()


def test_entry_outside_segments(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="entry point"):
        load_kernel(mem, _write(tmp_path, make_elf(SEGMENTS, 0x5000000)))


def test_truncated_elf(mem: GuestMemory, tmp_path: Path) -> None:
    image = make_elf(SEGMENTS, ENTRY)
    for cut in (40, 100, len(image) - 500):
        with pytest.raises(LoaderError, match=r"truncated|corrupt"):
            load_kernel(mem, _write(tmp_path, image[:cut]))


def test_file_errors(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match=r"kernel .*nope: no such file"):
        load_kernel(mem, tmp_path / "nope")
    with pytest.raises(LoaderError, match="is a directory"):
        load_kernel(mem, tmp_path)
    with pytest.raises(LoaderError, match="file is empty"):
        load_kernel(mem, _write(tmp_path, b""))
    with pytest.raises(LoaderError, match="not a Linux kernel"):
        load_kernel(mem, _write(tmp_path, b"#!/bin/sh\n" * 100))


def test_unreadable_file(mem: GuestMemory, tmp_path: Path) -> None:
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads files regardless of their mode")
    p = _write(tmp_path, make_elf(SEGMENTS, ENTRY))
    p.chmod(0)
    with pytest.raises(LoaderError, match="cannot read"):
        load_kernel(mem, p)


def test_bad_boot_mode(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        load_kernel(mem, _write(tmp_path, make_elf(SEGMENTS, ENTRY)), boot="bios")  # type: ignore[arg-type]
