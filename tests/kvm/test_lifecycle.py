"""How a VM ends, driven through the real CLI with a tiny "kernel": an ELF whose code prints READY on
the UART and then echoes every byte it receives (polling LSR.DR).  No Linux needed, seconds each.

Covers: --timeout (status 5), SIGINT/SIGTERM/SIGHUP (status 6, clean message), console input from a
pipe, the interactive console on a terminal (raw mode, echo through the guest, Ctrl-A x, the terminal
restored afterwards).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvmm.testing.kernels import make_elf

pytestmark = pytest.mark.kvm

ENTRY = 0x1000000


def _echo_guest() -> bytes:
    """x86-64 machine code (hand-assembled; SDM vol. 2 encodings in the comments)."""
    code = bytearray(b"\x66\xba\xf8\x03")  # mov $0x3f8, %dx
    for ch in b"READY\n":
        code += bytes((0xB0, ch, 0xEE))  # mov $ch, %al ; out %al, (%dx)
    loop = bytes.fromhex(
        "66bafd03"  # L: mov $0x3fd, %dx       (LSR)
        "ec"  #    in (%dx), %al
        "a801"  #    test $1, %al          (DR: data ready)
        "74f7"  #    jz L
        "66baf803"  #    mov $0x3f8, %dx       (RBR/THR)
        "ec"  #    in (%dx), %al
        "ee"  #    out %al, (%dx)        (echo)
        "ebef"  #    jmp L
    )
    return bytes(code + loop)


@pytest.fixture(scope="module")
def echo_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    code = _echo_guest()
    path = tmp_path_factory.mktemp("lifecycle") / "echo.elf"
    path.write_bytes(make_elf([(ENTRY, code, len(code))], ENTRY))
    return path


def _cmd(kernel: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pyvmm", "run", "--kernel", str(kernel), "--memory", "64M", *extra]


def _wait_for(proc: subprocess.Popen[bytes], marker: bytes, timeout: float = 60) -> bytes:
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    os.set_blocking(proc.stdout.fileno(), False)
    while marker not in seen:
        assert time.monotonic() < deadline, f"no {marker!r} in {seen!r}"
        chunk = proc.stdout.read(4096)
        if chunk:
            seen += chunk
        else:
            time.sleep(0.05)
    return seen


def test_timeout_ends_a_guest_that_never_stops(kvm: None, echo_kernel: Path) -> None:
    proc = subprocess.run(_cmd(echo_kernel, "--timeout", "2"), capture_output=True, timeout=60,
                          stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 5, proc.stderr
    assert b"READY" in proc.stdout
    assert b"--timeout of 2 s expired" in proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_signals_stop_cleanly(kvm: None, echo_kernel: Path, sig: signal.Signals) -> None:
    proc = subprocess.Popen(_cmd(echo_kernel), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        _wait_for(proc, b"READY")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 6, err
    assert f"stopped by {sig.name}".encode() in err
    assert b"Traceback" not in err


def test_console_input_from_a_pipe(kvm: None, echo_kernel: Path) -> None:
    proc = subprocess.Popen(_cmd(echo_kernel, "--timeout", "30"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(proc, b"READY")
        assert proc.stdin is not None
        proc.stdin.write(b"ping-through-the-uart\n")
        proc.stdin.flush()
        out = _wait_for(proc, b"ping-through-the-uart")
        assert b"ping-through-the-uart" in out
        proc.terminate()
        proc.wait(timeout=30)
    finally:
        proc.kill()


def test_interactive_terminal_escape_and_restore(kvm: None, echo_kernel: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    cmd = " ".join(_cmd(echo_kernel))
    child = pexpect.spawn("/bin/sh", ["-c", f"stty -g; {cmd}; echo RC=$?; stty -g"], timeout=60)
    try:
        child.expect(r"([0-9a-f:]{20,})\r\n")
        before = child.match.group(1)
        child.expect("READY")
        child.send("hi there")  # raw mode: no newline needed, the guest echoes each byte
        child.expect("hi there")
        child.send("\x01x")  # Ctrl-A x
        child.expect(r"RC=(\d+)")
        assert child.match.group(1) == b"6"
        child.expect(r"([0-9a-f:]{20,})\r\n")
        assert child.match.group(1) == before  # the terminal is as it was
    finally:
        child.close(force=True)


def test_inherited_descriptors_are_closed(kvm: None, echo_kernel: Path, tmp_path: Path) -> None:
    """A descriptor the caller leaves open does not stay open in the VMM the guest talks to."""
    secret = tmp_path / "secret"
    secret.write_text("host-only")
    fd = os.open(secret, os.O_RDONLY)  # inheritable, as a careless parent might leave it
    os.set_inheritable(fd, True)
    proc = subprocess.Popen(_cmd(echo_kernel, "--timeout", "30"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, pass_fds=(fd,))
    try:
        _wait_for(proc, b"READY")
        targets = [os.readlink(f"/proc/{proc.pid}/fd/{n}") for n in os.listdir(f"/proc/{proc.pid}/fd")]
        assert str(secret) not in targets
        proc.terminate()
        proc.wait(timeout=30)
    finally:
        proc.kill()
        os.close(fd)
