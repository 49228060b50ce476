"""Expect-style access to a serial console (:class:`Console`): any pexpect child, a :class:`VM`'s
console or ``pexpect.spawn("sh")`` in the unit tests."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import pexpect

from pyvmm.api.errors import CommandResult, ConsoleEOF, ConsoleError, ConsoleTimeout, VmState

DEFAULT_EXPECT_TIMEOUT = 30.0
DEFAULT_RUN_TIMEOUT = 60.0


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
