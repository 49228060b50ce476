"""A minimal MC146818 CMOS real-time clock at ports 0x70/0x71: reads the host's UTC time.

Without it, a guest polling the "update in progress" bit of an empty port (0xff) spins for a long
time.  Register map: MC146818A data sheet; Linux's include/linux/mc146818rtc.h names.  Binary-coded
decimal, 24-hour mode, no alarms or periodic interrupts; CMOS RAM beyond the clock reads as zero.
"""

from __future__ import annotations

import time
from collections.abc import Callable

RTC_SECONDS = 0x00
RTC_MINUTES = 0x02
RTC_HOURS = 0x04
RTC_DAY_OF_WEEK = 0x06
RTC_DAY_OF_MONTH = 0x07
RTC_MONTH = 0x08
RTC_YEAR = 0x09
RTC_REG_A = 0x0A  # bit 7 UIP: never set here; 0x26 = 32.768 kHz base, 1024 Hz rate (power-on)
RTC_REG_B = 0x0B  # 0x02 = 24-hour, BCD, no interrupts
RTC_REG_C = 0x0C
RTC_REG_D = 0x0D  # bit 7 VRT: CMOS contents valid
RTC_CENTURY = 0x32


def _bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


class CmosRtc:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._index = 0
        self._ram = bytearray(128)
        self._ram[RTC_REG_A] = 0x26
        self._ram[RTC_REG_B] = 0x02
        self._ram[RTC_REG_D] = 0x80

    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            return self._index
        t = time.gmtime(self._clock())
        clock = {
            RTC_SECONDS: t.tm_sec,
            RTC_MINUTES: t.tm_min,
            RTC_HOURS: t.tm_hour,
            RTC_DAY_OF_WEEK: (t.tm_wday + 1) % 7 + 1,
            RTC_DAY_OF_MONTH: t.tm_mday,
            RTC_MONTH: t.tm_mon,
            RTC_YEAR: t.tm_year % 100,
            RTC_CENTURY: t.tm_year // 100,
        }
        if self._index in clock:
            return _bcd(clock[self._index])
        return self._ram[self._index]

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self._index = value & 0x7F  # bit 7 is the NMI mask on a PC
        elif self._index not in (RTC_REG_A, RTC_REG_C, RTC_REG_D):
            self._ram[self._index] = value & 0xFF
