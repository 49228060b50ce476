"""KVM-level tests: tiny guests from firmware/ run through pyvmm.testing.tinyvm.

The ``firmware`` fixture builds them once per session (``make -C firmware``) and skips, with a reason,
when /dev/kvm is unusable or the assembler/linker (Debian: binutils) is missing.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvmm.testing.tinyvm import Recorder, TinyResult

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE = ROOT / "firmware"

# firmware/common.inc
PORT_BASE = 0x510  # PORT_IN 0x510, PORT_ECHO 0x511, PORT_READY 0x512, PORT_REPORT 0x514
OFF_IN, OFF_ECHO, OFF_READY, OFF_REPORT = 0, 1, 2, 4
PORT_SPAN = 8


@pytest.fixture(scope="session")
def firmware(kvm: None) -> Callable[..., Path]:
    """``firmware("pio")`` -> the path of firmware/out/pio.bin, built once per session;
    ``firmware("pio", "elf")`` -> the same guest as an ELF executable with symbols (for ``pyvmm run``)."""
    missing = [tool for tool in ("make", "as", "ld") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not on PATH: install make and binutils to build firmware/")
    proc = subprocess.run(["make", "-C", str(FIRMWARE)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"make -C firmware failed:\n{proc.stdout}{proc.stderr}")

    def path(name: str, kind: str = "bin") -> Path:
        p = FIRMWARE / "out" / f"{name}.{kind}"
        assert p.is_file(), f"{p} was not built"
        return p

    return path


def reports(rec: Recorder) -> list[int]:
    """The 32-bit values a guest wrote to PORT_REPORT, in order."""
    return [v for off, size, v in rec.writes if off == OFF_REPORT and size == 4]


def pairs64(words: list[int]) -> list[int]:
    """Join (low, high) 32-bit report pairs into 64-bit values."""
    assert len(words) % 2 == 0, words
    return [lo | hi << 32 for lo, hi in zip(words[::2], words[1::2], strict=True)]


def describe(result: TinyResult, rec: Recorder | None = None) -> str:
    """For assertion messages: how the run ended and what the guest reported."""
    text = f"{result.status.name}: {result.reason}; exits {dict(result.exits)}; assist {dict(result.assist)}"
    if rec is not None:
        text += f"; reports {[hex(v) for v in reports(rec)]}"
    return text
