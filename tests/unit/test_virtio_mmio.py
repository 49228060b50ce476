"""The virtio-mmio transport (virtio 1.2 §4.2) with a dummy device: registers and status rules."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import pytest

from pyvmm.devices.virtio import device as d
from pyvmm.devices.virtio import mmio as m
from pyvmm.devices.virtio.queue import Virtqueue, VirtqueueError
from pyvmm.interrupt import CountingIrq
from pyvmm.memory import GuestMemory
from pyvmm.testing.driverqueue import DriverQueue, SetupError, setup_device

FEATURE_X = 1 << 3


class Dummy(d.VirtioDevice):
    device_id = 42
    queue_max_sizes = (16, 8)

    def __init__(self) -> None:
        super().__init__()
        self.activations: list[int] = []
        self.resets = 0
        self.processed: list[int] = []
        self.fail = False
        self.block: threading.Event | None = None
        self.block_event = threading.Event()  # the event the last blocked processing waits on
        self.entered = threading.Event()
        self.config = bytearray(b"\x01\x02\x03\x04\x05\x06\x07\x08")
        self.queues: Sequence[Virtqueue] = ()

    @property
    def device_features(self) -> int:
        return d.VIRTIO_F_VERSION_1 | FEATURE_X | d.VIRTIO_F_EVENT_IDX

    def config_bytes(self) -> bytes:
        return bytes(self.config)

    def write_config(self, offset: int, size: int, value: int) -> None:
        self.config[offset : offset + size] = value.to_bytes(size, "little")

    def activate(self, mem: GuestMemory, queues: Sequence[Virtqueue], features: int) -> None:
        self.activations.append(features)
        self.queues = queues

    def reset(self) -> None:
        self.resets += 1

    def process_queue(self, index: int, mem: GuestMemory) -> bool:
        self.entered.set()
        block = self.block
        if block is not None:
            self.block_event = block
            block.wait(5)
        if self.fail:
            raise VirtqueueError("bogus")
        self.processed.append(index)
        q = self.queues[index]
        advanced = False
        while (chain := q.pop(mem)) is not None:
            q.push_used(mem, chain.head, 0)
            advanced = True
        return advanced


class Rig:
    """The dummy device behind a transport of ``version`` 2 (or the legacy 1), two driver queues."""

    def __init__(self, version: int = 2) -> None:
        self.mem = GuestMemory.single(1 << 20)
        self.irq = CountingIrq()
        self.events: list[str] = []
        self.dev = Dummy()
        self.t = m.VirtioMmioTransport(self.dev, self.mem, self.irq, trace=self.events.append, version=version)
        self.q0 = DriverQueue(self.mem, 0x10000, 16, data_size=4096)
        self.q1 = DriverQueue(self.mem, 0x20000, 8, data_size=4096)

    def r(self, off: int) -> int:
        return self.t.read(off, 4)

    def w(self, off: int, value: int) -> None:
        self.t.write(off, 4, value)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.mem.close()


def test_identification_registers(rig: Rig) -> None:
    assert rig.r(m.REG_MAGIC_VALUE) == 0x74726976
    assert rig.r(m.REG_VERSION) == 2
    assert rig.r(m.REG_DEVICE_ID) == 42
    assert rig.r(m.REG_VENDOR_ID) == m.VENDOR_ID
    for off in (m.REG_SHM_LEN_LOW, m.REG_SHM_LEN_HIGH, m.REG_SHM_BASE_LOW, m.REG_SHM_BASE_HIGH):
        assert rig.r(off) == 0xFFFFFFFF
    assert rig.r(m.REG_QUEUE_RESET) == 0
    assert rig.r(0x0F0) == 0  # unknown register


def test_non_word_register_access_is_ignored(rig: Rig) -> None:
    assert rig.t.read(m.REG_MAGIC_VALUE, 1) == 0
    assert rig.t.read(m.REG_MAGIC_VALUE, 2) == 0
    assert rig.t.read(m.REG_MAGIC_VALUE + 2, 4) == 0
    rig.t.write(m.REG_STATUS, 1, m.STATUS_ACKNOWLEDGE)
    assert rig.r(m.REG_STATUS) == 0


def test_device_features_by_select(rig: Rig) -> None:
    rig.w(m.REG_DEVICE_FEATURES_SEL, 0)
    assert rig.r(m.REG_DEVICE_FEATURES) == FEATURE_X | d.VIRTIO_F_EVENT_IDX
    rig.w(m.REG_DEVICE_FEATURES_SEL, 1)
    assert rig.r(m.REG_DEVICE_FEATURES) == 1 | 4  # VERSION_1 is bit 32; the transport offers RING_PACKED (34)
    rig.w(m.REG_DEVICE_FEATURES_SEL, 7)
    assert rig.r(m.REG_DEVICE_FEATURES) == 0


def test_full_setup_activates_once(rig: Rig) -> None:
    feats = setup_device(rig.t, [rig.q0, rig.q1])
    assert rig.dev.activations == [feats]
    assert rig.r(m.REG_STATUS) == 15
    assert rig.t.queues[0].event_idx
    rig.w(m.REG_STATUS, 15)
    assert rig.dev.activations == [feats]


@pytest.mark.parametrize("features", [FEATURE_X, d.VIRTIO_F_VERSION_1 | (1 << 20)])
def test_features_ok_refused(rig: Rig, features: int) -> None:
    with pytest.raises(SetupError):
        setup_device(rig.t, [rig.q0], features=features)
    assert not rig.r(m.REG_STATUS) & m.STATUS_FEATURES_OK
    # DRIVER_OK without FEATURES_OK is not accepted either
    rig.w(m.REG_STATUS, m.STATUS_ACKNOWLEDGE | m.STATUS_DRIVER | m.STATUS_DRIVER_OK)
    assert not rig.r(m.REG_STATUS) & m.STATUS_DRIVER_OK
    assert rig.dev.activations == []


def test_features_frozen_after_features_ok(rig: Rig) -> None:
    setup_device(rig.t, [rig.q0], features=d.VIRTIO_F_VERSION_1)
    rig.w(m.REG_DRIVER_FEATURES_SEL, 0)
    rig.w(m.REG_DRIVER_FEATURES, FEATURE_X)
    assert rig.t.negotiated_features == d.VIRTIO_F_VERSION_1


def test_queue_registers(rig: Rig) -> None:
    rig.w(m.REG_QUEUE_SEL, 1)
    assert rig.r(m.REG_QUEUE_NUM_MAX) == 8
    rig.w(m.REG_QUEUE_SEL, 2)
    assert rig.r(m.REG_QUEUE_NUM_MAX) == 0
    rig.w(m.REG_QUEUE_READY, 1)  # no such queue: ignored
    assert rig.r(m.REG_QUEUE_READY) == 0
    rig.w(m.REG_QUEUE_SEL, 0)
    rig.w(m.REG_QUEUE_NUM, 12)  # not a power of two: QueueReady refused
    rig.w(m.REG_QUEUE_READY, 1)
    assert rig.r(m.REG_QUEUE_READY) == 0
    rig.w(m.REG_QUEUE_NUM, 32)  # above the maximum
    rig.w(m.REG_QUEUE_READY, 1)
    assert rig.r(m.REG_QUEUE_READY) == 0
    rig.w(m.REG_QUEUE_NUM, 16)
    rig.w(m.REG_QUEUE_DESC_LOW, 0x1000)
    rig.w(m.REG_QUEUE_DESC_HIGH, 0x2)  # a descriptor table outside guest RAM: QueueReady refused
    rig.w(m.REG_QUEUE_READY, 1)
    assert rig.r(m.REG_QUEUE_READY) == 0
    rig.w(m.REG_QUEUE_DESC_HIGH, 0)
    rig.w(m.REG_QUEUE_READY, 1)
    assert rig.r(m.REG_QUEUE_READY) == 1
    assert rig.t.queues[0].desc_addr == 0x1000
    rig.w(m.REG_QUEUE_DESC_LOW, 0x3000)  # ignored while ready
    assert rig.t.queues[0].desc_addr == 0x1000


@pytest.mark.parametrize("part", ["desc", "avail", "used"])
def test_each_ring_part_must_lie_in_ram_when_the_queue_is_made_ready(rig: Rig, part: str) -> None:
    """The rings are checked once, at QueueReady, part by part (a part that starts in RAM and runs
    past its end counts as outside): a queue whose rings the device could not use is not made ready."""
    ram_end = rig.mem.regions[-1].gpa + rig.mem.regions[-1].size
    parts = {"desc": (m.REG_QUEUE_DESC_LOW, 16 * 16), "avail": (m.REG_QUEUE_DRIVER_LOW, 6 + 2 * 16),
             "used": (m.REG_QUEUE_DEVICE_LOW, 6 + 8 * 16)}
    rig.w(m.REG_QUEUE_SEL, 0)
    rig.w(m.REG_QUEUE_NUM, 16)
    for reg, _ in parts.values():
        rig.w(reg, 0x1000)
    reg, length = parts[part]
    rig.w(reg, (ram_end - length + 16) & ~15)  # starts inside, ends 16 bytes past the end of RAM
    rig.w(m.REG_QUEUE_READY, 1)
    assert rig.r(m.REG_QUEUE_READY) == 0
    rig.w(reg, (ram_end - length) & ~15)  # ends exactly at the end: fine
    rig.w(m.REG_QUEUE_READY, 1)
    assert rig.r(m.REG_QUEUE_READY) == 1


def test_queue_layout_frozen_after_driver_ok(rig: Rig) -> None:
    setup_device(rig.t, [rig.q0, rig.q1])
    rig.w(m.REG_QUEUE_SEL, 0)
    rig.w(m.REG_QUEUE_NUM, 4)
    rig.w(m.REG_QUEUE_DESC_LOW, 0x5000)
    assert rig.t.queues[0].size == 16 and rig.t.queues[0].desc_addr == rig.q0.desc_addr


def test_queue_ready_0_after_driver_ok_stops_the_queue(rig: Rig) -> None:
    # §4.2.2: QueueReady reads back the last value written, and the device does not touch a queue whose
    # QueueReady is 0.
    setup_device(rig.t, [rig.q0, rig.q1], mask=~d.VIRTIO_F_EVENT_IDX)
    rig.w(m.REG_QUEUE_SEL, 0)
    rig.w(m.REG_QUEUE_READY, 0)
    assert rig.r(m.REG_QUEUE_READY) == 0
    used_idx = rig.mem.read(rig.q0.used_addr, 4)
    head = rig.q0.add_chain([(4, True)])
    rig.w(m.REG_QUEUE_NOTIFY, 0)
    rig.t.notify(0, via="ioeventfd")
    assert rig.dev.processed == [] and rig.irq.count == 0
    assert rig.mem.read(rig.q0.used_addr, 4) == used_idx  # the used ring untouched
    rig.w(m.REG_QUEUE_SEL, 1)
    assert rig.r(m.REG_QUEUE_READY) == 1  # the other queue runs on
    # Started again (the layout is the one it had): the waiting buffer is served.
    rig.w(m.REG_QUEUE_SEL, 0)
    rig.w(m.REG_QUEUE_READY, 1)
    assert rig.r(m.REG_QUEUE_READY) == 1
    rig.w(m.REG_QUEUE_NOTIFY, 0)
    assert [u.head for u in rig.q0.get_used()] == [head] and rig.irq.count == 1


def test_queue_ready_0_waits_for_the_queues_work_in_flight(rig: Rig) -> None:
    setup_device(rig.t, [rig.q0, rig.q1])
    rig.dev.block = threading.Event()
    rig.q0.add_chain([(4, True)])
    worker = threading.Thread(target=rig.t.notify, args=(0,))
    worker.start()
    assert rig.dev.entered.wait(5)
    rig.w(m.REG_QUEUE_SEL, 0)
    stopper = threading.Thread(target=rig.w, args=(m.REG_QUEUE_READY, 0))
    stopper.start()
    stopper.join(0.1)
    assert stopper.is_alive()  # once the write returns, nothing of the queue is in flight
    rig.dev.block.set()
    worker.join(5)
    stopper.join(5)
    assert rig.r(m.REG_QUEUE_READY) == 0


def test_queues_are_processed_at_the_same_time(rig: Rig) -> None:
    """Each queue has its own processing lock: while queue 0's work is in flight, queue 1 is served
    (and stopping queue 1 does not wait for queue 0)."""
    setup_device(rig.t, [rig.q0, rig.q1])
    rig.dev.block = threading.Event()
    h0 = rig.q0.add_chain([(4, True)])
    worker = threading.Thread(target=rig.t.notify, args=(0,))
    worker.start()
    assert rig.dev.entered.wait(5)
    rig.dev.block = None  # queue 1's processing does not block
    head = rig.q1.add_chain([(4, True)])
    done = threading.Thread(target=rig.t.notify, args=(1,))
    done.start()
    done.join(5)
    assert not done.is_alive() and [u.head for u in rig.q1.get_used()] == [head]
    rig.w(m.REG_QUEUE_SEL, 1)
    rig.w(m.REG_QUEUE_READY, 0)  # returns at once: queue 1 has nothing in flight
    assert worker.is_alive() and rig.q0.get_used() == []
    blocked = rig.dev.block_event
    blocked.set()
    worker.join(5)
    assert [u.head for u in rig.q0.get_used()] == [h0]


def test_a_queue_not_ready_at_driver_ok_cannot_be_started_later(rig: Rig) -> None:
    setup_device(rig.t, [rig.q0])  # the driver set up queue 0 only
    rig.w(m.REG_QUEUE_SEL, 1)
    rig.w(m.REG_QUEUE_READY, 1)  # its layout was never written, and now cannot be
    assert rig.r(m.REG_QUEUE_READY) == 0


def test_a_reset_never_follows_its_own_completion_interrupt(rig: Rig) -> None:
    # The used ring advances, then a reset comes before the interrupt is raised: the reset must wait for
    # the interrupt (raised while the device is still live), not the other way round.
    setup_device(rig.t, [rig.q0, rig.q1], mask=~d.VIRTIO_F_EVENT_IDX)
    seen: list[int] = []
    trigger = rig.irq.trigger

    def irq_trigger() -> None:
        seen.append(rig.t.status)  # the device status when the interrupt goes out
        trigger()

    rig.irq.trigger = irq_trigger  # type: ignore[method-assign]
    signal = rig.t.signal_used_buffer
    resetter = threading.Thread(target=rig.w, args=(m.REG_STATUS, 0))

    def signal_with_a_reset_racing() -> None:
        resetter.start()
        resetter.join(0.3)  # a reset that can run now would be done by then
        signal()

    rig.t.signal_used_buffer = signal_with_a_reset_racing  # type: ignore[method-assign]
    rig.q0.add_chain([(4, True)])
    rig.t.notify(0)
    resetter.join(5)
    assert seen == [15]  # raised before the reset, on a live device
    assert rig.r(m.REG_STATUS) == 0 and rig.r(m.REG_INTERRUPT_STATUS) == 0


def test_notify_before_driver_ok_does_nothing(rig: Rig) -> None:
    rig.w(m.REG_QUEUE_NOTIFY, 0)
    assert rig.dev.processed == []


def test_notify_processes_and_interrupts(rig: Rig) -> None:
    setup_device(rig.t, [rig.q0, rig.q1], mask=~d.VIRTIO_F_EVENT_IDX)
    head = rig.q0.add_chain([(4, True)])
    rig.w(m.REG_QUEUE_NOTIFY, 0)
    assert rig.dev.processed == [0]
    assert [u.head for u in rig.q0.get_used()] == [head]
    assert rig.irq.count == 1
    assert rig.r(m.REG_INTERRUPT_STATUS) == m.INT_USED_BUFFER
    rig.w(m.REG_INTERRUPT_ACK, m.INT_USED_BUFFER)
    assert rig.r(m.REG_INTERRUPT_STATUS) == 0
    rig.t.notify(1)  # the event-loop path; nothing available: no interrupt
    rig.t.notify(9)  # no such queue
    assert rig.irq.count == 1
    assert rig.events[:2] == ["ready queues=2 layout=split features=0x100000008", "notify q=0"]
    assert "irq used" in rig.events and any(e.startswith("ack value=0x1") for e in rig.events)


def test_malformed_chain_sets_needs_reset(rig: Rig) -> None:
    setup_device(rig.t, [rig.q0, rig.q1])
    rig.dev.fail = True
    rig.t.notify(0)
    assert rig.r(m.REG_STATUS) & m.STATUS_DEVICE_NEEDS_RESET
    assert rig.r(m.REG_INTERRUPT_STATUS) & m.INT_CONFIG_CHANGE
    assert rig.irq.count == 1
    rig.dev.fail = False
    rig.t.notify(0)  # no processing until reset
    assert rig.dev.processed == []
    setup_device(rig.t, [rig.q0, rig.q1])
    assert rig.r(m.REG_STATUS) == 15
    rig.t.notify(0)
    assert rig.dev.processed == [0]


def test_reset_clears_everything(rig: Rig) -> None:
    setup_device(rig.t, [rig.q0, rig.q1])
    rig.q0.add_chain([(4, True)])
    rig.t.notify(0)
    rig.w(m.REG_QUEUE_SEL, 1)
    before = rig.dev.resets
    rig.w(m.REG_STATUS, 0)
    assert rig.r(m.REG_STATUS) == 0
    assert rig.r(m.REG_INTERRUPT_STATUS) == 0
    assert rig.dev.resets == before + 1
    for q in rig.t.queues:
        assert (q.ready, q.desc_addr, q.last_avail_idx, q.used_idx) == (False, 0, 0, 0)
    rig.w(m.REG_QUEUE_SEL, 0)
    assert rig.r(m.REG_QUEUE_READY) == 0
    assert rig.t.negotiated_features == 0


def test_reset_waits_for_in_flight_processing(rig: Rig) -> None:
    setup_device(rig.t, [rig.q0, rig.q1])
    rig.dev.block = threading.Event()
    rig.q0.add_chain([(4, True)])
    worker = threading.Thread(target=rig.t.notify, args=(0,))
    worker.start()
    assert rig.dev.entered.wait(5)
    before = rig.dev.resets
    resetter = threading.Thread(target=rig.w, args=(m.REG_STATUS, 0))
    resetter.start()
    resetter.join(0.1)
    assert resetter.is_alive()  # blocked behind the request
    assert rig.r(m.REG_STATUS) == 15  # register reads are not blocked
    rig.dev.block.set()
    worker.join(5)
    resetter.join(5)
    assert rig.r(m.REG_STATUS) == 0 and rig.dev.resets == before + 1


def test_config_space(rig: Rig) -> None:
    assert rig.t.read(m.REG_CONFIG, 1) == 1
    assert rig.t.read(m.REG_CONFIG + 1, 2) == 0x0302
    assert rig.t.read(m.REG_CONFIG, 4) == 0x04030201
    assert rig.t.read(m.REG_CONFIG, 8) == 0x0807060504030201
    assert rig.t.read(m.REG_CONFIG + 6, 4) == 0x0807  # past the end reads 0
    assert rig.t.read(m.REG_CONFIG, 3) == 0
    rig.t.write(m.REG_CONFIG + 2, 2, 0xBBAA)
    assert rig.t.read(m.REG_CONFIG, 4) == 0xBBAA0201
    gen = rig.r(m.REG_CONFIG_GENERATION)
    rig.t.signal_config_change()
    assert rig.r(m.REG_CONFIG_GENERATION) == gen + 1
    assert rig.r(m.REG_INTERRUPT_STATUS) == m.INT_CONFIG_CHANGE
    assert rig.irq.count == 1


def test_trace_off_by_default() -> None:
    mem = GuestMemory.single(1 << 16)
    t = m.VirtioMmioTransport(Dummy(), mem, CountingIrq())
    assert t.trace is None
    t.notify(0)
    mem.close()


def test_guest_triggered_warnings_are_rate_limited(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.w(m.REG_QUEUE_SEL, 0)
    rig.w(m.REG_QUEUE_NUM, 12)  # not a power of two: every QueueReady write is refused with a warning
    with caplog.at_level("WARNING", logger=m.__name__):
        for _ in range(1000):
            rig.w(m.REG_QUEUE_READY, 1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 8 + 6  # the first 8, then the 16th, 32nd, 64th, 128th, 256th and 512th
    assert lines[-1].endswith("(512 guest errors so far)")
