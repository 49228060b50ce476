"""The virtio-mmio transport (virtio 1.2 §4.2): version 2, and the legacy version 1 of §4.2.4.

:class:`VirtioMmioTransport` is a bus device (``read``/``write`` at offsets into its 0x200-byte
window) that implements the register layout of §4.2.2, the device status state machine of §2.1 / §3.1
and the feature negotiation of §2.2, and hands configured :class:`~.queue.Virtqueue` objects to a
:class:`VirtioDevice` (block, ...).

``version=1`` gives the legacy register file instead (§4.2.4 "Legacy interface"): the driver writes
GuestPageSize once, then per queue QueueNum, QueueAlign and QueuePFN, the page number of one contiguous
area holding the descriptor table, the available ring and, at the next QueueAlign boundary, the used ring
(§2.7.2 "Legacy Interfaces: A Note on Virtqueue Layout").  A non-zero QueuePFN makes the queue live, 0
stops it.  A legacy device does not offer VIRTIO_F_VERSION_1, and its driver sets DRIVER_OK without
FEATURES_OK (§3.1.2).  The version 2 registers (QueueReady, the queue address registers, shared memory,
ConfigGeneration) do not exist there and read 0, and the legacy ones do not exist in version 2.

Threads: register accesses arrive on a vCPU thread; queue processing (:meth:`notify`) runs on the
event-loop thread or a queue's own worker thread, or on the vCPU thread when QueueNotify is written and
no ioeventfd catches it.  ``_lock`` guards registers and InterruptStatus (held briefly); each queue has a
processing lock, held while that queue is processed, so different queues are served at the same time
(§5.2 multiqueue: no ordering is promised across queues).  A reset (Status = 0) and the status writes
take every queue's lock first, so a reset waits for in-flight requests and never tears queues down under
the device.  Lock order: queue locks in index order, then ``_lock``.

Guest mistakes never raise out of here: unknown registers read 0 and ignore writes, non-32-bit
register accesses are ignored (§4.2.2.2 lets the device behave as it likes there), and a chain the
device cannot parse puts the device into DEVICE_NEEDS_RESET with a configuration change interrupt
(§2.1.2).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from pyvmm.devices.ratelimit import LogLimiter
from pyvmm.devices.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    AnyVirtqueue,
    TraceHook,
    VirtioDevice,
)
from pyvmm.devices.virtio.packed import PackedVirtqueue
from pyvmm.devices.virtio.queue import Virtqueue, VirtqueueError
from pyvmm.errors import GuestMemoryError
from pyvmm.interrupt import IrqLine
from pyvmm.log import get_logger
from pyvmm.memory import GuestMemory

log = get_logger(__name__)

# §4.2.2 Table "MMIO Device Register Layout" (offsets into the device window; all 32-bit registers).
REG_MAGIC_VALUE = 0x000  # R  0x74726976 ("virt")
REG_VERSION = 0x004  # R  2 (1 = legacy, §4.2.4)
REG_DEVICE_ID = 0x008  # R  device type (§5)
REG_VENDOR_ID = 0x00C  # R
REG_DEVICE_FEATURES = 0x010  # R  bits [32*sel, 32*sel+31] of the device features
REG_DEVICE_FEATURES_SEL = 0x014  # W
REG_DRIVER_FEATURES = 0x020  # W  bits [32*sel, 32*sel+31] of the driver's accepted features
REG_DRIVER_FEATURES_SEL = 0x024  # W
REG_GUEST_PAGE_SIZE = 0x028  # W  legacy only (§4.2.4)
REG_QUEUE_SEL = 0x030  # W
REG_QUEUE_NUM_MAX = 0x034  # R  0 if the selected queue does not exist
REG_QUEUE_NUM = 0x038  # W
REG_QUEUE_ALIGN = 0x03C  # W  legacy only
REG_QUEUE_PFN = 0x040  # RW legacy only
REG_QUEUE_READY = 0x044  # RW
REG_QUEUE_NOTIFY = 0x050  # W  value = queue index (no VIRTIO_F_NOTIFICATION_DATA)
REG_INTERRUPT_STATUS = 0x060  # R
REG_INTERRUPT_ACK = 0x064  # W
REG_STATUS = 0x070  # RW device status (§2.1); writing 0 resets
REG_QUEUE_DESC_LOW = 0x080  # W  descriptor area
REG_QUEUE_DESC_HIGH = 0x084  # W
REG_QUEUE_DRIVER_LOW = 0x090  # W  driver area (available ring)
REG_QUEUE_DRIVER_HIGH = 0x094  # W
REG_QUEUE_DEVICE_LOW = 0x0A0  # W  device area (used ring)
REG_QUEUE_DEVICE_HIGH = 0x0A4  # W
REG_SHM_SEL = 0x0AC  # W  shared memory region id
REG_SHM_LEN_LOW = 0x0B0  # R  -1 for a region that does not exist
REG_SHM_LEN_HIGH = 0x0B4  # R
REG_SHM_BASE_LOW = 0x0B8  # R
REG_SHM_BASE_HIGH = 0x0BC  # R
REG_QUEUE_RESET = 0x0C0  # RW only with VIRTIO_F_RING_RESET (not offered): reads 0
REG_CONFIG_GENERATION = 0x0FC  # R
REG_CONFIG = 0x100  # device-specific configuration space starts here


MAGIC_VALUE = 0x74726976
MMIO_VERSION = 2
LEGACY_VERSION = 1
MMIO_VERSIONS = (LEGACY_VERSION, MMIO_VERSION)
RING_MODES = ("auto", "split", "packed")
# §4.2.4: QueueAlign before the driver writes one; what Linux writes (its PAGE_SIZE) and QEMU assumes
LEGACY_DEFAULT_ALIGN = 4096
_VERSION_2_ONLY = frozenset((REG_QUEUE_READY, REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH, REG_QUEUE_DRIVER_LOW,
                             REG_QUEUE_DRIVER_HIGH, REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH, REG_SHM_SEL,
                             REG_SHM_LEN_LOW, REG_SHM_LEN_HIGH, REG_SHM_BASE_LOW, REG_SHM_BASE_HIGH,
                             REG_QUEUE_RESET, REG_CONFIG_GENERATION))
_LEGACY_ONLY = frozenset((REG_GUEST_PAGE_SIZE, REG_QUEUE_ALIGN, REG_QUEUE_PFN))
VENDOR_ID = 0x4D565950  # "PYVM" little-endian; §4.2.2 leaves it to the implementation

# §4.2.2 InterruptStatus bits.
INT_USED_BUFFER = 1 << 0
INT_CONFIG_CHANGE = 1 << 1

# §2.1 Device status field.
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128
_DRIVER_STATUS_BITS = (
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK | STATUS_FEATURES_OK | STATUS_FAILED
)

class VirtioMmioTransport:
    """A virtio-mmio register window (version 2, or the legacy version 1) in front of a :class:`VirtioDevice`."""

    def __init__(
        self,
        device: VirtioDevice,
        mem: GuestMemory,
        irq: IrqLine,
        *,
        trace: TraceHook | None = None,
        version: int = MMIO_VERSION,
        ring: str = "auto",
    ) -> None:
        if version not in MMIO_VERSIONS:
            raise ValueError(f"virtio-mmio version {version}: expected 1 (legacy) or 2")
        if ring not in RING_MODES:
            raise ValueError(f"virtqueue layout {ring!r}: expected one of {', '.join(RING_MODES)}")
        # "auto" offers VIRTIO_F_RING_PACKED and the driver chooses; "packed" requires it (FEATURES_OK is
        # refused without it); "split" does not offer it.  A legacy device has no packed queues.
        self.ring = "split" if version == LEGACY_VERSION else ring
        self.version = version
        self.legacy = version == LEGACY_VERSION
        # Legacy: written once by the driver when it finds the device, before any reset; a reset keeps it
        # (§4.2.4 lists only QueuePFN among what a reset clears), as Linux writes it only at probe.
        self.guest_page_size = 0
        self.device = device
        self.mem = mem
        self.irq = irq
        self.trace = trace
        device.trace = trace
        self.queues: list[AnyVirtqueue] = [Virtqueue(n) for n in device.queue_max_sizes]
        self._lock = threading.Lock()
        self._queue_locks = [threading.Lock() for _ in self.queues]
        self._warn_log = LogLimiter()  # what the guest can make us log, rate-limited
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.status = 0
        self.interrupt_status = 0
        self.config_generation = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.shm_sel = 0
        self.activated = False
        self._live_queues: set[int] = set()  # the queues that were ready at DRIVER_OK
        self.queue_pfn = [0] * len(self.queues)  # legacy QueuePFN per queue
        self.queue_align = [LEGACY_DEFAULT_ALIGN] * len(self.queues)  # legacy QueueAlign per queue
        # Split queues until a driver negotiates VIRTIO_F_RING_PACKED (then _use_layout swaps them)
        self.queues = [Virtqueue(n) for n in self.device.queue_max_sizes]

    # -- BusDevice ---------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset >= REG_CONFIG:
            if size not in (1, 2, 4, 8):
                return 0
            with self._lock:
                return self.device.read_config(offset - REG_CONFIG, size) & ((1 << (8 * size)) - 1)
        if size != 4 or offset % 4:
            return 0
        with self._lock:
            return self._read_register(offset) & 0xFFFFFFFF

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= REG_CONFIG:
            if size in (1, 2, 4, 8):
                with self._lock:
                    self.device.write_config(offset - REG_CONFIG, size, value & ((1 << (8 * size)) - 1))
            return
        if size != 4 or offset % 4:
            return
        value &= 0xFFFFFFFF
        if offset in (_LEGACY_ONLY if not self.legacy else _VERSION_2_ONLY):
            return  # not a register of this version
        if offset == REG_QUEUE_NOTIFY:
            self.notify(value)
        elif offset == REG_STATUS:
            self._write_status(value)
        elif offset == REG_QUEUE_PFN:
            with self._selected_queue_lock(), self._lock:
                self._write_queue_pfn(value)
        elif offset == REG_QUEUE_READY:
            # The queue's lock first: once a write of 0 returns, no processing of that queue is in flight.
            with self._selected_queue_lock(), self._lock:
                self._write_queue_ready(value)
        else:
            with self._lock:
                self._write_register(offset, value)

    @property
    def device_features(self) -> int:
        """What the device offers through this transport: a legacy device is not a virtio 1.x one, and
        the packed layout is offered unless the disk says split (RING_PACKED is a transport feature)."""
        features = self.device.device_features
        if self.legacy:
            return features & ~VIRTIO_F_VERSION_1
        return features | VIRTIO_F_RING_PACKED if self.ring != "split" else features

    def _read_register(self, offset: int) -> int:
        if offset in (_LEGACY_ONLY if not self.legacy else _VERSION_2_ONLY):
            return 0  # not a register of this version
        if offset == REG_MAGIC_VALUE:
            return MAGIC_VALUE
        if offset == REG_VERSION:
            return self.version
        if offset == REG_DEVICE_ID:
            return self.device.device_id
        if offset == REG_VENDOR_ID:
            return VENDOR_ID
        if offset == REG_DEVICE_FEATURES:
            sel = self.device_features_sel
            return self.device_features >> (32 * sel) if sel < 2 else 0
        q = self._selected_queue()
        if offset == REG_QUEUE_PFN:
            return self.queue_pfn[self.queue_sel] if q else 0
        if offset == REG_QUEUE_NUM_MAX:
            return q.max_size if q else 0
        if offset == REG_QUEUE_READY:
            return int(q.ready) if q else 0
        if offset == REG_INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == REG_STATUS:
            return self.status
        if offset in (REG_SHM_LEN_LOW, REG_SHM_LEN_HIGH, REG_SHM_BASE_LOW, REG_SHM_BASE_HIGH):
            return 0xFFFFFFFF  # §4.2.2: no shared memory regions, so every id reads length -1
        if offset == REG_CONFIG_GENERATION:
            return self.config_generation
        return 0  # write-only, legacy and unknown registers

    def _selected_queue_lock(self) -> contextlib.AbstractContextManager[object]:
        sel = self.queue_sel
        return self._queue_locks[sel] if sel < len(self._queue_locks) else contextlib.nullcontext()

    @contextlib.contextmanager
    def _all_queues(self) -> Iterator[None]:
        """Every queue's processing lock, in index order: no queue work is in flight while held."""
        with contextlib.ExitStack() as held:
            for lock in self._queue_locks:
                held.enter_context(lock)
            yield

    def _selected_queue(self) -> AnyVirtqueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _write_register(self, offset: int, value: int) -> None:
        if offset == REG_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == REG_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == REG_DRIVER_FEATURES:
            # §2.2 / §3.1.1: the feature negotiation ends with FEATURES_OK; later writes are ignored.
            if self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK) or self.driver_features_sel > 1:
                return
            shift = 32 * self.driver_features_sel
            self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif offset == REG_QUEUE_SEL:
            self.queue_sel = value
        elif offset == REG_INTERRUPT_ACK:
            self.interrupt_status &= ~value
            if self.trace is not None:
                self.trace(f"ack value={value:#x} status={self.interrupt_status:#x}")
        elif offset == REG_SHM_SEL:
            self.shm_sel = value
        elif offset == REG_GUEST_PAGE_SIZE:
            self.guest_page_size = value
        elif offset == REG_QUEUE_ALIGN:
            q = self._selected_queue()
            if q is not None and not q.ready:
                self.queue_align[self.queue_sel] = value
        else:
            self._write_queue_register(offset, value)

    def _write_queue_pfn(self, value: int) -> None:
        """Legacy QueuePFN (§4.2.4): the queue's area starts at page ``value``; 0 stops the queue."""
        q = self._selected_queue()
        if q is None:
            return
        index = self.queue_sel
        if value == 0:
            q.ready = False
            self.queue_pfn[index] = 0
            return
        if q.ready or (self.status & STATUS_DRIVER_OK and index not in self._live_queues):
            return  # as with QueueReady: a live queue keeps its layout; after DRIVER_OK no new queue
        page, align = self.guest_page_size, self.queue_align[index]
        problem = None
        if page == 0 or page & (page - 1):
            problem = f"GuestPageSize {page} is not a power of two"
        elif align == 0 or align & (align - 1):
            problem = f"QueueAlign {align} is not a power of two"
        if problem is None:
            # §2.7.2: desc[size] (16 B each), then avail (flags, idx, ring[size], used_event: 6 + 2 * size
            # bytes), then used (flags, idx, ring[size], avail_event) at the next multiple of QueueAlign
            q.desc_addr = value * page
            q.avail_addr = q.desc_addr + 16 * q.size
            q.used_addr = (q.avail_addr + 6 + 2 * q.size + align - 1) & ~(align - 1)
            problem = q.activate(self.mem)
        if problem:
            if self._warn_log.tick():
                log.warning("virtio-mmio(%d): queue %d not made live: %s (%d guest errors so far)",
                            self.device.device_id, index, problem, self._warn_log.count)
            return
        self.queue_pfn[index] = value
        q.ready = True

    def _write_queue_ready(self, value: int) -> None:
        """QueueReady (§4.2.2): reading it returns the last value written, and the device does not touch a
        queue whose QueueReady is 0, before DRIVER_OK and after it (the driver may stop a queue)."""
        q = self._selected_queue()
        if q is None:
            return
        if not value & 1:
            q.ready = False
            return
        if q.ready:
            return
        if self.status & STATUS_DRIVER_OK and self.queue_sel not in self._live_queues:
            return  # after DRIVER_OK only a queue that was live then may be started again (same layout)
        problem = q.activate(self.mem)
        if problem:
            if self._warn_log.tick():
                log.warning("virtio-mmio(%d): queue %d not made ready: %s (%d guest errors so far)",
                            self.device.device_id, self.queue_sel, problem, self._warn_log.count)
            return
        q.ready = True

    def _write_queue_register(self, offset: int, value: int) -> None:
        q = self._selected_queue()
        # §4.2.3.2 / §3.1.1: queues are configured before DRIVER_OK; afterwards (without
        # VIRTIO_F_RING_RESET) the device ignores writes to the queue's layout.
        if q is None or self.status & STATUS_DRIVER_OK:
            return
        if q.ready:
            return  # §4.2.3.2: the driver writes the queue layout while the queue is not ready
        if offset == REG_QUEUE_NUM:
            q.size = value
        elif offset == REG_QUEUE_DESC_LOW:
            q.desc_addr = (q.desc_addr & ~0xFFFFFFFF) | value
        elif offset == REG_QUEUE_DESC_HIGH:
            q.desc_addr = (q.desc_addr & 0xFFFFFFFF) | (value << 32)
        elif offset == REG_QUEUE_DRIVER_LOW:
            q.avail_addr = (q.avail_addr & ~0xFFFFFFFF) | value
        elif offset == REG_QUEUE_DRIVER_HIGH:
            q.avail_addr = (q.avail_addr & 0xFFFFFFFF) | (value << 32)
        elif offset == REG_QUEUE_DEVICE_LOW:
            q.used_addr = (q.used_addr & ~0xFFFFFFFF) | value
        elif offset == REG_QUEUE_DEVICE_HIGH:
            q.used_addr = (q.used_addr & 0xFFFFFFFF) | (value << 32)

    # -- device status (§2.1, §3.1) -----------------------------------------------------------------
    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        # The queue locks keep a notification from reaching the device between DRIVER_OK becoming
        # visible and ``activate`` having run.
        with self._all_queues():
            self._update_status(value)

    def _update_status(self, value: int) -> None:
        activate = False
        with self._lock:
            old = self.status
            # The driver never clears bits (§2.1.1) and never sets DEVICE_NEEDS_RESET itself.
            new = old | (value & _DRIVER_STATUS_BITS)
            if new & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK:
                if not self._features_acceptable():
                    new &= ~STATUS_FEATURES_OK  # §2.2.2: refused, the driver sees the bit clear on read-back
                elif self.driver_features & VIRTIO_F_RING_PACKED:
                    # The driver sets the queues up after FEATURES_OK (§3.1.1), in the negotiated layout.
                    self.queues = [PackedVirtqueue(n) for n in self.device.queue_max_sizes]
            if new & STATUS_DRIVER_OK and not new & STATUS_FEATURES_OK and not self.legacy:
                new &= ~STATUS_DRIVER_OK  # §3.1.1: DRIVER_OK only after a successful FEATURES_OK
            if new & STATUS_DRIVER_OK and not self.activated:
                self.activated = activate = True
                # A legacy driver has no FEATURES_OK to be refused with (§3.1.2): it gets what was offered
                features = self.driver_features & self.device_features if self.legacy else self.driver_features
                for q in self.queues:
                    q.event_idx = bool(features & VIRTIO_F_EVENT_IDX)
                    q.indirect = bool(features & VIRTIO_F_INDIRECT_DESC)
                self._live_queues = {i for i, q in enumerate(self.queues) if q.ready}
            self.status = new
        if activate:
            if self.trace is not None:
                self.trace(f"ready queues={len(self._live_queues)} layout={self.queues[0].layout} "
                           f"features={features:#x}")
            self.device.activate(self.mem, self.queues, features)

    def _features_acceptable(self) -> bool:
        offered = self.device_features
        if self.ring == "packed" and not self.driver_features & VIRTIO_F_RING_PACKED:
            return False  # §2.2.1: a device may refuse a subset it cannot work with
        return not self.driver_features & ~offered and (self.legacy or bool(self.driver_features & VIRTIO_F_VERSION_1))

    @property
    def negotiated_features(self) -> int:
        if self.legacy:  # what the device was activated with: no FEATURES_OK refused the rest (§3.1.2)
            return self.driver_features & self.device_features if self.status & STATUS_DRIVER_OK else 0
        return self.driver_features if self.status & STATUS_FEATURES_OK else 0

    def reset(self) -> None:
        """Device reset (Status = 0, §2.4): waits for in-flight queue work, then clears everything."""
        with self._all_queues(), self._lock:
            self.device.reset()
            self._reset_registers()

    # -- queue notification and interrupts ---------------------------------------------------------
    def notify(self, index: int, *, via: str | None = None) -> None:
        """The driver notified queue ``index`` (QueueNotify write or its ioeventfd fired).

        ``via`` names the path for the trace (the builder's ioeventfd handler says ``"ioeventfd"``).
        """
        trace = self.trace
        if trace is not None:
            trace(f"notify q={index} via={via}" if via else f"notify q={index}")
        if not 0 <= index < len(self._queue_locks):
            return
        with self._queue_locks[index]:
            with self._lock:
                if (
                    self.status & (STATUS_DRIVER_OK | STATUS_DEVICE_NEEDS_RESET) != STATUS_DRIVER_OK
                    or index >= len(self.queues)
                    or not self.queues[index].ready
                ):
                    return
            queue = self.queues[index]
            try:
                advanced = self.device.process_queue(index, self.mem)
                wanted = advanced and queue.needs_interrupt(self.mem)
            except (VirtqueueError, GuestMemoryError) as err:
                self._needs_reset(index, err)
                return
            # Still under the queue lock: a reset (which takes every one) cannot slip in between the used ring's
            # update and its interrupt, and a reset device raises none.
            if wanted:
                self.signal_used_buffer()
            elif advanced and trace is not None:
                trace("irq suppressed")

    def signal_used_buffer(self) -> None:
        with self._lock:
            self.interrupt_status |= INT_USED_BUFFER
        self._trace("irq used")
        self.irq.trigger()

    def signal_config_change(self) -> None:
        """The device changed its config space (or needs a reset): §4.2.3.3 / §2.1.2."""
        with self._lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
            self.interrupt_status |= INT_CONFIG_CHANGE
        self._trace("irq config")
        self.irq.trigger()

    def _needs_reset(self, index: int, err: Exception) -> None:
        if self._warn_log.tick():
            log.warning("virtio-mmio(%d) queue %d: %s; device needs reset (%d guest errors so far)",
                        self.device.device_id, index, err, self._warn_log.count)
        with self._lock:
            self.status |= STATUS_DEVICE_NEEDS_RESET
            # §2.1.2: "If DEVICE_NEEDS_RESET is set, the device MUST send a device configuration
            # change notification to the driver."  (The generation does not change: the config did not.)
            self.interrupt_status |= INT_CONFIG_CHANGE
        self._trace("needs reset")
        self.irq.trigger()

    def _trace(self, event: str) -> None:
        if self.trace is not None:
            self.trace(event)
