"""The gdb server on aarch64, in the arm64 KVM lab: registers, single steps, a software and a hardware
breakpoint, Ctrl-C, memory read through the guest's page tables, detach (tests/lab/arm64_gdb_session.py
runs inside the lab; this side starts the lab and checks what it printed).  Runs on the x86 host, like
tests/lab/test_arm64_lab.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyvmm.lab import LabOptions, run, unavailable_reason
from tests.lab.conftest import vm_timeout

ROOT = Path(__file__).resolve().parents[2]
ARM64 = ROOT / "images" / "out" / "arm64"
SESSION_S = vm_timeout(240.0)  # pyvmm's start in the lab, the stops, the boot to the panic
LAB_TIMEOUT_S = 60.0 + SESSION_S
PORT = 41234


@pytest.mark.timeout(LAB_TIMEOUT_S + 60.0, method="signal")
def test_gdb_on_the_arm64_guest(tmp_path: Path) -> None:
    image, config = ARM64 / "Image", ARM64 / "config-arm64"
    if not image.is_file() or not config.is_file():
        pytest.skip("arm64 guest images missing: run `python3 images/arm64.py`")
    reason = unavailable_reason(arch="aarch64")
    if reason:
        pytest.skip(reason)
    va_bits = re.search(r"^CONFIG_ARM64_VA_BITS=(\d+)$", config.read_text(), re.M)
    assert va_bits, "no CONFIG_ARM64_VA_BITS in the guest's config"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    console = scratch / "console.log"
    output = bytearray()
    result = run(LabOptions(command=["python3", "-m", "tests.lab.arm64_gdb_session", str(image), va_bits[1],
                                     str(console), str(PORT)],
                            cwd=ROOT, scratch=scratch, timeout=LAB_TIMEOUT_S, arch="aarch64"), out=output.extend)
    out = output.decode(errors="replace")
    found = dict(re.findall(r"^ARM64-GDB: (\S+) (.*)$", out, re.M))
    text = console.read_text(errors="replace") if console.exists() else ""
    explain = (f"lab status {result.status} {result.reason}\n--- lab output ---\n{out[-6000:]}\n"
               f"--- guest console ---\n{text[-3000:]}\n--- lab console ---\n{result.boot_log[-2000:]}")
    assert result.status == 0, explain
    expected = {"xml": "aarch64", "stop": "05", "g-bytes": "True", "entry-code": "True", "entry-cpsr": "0x5",
                "steps": "True", "Z0": "OK", "swbreak": "True", "z0": "OK", "code-under-breakpoint": "True",
                "Z1": "OK", "hwbreak": "True", "z1": "OK", "interrupt": "02",
                "interrupted-in-the-kernel-image": "True", "code-through-page-tables": "True", "detach": "OK",
                "exit": "0"}
    assert {k: found.get(k) for k in expected} == expected, explain
    # the guest ran on to its end after the detach: the panic (no root device), then the reboot (panic=5)
    assert "Kernel panic - not syncing" in text and "Rebooting in 5 seconds" in text, explain
