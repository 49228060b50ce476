from __future__ import annotations

import os

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
