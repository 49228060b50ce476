"""Coalesced port writes (pyvmm/coalescing.py) with the tiny guest firmware/thr.S: N bytes to COM1's THR,
with or without polling LSR first, must reach the UART complete, in order and interleaved with the other
UART accesses exactly as the guest made them; where KVM has KVM_CAP_COALESCED_PIO the THR writes then
cost (almost) no exits.  Also: exit statistics (--stats) through TinyVm and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvmm.console import ConsoleOutput
from pyvmm.devices.serial import Serial16550
from pyvmm.exitstats import process_age_s
from pyvmm.interrupt import CountingIrq
from pyvmm.kvm.abi import KVM_CAP_COALESCED_MMIO, KVM_CAP_COALESCED_PIO
from pyvmm.kvm.system import Kvm
from pyvmm.status import ExitStatus
from pyvmm.testing.tinyvm import Recorder, TinyVm
from tests.kvm.conftest import OFF_IN, PORT_BASE, PORT_SPAN, describe

pytestmark = pytest.mark.kvm

N = 3000
MODE_POLL, MODE_DLAB, MODE_WAIT = 1, 2, 4  # firmware/thr.S
EXPECTED = bytes(i & 0xFF for i in range(N))
THR, LCR, LSR = 0, 3, 5


def _host_coalesces() -> bool:
    kvm = Kvm()
    try:
        return kvm.check_extension(KVM_CAP_COALESCED_MMIO) > 0 and kvm.check_extension(KVM_CAP_COALESCED_PIO) > 0
    finally:
        kvm.close()


@pytest.mark.parametrize("coalesced", [True, False], ids=["coalesced", "exits"])
@pytest.mark.parametrize("mode", [0, MODE_POLL, MODE_DLAB | MODE_POLL], ids=["no-poll", "poll-lsr", "dlab-poll"])
def test_thr_writes_arrive_complete_and_in_guest_order(firmware: Callable[[str], Path], coalesced: bool,
                                                       mode: int) -> None:
    probe = Recorder(reads={OFF_IN: [N, mode, 0]})
    with TinyVm(firmware("thr"), timeout=60, coalesced_pio=coalesced) as vm:
        vm.add_pio(PORT_BASE, PORT_SPAN, probe, "probe")
        active = vm.coalesced is not None
        result = vm.run()
    assert result.status == ExitStatus.OK and result.debug_exit == 0, describe(result, probe)
    # Every access in the guest's order: a replay that came late would put THR writes after the LSR
    # read or the LCR write that followed them in the guest.
    expected_events: list[tuple[str, int] | tuple[str, int, int]] = []
    if mode & MODE_DLAB:
        expected_events += [("w", LCR, 0x83), ("w", THR, 0x01), ("w", LCR, 0x03)]
    for b in EXPECTED:
        if mode & MODE_POLL:
            expected_events.append(("r", LSR))
        expected_events.append(("w", THR, b))
    assert vm.serial.events == expected_events
    polls = N if mode & MODE_POLL else 0
    fixed = 3 + (3 if mode & MODE_DLAB else 0)  # two PORT_IN reads, the debug exit, the LCR/DLL writes
    if not active:
        assert result.exits["io"] == N + polls + fixed
        if coalesced:
            pytest.skip("this host's KVM has no KVM_CAP_COALESCED_PIO: bytes checked, every THR write exited")
    else:
        # KVM's ring holds 169 writes; a write that finds it full exits (and replays it first).
        assert result.exits["io"] <= polls + fixed + N // 150, describe(result)
        if not mode & MODE_POLL:
            assert result.exits["io"] < N // 10, describe(result)


def test_coalescing_is_there_where_the_host_has_the_capability(firmware: Callable[[str], Path]) -> None:
    with TinyVm(firmware("thr"), coalesced_pio=True) as vm:
        assert (vm.coalesced is not None) == _host_coalesces()
    with TinyVm(firmware("thr"), coalesced_pio=False) as vm:
        assert vm.coalesced is None


def test_the_event_loop_replays_the_ring_without_another_uart_exit(firmware: Callable[[str], Path]) -> None:
    """The guest writes a few bytes (far fewer than the ring holds) and then only polls a port of its own,
    until the host has seen them all: the event loop's timer must replay the ring."""
    if not _host_coalesces():
        pytest.skip("this host's KVM has no KVM_CAP_COALESCED_PIO: every THR write exits")
    n = 20
    holder: list[TinyVm] = []

    class Gate:
        def __init__(self) -> None:
            self.first = [n, MODE_WAIT]

        def read(self, offset: int, size: int) -> int:
            if self.first:
                return self.first.pop(0)
            return int(len(holder[0].serial.data) >= n)

        def write(self, offset: int, size: int, value: int) -> None:
            pass

    with TinyVm(firmware("thr"), timeout=20, coalesced_pio=True) as vm:
        holder.append(vm)
        vm.add_pio(PORT_BASE, PORT_SPAN, Gate(), "gate")
        result = vm.run()
    assert result.status == ExitStatus.OK, describe(result)
    assert bytes(vm.serial.data) == EXPECTED[:n]
    assert ("r", LSR) not in vm.serial.events


def test_the_real_uart_and_console_get_every_byte_and_the_divisor(firmware: Callable[[str], Path]) -> None:
    """The 16550 model and the buffered console: the DLL write (THR port with DLAB set) sets the divisor
    and is not transmitted; the N bytes reach the console fd complete (flushed at the end of the run)."""
    r, w = os.pipe2(os.O_NONBLOCK)
    try:
        console = ConsoleOutput(w)
        uart = Serial16550(CountingIrq(), console)
        probe = Recorder(reads={OFF_IN: [N, MODE_DLAB]})
        with TinyVm(firmware("thr"), timeout=60, coalesced_pio=True, com1=uart, console=console) as vm:
            vm.add_pio(PORT_BASE, PORT_SPAN, probe, "probe")
            result = vm.run()
        assert result.status == ExitStatus.OK, describe(result, probe)
        assert os.read(r, 2 * N) == EXPECTED
        assert (uart.dll, uart.dlm, uart.lcr) == (1, 0, 0x03)
    finally:
        os.close(r)
        os.close(w)


def test_the_console_sees_every_byte_before_the_stop_is_decided(firmware: Callable[[str], Path]) -> None:
    """A few bytes (one line) stay in the ring, and the guest's next exit ends the VM: the stop replays the
    ring before it decides, so the line watcher (the panic check) sees the line while the VM still runs."""
    if not _host_coalesces():
        pytest.skip("this host's KVM has no KVM_CAP_COALESCED_PIO: every THR write exits")
    holder: list[TinyVm] = []
    seen: list[tuple[bytes, bool]] = []
    console = ConsoleOutput(None, on_line=lambda line: seen.append((line, holder[0].vmm.stopping)))
    uart = Serial16550(CountingIrq(), console)
    with TinyVm(firmware("thr"), coalesced_pio=True, com1=uart, console=console) as vm:
        holder.append(vm)
        vm.add_pio(PORT_BASE, PORT_SPAN, Recorder(reads={OFF_IN: [20, 0]}), "probe")
        result = vm.run()
    assert result.status == ExitStatus.OK, describe(result)
    assert seen == [(EXPECTED[:10], False)]  # bytes 0..9, then the newline (byte 10)
    assert result.exits["io"] == 3  # two PORT_IN reads and the debug exit: no THR write exited


@pytest.mark.parametrize("coalesced", [True, False], ids=["coalesced", "exits"])
def test_stats_count_exits_by_register(firmware: Callable[[str], Path], coalesced: bool) -> None:
    probe = Recorder(reads={OFF_IN: [N, MODE_POLL]})
    with TinyVm(firmware("thr"), timeout=60, stats=True, coalesced_pio=coalesced) as vm:
        vm.add_pio(PORT_BASE, PORT_SPAN, probe, "probe")
        active = vm.coalesced is not None
        result = vm.run()
    assert result.status == ExitStatus.OK, describe(result, probe)
    st = result.stats
    assert st is not None
    assert st.count("pio", 0x3FD, "read") == N
    assert st.count("pio", PORT_BASE, "read") == 2
    assert st.count("pio", 0x501, "write") == 1
    if active:
        assert st.coalesced == {"pio 0x3f8 write": N - st.count("pio", 0x3F8, "write")}
    else:
        assert st.count("pio", 0x3F8, "write") == N and not st.coalesced
    assert st.exits == result.exits["io"] + result.exits["intr"]
    assert st.in_kvm_s > 0 and st.handle_s > 0
    # from this process's start (pytest's, which may have run other tests for many minutes) to the VM's run
    age = process_age_s()
    assert age is not None and st.start_to_first_run_s is not None and 0 < st.start_to_first_run_s < age


def test_cli_prints_the_stats_table(firmware: Callable[..., Path]) -> None:
    # pio.elf ends with a write to the debug-exit port, which `pyvmm run` does not have: it then spins
    # until the timeout.
    proc = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", "--kernel", str(firmware("pio", "elf")), "--memory", "64M",
         "--console", "none", "--timeout", "1.5", "--stats"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == ExitStatus.TIMEOUT, proc.stderr
    err = proc.stderr
    assert "exit statistics:" in err and "in KVM_RUN" in err and "process start -> first KVM_RUN" in err, err
    assert "pio 0x510 read" in err and "pio 0x3f8 write" in err, err
    # without --stats: no table
    proc = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", "--kernel", str(firmware("pio", "elf")), "--memory", "64M",
         "--console", "none", "--timeout", "1.5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == ExitStatus.TIMEOUT and "exit statistics" not in proc.stderr, proc.stderr
