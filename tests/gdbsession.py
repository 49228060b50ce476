"""Debian's gdb against the default guest's kernel through ``pyvmm run --gdb``: the sessions the boot and
lab tests run with ``gdb -batch``, and what their output must show.  docs/virtio-walkthrough.md ("With
gdb") quotes the breakpoint session."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

# Stop in the virtio-blk driver as it queues the first request (the partition-table read of the probe),
# look at the request, continue to its completion, detach.  gdb sets the first breakpoint while the guest
# still runs on pyvmm's boot page tables, where the kernel's addresses are not mapped yet.
BREAKPOINT_SESSION = [
    "set pagination off",
    "set confirm off",
    "target remote 127.0.0.1:{port}",
    "break virtio_queue_rq",
    "continue",
    "bt",
    "print bd->rq->__sector",
    "print bd->rq->__data_len",
    "print/x bd->rq->cmd_flags",
    "delete",
    "break virtblk_done",
    "continue",
    "bt 4",
    "info threads",
    "delete",
    "detach",
]

# Where the host's KVM stops at no breakpoint (measured: pyvmm/arch/x86_64/debugprobe.py), what gdb can
# still do: registers, memory, disassembly, single steps, and a breakpoint it is told it cannot have.
STEP_SESSION = [
    "set pagination off",
    "set confirm off",
    "target remote 127.0.0.1:{port}",
    "info registers rip",
    "x/3i $pc",
    "stepi",
    "stepi",
    "info registers rip",
    "print/x $cr0",
    "break virtio_queue_rq",
    "continue",
    "delete",
    "detach",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(text: str, read: Callable[[], str], alive: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in read():
            return
        if not alive():
            break
        time.sleep(0.1)
    raise AssertionError(f"pyvmm did not say {text!r}:\n{read()}")


def run_gdb(gdb: str, vmlinux: Path, port: int, session: list[str], workdir: Path, timeout: float) -> str:
    script = workdir / "session.gdb"
    script.write_text("\n".join(session).format(port=port) + "\n")
    proc = subprocess.run([gdb, "-batch", "-nx", "-x", str(script), str(vmlinux)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    out = proc.stdout + proc.stderr
    print(f"--- gdb ---\n{out}")
    return out


def check_breakpoint_session(out: str) -> None:
    assert re.search(r"Breakpoint 1, (0x[0-9a-f]+ in )?virtio_queue_rq \(", out), out
    # the block layer above the driver: blk-mq's dispatch called virtio_queue_rq
    bt = out[out.index("Breakpoint 1, "):out.index("$1 = ")]
    assert re.search(r"#1 .* in (__)?blk_mq_\w+", bt), bt
    assert re.search(r"\$1 = \d+\n", out) and re.search(r"\$2 = \d+\n", out), out  # sector and length
    assert re.search(r"Breakpoint 2, (0x[0-9a-f]+ in )?virtblk_done \(", out), out
    assert "Thread 1 (vCPU 0)" in out, out
    assert "[Inferior 1 (Remote target) detached]" in out, out


def check_step_session(out: str) -> None:
    rips = [int(m, 16) for m in re.findall(r"^rip\s+(0x[0-9a-f]+)", out, re.MULTILINE)]
    assert len(rips) == 2 and rips[0] != rips[1], out  # two single steps moved the guest on
    assert re.search(r"^\$1 = 0x[0-9a-f]+", out, re.MULTILINE), out  # a control register
    assert "Cannot insert breakpoint 1" in out, out  # refused, not silently ignored
    assert "[Inferior 1 (Remote target) detached]" in out, out
