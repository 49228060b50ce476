"""The builder puts the MP and ACPI tables in guest RAM, announces the RSDP in the zero page, and follows
``--devices-via`` (built, not run: the VM's memory is inspected before any vCPU starts)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.arch.x86_64 import layout
from pyvmm.builder import build_vm
from pyvmm.config import CONSOLE_NONE, DiskConfig, VmConfig
from pyvmm.memory import GuestMemory
from pyvmm.testing.kernels import make_elf

pytestmark = pytest.mark.kvm


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    yield path


def _built(kernel: Path, disk: Path, devices_via: str, cmdline: str = "console=ttyS0") -> tuple[bytes, bytes, str]:
    config = VmConfig(kernel=kernel, memory=64 << 20, cpus=3, console=CONSOLE_NONE, cmdline=cmdline,
                      disks=(DiskConfig(path=disk),), devices_via=devices_via)
    vmm, report = build_vm(config, console_fd=None)
    try:
        assert vmm.mem is not None
        mem: GuestMemory = vmm.mem
        zero_page = mem.read(layout.ZERO_PAGE_ADDR, 4096)
        bios = mem.read(layout.BIOS_AREA_START, layout.BIOS_AREA_END - layout.BIOS_AREA_START)
    finally:
        vmm._cleanup.close()
    return zero_page, bios, report.cmdline


@pytest.mark.parametrize("devices_via", ["both", "cmdline", "acpi"])
def test_tables_in_guest_memory(kvm: None, images: Path, disk: Path, devices_via: str) -> None:
    zero_page, bios, cmdline = _built(images / "vmlinux", disk, devices_via)
    rsdp = struct.unpack_from("<Q", zero_page, 0x070)[0]
    assert rsdp == layout.ACPI_TABLES_START
    off = rsdp - layout.BIOS_AREA_START
    assert bios[off : off + 8] == b"RSD PTR " and sum(bios[off : off + 36]) % 256 == 0
    mp = layout.MPTABLE_START - layout.BIOS_AREA_START
    assert bios[mp : mp + 4] == b"_MP_"
    assert bios.count(b"\x01\x0c\x03\x00\x00\x00\xc0\xfe") == 1  # MADT I/O APIC entry (id 3 = after 3 CPUs)
    has_acpi_dev = b"LNRO0005" in bios
    has_cmdline_dev = "virtio_mmio.device=4K@0xd0000000:5" in cmdline
    # The default guest has ACPI: with "both" its disks are in the DSDT alone.
    assert (has_acpi_dev, has_cmdline_dev) == {"both": (True, False), "cmdline": (False, True),
                                               "acpi": (True, False)}[devices_via]
    assert b"QEMU0001" in bios  # pvpanic, in every mode


@pytest.mark.parametrize(("params", "cmdline", "expected"), [
    ([], "console=ttyS0", (True, True)),  # no ACPI (or a modular one): both
    (["panic", "acpi.acpica_version"], "console=ttyS0", (True, False)),  # ACPI: the DSDT alone
    (["panic", "acpi.acpica_version"], "console=ttyS0 acpi=off", (True, True)),  # ACPI switched off: both
])
def test_both_announces_disks_as_the_kernel_can_use_them(kvm: None, tmp_path: Path, disk: Path, params: list[str],
                                                         cmdline: str, expected: tuple[bool, bool]) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(make_elf([(0x1000000, b"\xf4" * 4096, 4096)], 0x1000000, params=params))
    _, bios, built_cmdline = _built(kernel, disk, "both", cmdline)
    assert (b"LNRO0005" in bios, "virtio_mmio.device=4K@0xd0000000:5" in built_cmdline) == expected


def test_cmdline_devices_with_an_acpi_kernel_are_warned_about(kvm: None, tmp_path: Path, disk: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(make_elf([(0x1000000, b"\xf4" * 4096, 4096)], 0x1000000, params=["acpi.acpica_version"]))
    config = VmConfig(kernel=kernel, memory=64 << 20, console=CONSOLE_NONE, disks=(DiskConfig(path=disk),),
                      devices_via="cmdline")
    vmm, report = build_vm(config, console_fd=None)
    vmm._cleanup.close()
    assert any(note.startswith("warning: --devices-via cmdline with a kernel that has ACPI") for note in report.notes)
