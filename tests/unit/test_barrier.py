"""The virtqueue's memory barriers (pyvmm/devices/virtio/barrier.py): the aarch64 machine code checked
against GNU as for aarch64, and on this host the barriers that run.  On an arm64 host the same module
runs its ``dmb`` code: tests/lab/test_arm64_lab.py calls it in the arm64 lab and compares the bytes."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from pyvmm.devices.virtio import barrier

AS = shutil.which("aarch64-linux-gnu-as")
OBJCOPY = shutil.which("aarch64-linux-gnu-objcopy")


@pytest.mark.skipif(AS is None or OBJCOPY is None, reason="no aarch64 binutils (binutils-aarch64-linux-gnu)")
def test_the_arm64_code_is_what_the_assembler_makes(tmp_path: Path) -> None:
    src, obj, raw = tmp_path / "b.S", tmp_path / "b.o", tmp_path / "b.bin"
    src.write_text("dmb ishld\nret\ndmb ishst\nret\ndmb ish\nret\n")
    assert AS is not None and OBJCOPY is not None
    subprocess.run([AS, "-o", str(obj), str(src)], check=True, capture_output=True)
    subprocess.run([OBJCOPY, "-O", "binary", "-j", ".text", str(obj), str(raw)], check=True, capture_output=True)
    words = [barrier.DMB_ISHLD, barrier.RET, barrier.DMB_ISHST, barrier.RET, barrier.DMB_ISH, barrier.RET]
    assert raw.read_bytes() == struct.pack("<6I", *words)


def test_this_hosts_barriers_run() -> None:
    if os.uname().machine == "aarch64":
        assert barrier.KIND == "dmb" and len(barrier.code_bytes()) == 24
    else:
        assert barrier.KIND == "tso" and barrier.code_bytes() == b""
    for fn in (barrier.rmb, barrier.wmb, barrier.mb):
        for _ in range(1000):
            fn()


def test_the_full_barrier_is_safe_from_many_threads() -> None:
    threads = [threading.Thread(target=lambda: [barrier.mb() for _ in range(2000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
