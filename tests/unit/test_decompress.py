"""bzImage payload extraction: every compressor Linux offers, the trailing size, corrupt inputs."""

from __future__ import annotations

import random
import struct

import pytest

from pyvmm.errors import LoaderError
from pyvmm.loader.decompress import decompress, detect, extract_elf
from pyvmm.testing.kernels import LZ4_LEGACY_MAGIC, compress, lz4_legacy

FORMATS = ["gzip", "bzip2", "xz", "lzma", "lz4", "zstd"]
ELF_BLOB = b"\x7fELF" + bytes(range(256)) * 64 + random.Random(0).randbytes(4096)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("size_append", [True, False])
def test_roundtrip(fmt: str, size_append: bool) -> None:
    payload = compress(fmt, ELF_BLOB, size_append=size_append)
    assert detect(payload) == fmt
    assert extract_elf(payload) == (fmt, ELF_BLOB)


def test_lz4_multiple_blocks_and_concatenated_streams() -> None:
    data = b"\x7fELF" + random.Random(1).randbytes(3000) + b"\0" * 5000
    multi = lz4_legacy(data, block_size=1024)
    assert decompress(multi + struct.pack("<I", len(data))) == ("lz4", data)
    # a second legacy stream appended (its magic where a block size would be) continues the output
    both = lz4_legacy(data, block_size=4096) + lz4_legacy(data, block_size=2048)
    assert decompress(both) == ("lz4", data + data)
    # a zero block size ends the stream
    assert decompress(lz4_legacy(data) + b"\0\0\0\0" + b"junk") == ("lz4", data)


def test_lz4_block_past_end_is_corrupt() -> None:
    payload = struct.pack("<II", LZ4_LEGACY_MAGIC, 1000) + b"\0" * 10
    with pytest.raises(LoaderError, match="corrupt lz4 payload"):
        decompress(payload)


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_payload_is_corrupt(fmt: str) -> None:
    payload = compress(fmt, ELF_BLOB, size_append=False)
    with pytest.raises(LoaderError, match=f"corrupt {fmt} payload"):
        decompress(payload[: len(payload) // 2])


@pytest.mark.parametrize("fmt", FORMATS)
def test_garbled_payload_is_corrupt(fmt: str) -> None:
    payload = bytearray(compress(fmt, ELF_BLOB, size_append=False))
    # LZ4 has no checksum: garble the first block's token and literal length so it overruns its input.
    mid = 8 if fmt == "lz4" else len(payload) // 2
    payload[mid : mid + 64] = b"\xff" * 64
    with pytest.raises(LoaderError, match=f"corrupt {fmt} payload"):
        decompress(bytes(payload))


def test_unknown_magic() -> None:
    with pytest.raises(LoaderError, match="unknown compression"):
        decompress(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(LoaderError, match="unknown compression"):
        decompress(b"")


@pytest.mark.parametrize("fmt", FORMATS)
def test_payload_not_elf(fmt: str) -> None:
    with pytest.raises(LoaderError, match="payload is not an ELF"):
        extract_elf(compress(fmt, b"MZ not a vmlinux" * 10))
