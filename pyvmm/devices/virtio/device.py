"""What a virtio device type is, independently of the transport in front of it (virtio 1.2 §2: device
status, feature bits, virtqueues, device configuration space).

A device implements :class:`VirtioDevice`; a transport (pyvmm/devices/virtio/mmio.py, virtio 1.2 §4.2)
gives the driver its registers and calls the device: ``activate`` once the driver set DRIVER_OK,
``process_queue`` per notification, ``reset`` on a device reset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pyvmm.devices.virtio.packed import PackedVirtqueue
from pyvmm.devices.virtio.queue import Virtqueue
from pyvmm.memory import GuestMemory

# A queue of either layout (§2.7 split, §2.8 packed): the same interface to a device.
AnyVirtqueue = Virtqueue | PackedVirtqueue

# §6 Reserved feature bits (device-independent).
VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_F_RING_PACKED = 1 << 34  # §6: the packed virtqueue layout (§2.8) may be used

TraceHook = Callable[[str], None]


class VirtioDevice:
    """Base class of a virtio device type behind a transport.

    Subclasses set ``device_id`` and ``queue_max_sizes`` and implement the methods below.  The
    transport calls ``activate`` once the driver set DRIVER_OK, ``process_queue`` per notification
    (serialised: never two at a time for one device), and ``reset`` on a device reset.
    """

    device_id: int = 0
    queue_max_sizes: tuple[int, ...] = ()

    def __init__(self) -> None:
        self.trace: TraceHook | None = None  # set by the transport

    @property
    def device_features(self) -> int:
        """The 64-bit feature set the device offers (§2.2)."""
        return VIRTIO_F_VERSION_1

    def read_config(self, offset: int, size: int) -> int:
        """A little-endian read of ``size`` bytes at ``offset`` into the config space; 0 past its end."""
        data = self.config_bytes()
        chunk = data[offset : offset + size] if offset < len(data) else b""
        return int.from_bytes(chunk.ljust(size, b"\0"), "little")

    def config_bytes(self) -> bytes:
        """The device-specific configuration space (§4.2.2 offset 0x100 onwards)."""
        return b""

    def write_config(self, offset: int, size: int, value: int) -> None:
        """A driver write to the config space; read-only by default (ignored)."""

    def activate(self, mem: GuestMemory, queues: Sequence[AnyVirtqueue], features: int) -> None:
        """The driver set DRIVER_OK with ``features`` negotiated; the queues are configured."""

    def reset(self) -> None:
        """Forget all per-driver state (§2.4); the transport resets the queues itself."""

    def process_queue(self, index: int, mem: GuestMemory) -> bool:
        """Serve available buffers on queue ``index``; True if the used ring advanced.

        Raises :class:`~.queue.VirtqueueError` for a chain the device cannot parse.
        """
        return False
