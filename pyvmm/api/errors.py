"""The errors and results of the Python API (:mod:`pyvmm.api`)."""

from __future__ import annotations

from typing import NamedTuple

from pyvmm.errors import VmmError


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


class CommandResult(NamedTuple):
    """What :meth:`Console.run` returns: the command's exit status and its output (``\\n`` line ends)."""

    status: int
    output: str
