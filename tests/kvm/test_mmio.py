"""MMIO through KVM_EXIT_MMIO and the MMIO bus: 1/2/4/8-byte stores and loads (firmware/mmio.S)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pyvmm.status import ExitStatus
from pyvmm.testing.tinyvm import Recorder, TinyVm
from tests.kvm.conftest import PORT_BASE, PORT_SPAN, describe, pairs64, reports

pytestmark = pytest.mark.kvm

MMIO_BASE = 0xD000_0000  # firmware/mmio.S; in the device hole (layout.MMIO_HOLE_START..4 GiB)
READS = {0x40: (1, 0x1AB), 0x50: (2, 0x1BEEF), 0x60: (4, 0x1DEADBEEF), 0x70: (8, 0x0123456789ABCDEF)}


def test_mmio_widths_both_ways(firmware: Callable[[str], Path]) -> None:
    dev = Recorder(reads={off: value for off, (_, value) in READS.items()})
    probe = Recorder()
    with TinyVm(firmware("mmio"), timeout=10) as vm:
        vm.add_mmio(MMIO_BASE, 0x1000, dev, "mmio-probe")
        vm.add_pio(PORT_BASE, PORT_SPAN, probe, "probe")
        result = vm.run()
    assert result.status == ExitStatus.OK, describe(result, probe)
    assert result.debug_exit == 0
    assert dev.writes == [
        (0x00, 1, 0x11),
        (0x10, 2, 0x2233),
        (0x20, 4, 0x44556677),
        (0x30, 8, 0x8899AABBCCDDEEFF),
        (0x80, 4, 0xCAFEF00D),  # base + index * 8
    ]
    assert dev.read_log == [(off, size) for off, (size, _) in READS.items()]
    # each load, truncated to its width by the bus and zero-extended by the guest
    expected = [value & ((1 << (8 * size)) - 1) for size, value in READS.values()]
    assert pairs64(reports(probe)) == expected
    assert result.exits["mmio"] == 9
