"""Where each vCPU was when pyvmm stopped a VM from outside (--timeout, a signal): two guests that hang on
purpose, run through TinyVm, through the CLI, and through the Python API.

``spin`` jumps to itself with no exit at all: the report must say *stuck*, in the guest, at ``spin``.
``pollport`` polls a port no device claims, exiting on every read: the report must say *slow*, with
exits, at the polling loop.  The checks are on the report's contents, not on timings.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvmm.api import VM
from pyvmm.loader.symbols import read_elf_symbols
from pyvmm.status import ExitStatus
from pyvmm.testing.tinyvm import TinyVm
from tests.kvm.conftest import describe

pytestmark = pytest.mark.kvm

TIMEOUT_S = 2.5
POLL_LOOP_LEN = 5  # firmware/pollport.S: inb %dx,%al (1 byte); test $0x80,%al (2); jnz poll (2)


def _address(elf: Path, name: str) -> int:
    syms = read_elf_symbols(elf)
    assert syms is not None, f"{elf} has no symbol table"
    addr = syms.address(name)
    assert addr is not None, f"{elf} has no symbol {name}"
    return addr


def _cli(kernel: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pyvmm", "run", "--kernel", str(kernel), "--memory", "64M", *extra]


# -- TinyVm: the report in the result --------------------------------------------------------------------
def test_tight_loop_is_stuck_in_the_guest(firmware: Callable[..., Path]) -> None:
    elf = firmware("spin", "elf")
    with TinyVm(firmware("spin"), timeout=TIMEOUT_S, symbols=elf) as vm:
        result = vm.run()
    assert result.status == ExitStatus.TIMEOUT, describe(result)
    [report] = result.vcpu_report
    spin = _address(elf, "spin")
    assert report.verdict == "stuck", report
    assert report.in_guest, report
    assert report.exits_last_s == 0, report
    assert report.rip == spin and report.rip_before == spin, report  # `spin: jmp spin` never leaves spin
    assert report.symbol == "spin+0x0", report


def test_port_polling_loop_is_slow(firmware: Callable[..., Path]) -> None:
    elf = firmware("pollport", "elf")
    with TinyVm(firmware("pollport"), timeout=TIMEOUT_S, symbols=elf) as vm:
        result = vm.run()
    assert result.status == ExitStatus.TIMEOUT, describe(result)
    [report] = result.vcpu_report
    poll = _address(elf, "poll")
    assert report.verdict == "slow", report
    assert report.exits_last_s > 10, report  # one KVM_EXIT_IO per iteration
    assert report.rip is not None and poll <= report.rip < poll + POLL_LOOP_LEN, report
    assert report.symbol is not None and report.symbol.startswith("poll+"), report


def test_no_report_when_the_guest_ends_itself(firmware: Callable[..., Path]) -> None:
    with TinyVm(firmware("pio")) as vm:
        result = vm.run()
    assert result.status == ExitStatus.OK, describe(result)
    assert result.vcpu_report == []


# -- the CLI: the report on stderr, after the stop line ----------------------------------------------------
# A spinning guest is still entered by KVM (host interrupts take it out and back in): "KVM entered the
# guest N times" with N > 0 tells it apart from a vCPU the host kernel never ran.
STUCK_LINE = re.compile(r"pyvmm: vCPU 0 stuck at (0x[0-9a-f]+) <spin\+0x0> in the guest; 0 exits in the last 1\.0 s"
                        r"; KVM entered the guest [1-9]\d* times")
SLOW_LINE = re.compile(r"pyvmm: vCPU 0 slow at (0x[0-9a-f]+) <poll\+0x[0-9a-f]+> in the (guest|VMM); "
                       r"(\d+) exits in the last 1\.0 s; KVM entered the guest \d+ times")


def _stop_block(stderr: str) -> list[str]:
    """The stop line and everything pyvmm printed after it."""
    lines = stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if "exit status" in line)
    return lines[start:]


def test_cli_reports_a_stuck_guest(firmware: Callable[..., Path]) -> None:
    elf = firmware("spin", "elf")
    proc = subprocess.run(_cli(elf, "--timeout", str(TIMEOUT_S)), capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, check=False)
    sys.stderr.write(proc.stderr)  # shown with -s / on failure: the exact report
    assert proc.returncode == ExitStatus.TIMEOUT, proc.stderr
    block = _stop_block(proc.stderr)
    assert block[0].startswith(f"pyvmm: --timeout of {TIMEOUT_S:g} s expired"), block
    m = STUCK_LINE.fullmatch(block[1])
    assert m is not None, block
    assert int(m.group(1), 16) == _address(elf, "spin")
    assert block[2] == "pyvmm: last console line: pyvmm spin guest: spinning", block


def test_cli_reports_a_slow_guest(firmware: Callable[..., Path]) -> None:
    elf = firmware("pollport", "elf")
    proc = subprocess.run(_cli(elf, "--timeout", str(TIMEOUT_S)), capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, check=False)
    sys.stderr.write(proc.stderr)
    assert proc.returncode == ExitStatus.TIMEOUT, proc.stderr
    block = _stop_block(proc.stderr)
    m = SLOW_LINE.fullmatch(block[1])
    assert m is not None, block
    assert int(m.group(3)) > 10
    assert block[2] == "pyvmm: last console line: pyvmm pollport guest: waiting for the device", block


def test_cli_reports_on_sigterm(firmware: Callable[..., Path]) -> None:
    """No timeout, so no RIP sample before the stop: the verdict rests on the exit counts."""
    proc = subprocess.Popen(_cli(firmware("spin", "elf")), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert "spinning" in proc.stdout.readline()
        time.sleep(2.0)  # so that the console output lies outside the report's last second
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == ExitStatus.STOPPED, err
    block = _stop_block(err)
    assert block[0].startswith("pyvmm: stopped by SIGTERM"), block
    assert re.fullmatch(r"pyvmm: vCPU 0 stuck at 0x[0-9a-f]+ <spin\+0x0> in the guest; 0 exits in the last "
                        r"[0-9.]+ s; KVM entered the guest [1-9]\d* times", block[1]), block


# -- the Python API: the report read back from pyvmm's log ------------------------------------------------
def test_api_vm_reads_the_report(firmware: Callable[..., Path]) -> None:
    elf = firmware("spin", "elf")
    with VM(kernel=elf, memory="64M", timeout=TIMEOUT_S) as vm:
        status = vm.wait(timeout=60)
        reports = vm.vcpu_report
    assert status == ExitStatus.TIMEOUT, vm.explain()
    [report] = reports
    assert (report.index, report.verdict, report.in_guest, report.exits_last_s) == (0, "stuck", True, 0)
    assert (report.rip, report.symbol) == (_address(elf, "spin"), "spin+0x0")
