"""KVM_IOEVENTFD: guest stores that match signal the eventfd without an exit, others exit to user space
(firmware/ioeventfd.S)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pyvmm.status import ExitStatus
from pyvmm.testing.tinyvm import Recorder, TinyVm
from tests.kvm.conftest import describe

pytestmark = pytest.mark.kvm

NOTIFY_ADDR = 0xD000_1000  # firmware/ioeventfd.S
MATCH = 0x600DCAFE
PIO_NOTIFY = 0x520


def test_ioeventfd_datamatch_mmio_and_pio(firmware: Callable[[str], Path]) -> None:
    dev = Recorder()
    pio_dev = Recorder()
    with TinyVm(firmware("ioeventfd"), timeout=10) as vm:
        vm.add_mmio(NOTIFY_ADDR, 0x1000, dev, "notify")
        vm.add_pio(PIO_NOTIFY, 2, pio_dev, "pio-notify")
        mmio_efd = vm.ioeventfd(NOTIFY_ADDR, 4, datamatch=MATCH)
        pio_efd = vm.ioeventfd(PIO_NOTIFY, 2, pio=True)
        result = vm.run()
        mmio_count, pio_count = mmio_efd.read(), pio_efd.read()
    assert result.status == ExitStatus.OK, describe(result)
    assert mmio_count == 3  # the three stores of MATCH
    assert dev.writes == [(0, 4, 0x0BADF00D), (0, 4, MATCH + 1), (0, 4, 1)]  # the others, as exits
    assert result.exits["mmio"] == 3
    assert pio_count == 2  # no datamatch: every write
    assert pio_dev.writes == []
