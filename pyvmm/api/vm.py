"""A VM running in the background as a ``pyvmm run`` child process (:class:`VM`)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tty
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from pyvmm.api.console import DEFAULT_RUN_TIMEOUT, Console
from pyvmm.api.errors import CommandResult, GuestCommandError, VmState, VmTimeout
from pyvmm.api.pty import PtyChild
from pyvmm.config import DiskConfig, parse_memory
from pyvmm.configfile import RunSettings, load_file, normalise_trace
from pyvmm.errors import ConfigError, VmmError
from pyvmm.guestexec import check_exec, command_output
from pyvmm.record import replace
from pyvmm.status import ExitStatus, guest_status_of
from pyvmm.stopreport import VcpuReport, parse_report

STOP_GRACE_S = 10.0
STATUS_GRACE_S = 5.0  # how long a console error waits for pyvmm to exit once the console closed
CTRL_A = "\x01"  # pyvmm's console escape on a terminal: a literal Ctrl-A is sent as Ctrl-A Ctrl-A
LOG_TAIL_LINES = 20  # lines of pyvmm's log an error message quotes
_GUEST_EXITED = re.compile(r"guest exited with status (\d+) \(guest exit device\)")


DiskSpec = str | os.PathLike[str] | DiskConfig


def _disk(spec: DiskSpec) -> DiskConfig:
    if isinstance(spec, DiskConfig):
        return spec
    if isinstance(spec, str):
        return DiskConfig.parse(spec)  # "IMG" or "path=IMG,readonly=on,..."
    return DiskConfig(os.fspath(spec))


def _memory(memory: str | int) -> int:
    """An integer is MiB, as ``--memory 512`` and ``memory = 512`` in a config file; a string is a size."""
    if isinstance(memory, bool) or not isinstance(memory, str | int):
        raise ConfigError(f"bad memory {memory!r}: expected a size such as \"512M\" or a number of MiB")
    return parse_memory(str(memory))


def _check_files(settings: RunSettings) -> None:
    """The files the child will open exist (a directory is not an image): one error naming the first that
    does not, instead of a child that fails to start."""
    files = [("kernel", settings.kernel), ("initrd", settings.initrd)]
    files += [("disk image", d.path) for d in settings.disks]
    for what, path in files:
        if path is None:
            continue
        if not os.path.exists(path):
            raise ConfigError(f"{what} {path}: no such file")
        if os.path.isdir(path):
            raise ConfigError(f"{what} {path} is a directory")


_PR_SET_PDEATHSIG = 1
_libc_prctl: Any = None


def _parent_death_signal() -> None:
    """In the child before exec: get SIGTERM when the parent dies (a killed test run leaves no VM behind).

    Only a C call runs here (the function was looked up before the fork): safe in a threaded parent.
    """
    if _libc_prctl is not None:
        _libc_prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _load_prctl() -> None:
    global _libc_prctl
    if _libc_prctl is None:
        with contextlib.suppress(OSError, AttributeError):
            _libc_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """The last resort when a VM object is garbage-collected while its process still runs."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


class VM:
    """One pyvmm VM run in a child process, with its serial console on a pseudo-terminal.

    Configure it with the same options as ``pyvmm run`` (``config`` = a TOML config file; the keyword
    arguments override it), then :meth:`start` (or use it as a context manager, which starts it and
    always stops it and cleans up).  ``memory`` is a size string (``"256M"``, ``"1G"``) or an integer
    number of MiB, as on the command line and in config files; ``disks`` are ``--disk`` spec strings
    (``"path=base.img,snapshot=on"``), paths or :class:`~pyvmm.config.DiskConfig`; ``trace`` is a
    selector string or list (``"virtio"``).  ``extra_args`` are appended to the ``pyvmm run`` command.

    The options are checked here, by the checks ``pyvmm run`` makes, and so is that the kernel, initrd
    and disk images exist: a mistake raises :class:`~pyvmm.errors.ConfigError` (one line naming the value
    or the file) before anything starts.
    """

    def __init__(
        self,
        kernel: str | os.PathLike[str] | None = None,
        *,
        initrd: str | os.PathLike[str] | None = None,
        cmdline: str | None = None,
        memory: str | int | None = None,
        cpus: int | None = None,
        disks: Sequence[DiskSpec] | None = None,
        boot: str | None = None,
        workarounds: str | None = None,
        timeout: float | None = None,
        panic_exit: bool | None = None,
        trace: str | Sequence[str] | None = None,
        trace_file: str | os.PathLike[str] | None = None,
        verbose: int | None = None,
        config: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
        name: str = "vm",
    ) -> None:
        values: dict[str, Any] = load_file(os.fspath(config)) if config is not None else {}
        given: dict[str, Any] = {
            "kernel": None if kernel is None else os.fspath(kernel),
            "initrd": None if initrd is None else os.fspath(initrd),
            "cmdline": cmdline, "cpus": cpus, "boot": boot, "workarounds": workarounds,
            "timeout": None if timeout is None else float(timeout), "panic_exit": panic_exit,
            "trace_file": None if trace_file is None else os.fspath(trace_file), "verbose": verbose,
            "memory": None if memory is None else _memory(memory),
            "disks": None if disks is None else tuple(_disk(d) for d in disks),
            "trace": None if trace is None else normalise_trace([trace] if isinstance(trace, str) else list(trace)),
        }
        values.update({k: v for k, v in given.items() if v is not None})
        values["console"] = "stdio"
        self.settings = RunSettings(**values)  # validates: a bad option raises ConfigError here, not in the child
        self.settings.vm_config()
        _check_files(self.settings)
        self.name = name
        self.extra_args = list(extra_args)
        self.env = dict(env) if env is not None else None
        self.python = python
        self.status: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._child: PtyChild | None = None
        self._console: Console | None = None
        self._dir: Path | None = None
        self._log_text = ""
        self._final_transcript = ""
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self.started_at: float | None = None
        self.ended_at: float | None = None

    @classmethod
    def from_config(cls, path: str | os.PathLike[str], **overrides: Any) -> VM:
        """A VM from a config file (docs/config.md); keyword arguments override its values."""
        return cls(config=path, **overrides)

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def args(self) -> list[str]:
        """The child's command line (the config file exists once the VM is started)."""
        cfg = str(self._dir / "vm.toml") if self._dir else "<vm.toml>"
        return [self.python, "-m", "pyvmm", "run", "--config", cfg, "--console", "stdio", *self.extra_args]

    def start(self) -> VM:
        """Start the VM in the background; returns ``self``."""
        if self._proc is not None:
            raise VmmError(f"{self.name} was already started")
        self._dir = Path(tempfile.mkdtemp(prefix=f"pyvmm-{self.name}-"))
        (self._dir / "vm.toml").write_text(self.settings.to_toml(header=f"pyvmm.VM {self.name!r}"))
        _load_prctl()
        master, slave = pty.openpty()
        try:
            tty.setraw(slave)  # no echo, no newline translation, even before pyvmm sets raw mode itself
            with open(self._dir / "pyvmm.log", "wb") as log:
                self._proc = subprocess.Popen(
                    self.args, stdin=slave, stdout=slave, stderr=log, close_fds=True, start_new_session=True,
                    preexec_fn=_parent_death_signal,
                    env=None if self.env is None else {**os.environ, **self.env},
                )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.started_at = time.monotonic()
        self._finalizer = weakref.finalize(self, _kill, self._proc)
        self._child = PtyChild(master)
        self._console = Console(self._child, escape=CTRL_A, transcript=lambda: self.console_text,
                                vm_state=self._state_for_error)
        return self

    @property
    def console(self) -> Console:
        """The guest's serial console (after :meth:`start`)."""
        if self._console is None:
            raise VmmError(f"{self.name} is not started")
        return self._console

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self.poll() is None and self._proc is not None

    def poll(self) -> int | None:
        """The exit status if the VM has ended (recording it), else None."""
        if self._proc is None:
            return None
        if self.status is None:
            code = self._proc.poll()
            if code is not None:
                self._ended(code)
        return self.status

    def run(self, cmd: str, timeout: float | None = DEFAULT_RUN_TIMEOUT) -> CommandResult:
        """Run a command in the guest's shell on the console: see :meth:`Console.run`."""
        return self.console.run(cmd, timeout)

    def exec(self, cmd: str, timeout: float | None = None) -> CommandResult:
        """Boot the VM to run ``cmd`` in the guest and wait for the VM to end; return the command's exit
        status (0-255) and its output.

        This is ``pyvmm run --exec CMD``: the guest's /init (the default guests' images/init.sh) runs ``sh -c
        CMD`` and reports its status through the guest exit device, which ends the VM.  The output is what
        the console showed between /init's begin and end lines (``\n`` line ends); kernel messages printed
        meanwhile are part of it.  Call it on a VM that is not started (not inside ``with``): the command
        is part of the boot.  Afterwards the VM is closed; :attr:`log` and :attr:`console_text` stay
        readable.  ``timeout`` bounds the wait (the VM's own ``timeout`` still applies); then the VM is
        stopped and :class:`VmTimeout` raised.  A VM that ends any other way raises
        :class:`GuestCommandError`.  Needs guest user space: a hardware KVM or the KVM lab.
        """
        if self._proc is not None:
            raise VmmError(f"{self.name}: exec() boots the VM to run the command; call it on a VM that is not "
                           "started (for a shell on a running guest use run())")
        check_exec(cmd)
        self.settings = replace(self.settings, exec=cmd)
        self.start()
        try:
            status = self.wait(timeout)
        finally:
            self.close()  # stops it first if the wait timed out
        found = _GUEST_EXITED.findall(self.log)
        guest = int(found[-1]) if found else 0 if status == 0 else guest_status_of(status)
        if guest is None:
            raise GuestCommandError(f"{cmd!r} did not report a status\n{self.explain()}", status)
        return CommandResult(guest, command_output(self.console_text) or "")

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the VM to end; return pyvmm's exit status (:class:`~pyvmm.status.ExitStatus`).

        Raises :class:`VmTimeout` if it is still running after ``timeout`` seconds.
        """
        if self._proc is None:
            raise VmmError(f"{self.name} is not started")
        try:
            code = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise VmTimeout(f"{self.name} still running after {timeout} s\n{self.explain()}",
                            self.log_tail()) from None
        return self._ended(code)

    def _state_for_error(self, console_closed: bool) -> VmState:
        """The VM's status and log for a console error.  When the console has closed pyvmm is exiting: give
        it a moment, so the error can say how the VM ended."""
        if console_closed and self._proc is not None and self.status is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._ended(self._proc.wait(STATUS_GRACE_S))
        status = self.poll()
        return VmState(status, f"{self.name}: {self._describe(status)} after {self.elapsed:.1f} s",
                       self.log_tail())

    def _ended(self, code: int) -> int:
        if self.status is None:
            self.ended_at = time.monotonic()
            # A signal that killed pyvmm itself is reported like a shell does: 128 + signal.
            self.status = code if code >= 0 else 128 - code
            if self._child is not None:
                self._child.wait_eof(5.0)  # let the reader take the last console bytes
        return self.status

    def stop(self, grace: float = STOP_GRACE_S) -> int:
        """Stop the VM: SIGTERM (pyvmm ends the guest, exit status 6), SIGKILL after ``grace`` seconds."""
        if self._proc is None:
            raise VmmError(f"{self.name} is not started")
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()
                self._proc.wait()
        return self._ended(self._proc.returncode)

    def close(self) -> None:
        """Stop the VM if it runs and release everything (idempotent); logs stay readable."""
        if self._proc is not None and self.status is None:
            self.stop()
        if self._child is not None:
            self._final_transcript = self._child.transcript
            self._child.close()
            self._child = None
        if self._dir is not None:
            self._log_text = self._read_log()
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        if self._finalizer is not None:
            self._finalizer.detach()

    def __enter__(self) -> VM:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- what happened -----------------------------------------------------------------------------
    def _read_log(self) -> str:
        if self._dir is None:
            return self._log_text
        try:
            return (self._dir / "pyvmm.log").read_text(errors="replace")
        except OSError:
            return ""

    @property
    def log(self) -> str:
        """pyvmm's own messages (its stderr): what it decided, how the VM ended."""
        return self._read_log()

    @property
    def console_text(self) -> str:
        """Everything the guest wrote on its console so far (``\\r\\n`` line ends, as sent)."""
        return self._child.transcript if self._child is not None else self._final_transcript

    @property
    def vcpu_report(self) -> list[VcpuReport]:
        """Where each vCPU was when pyvmm stopped the VM from outside (timeout, :meth:`stop`), read from
        :attr:`log`; empty while it runs or when the guest ended by itself."""
        return parse_report(self.log)

    def console_tail(self, lines: int = 40) -> str:
        return "\n".join(self.console_text.replace("\r", "").splitlines()[-lines:])

    @property
    def elapsed(self) -> float:
        """Seconds from start to the end (or to now, while it runs)."""
        if self.started_at is None:
            return 0.0
        return (self.ended_at or time.monotonic()) - self.started_at

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of pyvmm's log."""
        return "\n".join(self.log.rstrip().splitlines()[-lines:])

    def _describe(self, status: int | None) -> str:
        if status is None:
            return "running" if self._proc is not None else "not started"
        try:
            return f"exit status {status} ({ExitStatus(status).name})"
        except ValueError:
            return f"exit status {status}"

    def explain(self, lines: int = 30) -> str:
        """A report for assertion messages: status, pyvmm's log and the console tail."""
        state = self._describe(self.poll())
        return (f"{self.name}: {state} after {self.elapsed:.1f} s\n--- pyvmm log ---\n{self.log.rstrip()}\n"
                f"--- console tail ---\n{self.console_tail(lines)}")

    def __repr__(self) -> str:
        return f"<VM {self.name} kernel={self.settings.kernel} status={self.status}>"
