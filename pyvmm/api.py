"""The Python API: a VM running in the background, and expect-style access to its serial console.

::

    from pyvmm import VM

    with VM(kernel="images/out/vmlinux", initrd="images/out/initrd.cpio.gz", memory="256M",
            cmdline="console=ttyS0 rdinit=/bin/sh", timeout=300) as vm:
        vm.console.wait_for_shell(timeout=120)
        status, output = vm.run("uname -r")
    print(vm.status, vm.console_tail())

How it works.  :meth:`VM.start` runs ``python -m pyvmm run --config <file> --console stdio`` as a child
process whose stdin/stdout are a pseudo-terminal: the guest's serial console.  A child process, not a
thread, because the vCPU kick needs a signal handler that only a main thread can install, and because a
process is cleanly isolated and always killable.  pyvmm's own messages (stderr) go to a separate log
(:attr:`VM.log`).  A reader thread drains the terminal all the time, so a guest that prints a lot never
blocks on a full pty while the test is busy elsewhere, and keeps the whole transcript
(:attr:`VM.console_text`).

The expect machinery is pexpect's: :class:`Console` drives any pexpect child (``pexpect.spawn("sh")``
stands in for a guest in the unit tests); for a VM the child is :class:`PtyChild`, a
:class:`pexpect.spawnbase.SpawnBase` fed by the reader thread.

:meth:`Console.run` needs a POSIX shell on the console (e.g. ``init=/bin/sh``; the default guest's
``/init`` runs its checks and reboots).  On a software-emulating host KVM guest user space cannot run at
all (docs: hosts.md), so there is no shell to talk to; use the KVM lab or a hardware KVM.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import dataclasses
import errno
import os
import pty
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tty
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import pexpect
from pexpect.spawnbase import SpawnBase

from pyvmm.config import DiskConfig, parse_memory
from pyvmm.configfile import RunSettings, load_file, normalise_trace
from pyvmm.errors import ConfigError, VmmError
from pyvmm.guestexec import check_exec, command_output
from pyvmm.status import ExitStatus, guest_status_of
from pyvmm.stopreport import VcpuReport, parse_report

__all__ = ["VM", "CommandResult", "Console", "ConsoleEOF", "ConsoleError", "ConsoleTimeout", "GuestCommandError",
           "PtyChild", "VmState", "VmTimeout"]

TRANSCRIPT_LIMIT = 16 << 20  # characters of console transcript kept (the oldest are dropped)
DEFAULT_EXPECT_TIMEOUT = 30.0
DEFAULT_RUN_TIMEOUT = 60.0
STOP_GRACE_S = 10.0
STATUS_GRACE_S = 5.0  # how long a console error waits for pyvmm to exit once the console closed
CTRL_A = "\x01"  # pyvmm's console escape on a terminal: a literal Ctrl-A is sent as Ctrl-A Ctrl-A


LOG_TAIL_LINES = 20  # lines of pyvmm's log an error message quotes


class VmState(NamedTuple):
    """What an error says about the VM behind a console: its exit status (None while it runs), a line
    describing that, and the last lines of pyvmm's log."""

    status: int | None
    summary: str
    log_tail: str


class ConsoleError(VmmError):
    """The console did not show what was expected.

    ``tail`` is the console's last lines.  For a :class:`VM`'s console, ``status`` is pyvmm's exit status
    (None while it still runs) and ``log_tail`` the last lines of its log; both are in the message too.
    """

    def __init__(self, message: str, tail: str = "", *, vm: VmState | None = None) -> None:
        parts = [message]
        if vm is not None:
            parts.append(vm.summary)
            if vm.log_tail:
                parts.append(f"--- pyvmm log (last lines) ---\n{vm.log_tail}")
        if tail:
            parts.append(f"--- console tail ---\n{tail}")
        super().__init__("\n".join(parts))
        self.tail = tail
        self.status = None if vm is None else vm.status
        self.log_tail = "" if vm is None else vm.log_tail


class ConsoleTimeout(ConsoleError, TimeoutError):
    """The pattern did not appear within the timeout."""


class ConsoleEOF(ConsoleError):
    """The console closed (the VM ended) before the pattern appeared."""


class VmTimeout(VmmError, TimeoutError):
    """:meth:`VM.wait` timed out: the VM is still running (``status`` None); ``log_tail`` is the end of
    pyvmm's log."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.status: int | None = None
        self.log_tail = log_tail


class GuestCommandError(VmmError):
    """:meth:`VM.exec`: the VM ended without the command's status (a panic, the timeout, a guest whose init
    ignores ``pyvmm.exec=``...).  ``status`` is pyvmm's exit status; the message says how the VM ended and
    quotes pyvmm's log and the console."""

    def __init__(self, message: str, status: int | None) -> None:
        super().__init__(message)
        self.status = status


_GUEST_EXITED = re.compile(r"guest exited with status (\d+) \(guest exit device\)")


class CommandResult(NamedTuple):
    """What :meth:`Console.run` returns: the command's exit status and its output (``\\n`` line ends)."""

    status: int
    output: str


if TYPE_CHECKING:
    _SpawnBase = SpawnBase[str]  # generic in the type stubs only
else:
    _SpawnBase = SpawnBase


class PtyChild(_SpawnBase):
    """A pexpect child over a pty master whose reads are done by a background thread.

    The thread keeps the pty drained (the guest never blocks on console output) and records the
    transcript; :meth:`read_nonblocking` hands pexpect what arrived.
    """

    def __init__(self, fd: int, *, timeout: float = DEFAULT_EXPECT_TIMEOUT) -> None:
        super().__init__(timeout=timeout, maxread=65536, encoding="utf-8", codec_errors="replace")
        self.child_fd = fd
        self._pending = bytearray()
        self._cond = threading.Condition()
        self._eof = False
        self._transcript: list[str] = []
        self._transcript_len = 0
        self._reader_decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._expect_decoder = codecs.getincrementaldecoder("utf-8")("replace")
        # The reader thread owns the fd: close() wakes it through this pipe and the fd is closed only once
        # the thread is gone.  Closing an fd under a thread that reads it would let the number be reused
        # (by a pipe of this process) and the thread read from that instead.
        self._wake_r, self._wake_w = os.pipe()
        self._closed = False
        self._thread = threading.Thread(target=self._reader, name=f"pyvmm-console-{fd}", daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        poller = select.poll()
        poller.register(self.child_fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _ in poller.poll()}
                if self._wake_r in ready:
                    return  # close(): stop reading
                try:
                    data = os.read(self.child_fd, 65536)
                except OSError as err:
                    if err.errno == errno.EINTR:
                        continue
                    data = b""  # EIO: the other side closed (Linux)
                if not data:
                    return
                with self._cond:
                    self._pending += data
                    if len(self._pending) > TRANSCRIPT_LIMIT:  # nobody is expecting: keep only the newest
                        del self._pending[:len(self._pending) - TRANSCRIPT_LIMIT]
                    self._record(self._reader_decoder.decode(data))
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def _record(self, text: str) -> None:
        self._transcript.append(text)
        self._transcript_len += len(text)
        while self._transcript_len > TRANSCRIPT_LIMIT and len(self._transcript) > 1:
            self._transcript_len -= len(self._transcript.pop(0))

    @property
    def transcript(self) -> str:
        """Everything read from the console so far (up to :data:`TRANSCRIPT_LIMIT` characters)."""
        with self._cond:
            return "".join(self._transcript)

    def wait_eof(self, timeout: float) -> bool:
        """Wait until the other side closed the terminal; True if it did."""
        with self._cond:
            return self._cond.wait_for(lambda: self._eof, timeout)

    # -- SpawnBase ---------------------------------------------------------------------------------
    def read_nonblocking(self, size: int = 1, timeout: float | None = None) -> str:
        with self._cond:
            if timeout is not None and timeout < 0:
                timeout = self.timeout
            if not self._cond.wait_for(lambda: self._pending or self._eof, timeout):
                raise pexpect.TIMEOUT("timeout exceeded")
            if not self._pending:
                self.flag_eof = True
                raise pexpect.EOF("the console closed")
            data = bytes(self._pending[:size])
            del self._pending[:size]
        s: str = self._expect_decoder.decode(data, final=False)
        for log in (self.logfile, self.logfile_read):
            if log is not None:
                log.write(s)
                log.flush()
        return s

    def send(self, s: str | bytes) -> int:
        if self._closed:
            raise OSError(errno.EBADF, "the console is closed")
        data = s.encode() if isinstance(s, str) else s
        for log in (self.logfile, self.logfile_send):
            if log is not None:
                log.write(s)
                log.flush()
        view = memoryview(data)
        while view:
            n = os.write(self.child_fd, view)
            view = view[n:]
        return len(data)

    def sendline(self, s: str | bytes = "") -> int:
        return self.send(s + "\n" if isinstance(s, str) else s + b"\n")

    def isalive(self) -> bool:
        with self._cond:
            return not self._eof

    def close(self) -> None:
        """Stop the reader, then close the pty (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._thread.join()  # returns at once: the reader waits in poll(), which the wake-up ends
        for fd in (self.child_fd, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class Console:
    """Expect-style access to a serial console: any pexpect child (a VM's, or a local shell's pty).

    ``escape`` is a control character the other side treats specially and wants doubled (pyvmm's
    console escape, Ctrl-A, for a VM).  ``transcript`` returns the full console text for error reports
    (by default, what this object has read).  ``vm_state`` (given by :class:`VM`) adds the VM's exit
    status and the end of pyvmm's log to every :class:`ConsoleError`.
    """

    def __init__(self, child: Any, *, escape: str | None = None, transcript: Any = None,
                 vm_state: Callable[[bool], VmState] | None = None) -> None:
        self.child = child
        self._escape = escape
        self._log: list[str] = []
        self._transcript = transcript
        # For a VM's console: the VM's exit status and log for error messages (the argument says whether
        # the console has closed, i.e. the VM is ending)
        self._vm_state = vm_state
        if transcript is None:
            child.logfile_read = self  # pexpect calls write()/flush() with what it reads

    # pexpect's logfile protocol
    def write(self, s: str) -> None:
        self._log.append(s)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        """The console transcript."""
        return str(self._transcript()) if self._transcript is not None else "".join(self._log)

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the transcript (``\\r`` removed)."""
        return "\n".join(self.text.replace("\r", "").splitlines()[-lines:])

    def expect(self, pattern: str | re.Pattern[str] | Sequence[str | re.Pattern[str]],
               timeout: float | None = DEFAULT_EXPECT_TIMEOUT) -> re.Match[str]:
        """Wait for a regular expression (or the first of several) in the console output.

        Returns the match; ``console.child.before`` holds the text before it.  Raises
        :class:`ConsoleTimeout` or :class:`ConsoleEOF` (with the console tail in the message).
        """
        patterns: list[str | re.Pattern[str]] = (
            list(pattern) if isinstance(pattern, list | tuple) else [cast(str | re.Pattern[str], pattern)])
        try:
            self.child.expect(patterns, timeout=timeout)
        except pexpect.TIMEOUT:
            raise self._error(ConsoleTimeout, f"no {_show(patterns)} on the console within {timeout} s") from None
        except pexpect.EOF:
            raise self._error(ConsoleEOF, f"the console closed before {_show(patterns)} appeared") from None
        match: re.Match[str] = self.child.match
        return match

    def _error(self, cls: type[ConsoleError], message: str) -> ConsoleError:
        vm = self._vm_state(cls is ConsoleEOF) if self._vm_state is not None else None
        return cls(message, self.tail(), vm=vm)

    def expect_exact(self, text: str, timeout: float | None = DEFAULT_EXPECT_TIMEOUT) -> None:
        """Wait for a literal string in the console output."""
        self.expect(re.escape(text), timeout)

    def send(self, text: str) -> None:
        """Type ``text`` on the console (no newline added)."""
        if self._escape:
            text = text.replace(self._escape, self._escape * 2)
        self.child.send(text)

    def sendline(self, text: str = "") -> None:
        """Type ``text`` and a newline (what Enter sends: ``\\r`` on a serial console is fine too)."""
        self.send(text + "\n")

    def wait_for_shell(self, timeout: float | None = 120.0, *, interval: float = 2.0) -> None:
        """Wait until a shell answers on the console: type an ``echo`` probe every ``interval`` seconds.

        Input typed before anything reads the console is lost, so one probe is not enough at boot.
        """
        nonce = secrets.token_hex(4)
        probe = f"echo __PYVMM_\"\"READY_{nonce}"  # the echoed input line does not match the pattern
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.sendline(probe)
            left = None if deadline is None else deadline - time.monotonic()
            try:
                self.expect(f"__PYVMM_READY_{nonce}", timeout=interval if left is None else min(interval, left))
                return
            except ConsoleTimeout:
                if deadline is not None and time.monotonic() >= deadline:
                    raise self._error(ConsoleTimeout,
                                      f"no shell answered on the console within {timeout} s") from None

    def run(self, cmd: str, timeout: float | None = DEFAULT_RUN_TIMEOUT) -> CommandResult:
        """Run ``cmd`` in the shell on the console; return its exit status and output.

        The protocol: one line ``printf BEGIN; cmd; printf "\\nRC=$?"`` with markers that carry a random
        nonce, spelled so that the shell's echo of the typed line cannot match them
        (``"__PYVMM_""BEGIN_<nonce>"``).  The output is the text between the two markers, with
        ``\\r\\n`` turned into ``\\n``.  ``cmd`` must be one line, a command list that does not read the
        console (stdin) and does not end in ``&``, ``;`` or a ``#`` comment.
        """
        nonce = secrets.token_hex(6)
        line = (f"printf '%s\\n' \"__PYVMM_\"\"BEGIN_{nonce}\"; {cmd}; "
                f"printf '\\n%s=%s__\\n' \"__PYVMM_\"\"RC_{nonce}\" \"$?\"")
        self.sendline(line)
        deadline = None if timeout is None else time.monotonic() + timeout
        self.expect(f"__PYVMM_BEGIN_{nonce}\r?\n", timeout)
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        match = self.expect(f"\r?\n__PYVMM_RC_{nonce}=(\\d+)__", left)
        output = str(self.child.before).replace("\r\n", "\n")
        return CommandResult(int(match.group(1)), output)


def _show(patterns: Sequence[str | re.Pattern[str]]) -> str:
    texts = [p.pattern if isinstance(p, re.Pattern) else p for p in patterns]
    return " or ".join(repr(t) for t in texts)


DiskSpec = str | os.PathLike[str] | DiskConfig


def _disk(spec: DiskSpec) -> DiskConfig:
    if isinstance(spec, DiskConfig):
        return spec
    if isinstance(spec, str):
        return DiskConfig.parse(spec)  # "IMG" or "path=IMG,readonly=on,..."
    return DiskConfig(Path(spec))


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
        if not path.exists():
            raise ConfigError(f"{what} {path}: no such file")
        if path.is_dir():
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
        values: dict[str, Any] = load_file(Path(config)) if config is not None else {}
        given: dict[str, Any] = {
            "kernel": None if kernel is None else Path(kernel),
            "initrd": None if initrd is None else Path(initrd),
            "cmdline": cmdline, "cpus": cpus, "boot": boot, "workarounds": workarounds,
            "timeout": None if timeout is None else float(timeout), "panic_exit": panic_exit,
            "trace_file": None if trace_file is None else Path(trace_file), "verbose": verbose,
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
        self.settings = dataclasses.replace(self.settings, exec=cmd)
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

