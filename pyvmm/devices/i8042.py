"""Just enough of the i8042 keyboard controller for a PC guest to look idle and to reset.

Linux's ``reboot=k`` path (arch/x86/kernel/reboot.c, ``kb_wait`` then ``outb(0xfe, 0x64)``) pulses the
CPU reset line through the controller's output port; that is the only command acted upon.  Status
reads always say "both buffers empty" so nothing polls forever (an unmodelled port reading 0xff would
look permanently busy).  Register semantics: IBM PS/2 hardware reference, 8042 status/command.
"""

from __future__ import annotations

from collections.abc import Callable

I8042_DATA = 0  # offset of port 0x60 in a range starting at 0x60
I8042_STATUS_CMD = 4  # port 0x64
CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_PULSE_RESET = 0xFE
STATUS_SYSTEM_FLAG = 0x04  # set after a successful self-test, as firmware leaves it


class I8042:
    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self._ctr = 0x00  # controller configuration byte: no interrupts, ports disabled
        self._out: int | None = None
        self._expect_ctr = False

    def read(self, offset: int, size: int) -> int:
        if offset == I8042_STATUS_CMD:
            return STATUS_SYSTEM_FLAG | (0x01 if self._out is not None else 0)
        if offset == I8042_DATA:
            value, self._out = self._out, None
            return value if value is not None else 0
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == I8042_STATUS_CMD:
            if value == CMD_PULSE_RESET:
                self._on_reset()
            elif value == CMD_READ_CTR:
                self._out = self._ctr
            elif value == CMD_WRITE_CTR:
                self._expect_ctr = True
        elif offset == I8042_DATA and self._expect_ctr:
            self._ctr = value
            self._expect_ctr = False
