"""The guest exit device: a guest ends the VM with an exit status of its own choosing.

pyvmm's own device (no standard one does this on both architectures; QEMU's ``isa-debug-exit`` is x86
port I/O only and mangles the value).  One 4 KiB MMIO page at a fixed address per machine
(``GUEST_EXIT_ADDR`` in pyvmm/arch/*/layout.py; on arm64 also a device tree node with
``compatible = "pyvmm,guest-exit"``), three little-endian 32-bit registers:

=======  ==========  ==================================================================================
offset   access      meaning
=======  ==========  ==================================================================================
0x00     read        magic ``0x78657970`` (the bytes ``"pyex"``): the device is there
0x04     read        version, 1
0x08     write       exit status: the VM ends now, and the guest's status is the value's low 8 bits
                     (0-255, like ``exit(3)``)
=======  ==========  ==================================================================================

Other offsets read 0 and ignore writes; any access size works.  From a shell with busybox:
``devmem 0xd0009000 32`` (reads the magic on x86), ``devmem 0xd0009008 32 7`` (ends the VM, status 7).
How pyvmm turns the guest's status into its own exit status: :mod:`pyvmm.status`.
"""

from __future__ import annotations

from collections.abc import Callable

GUEST_EXIT_SIZE = 0x1000
REG_MAGIC = 0x00
REG_VERSION = 0x04
REG_STATUS = 0x08
MAGIC = int.from_bytes(b"pyex", "little")
VERSION = 1
DT_COMPATIBLE = "pyvmm,guest-exit"


class GuestExit:
    """Calls ``on_exit(status)`` (0-255) for a write to the status register."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit

    def read(self, offset: int, size: int) -> int:
        if offset == REG_MAGIC:
            value = MAGIC
        elif offset == REG_VERSION:
            value = VERSION
        else:
            return 0
        return value & ((1 << (8 * size)) - 1) if size < 4 else value

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == REG_STATUS:
            self._on_exit(value & 0xFF)
