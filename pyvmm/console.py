"""The host end of the serial console: where guest output goes, where input comes from.

Output goes to a file descriptor (stdout, or a file for ``--console file:PATH``) and through a line
watcher that keeps the last lines (for error reports) and spots a kernel panic.  The UART hands over one
byte per THR write, so output is buffered: written at each newline, when the buffer holds
:attr:`ConsoleOutput.BUFFER_SIZE` bytes, and at :meth:`ConsoleOutput.flush`, which the VMM's event loop
calls on a short timer (a prompt or a key echoed without a newline shows within that time) and at the
end of the run.  The line watcher sees every byte as it comes, flushed or not.  Input comes from
stdin: in raw mode when it is a terminal (restored on every exit path), with the escape sequence
Ctrl-A x to stop the VM and Ctrl-A Ctrl-A to send a literal Ctrl-A; as plain bytes from a pipe.
"""

from __future__ import annotations

import contextlib
import os
import select
import termios
import threading
import tty
from collections import deque
from collections.abc import Callable

ESCAPE = 0x01  # Ctrl-A
ESCAPE_QUIT = ord("x")
PANIC_MARKER = b"Kernel panic - not syncing"


# How long a flush may wait for a console that is not ready (a terminal whose file description a
# non-blocking stdin shares, a full pipe) before the rest of the buffer is dropped: the guest must not
# hang on it.
WRITE_WAIT_S = 0.1


class ConsoleOutput:
    """A byte sink for the UART that also watches lines.  Thread-safe: vCPU threads write, the event loop
    flushes."""

    BUFFER_SIZE = 4096

    def __init__(self, fd: int | None, *, on_panic: Callable[[str], None] | None = None,
                 on_line: Callable[[bytes], None] | None = None, keep_lines: int = 200) -> None:
        self._fd = fd
        self._buf = bytearray()  # not yet written to fd
        self._line = bytearray()
        self.tail: deque[bytes] = deque(maxlen=keep_lines)
        self._on_panic = on_panic
        self._on_line = on_line
        self._lock = threading.Lock()
        self.bytes_out = 0
        # The first kernel panic line seen, when panics are watched (``on_panic``): it decides how the VM
        # ended, whatever the guest does after it (Vmm.request_stop).
        self.panic_line: str | None = None

    # A line longer than this is watched in pieces of LINE_MAX + 1 bytes (the guest may never end it).
    LINE_MAX = 4096

    def __call__(self, data: bytes) -> None:
        """Transmitted bytes, any number: lines are cut at LF, CRs dropped (a console line is one
        UART run when KVM's ring is replayed: no Python step per byte here either)."""
        with self._lock:
            self.bytes_out += len(data)
            pieces = data.split(b"\n")
            for piece in pieces[:-1]:
                self._add(piece)
                self._finish_line()
            self._add(pieces[-1])
            if self._fd is not None:
                self._buf += data
                if len(pieces) > 1 or len(self._buf) >= self.BUFFER_SIZE:
                    self._write_out()

    def _add(self, piece: bytes) -> None:
        """Part of a line, without its LF; an over-long line is finished every LINE_MAX + 1 bytes."""
        if b"\r" in piece:
            piece = piece.replace(b"\r", b"")
        self._line += piece
        while len(self._line) > self.LINE_MAX:
            rest = self._line[self.LINE_MAX + 1:]
            del self._line[self.LINE_MAX + 1:]
            self._finish_line()
            self._line += rest

    @property
    def pending(self) -> bool:
        """Bytes wait in the buffer."""
        return bool(self._buf)

    def flush(self) -> None:
        """Write what the buffer holds.  Cheap when it is empty (the event loop calls it on a timer)."""
        if self._buf:
            with self._lock:
                self._write_out()

    def _write_out(self) -> None:
        """With the lock held: write the whole buffer; what the console cannot take is dropped."""
        buf, fd = self._buf, self._fd
        waited = False
        while buf and fd is not None:
            try:
                n = os.write(fd, buf)
            except BlockingIOError:
                if not waited and select.select([], [fd], [], WRITE_WAIT_S)[1]:
                    waited = True  # once per flush: a console that stays full loses the rest
                    continue
                break
            except OSError:  # closed or gone (EPIPE, EIO on a hung-up terminal): the guest must not notice
                break
            del buf[:n]
        buf.clear()

    def _finish_line(self) -> None:
        line = bytes(self._line)
        self._line.clear()
        self.tail.append(line)
        if self._on_line is not None:
            self._on_line(line)
        if self._on_panic is not None and PANIC_MARKER in line:
            text = line.decode(errors="replace").strip()
            if self.panic_line is None:
                self.panic_line = text
            self._on_panic(text)

    def last_line(self, limit: int = 200) -> str | None:
        """The last non-empty line the guest wrote (an unfinished one counts), printable and at most
        ``limit`` characters; None if there is none."""
        with self._lock:
            candidates = [bytes(self._line), *reversed(self.tail)]
        line = next((c for c in candidates if c.strip()), None)
        if line is None:
            return None
        text = "".join(ch if ch.isprintable() else "?" for ch in line.decode(errors="replace").strip())
        return text if len(text) <= limit else text[: limit - 3] + "..."

    def tail_text(self, n: int = 20) -> str:
        with self._lock:
            lines = list(self.tail)[-n:]
            if self._line:
                lines.append(bytes(self._line))
        return "\n".join(x.decode(errors="replace") for x in lines)


class ConsoleInput:
    """Reads stdin for the guest; handles the escape sequence on a terminal."""

    def __init__(self, fd: int, on_escape_quit: Callable[[], None]) -> None:
        self.fd = fd
        self.is_tty = os.isatty(fd)
        self._saved: list[int | list[bytes | int]] | None = None
        self._on_quit = on_escape_quit
        self._escaped = False
        self.eof = False

    def __enter__(self) -> ConsoleInput:
        if self.is_tty:
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
        os.set_blocking(self.fd, False)
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        if self._saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None
        with contextlib.suppress(OSError):
            os.set_blocking(self.fd, True)

    def read(self) -> bytes:
        """Read what is available; return the bytes meant for the guest."""
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return b""
        except OSError:
            data = b""
        if not data:
            self.eof = True
            return b""
        if not self.is_tty:
            return data
        out = bytearray()
        for b in data:
            if self._escaped:
                self._escaped = False
                if b == ESCAPE_QUIT:
                    self._on_quit()
                    continue
                if b == ESCAPE:
                    out.append(b)
                    continue
                out.append(ESCAPE)
                out.append(b)
            elif b == ESCAPE:
                self._escaped = True
            else:
                out.append(b)
        return bytes(out)
