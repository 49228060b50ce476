"""Port I/O through KVM_EXIT_IO and the PIO bus, both directions and three widths (firmware/pio.S)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pyvmm.status import ExitStatus
from pyvmm.testing.tinyvm import Recorder, TinyVm
from tests.kvm.conftest import OFF_ECHO, OFF_IN, PORT_BASE, PORT_SPAN, describe

pytestmark = pytest.mark.kvm

MESSAGE = b"pyvmm pio guest: hello\n"


@pytest.mark.parametrize("values", [(0xAB, 0xBEEF, 0xDEADBEEF), (0x00, 0xFFFF, 0x80000001)])
def test_pio_serial_and_echo(firmware: Callable[[str], Path], values: tuple[int, int, int]) -> None:
    probe = Recorder(reads={OFF_IN: list(values)})
    with TinyVm(firmware("pio"), timeout=10) as vm:
        vm.add_pio(PORT_BASE, PORT_SPAN, probe, "probe")
        result = vm.run()
    assert result.status == ExitStatus.OK, describe(result, probe)
    assert result.debug_exit == 0
    assert result.serial == MESSAGE
    assert probe.read_log == [(OFF_IN, 1), (OFF_IN, 2), (OFF_IN, 4)]
    assert [(o, s, v) for o, s, v in probe.writes if o == OFF_ECHO] == [
        (OFF_ECHO, 1, values[0]), (OFF_ECHO, 2, values[1]), (OFF_ECHO, 4, values[2])]
    # one exit per byte of the message, three reads, three echoes, the debug exit; nothing else
    assert result.exits["io"] == len(MESSAGE) + 7
    assert result.exits["internal_error"] == 0
