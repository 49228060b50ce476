"""Setting up coalesced port writes (pyvmm/coalescing.py) with a fake VM and vCPU: registered only where
KVM has both capabilities, never without a ring to read; replayed writes reach the device, and every
access to the device's registers replays the ring first."""

from __future__ import annotations

import ctypes

import pytest

from pyvmm.bus import Bus, DispatchTable, Reader, Writer
from pyvmm.coalescing import CoalescedWrites, coalesce_port_writes
from pyvmm.config import DebugKnobs
from pyvmm.devices.serial import Serial16550
from pyvmm.interrupt import CountingIrq
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


def _real_uart_rig() -> tuple[FakeVcpu, CoalescedWrites, Serial16550, bytearray, CountingIrq,
                              DispatchTable[Reader], DispatchTable[Writer]]:
    _, vcpu, cw = _setup({KVM_CAP_COALESCED_MMIO: 2, KVM_CAP_COALESCED_PIO: 1})
    assert cw is not None
    out, irq = bytearray(), CountingIrq()
    uart = Serial16550(irq, out.extend)
    pio, mmio = Bus("pio"), Bus("mmio")
    pio.add(0x3F8, 8, uart, "com1")
    cw.bind(pio, mmio)
    readers, writers = pio.handlers()
    cw.wrap(readers, writers, pio)
    return vcpu, cw, uart, out, irq, readers, writers


def _push(vcpu: FakeVcpu, data: bytes) -> None:
    """What KVM does for a THR write in the coalesced zone."""
    hdr = abi.kvm_coalesced_mmio_ring.from_buffer(vcpu.buf, 2 * PAGE)
    for ch in data:
        e = abi.kvm_coalesced_mmio.from_buffer(vcpu.buf, 2 * PAGE + 8 + hdr.last * ctypes.sizeof(abi.kvm_coalesced_mmio))
        e.phys_addr, e.len, e.pio, e.data[0] = 0x3F8, 1, 1, ch
        hdr.last = (hdr.last + 1) % 170


def test_lsr_polls_do_not_replay_the_ring_but_everything_else_does() -> None:
    """The console's LSR poll cannot see a queued byte (transmission is instant): it is served without
    a replay; an IIR read (a queued byte sets the THRE interrupt) and any write replay first."""
    vcpu, _, _, out, irq, readers, writers = _real_uart_rig()
    writers[0x3FC](1, 0x08)  # MCR: OUT2
    writers[0x3F9](1, 0x02)  # IER: THRI (THR empty: one interrupt at once)
    assert readers[0x3FA](1) & 0x0F == 0x02 and readers[0x3FA](1) & 0x0F == 0x01
    _push(vcpu, b"ab")
    assert readers[0x3FD](1) == 0x60 and out == b""  # queued still
    assert readers[0x3FA](1) & 0x0F == 0x02 and out == b"ab"  # the THR writes' interrupt, after them
    _push(vcpu, b"cd")
    writers[0x3F9](1, 0)  # replayed before the IER write: THRE interrupts once more, then THRI is off
    assert out == b"abcd" and irq.count == 3


def test_in_loopback_an_lsr_read_sees_the_queued_byte() -> None:
    vcpu, _, _, out, _, readers, writers = _real_uart_rig()
    writers[0x3FC](1, 0x10)  # MCR: LOOP
    _push(vcpu, b"Z")
    assert readers[0x3FD](1) & 0x01  # DR: the byte looped back to RX
    assert readers[0x3F8](1) == ord("Z") and out == b""


def test_a_replay_hands_the_uart_each_run_of_bytes_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[bytes] = []
    original = Serial16550.write_run

    def write_run(self: Serial16550, offset: int, size: int, values: list[int]) -> None:
        runs.append(bytes(values))
        original(self, offset, size, values)

    monkeypatch.setattr(Serial16550, "write_run", write_run)
    vcpu, cw, _, out, _, _, _ = _real_uart_rig()
    _push(vcpu, b"hello\r\n")
    cw.drain()
    assert runs == [b"hello\r\n"] and out == b"hello\r\n" and cw.counts() == {"pio 0x3f8 write": 7}


def test_a_device_error_in_a_replay_loses_no_later_write() -> None:
    _, vcpu, cw = _setup({KVM_CAP_COALESCED_MMIO: 2, KVM_CAP_COALESCED_PIO: 1})
    assert cw is not None

    class Flaky(Recorder):
        def write(self, offset: int, size: int, value: int) -> None:
            super().write(offset, size, value)
            if value == ord("!"):
                raise RuntimeError("device bug")

    dev = Flaky()
    pio = Bus("pio")
    pio.add(0x3F8, 8, dev, "com1")
    cw.bind(pio, Bus("mmio"))
    _push(vcpu, b"a!")
    hdr = abi.kvm_coalesced_mmio_ring.from_buffer(vcpu.buf, 2 * PAGE)
    e = abi.kvm_coalesced_mmio.from_buffer(vcpu.buf, 2 * PAGE + 8 + hdr.last * ctypes.sizeof(abi.kvm_coalesced_mmio))
    e.phys_addr, e.len, e.pio, e.data[0] = 0x3F9, 1, 1, 0x05  # then a write to the next port
    hdr.last += 1
    with pytest.raises(RuntimeError, match="device bug"):
        cw.drain()
    assert dev.writes == [(0, 1, ord("a")), (0, 1, ord("!")), (1, 1, 0x05)]



def test_a_replay_that_replays_again_delivers_each_write_once() -> None:
    """Replaying a write may end the VM, and the stop replays the ring again on the same thread."""
    _, vcpu, cw = _setup({KVM_CAP_COALESCED_MMIO: 2, KVM_CAP_COALESCED_PIO: 1})
    assert cw is not None

    class Stopper(Recorder):
        def write(self, offset: int, size: int, value: int) -> None:
            super().write(offset, size, value)
            if value == ord("b"):
                cw.drain()

    dev = Stopper()
    pio = Bus("pio")
    pio.add(0x3F8, 8, dev, "com1")
    cw.bind(pio, Bus("mmio"))
    _push(vcpu, b"abcd")
    cw.drain()
    assert dev.writes == [(0, 1, ch) for ch in b"abcd"]
    assert cw.counts() == {"pio 0x3f8 write": 4}
