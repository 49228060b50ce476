"""The bzImage format: its setup header, and loading it either way pyvmm boots it.

Follows Documentation/arch/x86/boot.rst: "The Real-Mode Kernel Header" and "Details of Header Fields"
(which field exists from which protocol version, and the defaults for older ones), "Loading The Rest
of The Kernel" (the protected-mode code starts at ``(setup_sects + 1) * 512``, ``setup_sects == 0``
meaning 4) and "64-bit Boot Protocol" (entry = load address + 0x200, with ``XLF_KERNEL_64``).

``boot='guest'`` places the protected-mode code at 1 MiB; the kernel's own decompressor runs in the
guest.  The 64-bit entry needs protocol 2.12, the first with ``xloadflags`` and so with a way for the
kernel to say it has a 64-bit entry (``XLF_KERNEL_64``).  ``boot='elf'`` decompresses the payload
(protocol 2.08+: ``payload_offset``/``payload_length``) on the host and loads the ELF inside.
"""

from __future__ import annotations

import ctypes
import struct

from pyvmm.arch.x86_64.bootparams import (
    LOADED_HIGH,
    SETUP_HEADER_OFFSET,
    XLF_KERNEL_64,
    setup_header,
)
from pyvmm.arch.x86_64.layout import HIMEM_START, INITRD_ADDR_MAX_DEFAULT
from pyvmm.errors import LoaderError
from pyvmm.loader.elf import load_elf
from pyvmm.loader.formats import is_bzimage
from pyvmm.loader.kernel import LoadedKernel
from pyvmm.memory import GuestMemory
from pyvmm.record import record, replace

PROTOCOL_MIN_GUEST = 0x020C  # xloadflags / XLF_KERNEL_64
PROTOCOL_MIN_ELF = 0x0208  # payload_offset / payload_length
ENTRY_64_OFFSET = 0x200  # boot.rst "64-bit Boot Protocol"
CMDLINE_SIZE_DEFAULT = 255  # boot.rst cmdline_size: "for protocol < 2.06 the maximum is 255"
_HEADER_END = SETUP_HEADER_OFFSET + ctypes.sizeof(setup_header)
_HDRS_OFFSET = 0x202
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


def _v(protocol: int) -> str:
    return f"{protocol >> 8}.{protocol & 0xFF:02d}"


@record
class BzImageHeader:
    """The setup-header fields a loader reads, with boot.rst's defaults for older protocols."""

    protocol: int
    setup_sects: int
    syssize: int
    loadflags: int
    xloadflags: int
    relocatable_kernel: bool
    kernel_alignment: int
    pref_address: int
    init_size: int
    payload_offset: int
    payload_length: int
    initrd_addr_max: int
    cmdline_size: int
    raw: bytes  # the header as in the file, 0x1f1 up to its end (0x202 + the byte at 0x201)

    @property
    def setup_size(self) -> int:
        """Offset of the protected-mode code in the file."""
        return (self.setup_sects + 1) * 512


def parse_header(data: bytes, name: str = "kernel") -> BzImageHeader:
    """Parse and validate the setup header of the bzImage ``data``."""
    if not is_bzimage(data):
        raise LoaderError(f"{name}: not a Linux kernel (no ELF header, no bzImage boot sector/HdrS)")
    hdr = setup_header.from_buffer_copy(
        data[SETUP_HEADER_OFFSET:_HEADER_END].ljust(ctypes.sizeof(setup_header), b"\0")
    )
    p = hdr.version
    if p < 0x0200:
        raise LoaderError(f"{name}: boot protocol {_v(p)} is too old")
    raw_end = min(_HDRS_OFFSET + data[0x201], _HEADER_END)
    h = BzImageHeader(
        protocol=p,
        setup_sects=hdr.setup_sects or 4,
        syssize=hdr.syssize if p >= 0x0204 else hdr.syssize & 0xFFFF,
        loadflags=hdr.loadflags,
        xloadflags=hdr.xloadflags if p >= 0x020C else 0,
        relocatable_kernel=bool(hdr.relocatable_kernel) if p >= 0x0205 else False,
        kernel_alignment=hdr.kernel_alignment if p >= 0x0205 else 0,
        pref_address=hdr.pref_address if p >= 0x020A else 0,
        init_size=hdr.init_size if p >= 0x020A else 0,
        payload_offset=hdr.payload_offset if p >= 0x0208 else 0,
        payload_length=hdr.payload_length if p >= 0x0208 else 0,
        initrd_addr_max=hdr.initrd_addr_max if p >= 0x0203 else INITRD_ADDR_MAX_DEFAULT,
        cmdline_size=hdr.cmdline_size if p >= 0x0206 else CMDLINE_SIZE_DEFAULT,
        raw=bytes(data[SETUP_HEADER_OFFSET:raw_end]),
    )
    if len(data) < h.setup_size or len(data) < _HEADER_END:
        raise LoaderError(
            f"{name}: truncated bzImage ({len(data)} bytes, setup code alone is {h.setup_size})"
        )
    # build.c rounds syssize up to 16-byte paragraphs, so up to 15 bytes may be "missing".
    pm_len = len(data) - h.setup_size
    if h.syssize * 16 > pm_len + 15:
        raise LoaderError(
            f"{name}: truncated bzImage ({pm_len} bytes of kernel, header says {h.syssize * 16})"
        )
    if h.payload_offset + h.payload_length > pm_len:
        raise LoaderError(f"{name}: truncated bzImage (payload ends past the end of the file)")
    return h


def _align_up(n: int, align: int) -> int:
    return -(-n // align) * align if align > 1 else n


def load_guest(mem: GuestMemory, data: bytes, name: str) -> LoadedKernel:
    """Load the protected-mode code at 1 MiB for the 64-bit boot protocol; the guest decompresses."""
    h = parse_header(data, name)
    if h.protocol < PROTOCOL_MIN_GUEST:
        raise LoaderError(
            f"{name}: boot protocol {_v(h.protocol)} is too old for the 64-bit entry (needs 2.12)"
        )
    if not h.xloadflags & XLF_KERNEL_64:
        raise LoaderError(f"{name}: not a 64-bit kernel (XLF_KERNEL_64 is clear)")
    if not h.loadflags & LOADED_HIGH:
        raise LoaderError(f"{name}: zImage (not loaded high) is not supported")
    pm = data[h.setup_size :]
    load = HIMEM_START
    # Where the kernel decompresses itself (boot.rst init_size); x86_64 head_64.S additionally never
    # goes below LOAD_PHYSICAL_ADDR, which the header reports as pref_address.
    runtime = _align_up(load, h.kernel_alignment) if h.relocatable_kernel else (h.pref_address or load)
    runtime = max(runtime, h.pref_address)
    end = max(load + len(pm), runtime + h.init_size)
    if not mem.contains(load, end - load):
        raise LoaderError(f"{name}: needs guest RAM up to {end:#x} (at least {-(-end // (1 << 20))} MiB)")
    mem.write(load, pm)
    return LoadedKernel(
        entry=load + ENTRY_64_OFFSET,
        format="bzImage",
        setup_header=h.raw,
        protocol=h.protocol,
        kernel_start=load,
        kernel_end=end,
        initrd_addr_max=h.initrd_addr_max,
        cmdline_size=h.cmdline_size,
        xloadflags=h.xloadflags,
    )


def load_extracted(mem: GuestMemory, data: bytes, name: str) -> LoadedKernel:
    """Decompress the bzImage payload on the host and load the ``vmlinux`` ELF inside it."""
    h = parse_header(data, name)
    if h.protocol < PROTOCOL_MIN_ELF:
        raise LoaderError(
            f"{name}: boot protocol {_v(h.protocol)} is too old to locate the payload (needs 2.08)"
        )
    from pyvmm.loader.decompress import extract_elf  # lzma, bz2 and zlib: only for a bzImage

    start = h.setup_size + h.payload_offset
    try:
        fmt, elf = extract_elf(data[start : start + h.payload_length])
    except LoaderError as e:
        raise LoaderError(f"{name}: {e}") from None
    k = load_elf(mem, elf, f"{name} (vmlinux in bzImage)")
    return replace(
        k,
        format=f"bzImage→elf ({fmt})",
        setup_header=h.raw,
        protocol=h.protocol,
        initrd_addr_max=h.initrd_addr_max,
        cmdline_size=h.cmdline_size,
        xloadflags=h.xloadflags,
    )
