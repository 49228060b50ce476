"""Kernel and initrd loading: ELF ``vmlinux`` and bzImage (Documentation/arch/x86/boot.rst).

``load_kernel`` picks the format from the file's bytes, never from its name.
"""

from __future__ import annotations

import contextlib
import os
from typing import Literal

from pyvmm.errors import LoaderError
from pyvmm.loader._files import map_file
from pyvmm.loader.elf import ELF_MAGIC, load_elf
from pyvmm.loader.kernel import LoadedKernel
from pyvmm.memory import GuestMemory

__all__ = ["LoadedKernel", "load_kernel"]

Boot = Literal["elf", "guest"]
AARCH64_IMAGE_MAGIC = b"ARM\x64"  # Documentation/arch/arm64/booting.rst: the Image header's magic at byte 56


def load_kernel(mem: GuestMemory, path: str | os.PathLike[str], *, boot: Boot = "elf") -> LoadedKernel:
    """Load the kernel at ``path`` into ``mem``.

    An ELF file is loaded as is.  A bzImage is, with ``boot='elf'``, decompressed on the host and the
    ``vmlinux`` inside loaded; with ``boot='guest'``, loaded for the 64-bit boot protocol so that its
    own decompressor runs in the guest.
    """
    if boot not in ("elf", "guest"):
        raise ValueError(f"boot must be 'elf' or 'guest', not {boot!r}")
    name = os.fspath(path)
    mapped = map_file(path, "kernel")
    try:
        if mapped[:len(ELF_MAGIC)] == ELF_MAGIC:
            return load_elf(mem, mapped, name)
        data = mapped[:]  # a bzImage: its parts are parsed and decompressed from bytes
    finally:
        with contextlib.suppress(BufferError):  # a view still held by an error's traceback: freed with it
            mapped.close()
    from pyvmm.loader.bzimage import is_bzimage, load_extracted, load_guest  # not needed for an ELF vmlinux

    if is_bzimage(data):
        return load_extracted(mem, data, name) if boot == "elf" else load_guest(mem, data, name)
    if data[56:60] == AARCH64_IMAGE_MAGIC:
        raise LoaderError(f"{name}: an arm64 Image: this x86_64 host boots x86_64 kernels (vmlinux or bzImage)")
    raise LoaderError(f"{name}: not a Linux kernel (neither an ELF file nor a bzImage)")
