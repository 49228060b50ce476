"""The hardware-reduced ACPI sleep registers (ACPI 6.5 4.8.3.7): S5 powers off, nothing else does."""

from __future__ import annotations

from pyvmm.devices.acpi_sleep import AcpiSleep


def test_acpi_sleep_s5_powers_off() -> None:
    calls: list[int] = []
    dev = AcpiSleep(lambda: calls.append(1))
    dev.write(1, 1, 0x80)  # clear WAK_STS first, as ACPICA does
    dev.write(0, 1, 5 << 2)  # SLP_TYP without SLP_EN: nothing
    dev.write(0, 1, (3 << 2) | 0x20)  # another sleep type: ignored
    assert calls == []
    assert dev.read(1, 1) == 0 and dev.read(0, 1) == 0
    dev.write(0, 1, (5 << 2) | 0x20)
    assert calls == [1]
