from __future__ import annotations

import os
import random

import pytest

from pyvmm.console import ConsoleInput, ConsoleOutput


def test_output_lines_tail_and_panic() -> None:
    r, w = os.pipe()
    panics: list[str] = []
    out = ConsoleOutput(w, on_panic=panics.append)
    out(b"Linux version 6.1\r\nsecond")
    out(b" line\nKernel panic - not syncing: Attempted to kill init!\n")
    assert os.read(r, 1000).startswith(b"Linux version")
    assert list(out.tail)[:2] == [b"Linux version 6.1", b"second line"]
    assert panics == ["Kernel panic - not syncing: Attempted to kill init!"]
    assert "second line" in out.tail_text()
    os.close(r)
    os.close(w)


def test_input_from_a_pipe_passes_bytes_and_sees_eof() -> None:
    r, w = os.pipe()
    quits: list[int] = []
    with ConsoleInput(r, lambda: quits.append(1)) as cin:
        os.write(w, b"ls\x01x\n")
        assert cin.read() == b"ls\x01x\n"  # no escape handling on a pipe
        assert cin.read() == b""
        os.close(w)
        cin.read()
        assert cin.eof
    assert not quits
    os.close(r)


def test_escape_sequence_on_a_terminal() -> None:
    master, slave = os.openpty()
    quits: list[int] = []
    with ConsoleInput(slave, lambda: quits.append(1)) as cin:
        assert cin.is_tty
        os.write(master, b"a\x01\x01b\x01x")
        assert cin.read() == b"a\x01b"
        assert quits == [1]
    os.close(master)
    os.close(slave)


def test_last_line_for_the_stop_report() -> None:
    out = ConsoleOutput(None)
    assert out.last_line() is None
    out(b"first\r\nsecond\n")
    assert out.last_line() == "second"
    out(b"login: ")  # a prompt without a newline is the last thing the guest said
    assert out.last_line() == "login:"
    out(b"\n\x1b[1mbold\x1b[0m " + b"x" * 300 + b"\n")
    line = out.last_line()
    assert line is not None and "\x1b" not in line and len(line) <= 200 and line.startswith("?[1mbold")


# -- buffered output: a write() per line, per 4 KiB, per flush; never per byte ------------------------------
def _readable(fd: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return b""


def test_output_is_buffered_until_a_newline() -> None:
    r, w = os.pipe()
    out = ConsoleOutput(w)
    for b in b"login: ":
        out(bytes([b]))
    assert _readable(r) == b""  # a prompt stays in the buffer...
    assert out.pending
    out.flush()  # ...until a flush (the event loop's timer, or the VM's end)
    assert _readable(r) == b"login: "
    assert not out.pending
    for b in b"root\r\n":
        out(bytes([b]))
    assert _readable(r) == b"root\r\n"  # a newline writes the line at once
    os.close(r)
    os.close(w)


def test_a_full_buffer_is_written_without_a_newline() -> None:
    r, w = os.pipe()
    out = ConsoleOutput(w)
    for _ in range(ConsoleOutput.BUFFER_SIZE):
        out(b"x")
    assert _readable(r) == b"x" * ConsoleOutput.BUFFER_SIZE
    assert out.bytes_out == ConsoleOutput.BUFFER_SIZE
    os.close(r)
    os.close(w)


def test_the_line_watcher_sees_bytes_before_they_are_flushed() -> None:
    panics: list[str] = []
    r, w = os.pipe()
    out = ConsoleOutput(w, on_panic=panics.append)
    for b in b"Kernel panic - not syncing: VFS\n":
        out(bytes([b]))
    assert panics == ["Kernel panic - not syncing: VFS"]
    assert out.last_line() == "Kernel panic - not syncing: VFS"
    assert _readable(r) == b"Kernel panic - not syncing: VFS\n"
    os.close(r)
    os.close(w)


def test_output_to_a_closed_fd_is_dropped_quietly() -> None:
    r, w = os.pipe()
    os.close(r)
    out = ConsoleOutput(w)
    out(b"nobody reads this\n")  # EPIPE: the guest must not notice
    out(b"tail")
    out.flush()
    assert out.bytes_out == len(b"nobody reads this\ntail")
    os.close(w)


def test_a_console_that_stays_full_loses_bytes_instead_of_hanging() -> None:
    r, w = os.pipe2(os.O_NONBLOCK)
    out = ConsoleOutput(w)
    while True:  # fill the pipe
        try:
            os.write(w, b"x" * 4096)
        except BlockingIOError:
            break
    out(b"this line does not fit\n")  # returns after a short wait, the line dropped
    assert out.bytes_out == len(b"this line does not fit\n") and not out.pending
    os.close(r)
    os.close(w)


def _watched_byte_by_byte(chunks: list[bytes], line_max: int) -> tuple[list[bytes], bytes]:
    """The console's line rules, one byte at a time: LF ends a line, CR is dropped, and a line that
    reaches line_max + 1 bytes is finished there."""
    lines, line = [], bytearray()
    for b in b"".join(chunks):
        if b == 0x0A:
            lines.append(bytes(line))
            line.clear()
        elif b != 0x0D:
            line.append(b)
            if len(line) > line_max:
                lines.append(bytes(line))
                line.clear()
    return lines, bytes(line)


@pytest.mark.parametrize("seed", range(30))
def test_lines_cut_from_runs_of_bytes_as_from_single_bytes(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = b"ab \r\n" + bytes([0xFF])
    data = bytes(rng.choice(alphabet) if rng.random() < 0.9 else 0x78 for _ in range(rng.randrange(12000)))
    if seed % 3 == 0:
        data += b"x" * 9000  # an unfinished over-long line
    cuts = sorted(rng.sample(range(len(data) + 1), min(20, len(data) + 1)))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    seen: list[bytes] = []
    out = ConsoleOutput(None, on_line=seen.append)
    for c in chunks:
        out(c)
    expected_lines, rest = _watched_byte_by_byte(chunks, ConsoleOutput.LINE_MAX)
    assert seen == expected_lines
    assert bytes(out._line) == rest  # the line still open
    assert out.bytes_out == len(data)
