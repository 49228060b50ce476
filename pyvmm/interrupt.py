"""Interrupt lines as devices see them, and eventfd helpers.

A device holds an :class:`IrqLine` and calls :meth:`IrqLine.trigger` when it wants the guest's
attention; it does not know whether the line is an irqfd bound to a GSI (the real VMM), a
``KVM_IRQ_LINE`` call, or a counter (tests).  Edge semantics: every ``trigger`` is one interrupt.
"""

from __future__ import annotations

import os
import threading

from pyvmm.statictypes import Protocol


class IrqLine(Protocol):
    def trigger(self) -> None:
        """Raise one (edge) interrupt."""


class EventFd:
    """A non-blocking, close-on-exec eventfd (``eventfd(2)``)."""

    def __init__(self, initval: int = 0, *, nonblocking: bool = True) -> None:
        flags = os.EFD_CLOEXEC | (os.EFD_NONBLOCK if nonblocking else 0)
        self.fd: int = os.eventfd(initval, flags)

    def write(self, value: int = 1) -> None:
        os.eventfd_write(self.fd, value)

    def read(self) -> int:
        """Return and reset the counter; 0 if it was 0 (non-blocking)."""
        try:
            return int(os.eventfd_read(self.fd))
        except BlockingIOError:
            return 0

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class EventFdIrq:
    """An interrupt line backed by an eventfd the VMM registered with ``KVM_IRQFD`` for one GSI."""

    def __init__(self, eventfd: EventFd, gsi: int) -> None:
        self.eventfd = eventfd
        self.gsi = gsi

    def trigger(self) -> None:
        self.eventfd.write(1)


class CountingIrq:
    """A test line: counts triggers (thread-safe)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def trigger(self) -> None:
        with self._lock:
            self.count += 1
