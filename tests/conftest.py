"""Shared fixtures: what a test needs from the machine, with a skip reason when it is missing."""

from __future__ import annotations

import errno
import os
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images" / "out"


# Property-test examples actually run, per test (printed at the end: how much fuzzing a run did).
FUZZ_EXAMPLES: Counter[str] = Counter()


def count_example(test: str) -> None:
    FUZZ_EXAMPLES[test] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FUZZ_EXAMPLES:
        total = sum(FUZZ_EXAMPLES.values())
        parts = ", ".join(f"{k} {v}" for k, v in sorted(FUZZ_EXAMPLES.items()))
        terminalreporter.write_line(f"hypothesis examples run: {total} ({parts})")


def kvm_unavailable_reason() -> str | None:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ENOENT:
            return "/dev/kvm does not exist on this machine"
        return f"/dev/kvm cannot be opened: {err.strerror}"
    os.close(fd)
    return None


@pytest.fixture(scope="session")
def kvm() -> None:
    reason = kvm_unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def images() -> Path:
    """The built default guest (``make images``)."""
    missing = [n for n in ("vmlinux", "bzImage", "initrd.cpio.gz", "rootfs.ext4") if not (IMAGES / n).is_file()]
    if missing:
        pytest.skip(f"images/out lacks {', '.join(missing)}: run `make images`")
    return IMAGES
