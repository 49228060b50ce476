"""The VMM's event loop: one epoll over ioeventfds, console input and a stop eventfd.

Runs on the thread that called :meth:`EventLoop.run` (the main thread in the CLI).  Handlers run on
that thread; virtqueue processing happens here, register accesses on the vCPU threads.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable

from pyvmm.interrupt import EventFd


class EventLoop:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, Callable[[], None]] = {}
        self.stop_fd = EventFd()
        self._stopped = False
        self.add(self.stop_fd.fd, self._on_stop)
        self._timers: list[tuple[float, Callable[[], None]]] = []
        self._frozen_at: float | None = None

    def add(self, fd: int, handler: Callable[[], None]) -> None:
        self._epoll.register(fd, select.EPOLLIN)
        self._handlers[fd] = handler

    def remove(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread at ``time.monotonic() >= when``."""
        self._timers.append((when, fn))
        self._timers.sort(key=lambda t: t[0])

    def freeze(self) -> None:
        """Hold every timer (a guest stopped in a debugger): none fires until :meth:`thaw`, which moves
        each one later by the time the loop was frozen.  File descriptors are served as before."""
        if self._frozen_at is None:
            self._frozen_at = time.monotonic()

    def thaw(self) -> None:
        if self._frozen_at is not None:
            held = time.monotonic() - self._frozen_at
            self._frozen_at = None
            self._timers = [(when + held, fn) for when, fn in self._timers]

    def stop(self) -> None:
        """Thread-safe: make :meth:`run` return."""
        self.stop_fd.write(1)

    def _on_stop(self) -> None:
        self.stop_fd.read()
        self._stopped = True

    def run(self) -> None:
        while not self._stopped:
            timeout = -1.0
            if self._timers and self._frozen_at is None:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            for fd, _ in self._epoll.poll(timeout):
                handler = self._handlers.get(fd)
                if handler is not None:
                    handler()
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now and self._frozen_at is None:
                _, fn = self._timers.pop(0)
                fn()

    def close(self) -> None:
        self._epoll.close()
        self.stop_fd.close()
