"""The vCPU loop without KVM: a scripted vCPU lays out exits in a ``struct kvm_run`` (as KVM would) and the
real :class:`~pyvmm.vmm.Vmm` handles them.  Both loop variants (plain, and counting for ``--stats``) must
do exactly the same thing to the devices and to ``kvm_run``; the counting one also fills
``VmResult.stats``.  The decode offsets (pyvmm/kvm/exits.py) come from the ctypes structs in
pyvmm/kvm/abi.py: checked here against a ``kvm_run`` filled through ctypes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from pyvmm.bus import Bus
from pyvmm.console import ConsoleOutput
from pyvmm.eventloop import EventLoop
from pyvmm.kvm import abi
from pyvmm.kvm import exits as kx
from pyvmm.kvm.exits import EXIT_REASON_OFFSET
from pyvmm.status import ExitStatus
from pyvmm.testing.tinyvm import Recorder
from pyvmm.vmm import ArchExitHandler, Vmm, VmResult

RUN_SIZE = 3 * 4096
PIO_DATA = 4096  # where KVM puts port data: page 1 of the mapping (KVM_PIO_PAGE_OFFSET)


@dataclass
class Step:
    kind: str  # "out", "in", "outs", "mmio_w", "mmio_r", "hlt"
    addr: int = 0
    size: int = 1
    values: list[int] = field(default_factory=list)


class ScriptedVcpu:
    """Each ``run()`` lays out the next step's exit; the data a read left in kvm_run is kept in ``seen``."""

    index = 0
    fd = -1  # no stats fd

    def __init__(self, steps: list[Step]) -> None:
        self.buf = bytearray(RUN_SIZE)
        self.run_state = abi.kvm_run.from_buffer(self.buf)
        self.run_view = memoryview(self.buf)
        self.steps = list(steps)
        self.last: Step | None = None
        self.seen: list[int] = []  # values the VMM wrote back for "in" and "mmio_r" steps
        self.stop: Callable[[], None] = lambda: None

    def _collect(self) -> None:
        s = self.last
        if s is None:
            return
        r = self.run_state
        if s.kind == "in":
            self.seen.append(int.from_bytes(self.buf[PIO_DATA:PIO_DATA + s.size], "little"))
        elif s.kind == "mmio_r":
            self.seen.append(int.from_bytes(bytes(r.exit.mmio.data)[:s.size], "little"))

    def run_args(self) -> tuple[Callable[[int, object, None], int], int, object, Callable[[], int], memoryview, int]:
        """As VcpuFd.run_args: the plain loop's inlined run()."""
        def enter(fd: int, request: object, arg: None) -> int:
            self.run()
            return 0

        return enter, self.fd, None, self.run, memoryview(self.buf).cast("I"), EXIT_REASON_OFFSET // 4

    def run(self) -> int:
        self._collect()
        if not self.steps:
            self.last = None
            self.stop()
            self.run_state.exit_reason = abi.KVM_EXIT_INTR
            return abi.KVM_EXIT_INTR
        s = self.last = self.steps.pop(0)
        r = self.run_state
        r.exit.padding = b"\xAA" * 256  # stale bytes from the last exit must not leak into this one
        if s.kind in ("out", "in", "outs"):
            r.exit_reason = abi.KVM_EXIT_IO
            io = r.exit.io
            io.direction = abi.KVM_EXIT_IO_IN if s.kind == "in" else abi.KVM_EXIT_IO_OUT
            io.size, io.port, io.data_offset = s.size, s.addr, PIO_DATA
            io.count = len(s.values) if s.kind == "outs" else 1
            for i, v in enumerate(s.values):
                self.buf[PIO_DATA + i * s.size:PIO_DATA + (i + 1) * s.size] = v.to_bytes(s.size, "little")
            if s.kind == "in":
                self.buf[PIO_DATA:PIO_DATA + 8] = b"\x55" * 8
        elif s.kind in ("mmio_w", "mmio_r"):
            r.exit_reason = abi.KVM_EXIT_MMIO
            m = r.exit.mmio
            m.phys_addr, m.len, m.is_write = s.addr, s.size, int(s.kind == "mmio_w")
            value = s.values[0] if s.values else 0
            for i, b in enumerate(value.to_bytes(8, "little")):
                m.data[i] = b
        elif s.kind == "hlt":
            r.exit_reason = abi.KVM_EXIT_HLT
        return int(r.exit_reason)

    def kick(self) -> None:
        self.run_state.immediate_exit = 1


def _run(steps: list[Step], *, stats: bool) -> tuple[VmResult, ScriptedVcpu, Recorder, Recorder, Bus]:
    uart = Recorder(reads={5: 0x60})
    dev = Recorder(reads={0: 0x1234_5678_9ABC_DEF0}, default=0xFFFF_FFFF_FFFF_FFFF)
    pio, mmio = Bus("pio", unclaimed_read=0xFFFFFFFF), Bus("mmio")
    pio.add(0x3F8, 8, uart, "com1")
    mmio.add(0xD000_0000, 0x200, dev, "dev")
    mmio.add(0x1_0000_0000, 1 << 30, dev, "big")  # too big for the dispatch table: served by the search
    vcpu = ScriptedVcpu(steps)
    loop = EventLoop()
    vmm = Vmm([vcpu], pio, mmio, loop, ConsoleOutput(None), ArchExitHandler(),  # type: ignore[list-item]
              contextlib.ExitStack(), stats=stats)
    vcpu.stop = lambda: vmm.request_stop(ExitStatus.OK, "script done")
    try:
        result = vmm.run()
    finally:
        loop.close()
    return result, vcpu, uart, dev, pio


SCRIPT = [
    Step("in", 0x3FD), Step("out", 0x3F8, 1, [0x41]),
    Step("in", 0x3FD), Step("out", 0x3F8, 1, [0x42]),
    Step("out", 0x3F9, 2, [0xBEEF]), Step("in", 0x3FA, 4),
    Step("outs", 0x3F8, 1, [0x43, 0x44, 0x45]),
    Step("in", 0x80, 2),  # nobody's port: all ones
    Step("out", 0x80, 1, [0x99]),
    Step("mmio_w", 0xD000_0050, 4, [0xCAFEF00D]),
    Step("mmio_r", 0xD000_0000, 8),
    Step("mmio_r", 0xD000_0000, 2),
    Step("mmio_r", 0x1_0000_0010, 4),
    Step("mmio_w", 0x1_0000_0010, 1, [0x7F]),
    Step("mmio_r", 0xE000_0000, 4),  # unclaimed MMIO reads as zero
]


@pytest.mark.parametrize("stats", [False, True], ids=["plain", "counting"])
def test_both_loops_dispatch_the_same(stats: bool) -> None:
    result, vcpu, uart, dev, pio = _run(SCRIPT, stats=stats)
    assert result.status == ExitStatus.OK, result.reason
    assert uart.writes == [(0, 1, 0x41), (0, 1, 0x42), (1, 2, 0xBEEF), (0, 1, 0x43), (0, 1, 0x44), (0, 1, 0x45)]
    assert uart.read_log == [(5, 1), (5, 1), (2, 4)]
    assert dev.writes == [(0x50, 4, 0xCAFEF00D), (0x10, 1, 0x7F)]
    assert vcpu.seen == [0x60, 0x60, 0, 0xFFFF, 0x1234_5678_9ABC_DEF0, 0xDEF0, 0xFFFF_FFFF, 0]
    assert pio.unclaimed == 2
    assert result.exits["io"] == 9 and result.exits["mmio"] == 6
    assert (result.stats is not None) == stats


def test_counting_loop_counts_by_register() -> None:
    result, *_ = _run(SCRIPT, stats=True)
    st = result.stats
    assert st is not None
    assert st.count("pio", 0x3FD, "read") == 2
    assert st.count("pio", 0x3F8, "write") == 3  # two single writes and one string write (one exit)
    assert st.count("pio", 0x80, "read") == 1
    assert st.count("mmio", 0xD000_0050, "write") == 1
    assert st.count("mmio", 0xD000_0000, "read") == 2
    assert st.count("intr") == 1  # the script's end: the stop's KVM_EXIT_INTR
    assert st.exits == len(SCRIPT) + 1
    assert all(row.handle_s >= 0 for row in st.rows)
    assert st.in_kvm_s >= 0 and st.handle_s >= 0
    text = "\n".join(st.table())
    assert "pio 0x3fd read" in text and "mmio 0xd0000050 write" in text


def test_a_guest_halt_ends_both_loops() -> None:
    for stats in (False, True):
        result, *_ = _run([Step("out", 0x3F8, 1, [0x41]), Step("hlt")], stats=stats)
        assert result.status == ExitStatus.OK and result.reason == "guest halted"
        assert result.exits["hlt"] == 1


def test_decode_offsets_come_from_the_ctypes_structs() -> None:
    buf = bytearray(RUN_SIZE)
    run = abi.kvm_run.from_buffer(buf)
    run.exit_reason = abi.KVM_EXIT_IO
    io = run.exit.io
    io.direction, io.size, io.port, io.count, io.data_offset = 1, 2, 0x1234, 3, 0x1008
    assert kx.exit_reason(buf) == abi.KVM_EXIT_IO
    assert kx.IO.unpack_from(buf, kx.IO_OFFSET) == (1, 2, 0x1234, 3, 0x1008)
    run.exit_reason = abi.KVM_EXIT_MMIO
    m = run.exit.mmio
    m.phys_addr, m.len, m.is_write = 0xFEE0_0000, 4, 1
    for i, b in enumerate((0x1122334455667788).to_bytes(8, "little")):
        m.data[i] = b
    assert kx.MMIO.unpack_from(buf, kx.MMIO_OFFSET) == (0xFEE0_0000, 0x1122334455667788, 4, 1)
    kx.MMIO_DATA.pack_into(buf, kx.MMIO_DATA_OFFSET, 0xAB)
    assert bytes(m.data) == b"\xab" + bytes(7)
    for size in (1, 2, 4, 8):
        kx.PIO_DATA[size].pack_into(buf, 0x1008, (1 << (8 * size)) - 2)
        assert kx.PIO_DATA[size].unpack_from(buf, 0x1008)[0] == (1 << (8 * size)) - 2
