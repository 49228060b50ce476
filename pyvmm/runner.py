"""Run one VM from a :class:`VmConfig` in the foreground: the CLI's ``pyvmm run``.

Builds the VM, wires stdin to the UART when the console is stdio, prints what pyvmm decided (kernel
format, host workarounds, the final command line) and, at the end, how the guest ended; after a stop
from outside (timeout, signal) also where each vCPU was (:mod:`pyvmm.stopreport`).
"""

from __future__ import annotations

import resource
import sys
import time

from pyvmm import sandbox
from pyvmm.builder import build_vm
from pyvmm.config import CONSOLE_STDIO, VmConfig
from pyvmm.console import ConsoleInput
from pyvmm.errors import ConfigError
from pyvmm.log import get_logger
from pyvmm.status import ExitStatus
from pyvmm.stopreport import report_lines
from pyvmm.vmm import Vmm, VmResult, print_err

log = get_logger(__name__)

INPUT_RETRY_S = 0.02


def _attach_stdin(vmm: Vmm) -> ConsoleInput | None:
    try:
        fd = sys.stdin.fileno()
    except (OSError, ValueError):
        return None
    serial = vmm.serial
    if serial is None:
        return None
    pending = bytearray()
    console_in = ConsoleInput(fd, lambda: vmm.request_stop(ExitStatus.STOPPED, "stopped by the console escape"))

    def push() -> None:
        if pending:
            n = serial.feed(bytes(pending))
            del pending[:n]
            if pending:  # the guest's FIFO is full: try again shortly
                vmm.loop.call_at(time.monotonic() + INPUT_RETRY_S, push)

    def on_input() -> None:
        pending.extend(console_in.read())
        if console_in.eof:
            vmm.loop.remove(fd)
        push()
        vmm.hurry_housekeeping()

    try:
        console_in.__enter__()
        vmm.loop.add(fd, on_input)
    except (OSError, PermissionError):  # e.g. /dev/null or a closed stdin cannot be polled
        console_in.restore()
        return None
    return console_in


def run_vm(config: VmConfig, *, quiet: bool = False) -> int:
    """Build and run the VM; return pyvmm's exit status (pyvmm.status)."""
    t0 = time.monotonic()
    vmm, report = build_vm(config)
    if not quiet:
        print_err(f"kernel {config.kernel} ({report.kernel_format}), {config.memory >> 20} MiB, "
                  f"{config.cpus} vCPU(s); {report.host}")
        for note in report.notes:
            print_err(note)
        print_err(f"command line: {report.cmdline}")
        print_err(f"VM built in {time.monotonic() - t0:.2f} s; console: {config.console}"
                  + (" (Ctrl-A x quits)" if config.console == CONSOLE_STDIO and sys.stdin.isatty() else ""))
    console_in = _attach_stdin(vmm) if config.console == CONSOLE_STDIO else None
    sandbox_note = "seccomp sandbox: off (--sandbox off)"
    if config.sandbox:
        # Everything the VM needs is open and mapped: from here on the process cannot start programs,
        # fork, trace, mount or open sockets (pyvmm.sandbox).
        try:
            refused = sandbox.install()
        except sandbox.SandboxError as err:
            if console_in is not None:
                console_in.restore()
            vmm.abandon()
            raise ConfigError(f"cannot install the seccomp sandbox: {err.strerror}; --sandbox off runs "
                              "without it") from None
        vmm.sandboxed = True
        sandbox_note = f"seccomp sandbox: on ({refused} kinds of system call refused)"
    if not quiet:
        log.info("%s", sandbox_note)
    try:
        result = vmm.run()
    finally:
        if console_in is not None:
            console_in.restore()
    if config.exec_cmd is not None and result.status == ExitStatus.OK and result.guest_status is None:
        result.status = ExitStatus.NO_GUEST_STATUS
        result.reason = (f"{result.reason}, without reporting the --exec command's status (does the guest's "
                         "init honour pyvmm.exec=? images/init.sh does)")
    report_result(result, quiet=quiet)
    if result.stats is not None:
        print_err(sandbox_note)
    return result.exit_code


def report_result(result: VmResult, *, quiet: bool = False) -> None:
    if result.exit_code != 0 or not quiet:
        exits = ", ".join(f"{k} {v}" for k, v in sorted(result.exits.items()))
        # ru_maxrss is in KiB on Linux; it includes the guest RAM the guest touched.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
        print_err(f"{result.reason} after {result.elapsed:.1f} s (exit status {result.exit_code}); exits: {exits}; "
                  f"peak RSS {peak} MiB")
        for line in report_lines(result.vcpu_report, result.last_console_line):
            print_err(line)
        for line in result.details:
            print_err(line)
    if result.stats is not None:  # asked for with --stats: printed even with --quiet
        for line in result.stats.table():
            print_err(line)
