"""Setting up coalesced port writes (pyvmm/coalescing.py) with a fake VM and vCPU: registered only where
KVM has both capabilities, never without a ring to read; replayed writes reach the device, and every
access to the device's registers replays the ring first."""

from __future__ import annotations

import ctypes

import pytest

from pyvmm.bus import Bus
from pyvmm.coalescing import CoalescedWrites, coalesce_port_writes
from pyvmm.config import DebugKnobs
from pyvmm.kvm import abi
from pyvmm.kvm.abi import KVM_CAP_COALESCED_MMIO, KVM_CAP_COALESCED_PIO
from pyvmm.kvm.coalesced import CoalescedRing
from pyvmm.testing.tinyvm import Recorder

PAGE = 4096


class FakeVm:
    def __init__(self, caps: dict[int, int]) -> None:
        self.caps = caps
        self.zones: list[tuple[int, int, bool]] = []

    def check_extension(self, cap: int) -> int:
        return self.caps.get(cap, 0)

    def register_coalesced_mmio(self, addr: int, size: int, *, pio: bool = False) -> None:
        self.zones.append((addr, size, pio))


class FakeVcpu:
    def __init__(self) -> None:
        self.buf = bytearray(3 * PAGE)
        self.pages: list[int] = []

    def coalesced_ring(self, page: int) -> CoalescedRing:
        self.pages.append(page)
        return CoalescedRing(self.buf, page * PAGE, PAGE)


def _setup(caps: dict[int, int], *, enabled: bool = True) -> tuple[FakeVm, FakeVcpu, CoalescedWrites | None]:
    vm, vcpu = FakeVm(caps), FakeVcpu()
    cw = coalesce_port_writes(vm, vcpu, 0x3F8, 1, device=(0x3F8, 8), enabled=enabled)  # type: ignore[arg-type]
    return vm, vcpu, cw


@pytest.mark.parametrize("caps", [{}, {KVM_CAP_COALESCED_MMIO: 2}, {KVM_CAP_COALESCED_PIO: 1}],
                         ids=["none", "mmio-only", "pio-only"])
def test_nothing_is_registered_without_both_capabilities(caps: dict[int, int]) -> None:
    vm, vcpu, cw = _setup(caps)
    assert cw is None and vm.zones == [] and vcpu.pages == []


def test_the_environment_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYVMM_NO_COALESCED_PIO", "1")
    assert not DebugKnobs.from_environ().coalesced_pio
    vm, _, cw = _setup({KVM_CAP_COALESCED_MMIO: 2, KVM_CAP_COALESCED_PIO: 1}, enabled=False)
    assert cw is None and vm.zones == []


def test_registered_zone_and_replay_before_device_access() -> None:
    vm, vcpu, cw = _setup({KVM_CAP_COALESCED_MMIO: 2, KVM_CAP_COALESCED_PIO: 1})
    assert cw is not None
    assert vm.zones == [(0x3F8, 1, True)] and vcpu.pages == [2]  # the page the capability named
    uart = Recorder(reads={5: 0x60})
    pio, mmio = Bus("pio"), Bus("mmio")
    pio.add(0x3F8, 8, uart, "com1")
    cw.bind(pio, mmio)
    readers, writers = pio.handlers()
    cw.wrap(readers, writers, pio)
    # the kernel records two THR writes in the ring (at page 2 of the mapping)
    hdr = abi.kvm_coalesced_mmio_ring.from_buffer(vcpu.buf, 2 * PAGE)
    for i, ch in enumerate(b"hi"):
        e = abi.kvm_coalesced_mmio.from_buffer(vcpu.buf, 2 * PAGE + 8 + i * ctypes.sizeof(abi.kvm_coalesced_mmio))
        e.phys_addr, e.len, e.pio, e.data[0] = 0x3F8, 1, 1, ch
    hdr.last = 2
    assert readers[0x3FD](1) == 0x60  # an LSR read: the two writes reach the UART before it
    assert uart.writes == [(0, 1, ord("h")), (0, 1, ord("i"))]
    assert uart.read_log == [(5, 1)]
    assert cw.counts() == {"pio 0x3f8 write": 2}
