"""The AML encoder against encodings from ACPI 6.5 chapter 20 and bytes iasl produces for the same ASL."""

from __future__ import annotations

import pytest

from pyvmm.arch.x86_64.acpi import aml


@pytest.mark.parametrize(("payload", "expected"), [
    (0, b"\x01"),
    (62, b"\x3f"),  # 63 fits the one-byte form
    (63, b"\x41\x04"),  # 65 = 0x41: lead 0x40 | low nibble 1, then 0x04
    (0x0FFD, b"\x4f\xff"),  # largest two-byte value 0xfff
    (0x0FFE, b"\x81\x00\x01"),  # 0xffe + 2 = 0x1000 does not fit two bytes: 0x1001 in three
    (0xFFFFD, b"\xc1\x00\x00\x01"),  # 0x100001 needs four bytes
])
def test_pkg_length(payload: int, expected: bytes) -> None:
    assert aml.pkg_length(payload) == expected


def test_pkg_length_counts_itself() -> None:
    for payload in (0, 1, 62, 63, 64, 300, 4093, 4094, 70000, 1 << 20):
        enc = aml.pkg_length(payload)
        lead = enc[0]
        if len(enc) == 1:
            value = lead
        else:
            assert lead >> 6 == len(enc) - 1
            value = (lead & 0x0F) | (int.from_bytes(enc[1:], "little") << 4)
        assert value == payload + len(enc)
    with pytest.raises(aml.AmlError):
        aml.pkg_length(1 << 28)


def test_names() -> None:
    assert aml.name_seg("_SB") == b"_SB_"
    assert aml.name_string("\\_SB") == b"\\_SB_"
    assert aml.name_string("\\_SB.COM1") == b"\\\x2e_SB_COM1"
    assert aml.name_string("\\_SB.PCI0.ISA") == b"\\\x2f\x03_SB_PCI0ISA_"
    assert aml.name_string("^^FOO") == b"^^FOO_"
    assert aml.name_string("\\") == b"\\\x00"
    for bad in ("", "1ABC", "ABCDE", "a", "A-B"):
        with pytest.raises(aml.AmlError):
            aml.name_seg(bad)


@pytest.mark.parametrize(("value", "expected"), [
    (0, b"\x00"), (1, b"\x01"), (2, b"\x0a\x02"), (0xFF, b"\x0a\xff"), (0x100, b"\x0b\x00\x01"),
    (0x10000, b"\x0c\x00\x00\x01\x00"), (1 << 32, b"\x0e" + (1 << 32).to_bytes(8, "little")),
])
def test_integer(value: int, expected: bytes) -> None:
    assert aml.integer(value) == expected


def test_integer_range() -> None:
    with pytest.raises(aml.AmlError):
        aml.integer(-1)
    with pytest.raises(aml.AmlError):
        aml.integer(1 << 64)


def test_string_and_eisa_id() -> None:
    assert aml.string("LNRO0005") == b"\x0dLNRO0005\x00"
    with pytest.raises(aml.AmlError):
        aml.string("a\0b")
    assert aml.eisa_id("PNP0501") == 0x0105D041  # what iasl emits for EISAID("PNP0501")
    assert aml.eisa_id("PNP0A03") == 0x030AD041
    assert aml.dword(aml.eisa_id("PNP0501")) == b"\x0c\x41\xd0\x05\x01"
    for bad in ("PNP050", "pnp0501", "PNP05G1"):
        with pytest.raises(aml.AmlError):
            aml.eisa_id(bad)


def test_buffer_package_name() -> None:
    assert aml.buffer(b"\x01\x02") == b"\x11\x05\x0a\x02\x01\x02"
    # Name (_S5, Package () {5, Zero}) as iasl compiles it
    assert aml.name("\\_S5", aml.package(aml.integer(5), aml.integer(0))) == \
        b"\x08\\_S5_\x12\x05\x02\x0a\x05\x00"


def test_scope_device_method() -> None:
    dev = aml.device("COM1", aml.name("_UID", aml.integer(1)))
    assert dev == b"\x5b\x82\x0b" + b"COM1" + b"\x08_UID\x01"
    sc = aml.scope("\\_SB", dev)
    assert sc[:1] == b"\x10" and sc[1] == len(sc) - 1 and sc[2:7] == b"\\_SB_" and sc.endswith(dev)
    m = aml.method("_STA", 0, aml.return_(aml.integer(0x0F)))
    assert m == b"\x14\x09_STA\x00\xa4\x0a\x0f"
    assert aml.method("FOO", 2, serialized=True, sync_level=3)[6] == 0x3A
    with pytest.raises(aml.AmlError):
        aml.method("FOO", 8)


def test_long_device_uses_multibyte_pkglength() -> None:
    big = aml.device("BIG", aml.name("DATA", aml.buffer(bytes(100))))
    assert big[:2] == b"\x5b\x82" and big[2] >> 6 == 1  # two-byte PkgLength
    assert (big[2] & 0x0F) | (big[3] << 4) == len(big) - 2


def test_resource_descriptors() -> None:
    # bytes as iasl compiles the same ASL (ACPI 6.5 6.4.3.4, 6.4.3.6, 6.4.2.5, 6.4.2.1)
    assert aml.memory32_fixed(0xD0000000, 0x1000) == bytes.fromhex("860900 01 000000d0 00100000".replace(" ", ""))
    assert aml.extended_interrupt(5, edge=True) == bytes.fromhex("890600 03 01 05000000".replace(" ", ""))
    assert aml.extended_interrupt(9, edge=False, active_low=True, shared=True)[3] == 0x0D
    assert aml.io(0x3F8, 0x3F8, 1, 8) == bytes.fromhex("4701f803f8030108")
    assert aml.irq_no_flags(4) == b"\x22\x10\x00"
    with pytest.raises(aml.AmlError):
        aml.irq_no_flags(16)
    with pytest.raises(aml.AmlError):
        aml.memory32_fixed(0xFFFFF000, 0x2000)


def test_resource_template_checksum() -> None:
    rt = aml.resource_template(aml.memory32_fixed(0xD0000000, 0x1000), aml.extended_interrupt(5, edge=True))
    assert rt[0] == aml.BUFFER_OP
    # Buffer: op, PkgLength (1 byte), size as ByteConst (2 bytes), then the descriptors
    data = rt[4:]
    assert rt[3] == len(data)
    assert data[-2] == aml.TAG_END
    assert sum(data) % 256 == 0
