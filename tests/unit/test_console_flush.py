"""A byte the guest echoes without a newline (a typed key, a prompt) reaches the console promptly: the
VMM's event loop flushes the console buffer on a short timer while the VM runs, not only at the end."""

from __future__ import annotations

import contextlib
import os
import threading
import time

from pyvmm.bus import Bus
from pyvmm.console import ConsoleOutput
from pyvmm.eventloop import EventLoop
from pyvmm.status import ExitStatus
from pyvmm.vmm import CONSOLE_FLUSH_S, ArchExitHandler, Vmm


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
