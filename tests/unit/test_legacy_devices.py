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


class LinuxI8042Probe:
    """Linux 6.1's i8042 driver against the model (drivers/input/serio/i8042.c: __i8042_command,
    i8042_controller_init, i8042_check_aux), counting status-port reads: each one is a VM exit, and a
    command that never answers costs I8042_CTL_TIMEOUT (10000) of them."""

    TIMEOUT = 10000

    def __init__(self, dev: I8042) -> None:
        self.dev = dev
        self.status_reads = 0

    def status(self) -> int:
        self.status_reads += 1
        return self.dev.read(4, 1)

    def command(self, command: int, params: tuple[int, ...] = ()) -> list[int] | None:
        """None on a timeout or (for AUX_LOOP) an answer that is not AUX data, like the driver's -1."""
        for _ in range(self.TIMEOUT):  # wait_write
            if not self.status() & 0x02:
                break
        else:
            return None
        self.dev.write(4, 1, command & 0xFF)
        for p in params:
            self.dev.write(0, 1, p)
        out = []
        for _ in range((command >> 8) & 0xF):
            for _ in range(self.TIMEOUT):  # wait_read
                if self.status() & 0x01:
                    break
            else:
                return None
            if command == 0x11D3 and not self.status() & 0x20:
                return None
            out.append(self.dev.read(0, 1))
        return out

    def has_aux(self) -> bool:
        """i8042_check_aux up to the IRQ test: False when the driver gives the AUX port up."""
        loop = self.command(0x11D3, (0x5A,))
        if loop != [0x5A]:
            test = self.command(0x01A9)
            if test is None or test[0] not in (0x00, 0xFA, 0xFF):
                return False
        return True


def test_i8042_answers_linux_probe_at_once() -> None:
    kbd = I8042(lambda: None)
    linux = LinuxI8042Probe(kbd)
    assert linux.status() & 0x10  # keyboard not inhibited: no "Keylock active" warning
    assert linux.command(0x01AA) == [0x55]  # controller self-test passed
    assert linux.command(0x01AB) == [0x00]  # keyboard interface test passed
    ctr = linux.command(0x0120)
    assert ctr is not None
    assert linux.command(0x1060, (ctr[0] | 0x10,)) == []  # keyboard disabled in the CTR
    assert linux.command(0x0120) == [ctr[0] | 0x10]
    assert linux.command(0x00AE) == [] and linux.command(0x0120) == [ctr[0]]  # KBD_ENABLE clears KBDDIS
    assert not linux.has_aux()  # no mouse: given up after one answer, not after a timeout
    assert linux.status_reads < 40, linux.status_reads
    assert not linux.status() & 0x01  # nothing left in the output buffer
