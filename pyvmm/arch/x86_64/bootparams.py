"""The x86 "zero page" (``struct boot_params``) and the E820 memory map handed to a Linux guest.

Structures mirror ``/usr/include/x86_64-linux-gnu/asm/bootparam.h`` (uapi ``asm/bootparam.h``) and the
headers it includes; every struct is ``__attribute__((packed))`` there, hence ``_pack_ = 1`` here.
Sizes are checked at import against the header's sizes; ``tests/unit/test_bootparam_cc.py`` compares
sizes and offsets with a C probe compiled against the installed header.

What a boot loader writes follows Documentation/arch/x86/boot.rst: "The Real-Mode Kernel Header"
(field by field), "64-bit Boot Protocol" (copy the kernel's setup header at 0x1f1 into a zeroed
boot_params, then fill the loader's fields) and Documentation/arch/x86/zero-page.rst (e820_table).
For an ELF ``vmlinux`` (no setup header in the file) a synthetic header is filled, which is enough for
the kernel's 64-bit entry ``startup_64`` that only reads the fields a loader writes.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from pyvmm.arch.x86_64.layout import (
    CMDLINE_ADDR,
    CMDLINE_MAX,
    EBDA_START,
    HIMEM_START,
    ZERO_PAGE_ADDR,
    MiB,
)
from pyvmm.errors import LoaderError
from pyvmm.kvm.abi import checked
from pyvmm.statictypes import TYPE_CHECKING

if TYPE_CHECKING:  # only for annotations: the loader imports this module for setup_header
    from pyvmm.loader.kernel import LoadedKernel
    from pyvmm.memory import GuestMemory

# --- constants (asm/bootparam.h, asm/e820.h) ---------------------------------------------------------
# loadflags
LOADED_HIGH = 1 << 0
KASLR_FLAG = 1 << 1
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7
# xloadflags (protocol 2.12+)
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
XLF_EFI_HANDOVER_32 = 1 << 2
XLF_EFI_HANDOVER_64 = 1 << 3
XLF_EFI_KEXEC = 1 << 4
XLF_5LEVEL = 1 << 5
XLF_5LEVEL_ENABLED = 1 << 6
# E820 types (asm/e820.h)
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5
E820_PMEM = 7
E820_MAX_ENTRIES_ZEROPAGE = 128

# boot.rst "The Real-Mode Kernel Header"
SETUP_HEADER_OFFSET = 0x1F1  # in the kernel file and in boot_params
BOOT_FLAG_MAGIC = 0xAA55  # boot_flag at 0x1fe
HDRS_MAGIC = 0x53726448  # "HdrS" at 0x202, little-endian
TYPE_OF_LOADER_UNDEFINED = 0xFF  # boot.rst: "0xFF: undefined", the value for loaders without an ID
# boot.rst "Sample Boot Configuration": heap_end = 0xe000 for protocol >= 2.02, stored minus 0x200.
# The 64-bit entry never runs the real-mode setup code that uses the heap; set as the protocol asks.
HEAP_END_PTR = 0xE000 - 0x200
# Synthetic header for ELF kernels: the protocol version the header we write corresponds to (2.15),
# and the alignment the kernel expects of its physical load address (CONFIG_PHYSICAL_ALIGN is at least
# 2 MiB on x86_64, arch/x86/Kconfig).
SYNTHETIC_PROTOCOL = 0x020F
SYNTHETIC_KERNEL_ALIGNMENT = 2 * MiB

# asm/bootparam.h / linux/edd.h array bounds
EDD_MBR_SIG_MAX = 16
EDDMAXNR = 6
EDDPARMSIZE = 74

class _Packed(ctypes.LittleEndianStructure):
    """Base of the packed boot-protocol structs; ``__slots__`` makes a misspelled field raise."""

    __slots__ = ()
    _pack_ = 1


# --- nested structs of boot_params --------------------------------------------------------------------
@checked(0x40)
class screen_info(_Packed):  # linux/screen_info.h
    __slots__ = ()
    _fields_ = [
        ("orig_x", ctypes.c_uint8),
        ("orig_y", ctypes.c_uint8),
        ("ext_mem_k", ctypes.c_uint16),
        ("orig_video_page", ctypes.c_uint16),
        ("orig_video_mode", ctypes.c_uint8),
        ("orig_video_cols", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("unused2", ctypes.c_uint8),
        ("orig_video_ega_bx", ctypes.c_uint16),
        ("unused3", ctypes.c_uint16),
        ("orig_video_lines", ctypes.c_uint8),
        ("orig_video_isVGA", ctypes.c_uint8),
        ("orig_video_points", ctypes.c_uint16),
        ("lfb_width", ctypes.c_uint16),
        ("lfb_height", ctypes.c_uint16),
        ("lfb_depth", ctypes.c_uint16),
        ("lfb_base", ctypes.c_uint32),
        ("lfb_size", ctypes.c_uint32),
        ("cl_magic", ctypes.c_uint16),
        ("cl_offset", ctypes.c_uint16),
        ("lfb_linelength", ctypes.c_uint16),
        ("red_size", ctypes.c_uint8),
        ("red_pos", ctypes.c_uint8),
        ("green_size", ctypes.c_uint8),
        ("green_pos", ctypes.c_uint8),
        ("blue_size", ctypes.c_uint8),
        ("blue_pos", ctypes.c_uint8),
        ("rsvd_size", ctypes.c_uint8),
        ("rsvd_pos", ctypes.c_uint8),
        ("vesapm_seg", ctypes.c_uint16),
        ("vesapm_off", ctypes.c_uint16),
        ("pages", ctypes.c_uint16),
        ("vesa_attributes", ctypes.c_uint16),
        ("capabilities", ctypes.c_uint32),
        ("ext_lfb_base", ctypes.c_uint32),
        ("_reserved", ctypes.c_uint8 * 2),
    ]


@checked(0x14)
class apm_bios_info(_Packed):  # linux/apm_bios.h (naturally aligned, no padding: same packed)
    __slots__ = ()
    _fields_ = [
        ("version", ctypes.c_uint16),
        ("cseg", ctypes.c_uint16),
        ("offset", ctypes.c_uint32),
        ("cseg_16", ctypes.c_uint16),
        ("dseg", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("cseg_len", ctypes.c_uint16),
        ("cseg_16_len", ctypes.c_uint16),
        ("dseg_len", ctypes.c_uint16),
    ]


@checked(0x10)
class ist_info(_Packed):  # asm/ist.h
    __slots__ = ()
    _fields_ = [
        ("signature", ctypes.c_uint32),
        ("command", ctypes.c_uint32),
        ("event", ctypes.c_uint32),
        ("perf_level", ctypes.c_uint32),
    ]


@checked(0x10)
class sys_desc_table(_Packed):  # asm/bootparam.h
    __slots__ = ()
    _fields_ = [("length", ctypes.c_uint16), ("table", ctypes.c_uint8 * 14)]


@checked(0x10)
class olpc_ofw_header(_Packed):  # asm/bootparam.h
    __slots__ = ()
    _fields_ = [
        ("ofw_magic", ctypes.c_uint32),
        ("ofw_version", ctypes.c_uint32),
        ("cif_handler", ctypes.c_uint32),
        ("irq_desc_table", ctypes.c_uint32),
    ]


@checked(0x80)
class edid_info(_Packed):  # video/edid.h
    __slots__ = ()
    _fields_ = [("dummy", ctypes.c_uint8 * 128)]


@checked(0x20)
class efi_info(_Packed):  # asm/bootparam.h
    __slots__ = ()
    _fields_ = [
        ("efi_loader_signature", ctypes.c_uint32),
        ("efi_systab", ctypes.c_uint32),
        ("efi_memdesc_size", ctypes.c_uint32),
        ("efi_memdesc_version", ctypes.c_uint32),
        ("efi_memmap", ctypes.c_uint32),
        ("efi_memmap_size", ctypes.c_uint32),
        ("efi_systab_hi", ctypes.c_uint32),
        ("efi_memmap_hi", ctypes.c_uint32),
    ]


@checked(8 + EDDPARMSIZE)
class edd_info(_Packed):  # linux/edd.h; edd_device_params (74 bytes of BIOS unions) kept opaque
    __slots__ = ()
    _fields_ = [
        ("device", ctypes.c_uint8),
        ("version", ctypes.c_uint8),
        ("interface_support", ctypes.c_uint16),
        ("legacy_max_cylinder", ctypes.c_uint16),
        ("legacy_max_head", ctypes.c_uint8),
        ("legacy_sectors_per_track", ctypes.c_uint8),
        ("params", ctypes.c_uint8 * EDDPARMSIZE),
    ]


@checked(0x26C - SETUP_HEADER_OFFSET)
class setup_header(_Packed):  # asm/bootparam.h; boot.rst "The Real-Mode Kernel Header"
    __slots__ = ()
    _fields_ = [
        ("setup_sects", ctypes.c_uint8),  # 0x1f1
        ("root_flags", ctypes.c_uint16),
        ("syssize", ctypes.c_uint32),
        ("ram_size", ctypes.c_uint16),
        ("vid_mode", ctypes.c_uint16),
        ("root_dev", ctypes.c_uint16),
        ("boot_flag", ctypes.c_uint16),  # 0x1fe
        ("jump", ctypes.c_uint16),
        ("header", ctypes.c_uint32),  # 0x202
        ("version", ctypes.c_uint16),  # 0x206
        ("realmode_swtch", ctypes.c_uint32),
        ("start_sys_seg", ctypes.c_uint16),
        ("kernel_version", ctypes.c_uint16),
        ("type_of_loader", ctypes.c_uint8),  # 0x210
        ("loadflags", ctypes.c_uint8),  # 0x211
        ("setup_move_size", ctypes.c_uint16),
        ("code32_start", ctypes.c_uint32),
        ("ramdisk_image", ctypes.c_uint32),  # 0x218
        ("ramdisk_size", ctypes.c_uint32),
        ("bootsect_kludge", ctypes.c_uint32),
        ("heap_end_ptr", ctypes.c_uint16),  # 0x224
        ("ext_loader_ver", ctypes.c_uint8),
        ("ext_loader_type", ctypes.c_uint8),
        ("cmd_line_ptr", ctypes.c_uint32),  # 0x228
        ("initrd_addr_max", ctypes.c_uint32),  # 0x22c
        ("kernel_alignment", ctypes.c_uint32),  # 0x230
        ("relocatable_kernel", ctypes.c_uint8),
        ("min_alignment", ctypes.c_uint8),
        ("xloadflags", ctypes.c_uint16),  # 0x236
        ("cmdline_size", ctypes.c_uint32),  # 0x238
        ("hardware_subarch", ctypes.c_uint32),
        ("hardware_subarch_data", ctypes.c_uint64),
        ("payload_offset", ctypes.c_uint32),  # 0x248
        ("payload_length", ctypes.c_uint32),  # 0x24c
        ("setup_data", ctypes.c_uint64),
        ("pref_address", ctypes.c_uint64),  # 0x258
        ("init_size", ctypes.c_uint32),  # 0x260
        ("handover_offset", ctypes.c_uint32),
        ("kernel_info_offset", ctypes.c_uint32),
    ]


@checked(20)
class boot_e820_entry(_Packed):  # asm/bootparam.h
    __slots__ = ()
    _fields_ = [("addr", ctypes.c_uint64), ("size", ctypes.c_uint64), ("type", ctypes.c_uint32)]


@checked(4096)
class boot_params(_Packed):  # asm/bootparam.h "The so-called zeropage"
    __slots__ = ()
    _fields_ = [
        ("screen_info", screen_info),  # 0x000
        ("apm_bios_info", apm_bios_info),  # 0x040
        ("_pad2", ctypes.c_uint8 * 4),
        ("tboot_addr", ctypes.c_uint64),  # 0x058
        ("ist_info", ist_info),  # 0x060
        ("acpi_rsdp_addr", ctypes.c_uint64),  # 0x070
        ("_pad3", ctypes.c_uint8 * 8),
        ("hd0_info", ctypes.c_uint8 * 16),  # 0x080
        ("hd1_info", ctypes.c_uint8 * 16),
        ("sys_desc_table", sys_desc_table),  # 0x0a0
        ("olpc_ofw_header", olpc_ofw_header),  # 0x0b0
        ("ext_ramdisk_image", ctypes.c_uint32),  # 0x0c0
        ("ext_ramdisk_size", ctypes.c_uint32),  # 0x0c4
        ("ext_cmd_line_ptr", ctypes.c_uint32),  # 0x0c8
        ("_pad4", ctypes.c_uint8 * 112),
        ("cc_blob_address", ctypes.c_uint32),  # 0x13c
        ("edid_info", edid_info),  # 0x140
        ("efi_info", efi_info),  # 0x1c0
        ("alt_mem_k", ctypes.c_uint32),  # 0x1e0
        ("scratch", ctypes.c_uint32),
        ("e820_entries", ctypes.c_uint8),  # 0x1e8
        ("eddbuf_entries", ctypes.c_uint8),
        ("edd_mbr_sig_buf_entries", ctypes.c_uint8),
        ("kbd_status", ctypes.c_uint8),
        ("secure_boot", ctypes.c_uint8),
        ("_pad5", ctypes.c_uint8 * 2),
        ("sentinel", ctypes.c_uint8),  # 0x1ef
        ("_pad6", ctypes.c_uint8 * 1),
        ("hdr", setup_header),  # 0x1f1
        ("_pad7", ctypes.c_uint8 * (0x290 - 0x26C)),
        ("edd_mbr_sig_buffer", ctypes.c_uint32 * EDD_MBR_SIG_MAX),  # 0x290
        ("e820_table", boot_e820_entry * E820_MAX_ENTRIES_ZEROPAGE),  # 0x2d0
        ("_pad8", ctypes.c_uint8 * 48),
        ("eddbuf", edd_info * EDDMAXNR),  # 0xd00
        ("_pad9", ctypes.c_uint8 * 276),
    ]


E820Entry = tuple[int, int, int]  # (addr, size, type)


def build_e820(ram_regions: Sequence[tuple[int, int]]) -> list[E820Entry]:
    """The E820 map for RAM laid out as ``ram_regions`` (``[(gpa, size), ...]``, as from ``ram_layout``).

    RAM below the EBDA is usable, [EBDA_START, 1 MiB) is reserved (EBDA, VGA hole, BIOS area with the MP
    table and RSDP), RAM from 1 MiB up is usable; the hole below 4 GiB is simply not listed.
    """
    entries: list[E820Entry] = []
    for gpa, size in sorted(ram_regions):
        end = gpa + size
        for lo, hi, kind in ((0, EBDA_START, E820_RAM), (EBDA_START, HIMEM_START, E820_RESERVED)):
            a, b = max(gpa, lo), min(end, hi)
            if a < b:
                entries.append((a, b - a, kind))
        a = max(gpa, HIMEM_START)
        if a < end:
            entries.append((a, end - a, E820_RAM))
    if len(entries) > E820_MAX_ENTRIES_ZEROPAGE:
        raise LoaderError(f"{len(entries)} E820 entries: the zero page holds {E820_MAX_ENTRIES_ZEROPAGE}")
    return entries


def write_boot_params(
    mem: GuestMemory,
    kernel: LoadedKernel,
    cmdline: bytes,
    initrd: tuple[int, int] | None,
    e820: Sequence[E820Entry],
    *,
    acpi_rsdp_addr: int = 0,
) -> None:
    """Write the zero page at ``ZERO_PAGE_ADDR`` and the NUL-terminated command line at ``CMDLINE_ADDR``.

    ``acpi_rsdp_addr`` (boot protocol 2.14+, zero-page.rst) tells the kernel where the ACPI RSDP is, so it
    need not scan the BIOS area; 0 = not given."""
    limit = min(CMDLINE_MAX - 1, kernel.cmdline_size)  # cmdline_size excludes the terminating NUL
    if len(cmdline) > limit:
        raise LoaderError(f"kernel command line is {len(cmdline)} bytes; the limit is {limit}")
    if b"\0" in cmdline:
        raise LoaderError("kernel command line contains a NUL byte")
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise LoaderError(f"{len(e820)} E820 entries: the zero page holds {E820_MAX_ENTRIES_ZEROPAGE}")

    bp = boot_params()
    hdr = bp.hdr
    if kernel.setup_header is not None:
        # boot.rst "64-bit Boot Protocol": copy the kernel's setup header into a zeroed boot_params.
        ctypes.memmove(
            ctypes.addressof(hdr), kernel.setup_header, min(len(kernel.setup_header), ctypes.sizeof(hdr))
        )
    else:
        hdr.boot_flag = BOOT_FLAG_MAGIC
        hdr.header = HDRS_MAGIC
        hdr.version = SYNTHETIC_PROTOCOL
        hdr.kernel_alignment = SYNTHETIC_KERNEL_ALIGNMENT
        hdr.initrd_addr_max = min(kernel.initrd_addr_max, 0xFFFFFFFF)
        hdr.xloadflags = kernel.xloadflags
        hdr.cmdline_size = min(kernel.cmdline_size, CMDLINE_MAX - 1)
    hdr.type_of_loader = TYPE_OF_LOADER_UNDEFINED
    # LOADED_HIGH: the protected-mode kernel is at 1 MiB or above; CAN_USE_HEAP: heap_end_ptr is valid.
    # KEEP_SEGMENTS stays clear: the 64-bit entry loads its own segments from our GDT.
    hdr.loadflags = (hdr.loadflags | LOADED_HIGH | CAN_USE_HEAP) & ~KEEP_SEGMENTS
    hdr.heap_end_ptr = HEAP_END_PTR
    hdr.cmd_line_ptr = CMDLINE_ADDR & 0xFFFFFFFF
    bp.ext_cmd_line_ptr = CMDLINE_ADDR >> 32
    if initrd is not None:
        addr, size = initrd
        hdr.ramdisk_image, bp.ext_ramdisk_image = addr & 0xFFFFFFFF, addr >> 32
        hdr.ramdisk_size, bp.ext_ramdisk_size = size & 0xFFFFFFFF, size >> 32
    bp.acpi_rsdp_addr = acpi_rsdp_addr
    bp.e820_entries = len(e820)
    for slot, (addr, size, kind) in zip(bp.e820_table, e820, strict=False):
        slot.addr, slot.size, slot.type = addr, size, kind

    mem.write(ZERO_PAGE_ADDR, bytes(bp))
    mem.write(CMDLINE_ADDR, cmdline + b"\0")
