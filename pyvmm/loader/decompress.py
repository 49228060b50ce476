"""Host-side extraction of the ELF ``vmlinux`` compressed inside a bzImage.

Protocol 2.08+ headers locate the payload: ``payload_offset`` (from the start of the protected-mode
code) and ``payload_length`` (boot.rst, "Details of Header Fields").  The compressor is recognised by
its magic, as in lib/decompress.c.  Linux's build appends the uncompressed size as 4 little-endian
bytes to every format (scripts/Makefile.lib ``size_append``), so each decoder here stops at the end of
its stream and ignores what follows.  LZ4 uses the *legacy* frame (lib/decompress_unlz4.c): the magic
0x184C2102 then blocks of ``[le32 compressed size][data]``, each at most 8 MiB uncompressed.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from collections.abc import Callable

from pyvmm.errors import LoaderError

ELF_MAGIC = b"\x7fELF"
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20  # lib/decompress_unlz4.c uncomp_chunksize

# (magic, name), longest first where one could be a prefix of another.
MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
)
_U32 = struct.Struct("<I")


def detect(payload: bytes) -> str:
    """The compression format of ``payload`` from its magic; LoaderError 'unknown compression'."""
    for magic, fmt in MAGICS:
        if payload.startswith(magic):
            return fmt
    raise LoaderError(f"unknown compression (payload starts with {payload[:6].hex(' ')})")


def _gunzip(data: bytes) -> bytes:
    d = zlib.decompressobj(wbits=31)  # gzip container; trailing bytes land in unused_data
    out = d.decompress(data) + d.flush()
    if not d.eof:
        raise ValueError("truncated gzip stream")
    return out


def _bunzip2(data: bytes) -> bytes:
    d = bz2.BZ2Decompressor()
    out = d.decompress(data)
    if not d.eof:
        raise ValueError("truncated bzip2 stream")
    return out


def _lzma_with(fmt: int) -> Callable[[bytes], bytes]:
    def run(data: bytes) -> bytes:
        d = lzma.LZMADecompressor(format=fmt)
        out = d.decompress(data)
        # An .lzma (alone) stream of unknown size ends with an end marker; with a known size it may not,
        # and then the decoder stops after exactly that many bytes, also reporting eof.
        if not d.eof:
            raise ValueError("truncated lzma/xz stream")
        return out

    return run


# The zstd and lz4 bindings are imported by the decoders that use them: a boot from an ELF vmlinux (the
# default) never pays for them at start-up.
def _unzstd(data: bytes) -> bytes:
    import zstandard

    # `zstd -22 --ultra` uses a window of up to 128 MiB; allow more than the library's default limit.
    try:
        d = zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj()
        out = d.decompress(data)
    except zstandard.ZstdError as err:
        raise ValueError(str(err)) from None
    if not d.eof:
        raise ValueError("truncated zstd stream")
    return bytes(out)


def _unlz4_legacy(data: bytes) -> bytes:
    import lz4.block

    if len(data) < 4 or _U32.unpack_from(data, 0)[0] != LZ4_LEGACY_MAGIC:
        raise ValueError("no lz4 legacy magic")
    out: list[bytes] = []
    off = 4
    while len(data) - off >= 4:
        size = _U32.unpack_from(data, off)[0]
        off += 4
        if size == LZ4_LEGACY_MAGIC:  # concatenated legacy streams: a new magic, go on
            continue
        if size == 0:
            break
        if off == len(data):  # the 4 bytes were the appended uncompressed size, not a block
            break
        if size > len(data) - off:
            raise ValueError(f"block of {size} bytes at {off - 4:#x} runs past the end")
        try:
            out.append(lz4.block.decompress(data[off : off + size], uncompressed_size=LZ4_LEGACY_BLOCK))
        except lz4.block.LZ4BlockError as err:
            raise ValueError(str(err)) from None
        off += size
    if not out:
        raise ValueError("no lz4 blocks")
    return b"".join(out)


DECODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": _gunzip,
    "bzip2": _bunzip2,
    "xz": _lzma_with(lzma.FORMAT_XZ),
    "lzma": _lzma_with(lzma.FORMAT_ALONE),
    "zstd": _unzstd,
    "lz4": _unlz4_legacy,
}


def decompress(payload: bytes) -> tuple[str, bytes]:
    """``(format, data)`` for a compressed kernel payload; LoaderError 'corrupt <fmt> payload'."""
    fmt = detect(payload)
    try:
        data = DECODERS[fmt](payload)
    except (
        ValueError,
        OSError,
        EOFError,
        lzma.LZMAError,
        zlib.error,
    ) as e:
        raise LoaderError(f"corrupt {fmt} payload: {e}") from None
    return fmt, data


def extract_elf(payload: bytes) -> tuple[str, bytes]:
    """Decompress a bzImage payload and check that it is the ELF ``vmlinux``: ``(format, elf)``."""
    fmt, data = decompress(payload)
    if not data.startswith(ELF_MAGIC):
        raise LoaderError(f"{fmt} payload is not an ELF (starts with {data[:4].hex(' ')})")
    return fmt, data
