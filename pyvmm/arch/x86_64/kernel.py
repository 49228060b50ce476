"""Loading an x86_64 kernel: an ELF ``vmlinux`` or a bzImage (Documentation/arch/x86/boot.rst).

``load_kernel`` picks the format from the file's bytes (:mod:`pyvmm.loader.formats`), never from its name.
"""

from __future__ import annotations

import contextlib
import os

from pyvmm.errors import LoaderError
from pyvmm.loader._files import map_file
from pyvmm.loader.elf import load_elf
from pyvmm.loader.formats import has_aarch64_image_magic, is_bzimage, is_elf
from pyvmm.loader.kernel import LoadedKernel
from pyvmm.memory import GuestMemory
from pyvmm.statictypes import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Literal

    Boot = Literal["elf", "guest"]


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
        if is_elf(mapped[:4]):
            return load_elf(mem, mapped, name)
        data = mapped[:]  # a bzImage: its parts are parsed and decompressed from bytes
    finally:
        with contextlib.suppress(BufferError):  # a view still held by an error's traceback: freed with it
            mapped.close()
    if is_bzimage(data):
        from pyvmm.arch.x86_64.bzimage import load_extracted, load_guest  # not needed for an ELF vmlinux

        return load_extracted(mem, data, name) if boot == "elf" else load_guest(mem, data, name)
    if has_aarch64_image_magic(data):
        raise LoaderError(f"{name}: an arm64 Image: this x86_64 host boots x86_64 kernels (vmlinux or bzImage)")
    raise LoaderError(f"{name}: not a Linux kernel (neither an ELF file nor a bzImage)")
