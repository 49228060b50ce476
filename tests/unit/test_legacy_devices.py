from __future__ import annotations

import calendar

from pyvmm.devices.i8042 import I8042
from pyvmm.devices.rtc import CmosRtc


def test_i8042_idle_and_reset() -> None:
    resets: list[int] = []
    kbd = I8042(lambda: resets.append(1))
    assert kbd.read(4, 1) & 0x03 == 0  # neither buffer full: nobody polls forever
    kbd.write(4, 1, 0x20)  # read controller configuration byte
    assert kbd.read(4, 1) & 0x01
    assert kbd.read(0, 1) == 0
    assert not resets
    kbd.write(4, 1, 0xFE)
    assert resets == [1]


def test_rtc_reads_bcd_time_and_never_busy() -> None:
    t = calendar.timegm((2026, 12, 1, 13, 45, 59, 0, 0, 0))
    rtc = CmosRtc(clock=lambda: float(t))

    def reg(i: int) -> int:
        rtc.write(0, 1, i)
        return rtc.read(1, 1)

    assert reg(0x0A) & 0x80 == 0  # update-in-progress never set
    assert (reg(0x00), reg(0x02), reg(0x04)) == (0x59, 0x45, 0x13)
    assert (reg(0x07), reg(0x08), reg(0x09), reg(0x32)) == (0x01, 0x12, 0x26, 0x20)
    assert reg(0x0D) & 0x80
    rtc.write(0, 1, 0x40)
    rtc.write(1, 1, 0x77)
    assert reg(0x40) == 0x77
