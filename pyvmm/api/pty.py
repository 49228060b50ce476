"""A pexpect child over a pty master, drained by a background thread (:class:`PtyChild`)."""

from __future__ import annotations

import codecs
import contextlib
import errno
import os
import select
import threading
from typing import TYPE_CHECKING

import pexpect
from pexpect.spawnbase import SpawnBase

from pyvmm.api.console import DEFAULT_EXPECT_TIMEOUT

TRANSCRIPT_LIMIT = 16 << 20  # characters of console transcript kept (the oldest are dropped)

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
