"""The hardware-reduced ACPI sleep registers (ACPI 6.5 4.8.3.7 "Sleep Control and Status Registers"):
how a guest with ACPI powers the machine off.

The FADT's SLEEP_CONTROL_REG and SLEEP_STATUS_REG point at two consecutive one-byte I/O ports.  To
enter S5 the OS writes ``SLP_TYP << 2 | SLP_EN`` to the control register, SLP_TYP being the first value
of the DSDT's ``\\_S5`` package (ACPICA ``acpi_hw_extended_sleep``, drivers/acpi/acpica/hwesleep.c).
Before that it clears WAK_STS by writing 1 to it in the status register.  Other sleep states are not
offered (no ``\\_S1``-``\\_S4``), so any other SLP_TYP is ignored.
"""

from __future__ import annotations

from collections.abc import Callable

CONTROL = 0  # offset of SLEEP_CONTROL_REG in the device's 2-port range
STATUS = 1  # SLEEP_STATUS_REG
SLP_TYP_SHIFT = 2  # 4.8.3.7 Table 4.19: bits 4:2 SLP_TYPx, bit 5 SLP_EN
SLP_TYP_MASK = 0x7
SLP_EN = 1 << 5
WAK_STS = 1 << 7  # Table 4.20
S5_SLP_TYP = 5  # what our DSDT's \_S5 says


class AcpiSleep:
    def __init__(self, on_poweroff: Callable[[], None], *, s5_slp_typ: int = S5_SLP_TYP) -> None:
        self._on_poweroff = on_poweroff
        self._s5 = s5_slp_typ
        self.status = 0

    def read(self, offset: int, size: int) -> int:
        return self.status if offset == STATUS else 0

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == STATUS:
            self.status &= ~(value & WAK_STS)  # write-1-to-clear
        elif offset == CONTROL and value & SLP_EN and (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == self._s5:
            self._on_poweroff()
