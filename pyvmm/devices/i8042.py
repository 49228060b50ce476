"""Just enough of the i8042 keyboard controller for a PC guest to probe it at once, look idle, and reset.

Linux's ``reboot=k`` path (arch/x86/kernel/reboot.c, ``kb_wait`` then ``outb(0xfe, 0x64)``) pulses the
CPU reset line through the controller's output port.  Linux's i8042 driver probes the controller with
commands that each expect an answer within ``I8042_CTL_TIMEOUT`` (10000) status polls, and every poll is a
VM exit: so every command it sends gets its answer at once.  The model is a controller with a keyboard
port and no mouse (AUX) port: the AUX loopback comes back as keyboard data and the AUX interface test
reports a stuck clock line, which makes the driver give the AUX port up after two answers instead of two
timeouts.  The keyboard itself never sends anything: there is none, and pyvmm says so on the kernel
command line (``i8042.nokbd``), since a PS/2 command to a missing keyboard would wait for its timeout.  Status reads say "keyboard not inhibited" (no
keylock warning) and never "input buffer full", so nothing polls forever (an unmodelled port reading 0xff
would look permanently busy).  Commands and bits: include/linux/i8042.h and the IBM PS/2 hardware
reference (8042 status register, command byte).
"""

from __future__ import annotations

from collections.abc import Callable

I8042_DATA = 0  # offset of port 0x60 in a range starting at 0x60
I8042_STATUS_CMD = 4  # port 0x64

STATUS_OBF = 0x01  # output buffer full: data for the guest at port 0x60
STATUS_SYSTEM_FLAG = 0x04  # set after a successful self-test, as firmware leaves it
STATUS_KEYLOCK = 0x10  # set: the keyboard is not inhibited

CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_BOOT = 0x00  # no port interrupts, no translation: Linux sets what it wants at probe time

CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_KBD_LOOP = 0xD2
CMD_AUX_LOOP = 0xD3
CMD_AUX_SEND = 0xD4
CMD_PULSE_RESET = 0xFE

SELF_TEST_OK = 0x55
INTERFACE_OK = 0x00
AUX_CLOCK_STUCK_LOW = 0x01  # an AUX interface test failure: no mouse port

# Commands whose parameter byte goes to port 0x60 next, and what the model makes of it.
_WITH_PARAM = (CMD_WRITE_CTR, CMD_KBD_LOOP, CMD_AUX_LOOP, CMD_AUX_SEND)


class I8042:
    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self._ctr = CTR_BOOT
        self._out: int | None = None
        self._pending: int | None = None  # a command waiting for its parameter byte

    def read(self, offset: int, size: int) -> int:
        if offset == I8042_STATUS_CMD:
            return STATUS_SYSTEM_FLAG | STATUS_KEYLOCK | (STATUS_OBF if self._out is not None else 0)
        if offset == I8042_DATA:
            value, self._out = self._out, None
            return value if value is not None else 0
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == I8042_STATUS_CMD:
            self._command(value)
        elif offset == I8042_DATA:
            pending, self._pending = self._pending, None
            if pending == CMD_WRITE_CTR:
                self._ctr = value
            elif pending in (CMD_KBD_LOOP, CMD_AUX_LOOP):
                self._out = value  # echoed as keyboard data: there is no AUX port to loop through
            # A byte for the keyboard (or for the absent mouse) gets no answer: nothing is attached.

    def _command(self, cmd: int) -> None:
        self._pending = cmd if cmd in _WITH_PARAM else None
        if cmd == CMD_PULSE_RESET:
            self._on_reset()
        elif cmd == CMD_READ_CTR:
            self._out = self._ctr
        elif cmd == CMD_SELF_TEST:
            self._out = SELF_TEST_OK
        elif cmd == CMD_KBD_TEST:
            self._out = INTERFACE_OK
        elif cmd == CMD_AUX_TEST:
            self._out = AUX_CLOCK_STUCK_LOW
        elif cmd in (CMD_KBD_DISABLE, CMD_KBD_ENABLE):
            self._ctr = self._ctr | CTR_KBDDIS if cmd == CMD_KBD_DISABLE else self._ctr & ~CTR_KBDDIS
        elif cmd in (CMD_AUX_DISABLE, CMD_AUX_ENABLE):
            self._ctr = self._ctr | CTR_AUXDIS if cmd == CMD_AUX_DISABLE else self._ctr & ~CTR_AUXDIS
