"""virtio-blk (virtio 1.2 §5.2) end to end: DriverQueue -> virtio-mmio -> VirtioBlock -> RawDisk."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.devices.virtio import block as b
from pyvmm.devices.virtio import device as d
from pyvmm.devices.virtio import mmio as m
from pyvmm.devices.virtio.disk import RawDisk
from pyvmm.interrupt import CountingIrq
from pyvmm.memory import GuestMemory
from pyvmm.testing.driverqueue import DriverQueue, setup_device

SECTORS = 128
QSIZE = 16
HDR = struct.Struct("<IIQ")


def request_buffers(rtype: int, sector: int = 0, out: bytes = b"", in_len: int = 0, *, status: bool = True
                    ) -> list[tuple[bytes | int, bool]]:
    """A virtio-blk request as a driver lays it out (§5.2.6): header, data out or in, status byte."""
    bufs: list[tuple[bytes | int, bool]] = [(HDR.pack(rtype, 0, sector), False)]
    if out:
        bufs.append((out, False))
    if in_len:
        bufs.append((in_len, True))
    if status:
        bufs.append((b"\xff", True))
    return bufs


def pattern(sector: int) -> bytes:
    return bytes((sector * 7 + i) & 0xFF for i in range(512))


class Rig:
    def __init__(self, tmp: Path, *, readonly: bool = False, discard: bool = True, mask: int = -1) -> None:
        self.image = tmp / "disk.img"
        if not self.image.exists():
            self.image.write_bytes(b"".join(pattern(s) for s in range(SECTORS)))
        self.disk = RawDisk(self.image, readonly=readonly)
        self.dev = b.VirtioBlock(self.disk, serial="pyvmm-serial-0001", discard=discard, queue_size=QSIZE)
        self.mem = GuestMemory.single(1 << 20)
        self.irq = CountingIrq()
        self.t = m.VirtioMmioTransport(self.dev, self.mem, self.irq)
        self.q = DriverQueue(self.mem, 0x1000, QSIZE, data_size=512 << 10)
        self.features = setup_device(self.t, [self.q], mask=mask)

    def submit(
        self,
        rtype: int,
        sector: int = 0,
        out: bytes = b"",
        in_len: int = 0,
        *,
        indirect: bool = False,
        status: bool = True,
    ) -> int:
        return self.q.add_chain(request_buffers(rtype, sector, out, in_len, status=status), indirect=indirect)

    def run(
        self, rtype: int, sector: int = 0, out: bytes = b"", in_len: int = 0, **kw: bool
    ) -> tuple[int, int, bytes]:
        """One request: (status, used len, data read)."""
        head = self.submit(rtype, sector, out, in_len, **kw)
        self.t.notify(0)
        used = self.q.get_used()
        assert [u.head for u in used] == [head]
        bufs = self.q.buffers[head]
        status = self.mem.read(bufs[-1][0], 1)[0]
        data = self.q.read_buffer(head, len(bufs) - 2) if in_len else b""
        return status, used[0].length, data

    def close(self) -> None:
        self.dev.close()
        self.mem.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def test_features_and_config(rig: Rig) -> None:
    f = rig.features
    for bit in (d.VIRTIO_F_VERSION_1, d.VIRTIO_F_INDIRECT_DESC, d.VIRTIO_F_EVENT_IDX, b.VIRTIO_BLK_F_FLUSH,
                b.VIRTIO_BLK_F_BLK_SIZE, b.VIRTIO_BLK_F_SEG_MAX, b.VIRTIO_BLK_F_DISCARD, b.VIRTIO_BLK_F_WRITE_ZEROES):  # fmt: skip
        assert f & bit, hex(bit)
    assert not f & b.VIRTIO_BLK_F_RO
    assert rig.t.read(m.REG_DEVICE_ID, 4) == 2
    assert rig.t.read(m.REG_CONFIG, 8) == SECTORS
    assert rig.t.read(m.REG_CONFIG + 12, 4) == QSIZE - 2  # seg_max
    assert rig.t.read(m.REG_CONFIG + 20, 4) == 512  # blk_size
    assert rig.t.read(m.REG_CONFIG + 40, 4) == b.MAX_DISCARD_SEG
    assert rig.t.read(m.REG_CONFIG + 56, 1) == 1  # write_zeroes_may_unmap


@pytest.mark.parametrize("indirect", [False, True])
def test_read(rig: Rig, indirect: bool) -> None:
    status, used, data = rig.run(b.VIRTIO_BLK_T_IN, 3, in_len=1024, indirect=indirect)
    assert status == b.VIRTIO_BLK_S_OK
    assert used == 1025
    assert data == pattern(3) + pattern(4)
    assert rig.irq.count == 1


def test_read_with_split_header_and_scattered_data(rig: Rig) -> None:
    hdr = HDR.pack(b.VIRTIO_BLK_T_IN, 0, 10)
    head = rig.q.add_chain([(hdr[:5], False), (hdr[5:], False), (100, True), (412, True), (b"\xff", True)])
    rig.t.notify(0)
    (u,) = rig.q.get_used()
    assert u.head == head and u.length == 513
    assert rig.q.read_buffer(head, 2) + rig.q.read_buffer(head, 3) == pattern(10)
    assert rig.q.read_buffer(head, 4) == b"\0"
    # the status byte may share a buffer with data (§2.6.4: no framing assumptions)
    rig.q.add_chain([(hdr, False), (513, True)])
    rig.t.notify(0)
    (u,) = rig.q.get_used()
    buf = rig.q.read_buffer(u.head, 1)
    assert buf[:512] == pattern(10) and buf[512] == 0 and u.length == 513


def test_write_then_read(rig: Rig) -> None:
    data = bytes(range(256)) * 4
    status, used, _ = rig.run(b.VIRTIO_BLK_T_OUT, 5, out=data)
    assert (status, used) == (b.VIRTIO_BLK_S_OK, 1)
    assert rig.image.read_bytes()[5 * 512 : 7 * 512] == data
    assert rig.run(b.VIRTIO_BLK_T_IN, 5, in_len=1024)[2] == data


def test_flush_and_get_id(rig: Rig) -> None:
    assert rig.run(b.VIRTIO_BLK_T_FLUSH)[:2] == (b.VIRTIO_BLK_S_OK, 1)
    status, used, data = rig.run(b.VIRTIO_BLK_T_GET_ID, in_len=20)
    assert (status, used) == (b.VIRTIO_BLK_S_OK, 21)
    assert data == b"pyvmm-serial-0001\0\0\0"


def test_get_id_into_a_larger_buffer_counts_only_the_id(rig: Rig) -> None:
    head = rig.submit(b.VIRTIO_BLK_T_GET_ID, in_len=64)
    buf = rig.q.buffers[head][1][0]
    rig.mem.write(buf, b"\xaa" * 64)
    rig.t.notify(0)
    (u,) = rig.q.get_used()
    data = rig.mem.read(buf, 64)
    # 20 bytes of id, the rest untouched; the status byte lies after 44 unwritten bytes: len 20 (§2.7.8.2)
    assert data == b"pyvmm-serial-0001\0\0\0" + b"\xaa" * 44
    assert u.length == 20 and rig.mem.read(rig.q.buffers[head][-1][0], 1) == bytes([b.VIRTIO_BLK_S_OK])


def test_unknown_type_is_unsupported(rig: Rig) -> None:
    assert rig.run(99, in_len=512)[0] == b.VIRTIO_BLK_S_UNSUPP
    assert rig.run(10, in_len=16)[0] == b.VIRTIO_BLK_S_UNSUPP  # GET_LIFETIME not offered


@pytest.mark.parametrize(
    ("rtype", "sector", "out", "in_len"),
    [
        (b.VIRTIO_BLK_T_IN, SECTORS, b"", 512),  # beyond the end
        (b.VIRTIO_BLK_T_IN, SECTORS - 1, b"", 1024),  # straddles the end
        (b.VIRTIO_BLK_T_IN, 2**64 - 1, b"", 512),  # wraps
        (b.VIRTIO_BLK_T_IN, 0, b"", 100),  # not a multiple of 512
        (b.VIRTIO_BLK_T_OUT, SECTORS, b"x" * 512, 0),
        (b.VIRTIO_BLK_T_OUT, 0, b"x" * 100, 0),
        (b.VIRTIO_BLK_T_IN, 0, b"x" * 512, 512),  # device-readable data for a read
        (b.VIRTIO_BLK_T_OUT, 0, b"x" * 512, 512),  # device-writable data for a write
    ],
)
def test_bad_requests_get_ioerr(rig: Rig, rtype: int, sector: int, out: bytes, in_len: int) -> None:
    before = rig.image.read_bytes()
    status, used, _ = rig.run(rtype, sector, out=out, in_len=in_len)
    # §2.7.8.2: len counts what was written from the start of the writable part.  Nothing was written into
    # a data buffer, so with one the status byte (after it) is not counted: 0; with only the status byte, 1.
    assert (status, used) == (b.VIRTIO_BLK_S_IOERR, 0 if in_len else 1)
    assert rig.image.read_bytes() == before


def test_short_header_gets_ioerr(rig: Rig) -> None:
    head = rig.q.add_chain([(b"\0" * 15, False), (b"\xff", True)])
    rig.t.notify(0)
    (u,) = rig.q.get_used()
    assert u.head == head and u.length == 1
    assert rig.q.read_buffer(head, 1) == bytes([b.VIRTIO_BLK_S_IOERR])


def test_chain_without_status_byte_is_returned_with_len_0(rig: Rig) -> None:
    status_less = rig.submit(b.VIRTIO_BLK_T_IN, 0, status=False)
    rig.submit(b.VIRTIO_BLK_T_FLUSH)
    rig.t.notify(0)
    used = rig.q.get_used()
    assert (used[0].head, used[0].length) == (status_less, 0)
    assert used[1].length == 1
    assert not rig.t.read(m.REG_STATUS, 4) & m.STATUS_DEVICE_NEEDS_RESET


def test_readonly_disk(tmp_path: Path) -> None:
    Rig(tmp_path).close()  # creates the image
    rig = Rig(tmp_path, readonly=True)
    try:
        assert rig.features & b.VIRTIO_BLK_F_RO
        assert not rig.features & (b.VIRTIO_BLK_F_DISCARD | b.VIRTIO_BLK_F_WRITE_ZEROES)
        before = rig.image.read_bytes()
        assert rig.run(b.VIRTIO_BLK_T_OUT, 0, out=b"z" * 512)[0] == b.VIRTIO_BLK_S_IOERR
        assert rig.run(b.VIRTIO_BLK_T_WRITE_ZEROES, 0, out=seg(0, 1))[0] == b.VIRTIO_BLK_S_UNSUPP
        assert rig.run(b.VIRTIO_BLK_T_FLUSH)[0] == b.VIRTIO_BLK_S_OK
        assert rig.run(b.VIRTIO_BLK_T_IN, 1, in_len=512)[2] == pattern(1)
        assert rig.image.read_bytes() == before
    finally:
        rig.close()


def seg(sector: int, count: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, count, flags)


def test_write_zeroes_and_discard(rig: Rig) -> None:
    out = seg(8, 8) + seg(20, 8, b.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
    assert rig.run(b.VIRTIO_BLK_T_WRITE_ZEROES, out=out)[:2] == (b.VIRTIO_BLK_S_OK, 1)
    img = rig.image.read_bytes()
    assert img[8 * 512 : 16 * 512] == bytes(4096) and img[20 * 512 : 28 * 512] == bytes(4096)
    assert img[16 * 512 : 17 * 512] == pattern(16)
    assert len(img) == SECTORS * 512
    assert rig.run(b.VIRTIO_BLK_T_DISCARD, out=seg(32, 8))[0] == b.VIRTIO_BLK_S_OK
    assert rig.run(b.VIRTIO_BLK_T_DISCARD, out=seg(32, 8, 1))[0] == b.VIRTIO_BLK_S_UNSUPP  # unmap on discard
    assert rig.run(b.VIRTIO_BLK_T_WRITE_ZEROES, out=seg(0, 1, 2))[0] == b.VIRTIO_BLK_S_UNSUPP  # unknown flag
    assert rig.run(b.VIRTIO_BLK_T_WRITE_ZEROES, out=seg(SECTORS - 1, 2))[0] == b.VIRTIO_BLK_S_IOERR
    assert rig.run(b.VIRTIO_BLK_T_WRITE_ZEROES, out=seg(0, 1)[:10])[0] == b.VIRTIO_BLK_S_IOERR
    too_many = seg(0, 1) * (b.MAX_DISCARD_SEG + 1)
    assert rig.run(b.VIRTIO_BLK_T_DISCARD, out=too_many)[0] == b.VIRTIO_BLK_S_IOERR
    # a bad segment leaves the good ones before it undone
    before = rig.image.read_bytes()
    assert rig.run(b.VIRTIO_BLK_T_WRITE_ZEROES, out=seg(40, 1) + seg(SECTORS, 1))[0] == b.VIRTIO_BLK_S_IOERR
    assert rig.image.read_bytes() == before


def test_discard_not_negotiated(tmp_path: Path) -> None:
    rig = Rig(tmp_path, mask=~(b.VIRTIO_BLK_F_DISCARD | b.VIRTIO_BLK_F_WRITE_ZEROES))
    try:
        assert rig.run(b.VIRTIO_BLK_T_DISCARD, out=seg(0, 1))[0] == b.VIRTIO_BLK_S_UNSUPP
        assert rig.run(b.VIRTIO_BLK_T_WRITE_ZEROES, out=seg(0, 1))[0] == b.VIRTIO_BLK_S_UNSUPP
    finally:
        rig.close()


def test_batch_and_event_idx_suppression(rig: Rig) -> None:
    assert rig.features & d.VIRTIO_F_EVENT_IDX
    rig.q.set_used_event(3)  # interrupt once the 4th buffer is used
    for i in range(3):
        rig.submit(b.VIRTIO_BLK_T_IN, i, in_len=512)
    rig.t.notify(0)
    assert len(rig.q.get_used()) == 3 and rig.irq.count == 0
    assert rig.q.avail_event == 3  # the device asks to be notified for slot 3
    rig.submit(b.VIRTIO_BLK_T_IN, 0, in_len=512)
    rig.t.notify(0)
    assert rig.irq.count == 1


def test_no_interrupt_flag_without_event_idx(tmp_path: Path) -> None:
    rig = Rig(tmp_path, mask=~d.VIRTIO_F_EVENT_IDX)
    try:
        rig.q.set_no_interrupt(True)
        assert rig.run(b.VIRTIO_BLK_T_IN, 0, in_len=512)[0] == b.VIRTIO_BLK_S_OK
        assert rig.irq.count == 0
        rig.q.set_no_interrupt(False)
        rig.run(b.VIRTIO_BLK_T_IN, 0, in_len=512)
        assert rig.irq.count == 1
    finally:
        rig.close()


def test_indirect_without_negotiation_needs_reset(tmp_path: Path) -> None:
    rig = Rig(tmp_path, mask=~d.VIRTIO_F_INDIRECT_DESC)
    try:
        rig.submit(b.VIRTIO_BLK_T_IN, 0, in_len=512, indirect=True)
        rig.t.notify(0)
        assert rig.t.read(m.REG_STATUS, 4) & m.STATUS_DEVICE_NEEDS_RESET
        assert rig.t.read(m.REG_INTERRUPT_STATUS, 4) == m.INT_CONFIG_CHANGE
        assert rig.q.get_used() == []
    finally:
        rig.close()


def test_reset_mid_flight_and_reinitialise(rig: Rig) -> None:
    rig.run(b.VIRTIO_BLK_T_IN, 0, in_len=512)
    rig.submit(b.VIRTIO_BLK_T_IN, 1, in_len=512)  # published, never processed
    rig.t.write(m.REG_STATUS, 4, 0)
    assert rig.t.read(m.REG_STATUS, 4) == 0
    rig.t.notify(0)
    assert rig.q.get_used() == []  # a reset device does nothing
    rig.q = DriverQueue(rig.mem, 0x1000, QSIZE, data_size=512 << 10)
    setup_device(rig.t, [rig.q])
    assert rig.run(b.VIRTIO_BLK_T_IN, 2, in_len=512)[2] == pattern(2)


def test_writethrough_without_flush(tmp_path: Path) -> None:
    rig = Rig(tmp_path, mask=~b.VIRTIO_BLK_F_FLUSH)
    try:
        synced: list[int] = []
        real_flush = rig.disk.flush

        def counting_flush() -> None:
            synced.append(1)
            real_flush()

        rig.disk.flush = counting_flush  # type: ignore[method-assign]
        assert rig.run(b.VIRTIO_BLK_T_OUT, 0, out=b"w" * 512)[0] == b.VIRTIO_BLK_S_OK
        assert synced
    finally:
        rig.close()


def test_trace_hook_sees_a_request(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    events: list[str] = []
    rig.t.trace = rig.dev.trace = events.append
    try:
        rig.run(b.VIRTIO_BLK_T_IN, 0, in_len=512)
        rig.t.write(m.REG_INTERRUPT_ACK, 4, 1)
        kinds = [e.split()[0] for e in events]
        assert kinds == ["notify", "pop", "req", "io", "used", "irq", "ack"]
    finally:
        rig.close()
