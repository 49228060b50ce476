"""What every architecture's kernel loading shares: reading files (:mod:`pyvmm.loader._files`), telling
kernel formats apart (:mod:`pyvmm.loader.formats`), ELF (:mod:`pyvmm.loader.elf`), decompression
(:mod:`pyvmm.loader.decompress`), the kernel command line (:mod:`pyvmm.loader.cmdline`), the loaded
kernel's description (:class:`LoadedKernel`) and kernel symbols (:mod:`pyvmm.loader.symbols`).  Each
architecture's own boot protocol lives under ``pyvmm/arch/`` (x86_64: ``kernel.py``, ``bzimage.py``,
``initrd.py``; aarch64: ``image.py``).
"""

from __future__ import annotations

from pyvmm.loader.kernel import LoadedKernel

__all__ = ["LoadedKernel"]
