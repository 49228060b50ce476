"""The pvpanic device: how a guest kernel tells the host that it panicked, independently of its console.

One byte-wide register (QEMU's pvpanic; Linux drivers/misc/pvpanic/, events in include/uapi/misc/pvpanic.h):

- read: the events the device supports, ``PVPANIC_PANICKED | PVPANIC_CRASH_LOADED``.  Linux keeps only
  the events both sides know (``pi->capability &= ioread8(base)``).
- write: the event that happened.  Linux writes ``PVPANIC_PANICKED`` from its panic notifier (after the
  "Kernel panic - not syncing" line, before any ``panic=N`` reboot) and ``PVPANIC_CRASH_LOADED`` instead
  when a kdump kernel is loaded and takes over.

Where the guest finds it: on x86 an ISA I/O port (0x505, QEMU's default) announced in the DSDT as a
device with ``_HID "QEMU0001"``; on arm64 a two-byte MMIO region (byte 0 the register, byte 1 reserved)
in the device tree as ``compatible = "qemu,pvpanic-mmio"`` (Documentation/devicetree/bindings/misc/
pvpanic-mmio.txt).  Linux's ``pvpanic-mmio`` driver matches both and accepts an I/O or a memory resource.

Both events mean the guest kernel panicked: the VM's result is a panic, whatever the guest does next.
The device only reports; what to do about it (stop after a grace period, or not) is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable

PVPANIC_PANICKED = 1 << 0
PVPANIC_CRASH_LOADED = 1 << 1
PVPANIC_EVENTS = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED

PVPANIC_PORT_SIZE = 1  # x86: one ISA port (layout.PVPANIC_PORT)
PVPANIC_MMIO_SIZE = 2  # arm64: the binding's 16-bit region (byte 0: events)
ACPI_HID = "QEMU0001"
DT_COMPATIBLE = "qemu,pvpanic-mmio"

EVENT_NAMES = {PVPANIC_PANICKED: "panicked", PVPANIC_CRASH_LOADED: "crash kernel loaded"}


def describe(events: int) -> str:
    """``3`` -> ``"panicked, crash kernel loaded"``."""
    return ", ".join(name for bit, name in EVENT_NAMES.items() if events & bit)


class PvPanic:
    """The register at offset 0; ``on_event(events)`` is called for every write with a known event bit
    (unknown bits are ignored, as the supported-events read told the guest)."""

    def __init__(self, on_event: Callable[[int], None]) -> None:
        self._on_event = on_event
        self.events = 0  # every event the guest reported, or-ed together

    def read(self, offset: int, size: int) -> int:
        return PVPANIC_EVENTS if offset == 0 else 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != 0:
            return  # byte 1 is reserved
        events = value & PVPANIC_EVENTS
        if events:
            self.events |= events
            self._on_event(events)
