"""ACPI tables (ACPI 6.5 chapter 5) and the MP table (MP spec 1.4 chapter 4): layout, lengths, checksums,
and the values a Linux guest relies on."""

from __future__ import annotations

import itertools
import struct

import pytest

from pyvmm.arch.x86_64 import layout, mptable
from pyvmm.arch.x86_64.acpi import tables as t


def virtio(n: int) -> list[t.VirtioMmioDevice]:
    out = []
    for i in range(n):
        base, irq = layout.virtio_mmio_slot(i)
        out.append(t.VirtioMmioDevice(base, layout.VIRTIO_MMIO_SIZE, irq))
    return out


@pytest.fixture
def acpi() -> t.AcpiTables:
    return t.build(4, virtio(3))


def test_every_table_checksums_to_zero(acpi: t.AcpiTables) -> None:
    for sig, (_, data) in acpi.tables.items():
        if sig == "RSDP":
            assert sum(data[:20]) % 256 == 0
            assert sum(data) % 256 == 0
        else:
            assert data[:4] == sig.encode()
            assert struct.unpack_from("<I", data, 4)[0] == len(data)
            assert sum(data) % 256 == 0, sig


def test_layout_in_bios_area(acpi: t.AcpiTables) -> None:
    assert acpi.rsdp_addr == layout.ACPI_TABLES_START
    assert acpi.rsdp_addr % 16 == 0 and 0xE0000 <= acpi.rsdp_addr < 0x100000
    assert acpi.base + len(acpi.blob) <= layout.ACPI_TABLES_END <= layout.MPTABLE_START
    for addr, data in acpi.tables.values():
        assert acpi.blob[addr - acpi.base : addr - acpi.base + len(data)] == data
    spans = sorted((a, a + len(d)) for a, d in acpi.tables.values())
    assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))


def test_rsdp_points_to_xsdt_points_to_fadt_and_madt(acpi: t.AcpiTables) -> None:
    _, rsdp = acpi.tables["RSDP"]
    sig, _, _oem, rev, rsdt, length, xsdt_addr, _ = struct.unpack("<8sB6sBIIQB3x", rsdp)
    assert (sig, rev, length, rsdt) == (b"RSD PTR ", 2, 36, 0)
    assert xsdt_addr == acpi.tables["XSDT"][0]
    xsdt = acpi.tables["XSDT"][1]
    assert list(struct.unpack_from("<2Q", xsdt, 36)) == [acpi.tables["FACP"][0], acpi.tables["APIC"][0]]


def test_fadt_hardware_reduced(acpi: t.AcpiTables) -> None:
    fadt = acpi.tables["FACP"][1]
    assert len(fadt) == 276 and fadt[8] == 6 and fadt[131] == 5
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & t.FADT_F_HW_REDUCED_ACPI
    assert struct.unpack_from("<I", fadt, 40)[0] == 0  # 32-bit DSDT unused when X_DSDT is set
    assert struct.unpack_from("<Q", fadt, 140)[0] == acpi.tables["DSDT"][0]
    assert fadt[56:96] == bytes(40)  # no PM1/PM2/PM timer/GPE blocks
    assert struct.unpack_from("<H", fadt, 46)[0] == 0  # no SCI
    space, width, _, access, addr = struct.unpack_from("<BBBBQ", fadt, 244)
    assert (space, width, access, addr) == (t.GAS_SYSTEM_IO, 8, 1, layout.ACPI_SLEEP_CONTROL_PORT)
    assert struct.unpack_from("<BBBBQ", fadt, 256)[4] == layout.ACPI_SLEEP_STATUS_PORT
    assert struct.unpack_from("<BBBBQ", fadt, 116)[4] == layout.I8042_CMD_PORT and fadt[128] == 0xFE


def _madt_entries(madt: bytes) -> list[bytes]:
    out, off = [], 44
    while off < len(madt):
        n = madt[off + 1]
        out.append(madt[off : off + n])
        off += n
    assert off == len(madt)
    return out


def test_madt(acpi: t.AcpiTables) -> None:
    madt = acpi.tables["APIC"][1]
    assert struct.unpack_from("<II", madt, 36) == (layout.LAPIC_ADDR, 1)
    entries = _madt_entries(madt)
    lapics = [struct.unpack("<BBBBI", e) for e in entries if e[0] == 0]
    assert lapics == [(0, 8, i, i, 1) for i in range(4)]
    ioapics = [struct.unpack("<BBBBII", e) for e in entries if e[0] == 1]
    assert ioapics == [(1, 12, mptable.ioapic_id(4), 0, layout.IOAPIC_ADDR, 0)]
    isos = {e[3]: struct.unpack("<BBBBIH", e) for e in entries if e[0] == 2}
    assert sorted(isos) == [0, 4, 5, 6, 7]
    for irq, (_, length, bus, src, gsi, flags) in isos.items():
        # identity (KVM's default routing), edge-triggered active high (irqfd pulses)
        assert (length, bus, src, gsi, flags) == (10, 0, irq, irq, 0x5)
    nmis = [e for e in entries if e[0] == 4]
    assert nmis == [struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)]


def test_madt_x2apic_for_large_ids() -> None:
    madt = t.madt(256, [0])
    entries = _madt_entries(madt)
    assert sum(1 for e in entries if e[0] == 0) == 255
    x2 = [struct.unpack("<BBHIII", e) for e in entries if e[0] == 9]
    assert x2 == [(9, 16, 0, 255, 1, 255)]
    assert any(e[0] == 10 for e in entries)


def test_dsdt_describes_devices(acpi: t.AcpiTables) -> None:
    dsdt = acpi.tables["DSDT"][1]
    assert dsdt.count(b"\x0dLNRO0005\x00") == 3
    assert b"COM1" in dsdt and b"\x0c\x41\xd0\x05\x01" in dsdt  # EISAID("PNP0501")
    for i, dev in enumerate(virtio(3)):
        assert f"VR{i:02X}".encode() in dsdt
        assert struct.pack("<BHBII", 0x86, 9, 1, dev.base, dev.size) in dsdt
        assert bytes([0x89, 6, 0, 0x03, 1]) + struct.pack("<I", dev.irq) in dsdt
    assert b"\\_S5_\x12\x05\x02\x0a\x05\x00" in dsdt


def test_tables_must_fit() -> None:
    with pytest.raises(ValueError, match="past"):
        t.build(2, virtio(2), limit=layout.ACPI_TABLES_START + 0x100)
    with pytest.raises(ValueError, match="aligned"):
        t.build(2, [], base=layout.ACPI_TABLES_START + 8)


# --- MP table --------------------------------------------------------------------------------------------
def test_mptable_floating_pointer_and_checksums() -> None:
    blob = mptable.build(2)
    sig, ptr, length, rev, _csum = struct.unpack_from("<4sIBBB", blob)
    assert (sig, ptr, length, rev) == (b"_MP_", layout.MPTABLE_START + 16, 1, 4)
    assert sum(blob[:16]) % 256 == 0
    assert layout.MPTABLE_START >= 0xF0000 and layout.MPTABLE_START % 16 == 0
    cfg = blob[16:]
    sig, base_len, rev, _, _oem, _product, _, _, count, lapic, ext_len, _, _ = struct.unpack_from(
        "<4sHBB8s12sIHHIHBB", cfg)
    assert (sig, base_len, rev, lapic, ext_len) == (b"PCMP", len(cfg), 4, layout.LAPIC_ADDR, 0)
    assert sum(cfg) % 256 == 0
    # 2 processors + bus + ioapic + 16 ISA interrupts + 2 local interrupts
    assert count == 2 + 1 + 1 + 16 + 2
    assert len(cfg) == 44 + 2 * 20 + (count - 2) * 8


def test_mptable_entries() -> None:
    cfg = mptable.build(3)[16:]
    off = 44
    procs = []
    for _ in range(3):
        procs.append(struct.unpack_from("<BBBB", cfg, off))
        off += 20
    assert procs == [(0, 0, 0x14, 3), (0, 1, 0x14, 1), (0, 2, 0x14, 1)]  # BSP flag only on cpu 0
    assert struct.unpack_from("<BB6s", cfg, off) == (1, 0, b"ISA   ")
    off += 8
    assert struct.unpack_from("<BBBBI", cfg, off) == (2, 3, 0x11, 1, layout.IOAPIC_ADDR)
    off += 8
    ints = [struct.unpack_from("<BBHBBBB", cfg, off + 8 * i) for i in range(16)]
    assert ints == [(3, 0, 0, 0, irq, 3, irq) for irq in range(16)]  # ISA IRQ n -> IOAPIC pin n
    off += 16 * 8
    assert struct.unpack_from("<BBHBBBB", cfg, off) == (4, 3, 0, 0, 0, 0xFF, 0)  # LINT0 ExtINT
    assert struct.unpack_from("<BBHBBBB", cfg, off + 8) == (4, 1, 0, 0, 0, 0xFF, 1)  # LINT1 NMI


def test_mptable_limits() -> None:
    with pytest.raises(ValueError):
        mptable.build(0)
    with pytest.raises(ValueError):
        mptable.build(255)
    with pytest.raises(ValueError):
        mptable.build(1, base=0xF0008)
