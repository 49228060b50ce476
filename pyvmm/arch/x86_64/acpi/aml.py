"""A small ACPI Machine Language encoder: just what a static DSDT of a microVM needs.

Every function returns the encoded bytes of one AML term; terms nest by passing bytes to bytes.
Grammar references are to ACPI 6.5, chapter 20 "ACPI Machine Language (AML) Specification":
- 20.2.2 Name Objects Encoding (NameSeg, NameString, RootChar, DualNamePrefix, MultiNamePrefix)
- 20.2.3 Data Objects Encoding (ZeroOp/OneOp, BytePrefix..QWordPrefix, StringPrefix)
- 20.2.4 Package Length Encoding (PkgLength)
- 20.2.5 Term Objects Encoding (DefName, DefScope, DefBuffer, DefPackage, DefMethod, DefDevice,
  DefReturn)
and the resource descriptors that go in a ``_CRS`` buffer to 6.4 "Resource Data Types for ACPI":
6.4.2.1 IRQ, 6.4.2.5 I/O Port, 6.4.2.9 End Tag, 6.4.3.4 32-Bit Fixed Memory Range, 6.4.3.6 Extended
Interrupt.  ``EISAID`` follows 6.1.5 (_HID) "compressed EISA type ID".
"""

from __future__ import annotations

import struct

# 20.2.3 / 20.2.5 opcodes
ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C  # '\'
PARENT_PREFIX_CHAR = 0x5E  # '^'
RETURN_OP = 0xA4

# 6.4 resource descriptor tags
TAG_IRQ_NO_FLAGS = 0x22  # small item 0x04, length 2
TAG_IO = 0x47  # small item 0x08, length 7
TAG_END = 0x79  # small item 0x0F, length 1
TAG_MEMORY32_FIXED = 0x86  # large item 0x06
TAG_EXTENDED_INTERRUPT = 0x89  # large item 0x09
# 6.4.3.6 Extended Interrupt flags
INT_CONSUMER = 1 << 0
INT_EDGE = 1 << 1
INT_ACTIVE_LOW = 1 << 2
INT_SHARED = 1 << 3
INT_WAKE_CAPABLE = 1 << 4

_LEAD_NAME_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_CHARS = _LEAD_NAME_CHARS | frozenset(b"0123456789")


class AmlError(ValueError):
    """A value that cannot be encoded (bad name, length out of range)."""


# --- 20.2.4 PkgLength ----------------------------------------------------------------------------------
def pkg_length(payload: int) -> bytes:
    """PkgLength for ``payload`` bytes that follow it; the encoded value counts the PkgLength too.

    One byte holds up to 63; otherwise bits 7-6 of the lead byte give the number (1-3) of following
    bytes, bits 3-0 the low nibble, and each following byte the next 8 bits.
    """
    if payload < 0:
        raise AmlError("negative package length")
    if payload + 1 < 0x40:
        return bytes([payload + 1])
    for extra in (1, 2, 3):
        total = payload + 1 + extra
        if total < 1 << (4 + 8 * extra):
            lead = (extra << 6) | (total & 0x0F)
            return bytes([lead]) + (total >> 4).to_bytes(extra, "little")
    raise AmlError(f"package of {payload} bytes exceeds the 2^28 PkgLength limit")


# --- 20.2.2 names ------------------------------------------------------------------------------------------
def name_seg(seg: str) -> bytes:
    """A NameSeg: 4 characters, [A-Z_] then [A-Z0-9_], padded with '_' (ASL pads the same way)."""
    raw = seg.encode("ascii")
    if not 1 <= len(raw) <= 4 or raw[0] not in _LEAD_NAME_CHARS or any(c not in _NAME_CHARS for c in raw):
        raise AmlError(f"bad ACPI name segment {seg!r}")
    return raw.ljust(4, b"_")


def name_string(path: str) -> bytes:
    """A NameString: optional '\\' or '^' prefixes, then dot-separated segments."""
    prefix = b""
    rest = path
    if rest.startswith("\\"):
        prefix, rest = bytes([ROOT_CHAR]), rest[1:]
    else:
        while rest.startswith("^"):
            prefix, rest = prefix + bytes([PARENT_PREFIX_CHAR]), rest[1:]
    if not rest:
        return prefix + bytes([ZERO_OP])  # NullName: the root itself (20.2.2)
    segs = [name_seg(s) for s in rest.split(".")]
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise AmlError(f"name path {path!r} has more than 255 segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


# --- 20.2.3 data objects -------------------------------------------------------------------------------------
def integer(value: int) -> bytes:
    """The shortest ComputationalData for ``value``: ZeroOp, OneOp, or a Byte/Word/DWord/QWord prefix."""
    if value < 0 or value >= 1 << 64:
        raise AmlError(f"integer {value} outside 0..2^64-1")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    for prefix, fmt, limit in ((BYTE_PREFIX, "<B", 1 << 8), (WORD_PREFIX, "<H", 1 << 16),
                               (DWORD_PREFIX, "<I", 1 << 32)):
        if value < limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def dword(value: int) -> bytes:
    """An integer always encoded as a DWord (how ASL writes EISAID values)."""
    return bytes([DWORD_PREFIX]) + struct.pack("<I", value)


def string(text: str) -> bytes:
    raw = text.encode("ascii")
    if b"\0" in raw or any(c > 0x7F for c in raw):
        raise AmlError(f"AML strings are NUL-free ASCII: {text!r}")
    return bytes([STRING_PREFIX]) + raw + b"\0"


def eisa_id(text: str) -> int:
    """6.1.5: "PNP0501" -> the compressed 32-bit EISA id (three 5-bit letters, four hex digits), byte
    order as stored in AML (EISAID("PNP0501") == 0x0105D041)."""
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise AmlError(f"bad EISA id {text!r}: three capital letters and four hex digits")
    try:
        product = int(text[3:], 16)
    except ValueError:
        raise AmlError(f"bad EISA id {text!r}: three capital letters and four hex digits") from None
    value = ((ord(text[0]) - 0x40) << 26) | ((ord(text[1]) - 0x40) << 21) | ((ord(text[2]) - 0x40) << 16) | product
    return int.from_bytes(value.to_bytes(4, "big"), "little")


def buffer(data: bytes) -> bytes:
    """DefBuffer: BufferOp PkgLength BufferSize ByteList."""
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def package(*elements: bytes) -> bytes:
    """DefPackage: PackageOp PkgLength NumElements PackageElementList (each element already encoded)."""
    if len(elements) > 255:
        raise AmlError("a Package holds at most 255 elements (use VarPackage)")
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


# --- 20.2.5 named objects and statements -----------------------------------------------------------------------
def name(path: str, value: bytes) -> bytes:
    """DefName: NameOp NameString DataRefObject."""
    return bytes([NAME_OP]) + name_string(path) + value


def scope(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def method(path: str, argc: int, *terms: bytes, serialized: bool = False, sync_level: int = 0) -> bytes:
    """DefMethod; MethodFlags: bits 2-0 argument count, bit 3 serialized, bits 7-4 sync level."""
    if not 0 <= argc <= 7 or not 0 <= sync_level <= 15:
        raise AmlError("a method has 0-7 arguments and a sync level of 0-15")
    flags = argc | (0x08 if serialized else 0) | (sync_level << 4)
    body = name_string(path) + bytes([flags]) + b"".join(terms)
    return bytes([METHOD_OP]) + pkg_length(len(body)) + body


def return_(value: bytes) -> bytes:
    return bytes([RETURN_OP]) + value


# --- 6.4 resource descriptors -------------------------------------------------------------------------------------
def memory32_fixed(base: int, length: int, *, writable: bool = True) -> bytes:
    """6.4.3.4 32-Bit Fixed Memory Range Descriptor (ASL Memory32Fixed)."""
    if base < 0 or length < 0 or base + length > 1 << 32:
        raise AmlError(f"Memory32Fixed {base:#x}+{length:#x} is not below 4 GiB")
    return struct.pack("<BHBII", TAG_MEMORY32_FIXED, 9, 1 if writable else 0, base, length)


def extended_interrupt(*irqs: int, edge: bool, active_low: bool = False, shared: bool = False,
                       wake_capable: bool = False, consumer: bool = True) -> bytes:
    """6.4.3.6 Extended Interrupt Descriptor (ASL Interrupt), without a resource source."""
    if not 1 <= len(irqs) <= 255 or any(not 0 <= i < 1 << 32 for i in irqs):
        raise AmlError(f"bad interrupt list {irqs}")
    flags = ((INT_CONSUMER if consumer else 0) | (INT_EDGE if edge else 0) | (INT_ACTIVE_LOW if active_low else 0)
             | (INT_SHARED if shared else 0) | (INT_WAKE_CAPABLE if wake_capable else 0))
    body = struct.pack(f"<BB{len(irqs)}I", flags, len(irqs), *irqs)
    return struct.pack("<BH", TAG_EXTENDED_INTERRUPT, len(body)) + body


def irq_no_flags(*irqs: int) -> bytes:
    """6.4.2.1 IRQ Descriptor, 2-byte form (ASL IRQNoFlags): edge-triggered, active high, exclusive."""
    if any(not 0 <= i < 16 for i in irqs):
        raise AmlError(f"ISA IRQs are 0-15: {irqs}")
    mask = 0
    for i in irqs:
        mask |= 1 << i
    return struct.pack("<BH", TAG_IRQ_NO_FLAGS, mask)


def io(minimum: int, maximum: int, alignment: int, length: int, *, decode16: bool = True) -> bytes:
    """6.4.2.5 I/O Port Descriptor (ASL IO)."""
    if not (0 <= minimum <= maximum < 1 << 16 and 0 <= alignment < 256 and 0 <= length < 256):
        raise AmlError("bad IO descriptor")
    return struct.pack("<BBHHBB", TAG_IO, 1 if decode16 else 0, minimum, maximum, alignment, length)


def end_tag(preceding: bytes) -> bytes:
    """6.4.2.9 End Tag, with the checksum that makes the whole template sum to zero."""
    return bytes([TAG_END, (-(sum(preceding) + TAG_END)) & 0xFF])


def resource_template(*descriptors: bytes) -> bytes:
    """ASL ResourceTemplate(): a Buffer of the descriptors and an End Tag."""
    data = b"".join(descriptors)
    return buffer(data + end_tag(data))
