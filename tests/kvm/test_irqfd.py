"""An interrupt from the host into the guest: KVM_IRQFD on GSI 5 -> in-kernel 8259A PIC (IRQ 5,
vector 0x25) -> LAPIC LINT0 (ExtINT) -> the guest's IDT handler, waking it from HLT (firmware/irq.S).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pyvmm.interrupt import EventFd
from pyvmm.status import ExitStatus
from pyvmm.testing.tinyvm import Recorder, TinyVm
from tests.kvm.conftest import OFF_READY, PORT_BASE, PORT_SPAN, describe, reports

pytestmark = pytest.mark.kvm

GSI = 5
VECTOR = 0x20 + GSI  # PIC vector base (ICW2) + IRQ


class ReadyTrigger(Recorder):
    """Writes the irqfd when the guest says it is ready (on the vCPU thread, inside the PIO exit)."""

    def __init__(self, irqfd: EventFd | None) -> None:
        super().__init__()
        self.irqfd = irqfd

    def write(self, offset: int, size: int, value: int) -> None:
        super().write(offset, size, value)
        if offset == OFF_READY and self.irqfd is not None:
            self.irqfd.write(1)


def test_irqfd_reaches_guest_through_pic(firmware: Callable[[str], Path]) -> None:
    with TinyVm(firmware("irq"), timeout=10) as vm:
        probe = ReadyTrigger(vm.irqfd(GSI))
        vm.add_pio(PORT_BASE, PORT_SPAN, probe, "probe")
        result = vm.run()
    assert result.status == ExitStatus.OK, describe(result, probe)
    assert result.debug_exit == 0
    assert any(o == OFF_READY for o, _, _ in probe.writes)
    assert reports(probe) == [VECTOR, 1]  # the handler's vector, one interrupt


def test_without_irqfd_write_guest_keeps_waiting(firmware: Callable[[str], Path]) -> None:
    """The control: the same guest, irqfd registered but never written, sleeps until the timeout."""
    with TinyVm(firmware("irq"), timeout=1.0) as vm:
        vm.irqfd(GSI)
        probe = ReadyTrigger(None)
        vm.add_pio(PORT_BASE, PORT_SPAN, probe, "probe")
        result = vm.run()
    assert result.status == ExitStatus.TIMEOUT, describe(result, probe)
    assert any(o == OFF_READY for o, _, _ in probe.writes)
    assert reports(probe) == []
