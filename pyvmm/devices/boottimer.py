"""A boot-timing device: one MMIO page whose writes are timestamped (for ``bench/boot.py``).

Like Firecracker's boot timer (a magic write to an MMIO address logs the time since VM start) and Cloud
Hypervisor's debug port, but on a page of its own in the device hole (``layout.BOOT_TIMER_ADDR``): port
0x80 is out, Linux writes it for I/O delays.  Every write records ``(time.monotonic(), value)``; reads
return 0.  A guest marks a milestone with e.g. ``busybox devmem 0xd0008000 8 1`` (the kernel has
``CONFIG_DEVMEM``); the marks are exposed as :attr:`BootTimer.marks` for the benchmark.
"""

from __future__ import annotations

import threading
import time

BOOT_TIMER_SIZE = 0x1000


class BootTimer:
    """Records ``(CLOCK_MONOTONIC seconds, value)`` for every guest write (thread-safe)."""

    def __init__(self, limit: int = 1024) -> None:
        self.limit = limit  # a guest must not grow our memory without bound
        self.marks: list[tuple[float, int]] = []
        self._lock = threading.Lock()

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self.marks) < self.limit:
                self.marks.append((now, value))
