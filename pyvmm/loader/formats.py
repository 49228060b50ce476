"""Which kind of kernel file this is, from its first bytes (never from its name): what every
architecture's loader asks first, and what lets one say "an x86 bzImage" to an arm64 host.

- ELF: ``\\x7fELF`` at 0 (the System V ABI, "ELF Identification").
- x86 bzImage: the boot sector's signature 0xAA55 at 0x1fe and "HdrS" at 0x202
  (Documentation/arch/x86/boot.rst, "The Real-Mode Kernel Header": ``boot_flag``, ``header``).
- arm64 ``Image``: "ARM\\x64" at 56 (Documentation/arch/arm64/booting.rst, the Image header's magic).
"""

from __future__ import annotations

import struct

ELF_MAGIC = b"\x7fELF"
BZIMAGE_BOOT_FLAG_OFFSET = 0x1FE
BZIMAGE_BOOT_FLAG = 0xAA55
BZIMAGE_HEADER_OFFSET = 0x202
BZIMAGE_HEADER_MAGIC = 0x53726448  # "HdrS", little-endian
AARCH64_IMAGE_MAGIC_OFFSET = 56
AARCH64_IMAGE_MAGIC = b"ARM\x64"

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


def is_elf(data: bytes) -> bool:
    return data[:len(ELF_MAGIC)] == ELF_MAGIC


def is_bzimage(data: bytes) -> bool:
    """Boot-sector signature 0xAA55 at 0x1fe and "HdrS" at 0x202."""
    return (
        len(data) >= BZIMAGE_HEADER_OFFSET + 4
        and _U16.unpack_from(data, BZIMAGE_BOOT_FLAG_OFFSET)[0] == BZIMAGE_BOOT_FLAG
        and _U32.unpack_from(data, BZIMAGE_HEADER_OFFSET)[0] == BZIMAGE_HEADER_MAGIC
    )


def has_aarch64_image_magic(data: bytes) -> bool:
    return data[AARCH64_IMAGE_MAGIC_OFFSET:AARCH64_IMAGE_MAGIC_OFFSET + 4] == AARCH64_IMAGE_MAGIC
