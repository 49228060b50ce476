"""virtio-blk (virtio 1.2 §5.2): one or more request queues in front of a :class:`~.disk.Disk`.

With ``num_queues`` > 1 the device offers VIRTIO_BLK_F_MQ and says how many queues it has in
``num_queues`` of its configuration (§5.2.3, §5.2.4); the driver uses as many as it likes (Linux: one per
CPU, at most that many).  Each queue is processed independently, on its own thread where the transport
has one per queue; what the queues share (the disk, the error count) is safe to use from several.

A request (§5.2.6) is a chain whose device-readable part starts with the 16-byte header
``{le32 type; le32 reserved; le64 sector}`` and whose device-writable part ends with the status
byte.  The device makes no assumption about how the driver split the request into descriptors
(§2.6.4 "Message Framing"): the header, data and status may share or straddle buffers.

Error handling, by who can be told:

* the chain itself cannot be parsed (loops, bad indices, buffers outside RAM): the queue raises
  :class:`~.queue.VirtqueueError` and the transport sets DEVICE_NEEDS_RESET (§2.1.2);
* a bad request with a writable status byte (short header, wrong-direction data, misaligned or
  out-of-range sectors, a write to a read-only disk, an I/O error): VIRTIO_BLK_S_IOERR; an unknown type
  or an unsupported flag: VIRTIO_BLK_S_UNSUPP (§5.2.6.2);
* a chain with no device-writable byte has no status to carry the error.  The chain parsed fine at
  the virtqueue level and the device is in no error state, so §2.1.2's "error state that a reset is
  needed" does not apply: the device returns it in the used ring with len 0 (so the driver does not
  lose the descriptors) and carries on.

Data moves with ``preadv``/``pwritev`` straight between the image and memoryviews of guest RAM.

The used length (§2.7.8.2: "The device MUST write at least len bytes to descriptor, beginning at the
first device-writable buffer") counts the bytes written from the start of the device-writable part
without a gap.  Data is written from its start and the status byte is the part's last byte, so: all of
it (data + 1) when the data filled its buffers, 1 for a request whose only writable byte is the status,
and only the data written otherwise: 0 for a failed read (the status byte alone lies past unwritten
data), 20 for GET_ID into a 64-byte buffer.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence

from pyvmm.config import DiskConfig
from pyvmm.devices.ratelimit import LogLimiter
from pyvmm.devices.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    AnyVirtqueue,
    VirtioDevice,
)
from pyvmm.devices.virtio.disk import SECTOR_SIZE, Disk, RawDisk
from pyvmm.devices.virtio.queue import Descriptor, DescriptorChain
from pyvmm.devices.virtio.snapshot import SnapshotDisk
from pyvmm.log import get_logger
from pyvmm.memory import GuestMemory

log = get_logger(__name__)

VIRTIO_ID_BLOCK = 2  # §5 device IDs

# §5.2.3 Feature bits.
VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_GEOMETRY = 1 << 4
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_TOPOLOGY = 1 << 10
VIRTIO_BLK_F_CONFIG_WCE = 1 << 11
VIRTIO_BLK_F_MQ = 1 << 12
VIRTIO_BLK_F_DISCARD = 1 << 13
VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14

# §5.2.6 Request types and status values.
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_ID_BYTES = 20  # §5.2.6: GET_ID returns a NUL-padded string of up to 20 bytes

# §5.2.6 struct virtio_blk_req header: le32 type; le32 reserved; le64 sector.
REQ_HEADER = struct.Struct("<IIQ")
# §5.2.6 struct virtio_blk_discard_write_zeroes { le64 sector; le32 num_sectors; le32 flags; }
DWZ_SEGMENT = struct.Struct("<QII")
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
_STATUS = struct.Struct("<B")

# §5.2.4 struct virtio_blk_config, up to write_zeroes_may_unmap / the secure-erase fields (72 bytes):
#  le64 capacity; le32 size_max; le32 seg_max;
#  struct { le16 cylinders; u8 heads; u8 sectors; } geometry; le32 blk_size;
#  struct { u8 physical_block_exp; u8 alignment_offset; le16 min_io_size; le32 opt_io_size; } topology;
#  u8 writeback; u8 unused0; le16 num_queues;
#  le32 max_discard_sectors; le32 max_discard_seg; le32 discard_sector_alignment;
#  le32 max_write_zeroes_sectors; le32 max_write_zeroes_seg; u8 write_zeroes_may_unmap; u8 unused1[3];
#  le32 max_secure_erase_sectors; le32 max_secure_erase_seg; le32 secure_erase_sector_alignment;
BLK_CONFIG = struct.Struct("<QII HBB I BBHI BBH IIIII B3x III")
assert BLK_CONFIG.size == 72

MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per segment
MAX_DISCARD_SEG = 32
DISCARD_ALIGNMENT_SECTORS = 8  # fallocate punches whole 4 KiB blocks
DEFAULT_QUEUE_SIZE = 256
MAX_QUEUES = 64  # as many as pyvmm has vCPUs at most (Linux uses one queue per CPU)


class VirtioBlock(VirtioDevice):
    """A virtio-blk device with ``num_queues`` request queues."""

    device_id = VIRTIO_ID_BLOCK

    def __init__(
        self,
        disk: Disk,
        *,
        serial: str | None = None,
        discard: bool = True,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        num_queues: int = 1,
    ) -> None:
        super().__init__()
        if not 1 <= num_queues <= MAX_QUEUES:
            raise ValueError(f"virtio-blk queue count {num_queues} not in 1..{MAX_QUEUES}")
        self.disk = disk
        self.num_queues = num_queues
        self.queue_max_sizes = (queue_size,) * num_queues
        self._error_lock = threading.Lock()
        self.serial = (serial or "").encode()[:VIRTIO_BLK_ID_BYTES].ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        self.readonly = disk.readonly
        self.discard_enabled = discard and not disk.readonly
        self._sectors = disk.size // SECTOR_SIZE
        self._features = (
            VIRTIO_F_VERSION_1
            | VIRTIO_F_INDIRECT_DESC
            | VIRTIO_F_EVENT_IDX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
        )
        if self.readonly:
            self._features |= VIRTIO_BLK_F_RO
        if self.discard_enabled:
            self._features |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES
        if num_queues > 1:
            self._features |= VIRTIO_BLK_F_MQ
        self._config = BLK_CONFIG.pack(
            self._sectors,
            0,  # size_max (VIRTIO_BLK_F_SIZE_MAX not offered: no limit)
            queue_size - 2,  # seg_max: the header and status take one descriptor each
            0, 0, 0,  # geometry (not offered)
            SECTOR_SIZE,  # blk_size
            0, 0, 1, 0,  # topology (not offered)
            1,  # writeback (informational: VIRTIO_BLK_F_CONFIG_WCE not offered)
            0, num_queues,  # unused0, num_queues (§5.2.4: meaningful with VIRTIO_BLK_F_MQ)
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, DISCARD_ALIGNMENT_SECTORS,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1,  # write zeroes; may_unmap
            0, 0, 0,  # secure erase (not offered)
        )  # fmt: skip
        self._queues: list[AnyVirtqueue] = []
        self.reset()

    @classmethod
    def from_config(cls, config: DiskConfig, *, queue_size: int = DEFAULT_QUEUE_SIZE,
                    num_queues: int = 1) -> VirtioBlock:
        """Open the image of a ``--disk`` (raises :class:`~pyvmm.errors.DeviceError`) and wrap it.

        ``snapshot=on`` puts a copy-on-write overlay in front of the image, unless the disk is also
        ``readonly=on``: then the guest cannot write at all and a read-only disk is the same thing.
        """
        disk: Disk = (SnapshotDisk.from_config(config) if config.snapshot and not config.readonly
                      else RawDisk.from_config(config))
        return cls(disk, serial=config.serial, discard=config.discard, queue_size=queue_size, num_queues=num_queues)

    def close(self) -> None:
        self.disk.close()

    # -- VirtioDevice ------------------------------------------------------------------------------
    @property
    def device_features(self) -> int:
        return self._features

    def config_bytes(self) -> bytes:
        return self._config

    def activate(self, mem: GuestMemory, queues: Sequence[AnyVirtqueue], features: int) -> None:
        self._queues = list(queues)
        self._negotiated = features
        # §5.2.6.2: without FLUSH negotiated the driver cannot ask for stability, so every write is
        # made stable before it completes (write-through).
        self._writethrough = not features & VIRTIO_BLK_F_FLUSH
        self._discard_ok = bool(features & VIRTIO_BLK_F_DISCARD)
        self._write_zeroes_ok = bool(features & VIRTIO_BLK_F_WRITE_ZEROES)

    def reset(self) -> None:
        self._queues = []
        self._negotiated = 0
        self._writethrough = True
        self._discard_ok = self._write_zeroes_ok = False
        self.errors = 0
        self._error_log = LogLimiter()

    def process_queue(self, index: int, mem: GuestMemory) -> bool:
        if index >= len(self._queues):
            return False
        queue = self._queues[index]
        trace = self.trace
        advanced = False
        while True:
            chain = queue.pop(mem)
            while chain is not None:
                if trace is not None:
                    descs = ",".join(f"{d.length}{'w' if d.writable else 'r'}" for d in chain.descriptors)
                    trace(f"pop head={chain.head} r={chain.readable_len} w={chain.writable_len} descs={descs}")
                written = self._handle(chain, mem)
                queue.push_used(mem, chain.head, written)
                advanced = True
                if trace is not None:
                    if queue.layout == "packed":
                        trace(f"used head={chain.head} len={written} slot={queue.used_idx} "
                              f"wrap={int(getattr(queue, 'used_wrap', False))}")
                    else:
                        trace(f"used head={chain.head} len={written} idx={queue.used_idx}")
                chain = queue.pop(mem)
            if not queue.enable_notification(mem):
                return advanced

    # -- one request -------------------------------------------------------------------------------
    def _handle(self, chain: DescriptorChain, mem: GuestMemory) -> int:
        descs = chain.descriptors
        if not chain.writable_len:
            self._note_error("request without a writable status byte", chain)
            return 0
        last = descs[-1]
        status_addr = last.addr + last.length - 1
        if chain.readable_len < REQ_HEADER.size:
            return self._finish(mem, status_addr, VIRTIO_BLK_S_IOERR, 0, "header too short", chain)
        first = descs[0]
        if first.length >= REQ_HEADER.size:
            rtype, _, sector = mem.unpack_from(REQ_HEADER, first.addr)
        else:
            rtype, _, sector = REQ_HEADER.unpack(_gather(mem, descs, 0, REQ_HEADER.size))
        trace = self.trace
        if trace is not None:
            trace(_describe_request(chain, rtype, sector))
        try:
            if rtype == VIRTIO_BLK_T_IN:
                status, data = self._read(mem, chain, sector)
            elif rtype == VIRTIO_BLK_T_OUT:
                status, data = self._write(mem, chain, sector), 0
            elif rtype == VIRTIO_BLK_T_FLUSH:
                self.disk.flush()
                status, data = VIRTIO_BLK_S_OK, 0
            elif rtype == VIRTIO_BLK_T_GET_ID:
                status, data = self._get_id(mem, chain)
            elif rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
                status, data = self._discard_or_zero(mem, chain, rtype), 0
            else:
                status, data = VIRTIO_BLK_S_UNSUPP, 0
        except OSError as err:
            self._note_error(f"I/O error: {err}", chain)
            status, data = VIRTIO_BLK_S_IOERR, 0
        return self._finish(mem, status_addr, status, data, "", chain)

    def _finish(
        self, mem: GuestMemory, status_addr: int, status: int, data: int, why: str, chain: DescriptorChain
    ) -> int:
        if why:
            self._note_error(why, chain)
        mem.pack_into(_STATUS, status_addr, status)
        if self.trace is not None:
            self.trace(f"io done head={chain.head} status={_STATUS_NAMES.get(status, status)} data={data}")
        # The written prefix of the writable part (module docstring): the status counts only after all data.
        return data + 1 if data == chain.writable_len - 1 else data

    def _in_range(self, sector: int, length: int) -> bool:
        return length % SECTOR_SIZE == 0 and sector + length // SECTOR_SIZE <= self._sectors

    def _read(self, mem: GuestMemory, chain: DescriptorChain, sector: int) -> tuple[int, int]:
        length = chain.writable_len - 1
        if chain.readable_len != REQ_HEADER.size or not self._in_range(sector, length):
            return VIRTIO_BLK_S_IOERR, 0  # device-readable data buffers, odd length or out of range
        views = _views(mem, chain.descriptors, chain.readable_len, length)
        self.disk.readv_into(sector * SECTOR_SIZE, views)
        return VIRTIO_BLK_S_OK, length

    def _write(self, mem: GuestMemory, chain: DescriptorChain, sector: int) -> int:
        length = chain.readable_len - REQ_HEADER.size
        # §5.2.6.2: a write to a read-only device fails with IOERR and writes no data.
        if self.readonly or chain.writable_len != 1 or not self._in_range(sector, length):
            return VIRTIO_BLK_S_IOERR
        views = _views(mem, chain.descriptors, REQ_HEADER.size, length)
        self.disk.writev(sector * SECTOR_SIZE, views)
        if self._writethrough:
            self.disk.flush()
        return VIRTIO_BLK_S_OK

    def _get_id(self, mem: GuestMemory, chain: DescriptorChain) -> tuple[int, int]:
        n = min(chain.writable_len - 1, VIRTIO_BLK_ID_BYTES)
        pos = 0
        for view in _views(mem, chain.descriptors, chain.readable_len, n):
            view[:] = self.serial[pos : pos + len(view)]
            pos += len(view)
        return VIRTIO_BLK_S_OK, n

    def _discard_or_zero(self, mem: GuestMemory, chain: DescriptorChain, rtype: int) -> int:
        discard = rtype == VIRTIO_BLK_T_DISCARD
        if not (self._discard_ok if discard else self._write_zeroes_ok) or self.readonly:
            return VIRTIO_BLK_S_UNSUPP
        length = chain.readable_len - REQ_HEADER.size
        nseg = length // DWZ_SEGMENT.size
        if length % DWZ_SEGMENT.size or not 1 <= nseg <= MAX_DISCARD_SEG:
            return VIRTIO_BLK_S_IOERR
        raw = _gather(mem, chain.descriptors, REQ_HEADER.size, length)
        segments = [DWZ_SEGMENT.unpack_from(raw, 16 * i) for i in range(nseg)]
        # Validate every segment before touching the image, so a bad one leaves the disk unchanged.
        for sector, count, flags in segments:
            # §5.2.6.2: UNSUPP for an unknown flag, and for the unmap flag on a discard.
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (discard and flags):
                return VIRTIO_BLK_S_UNSUPP
            if count > MAX_DISCARD_SECTORS or sector + count > self._sectors:
                return VIRTIO_BLK_S_IOERR
        for sector, count, flags in segments:
            if discard:
                self.disk.discard(sector * SECTOR_SIZE, count * SECTOR_SIZE)
            else:
                self.disk.write_zeroes(sector * SECTOR_SIZE, count * SECTOR_SIZE, bool(flags))
        if not discard and self._writethrough:
            self.disk.flush()
        return VIRTIO_BLK_S_OK

    def _note_error(self, why: str, chain: DescriptorChain) -> None:
        with self._error_lock:  # queues may fail requests at the same time
            self.errors += 1
            n = self.errors
            report = self._error_log.tick()
        if report:  # a guest must not flood the log
            log.warning("virtio-blk: %s (head %d; %d request errors so far)", why, chain.head, n)


_TYPE_NAMES = {
    VIRTIO_BLK_T_IN: "IN(read)", VIRTIO_BLK_T_OUT: "OUT(write)", VIRTIO_BLK_T_FLUSH: "FLUSH",
    VIRTIO_BLK_T_GET_ID: "GET_ID", VIRTIO_BLK_T_DISCARD: "DISCARD", VIRTIO_BLK_T_WRITE_ZEROES: "WRITE_ZEROES",
}
_STATUS_NAMES = {VIRTIO_BLK_S_OK: "OK", VIRTIO_BLK_S_IOERR: "IOERR", VIRTIO_BLK_S_UNSUPP: "UNSUPP"}


def _describe_request(chain: DescriptorChain, rtype: int, sector: int) -> str:
    """The trace event for a decoded request (only built when tracing is on)."""
    name = _TYPE_NAMES.get(rtype, f"{rtype}(unknown)")
    if rtype in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID):
        nbytes = max(chain.writable_len - 1, 0)  # data before the status byte
    else:
        nbytes = max(chain.readable_len - REQ_HEADER.size, 0)  # data after the header
    if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        return f"req head={chain.head} type=VIRTIO_BLK_T_{name} segments={nbytes // DWZ_SEGMENT.size}"
    where = f" sector={sector}" if rtype in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT) else ""
    return f"req head={chain.head} type=VIRTIO_BLK_T_{name}{where} bytes={nbytes}"


def _views(mem: GuestMemory, descs: list[Descriptor], skip: int, length: int) -> list[memoryview]:
    """Memoryviews of guest RAM covering bytes ``[skip, skip + length)`` of the chain's buffers."""
    out: list[memoryview] = []
    for d in descs:
        if length <= 0:
            break
        if skip >= d.length:
            skip -= d.length
            continue
        n = min(d.length - skip, length)
        out.append(mem.view(d.addr + skip, n))
        length -= n
        skip = 0
    return out


def _gather(mem: GuestMemory, descs: list[Descriptor], skip: int, length: int) -> bytes:
    return b"".join(bytes(v) for v in _views(mem, descs, skip, length))
