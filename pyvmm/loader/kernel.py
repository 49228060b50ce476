"""What the loaders report about a kernel they placed in guest RAM."""

from __future__ import annotations

from pyvmm.record import record


@record
class LoadedKernel:
    """A kernel image in guest RAM, and what the boot code needs to know about it.

    ``entry`` is the guest-physical 64-bit entry point: ``startup_64`` of the ELF ``vmlinux``
    (``phys_startup_64``), or load address + 0x200 for a bzImage booted in the guest (boot.rst,
    "64-bit Boot Protocol").  ``kernel_end`` is the first free guest-physical address above everything
    the kernel occupies before it reads the memory map (bss, brk, and for a bzImage its ``init_size``).
    """

    entry: int
    format: str  # 'elf', 'bzImage', 'bzImage→elf (lz4)', ...
    setup_header: bytes | None  # the kernel's setup header from 0x1f1 (bzImage only)
    protocol: int | None  # boot protocol version, e.g. 0x020f (bzImage only)
    kernel_start: int
    kernel_end: int
    initrd_addr_max: int  # highest byte address the initrd may occupy
    cmdline_size: int  # longest command line, without the terminating NUL
    pvh_entry: int | None = None  # XEN_ELFNOTE_PHYS32_ENTRY (32-bit PVH entry), ELF only
    xloadflags: int = 0
    # The names of the kernel's built-in parameters (its ELF's __param section: ``virtio_mmio.device`` where
    # the kernel takes virtio-mmio devices from its command line); None where the image does not say.
    builtin_params: frozenset[str] | None = None
