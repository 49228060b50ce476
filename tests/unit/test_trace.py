"""``--trace virtio``: selectors, and the trace of a known request sequence checked line by line.

The sequence drives the real virtio-mmio transport and virtio-blk device through the driver model
(DriverQueue), with a fake clock, exactly as the builder wires them (hook per device, irqfd description).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.devices.virtio import block as b
from pyvmm.devices.virtio import mmio as m
from pyvmm.devices.virtio.disk import RawDisk
from pyvmm.errors import ConfigError
from pyvmm.interrupt import CountingIrq
from pyvmm.memory import GuestMemory
from pyvmm.testing.driverqueue import DriverQueue, setup_device
from pyvmm.trace import EVENT_CLASSES, Tracer, describe, parse_selectors

HDR = struct.Struct("<IIQ")


def test_selectors() -> None:
    assert parse_selectors(["virtio"]) == frozenset(EVENT_CLASSES)
    assert parse_selectors(["virtio.irq,virtio.ack"]) == {"irq", "ack"}
    assert parse_selectors(["virtio.notify", " virtio.used "]) == {"notify", "used"}
    assert parse_selectors(["none"]) == frozenset() == parse_selectors([""])
    for bad in ("virtio.bogus", "pci", "virtio."):
        with pytest.raises(ConfigError, match="bad trace selector"):
            parse_selectors([bad])


def test_no_classes_no_hook() -> None:
    assert Tracer(frozenset(), io.StringIO()).hook("vda") is None  # off: the devices get trace=None


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 0.000125  # every event reads the clock once: 125 us apart
        return self.now


class TracedRig:
    def __init__(self, tmp: Path, classes: frozenset[str]) -> None:
        image = tmp / "disk.img"
        image.write_bytes(bytes(range(256)) * 2 * 64)  # 64 sectors
        self.dev = b.VirtioBlock(RawDisk(image), queue_size=8)
        self.mem = GuestMemory.single(1 << 20)
        self.out = io.StringIO()
        self.tracer = Tracer(classes, self.out, clock=Clock(), t0=100.0)
        hook = self.tracer.hook("vda", irq="irqfd (GSI 5)")
        self.t = m.VirtioMmioTransport(self.dev, self.mem, CountingIrq(), trace=hook)
        self.q = DriverQueue(self.mem, 0x1000, 8, data_size=64 << 10)
        setup_device(self.t, [self.q])

    def lines(self) -> list[str]:
        return self.out.getvalue().splitlines()

    def close(self) -> None:
        self.dev.close()
        self.mem.close()


@pytest.fixture
def traced(tmp_path: Path) -> Iterator[TracedRig]:
    rig = TracedRig(tmp_path, parse_selectors(["virtio"]))
    yield rig
    rig.close()


def test_trace_of_a_read_then_a_write_and_flush(traced: TracedRig) -> None:
    q, t = traced.q, traced.t
    # 1. A read of 2 sectors at sector 4, as virtblk_add_req builds it: header (out), data (in), status (in).
    q.add_chain([(HDR.pack(b.VIRTIO_BLK_T_IN, 0, 4), False), (1024, True), (1, True)])
    t.notify(0, via="ioeventfd")
    t.write(m.REG_INTERRUPT_ACK, 4, t.read(m.REG_INTERRUPT_STATUS, 4))
    # 2. A write and a flush published together, one kick; the driver's used_event asks for an interrupt
    #    only after the second one (EVENT_IDX), so the first completion is not signalled.
    q.get_used()
    q.set_used_event(2)
    q.add_chain([(HDR.pack(b.VIRTIO_BLK_T_OUT, 0, 0), False), (b"x" * 512, False), (1, True)])
    q.add_chain([(HDR.pack(b.VIRTIO_BLK_T_FLUSH, 0, 0), False), (1, True)])
    t.write(m.REG_QUEUE_NOTIFY, 4, 0)  # no ioeventfd: a trapped MMIO write
    t.write(m.REG_INTERRUPT_ACK, 4, 1)
    expected = [
        "+0.000125 vda  setup   DRIVER_OK: 1 queue(s) live, split virtqueue layout, features 0x130006244",
        "+0.000250 vda  notify  queue 0: QueueNotify written by the guest, caught by an ioeventfd",
        "+0.000375 vda  pop     head 7: chain of 3 descriptors [16 out, 1024 in, 1 in], device reads 16 B, "
        "may write 1025 B",
        "+0.000500 vda  req     head 7: type VIRTIO_BLK_T_IN(read), sector 4, 1024 data bytes",
        "+0.000625 vda  io      head 7: I/O done on the host, status OK, 1024 data bytes written into guest "
        "buffers",
        "+0.000750 vda  used    head 7: returned in the used ring, len 1025, used.idx now 1",
        "+0.000875 vda  irq     used buffer: InterruptStatus |= 0x1, interrupt sent via irqfd (GSI 5)",
        "+0.001000 vda  ack     guest wrote InterruptACK 0x1, InterruptStatus now 0x0",
        "+0.001125 vda  notify  queue 0: QueueNotify written by the guest, trapped as an MMIO exit",
        "+0.001250 vda  pop     head 5: chain of 3 descriptors [16 out, 512 out, 1 in], device reads 528 B, "
        "may write 1 B",
        "+0.001375 vda  req     head 5: type VIRTIO_BLK_T_OUT(write), sector 0, 512 data bytes",
        "+0.001500 vda  io      head 5: I/O done on the host, status OK, 0 data bytes written into guest buffers",
        "+0.001625 vda  used    head 5: returned in the used ring, len 1, used.idx now 2",
        "+0.001750 vda  pop     head 4: chain of 2 descriptors [16 out, 1 in], device reads 16 B, may write 1 B",
        "+0.001875 vda  req     head 4: type VIRTIO_BLK_T_FLUSH, 0 data bytes",
        "+0.002000 vda  io      head 4: I/O done on the host, status OK, 0 data bytes written into guest buffers",
        "+0.002125 vda  used    head 4: returned in the used ring, len 1, used.idx now 3",
        "+0.002250 vda  irq     used buffer: InterruptStatus |= 0x1, interrupt sent via irqfd (GSI 5)",
        "+0.002375 vda  ack     guest wrote InterruptACK 0x1, InterruptStatus now 0x0",
    ]
    assert traced.lines() == expected


def test_suppressed_interrupt_is_traced(traced: TracedRig) -> None:
    traced.q.set_used_event(5)  # EVENT_IDX: "interrupt me after used idx 5"
    traced.q.add_chain([(HDR.pack(b.VIRTIO_BLK_T_FLUSH, 0, 0), False), (1, True)])
    traced.t.notify(0, via="ioeventfd")
    assert traced.lines()[-1].endswith("vda  irq     used ring advanced, no interrupt: the driver asked for "
                                       "none yet (used_event / NO_INTERRUPT)")


def test_selected_classes_only(tmp_path: Path) -> None:
    rig = TracedRig(tmp_path, parse_selectors(["virtio.notify,virtio.irq"]))
    try:
        rig.q.add_chain([(HDR.pack(b.VIRTIO_BLK_T_IN, 0, 0), False), (512, True), (1, True)])
        rig.t.notify(0, via="ioeventfd")
        assert [line.split()[2] for line in rig.lines()] == ["notify", "irq"]
    finally:
        rig.close()


def test_trace_file(tmp_path: Path) -> None:
    path = tmp_path / "trace.txt"
    tracer = Tracer.open(parse_selectors(["virtio"]), path)
    hook = tracer.hook("vdb")
    assert hook is not None
    hook("notify q=0 via=ioeventfd")
    tracer.close()
    tracer.write("vdb", "ack", "after close: ignored")
    assert path.read_text().endswith("vdb  notify  queue 0: QueueNotify written by the guest, caught by an ioeventfd\n")
    with pytest.raises(ConfigError, match="cannot open trace file"):
        Tracer.open(frozenset({"irq"}), tmp_path / "no" / "such" / "dir.txt")


@pytest.mark.parametrize(("event", "cls", "text"), [
    ("needs reset", "reset", "device needs reset (a chain it could not parse): InterruptStatus |= 0x2"),
    ("irq config", "irq", "configuration change: InterruptStatus |= 0x2, interrupt sent"),
    ("req head=1 type=VIRTIO_BLK_T_DISCARD segments=2", "req", "head 1: type VIRTIO_BLK_T_DISCARD, 2 segment(s)"),
])
def test_describe(event: str, cls: str, text: str) -> None:
    assert describe(event) == (cls, text)
