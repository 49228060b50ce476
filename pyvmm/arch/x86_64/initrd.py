"""Placing the initial ramdisk in guest RAM (Documentation/arch/x86/boot.rst, ``initrd_addr_max`` and
"Sample Boot Configuration": as high as allowed, page-aligned, clear of the kernel)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from pyvmm.arch.x86_64.layout import HIGH_RAM_START
from pyvmm.errors import LoaderError
from pyvmm.loader._files import check_file, read_into
from pyvmm.loader.kernel import LoadedKernel
from pyvmm.memory import GuestMemory

PAGE_SIZE = 4096
MiB = 1 << 20


def _page_up(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def place_initrd(size: int, kernel: LoadedKernel, ram_regions: Sequence[tuple[int, int]]) -> int:
    """The guest-physical address for an initrd of ``size`` bytes; LoaderError if it does not fit."""
    low_end = max((gpa + sz for gpa, sz in ram_regions if gpa < HIGH_RAM_START), default=0)
    top = min(kernel.initrd_addr_max + 1, low_end)
    addr = (top - size) & ~(PAGE_SIZE - 1)
    floor = _page_up(kernel.kernel_end)
    if size <= top and addr >= floor:
        return addr
    needed = floor + _page_up(size)
    if needed > kernel.initrd_addr_max + 1:
        raise LoaderError(
            f"initrd of {size} bytes does not fit between the kernel end ({kernel.kernel_end:#x}) and the "
            f"kernel's initrd limit ({kernel.initrd_addr_max:#x})"
        )
    raise LoaderError(
        f"initrd of {size / MiB:.1f} MiB does not fit above the kernel: the guest needs at least "
        f"{-(-needed // MiB)} MiB of RAM"
    )


def load_initrd(
    mem: GuestMemory,
    path: str | os.PathLike[str],
    kernel: LoadedKernel,
    ram_regions: Sequence[tuple[int, int]],
) -> tuple[int, int]:
    """Read the initrd at ``path`` into guest RAM: ``(addr, size)``."""
    size = check_file(path, "initrd")
    addr = place_initrd(size, kernel, ram_regions)
    read_into(path, "initrd", mem.view(addr, size))
    return addr, size
