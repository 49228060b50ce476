"""A byte the guest echoes without a newline (a typed key, a prompt) reaches the console promptly: the
VMM's event loop flushes the console buffer on a short timer while the VM runs, not only at the end."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable

from pyvmm.bus import Bus
from pyvmm.console import ConsoleOutput
from pyvmm.eventloop import EventLoop
from pyvmm.status import ExitStatus
from pyvmm.vmm import CONSOLE_FLUSH_S, HOUSEKEEPING_IDLE_S, ArchExitHandler, Vmm


def test_an_echoed_key_is_flushed_by_the_timer() -> None:
    r, w = os.pipe()
    console = ConsoleOutput(w)
    loop = EventLoop()
    vmm = Vmm([], Bus("pio"), Bus("mmio"), loop, console, ArchExitHandler(), contextlib.ExitStack(), timeout=10.0)
    arrived: list[float] = []
    sent: list[float] = []

    def guest_echo() -> None:  # what a vCPU thread does for a THR write of the echoed key
        time.sleep(0.2)
        sent.append(time.monotonic())
        console(b"k")

    def terminal() -> None:  # the user's terminal: reads the echo, then ends the VM
        data = os.read(r, 16)
        arrived.append(time.monotonic())
        vmm.request_stop(ExitStatus.OK, f"terminal got {data!r}")

    threads = [threading.Thread(target=guest_echo, daemon=True), threading.Thread(target=terminal, daemon=True)]
    for t in threads:
        t.start()
    try:
        result = vmm.run()  # ends at the terminal's request, or (the bug) at the timeout's flush
    finally:
        loop.close()
        for t in threads:
            t.join(5)
        os.close(r)
        os.close(w)
    assert result.status == ExitStatus.OK, result.reason
    assert result.reason == "terminal got b'k'"
    assert arrived[0] - sent[0] < max(0.5, 10 * CONSOLE_FLUSH_S)


class _RecordingLoop(EventLoop):
    """Records each timer's delay instead of keeping it (the test runs the ticks itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.delays: list[float] = []
        self.calls: list[Callable[[], None]] = []

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        self.delays.append(round(when - time.monotonic(), 3))
        self.calls.append(fn)


def test_housekeeping_slows_down_while_idle_and_hurries_on_output_or_input() -> None:
    """Each wake-up of the event loop costs the guest a little (much in a nested VM); with nothing to flush
    the tick doubles up to HOUSEKEEPING_IDLE_S, and output waiting or console input brings it back."""
    r, w = os.pipe()
    console = ConsoleOutput(w)
    loop = _RecordingLoop()
    vmm = Vmm([], Bus("pio"), Bus("mmio"), loop, console, ArchExitHandler(), contextlib.ExitStack())
    try:
        vmm._housekeeping()
        for _ in range(6):
            loop.calls[-1]()
        assert loop.delays == [2 * CONSOLE_FLUSH_S, 4 * CONSOLE_FLUSH_S, 8 * CONSOLE_FLUSH_S] + [HOUSEKEEPING_IDLE_S] * 4
        console(b"$ ")  # a prompt without a newline waits in the buffer
        loop.calls[-1]()
        assert loop.delays[-1] == CONSOLE_FLUSH_S and os.read(r, 16) == b"$ "
        for _ in range(3):
            loop.calls[-1]()
        assert loop.delays[-1] == 8 * CONSOLE_FLUSH_S
        vmm.hurry_housekeeping()  # a key typed: the echo must not wait for the slow tick
        assert loop.delays[-1] == CONSOLE_FLUSH_S
        stale, fresh = loop.calls[-2], loop.calls[-1]
        n = len(loop.calls)
        stale()  # the slow tick it replaced does nothing and schedules nothing
        assert len(loop.calls) == n
        fresh()
        assert loop.delays[-1] == 2 * CONSOLE_FLUSH_S
    finally:
        loop.close()
        os.close(r)
        os.close(w)
