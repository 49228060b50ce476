"""The lab tier's bounds and its view of the inner run, without starting a lab or a VM.

Not marked ``lab``: these run on every host in seconds.  They check the collect pass that finds each lab
test's bound (tier.collect_bounds), that a lab test past its bound fails alone while the next one still
runs (pytest-timeout, from the bound), the PYVMM-LABTEST progress lines and how InnerRun reads them, and
the lab runner's watchdog with a stand-in for QEMU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvmm.lab import qemu
from pyvmm.lab.qemu import LabOptions
from tests.lab import tier
from tests.lab.conftest import lab_bound

NODE = "tests/lab/test_x.py::test_boot"
INNER_OUTPUT = (
    f"{tier.PROGRESS_MARK} start {NODE}\n.\n{tier.PROGRESS_MARK} end {NODE} passed 41.50\n"
    f"{tier.PROGRESS_MARK} start {NODE}2[1]\nF\n{tier.PROGRESS_MARK} end {NODE}2[1] failed 12.25\n"
    "=========================== short test summary info ============================\n"
    f"FAILED {NODE}2[1] - AssertionError: no /init\n"
    f"{tier.PROGRESS_MARK} start {NODE}3\n"
).encode()


def test_every_lab_test_declares_a_bound_the_collect_pass_finds() -> None:
    bounds = tier.collect_bounds()
    assert len(bounds) >= 3
    assert all(b > 0 for b in bounds.values()), bounds
    assert "tests/lab/test_guest_userspace.py::test_default_guest_disk_io_in_user_space" in bounds
    assert not any("test_lab_tier" in n or "test_arm64" in n for n in bounds)  # not marked lab
    plan = tier.TierPlan(bounds)
    assert plan.lab_timeout_s > tier.LAB_START_S + sum(bounds.values())
    assert plan.test_timeout_s > plan.lab_timeout_s


def test_a_lab_test_past_its_bound_fails_alone(tmp_path: Path) -> None:
    """Run as inside the lab (PYVMM_IN_LAB=1) with tests/lab/conftest.py as a plugin: the first test's
    VM stand-in outlives its 2 s bound and fails; the second one still runs and passes."""
    (tmp_path / "test_fake_lab.py").write_text(
        "import subprocess, pytest\n"
        "@pytest.mark.lab(bound_s=2)\n"
        "def test_hangs():\n    subprocess.run(['sleep', '60'], check=False)\n"
        "@pytest.mark.lab(bound_s=30)\n"
        "def test_next():\n    pass\n")
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(tier.ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
         "-p", "tests.lab.conftest", "-p", "no:cacheprovider", "-q", "-o", "console_output_style=classic",
         str(tmp_path / "test_fake_lab.py")],
        cwd=tier.ROOT, env={**os.environ, "PYVMM_IN_LAB": "1", tier.PROGRESS_ENV: "1"}, capture_output=True,
        text=True, timeout=120, check=False)
    out = proc.stdout + proc.stderr
    assert time.monotonic() - t0 < 60, out
    assert proc.returncode == 1, out
    assert "Timeout (>2.0s) from pytest-timeout" in out, out
    assert "1 failed, 1 passed" in out, out
    seen = tier.InnerRun(tier.TierPlan({}), echo=lambda line: None)
    seen.feed(proc.stdout.encode())
    seen.finish()
    assert [(t.nodeid.split("::")[1], t.outcome) for t in seen.finished] == [("test_hangs", "failed"),
                                                                              ("test_next", "passed")], out
    assert 2.0 <= (seen.finished[0].seconds or 0) < 10, out


def test_a_lab_test_without_a_bound_is_refused(tmp_path: Path) -> None:
    (tmp_path / "test_unbounded.py").write_text("import pytest\n@pytest.mark.lab\ndef test_x():\n    pass\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(tier.ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
         "-p", "tests.lab.conftest", "-p", "no:cacheprovider", str(tmp_path / "test_unbounded.py")],
        cwd=tier.ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 4 and "without a bound" in proc.stderr, proc.stdout + proc.stderr


def test_lab_bound_reads_the_marker(request: pytest.FixtureRequest) -> None:
    assert lab_bound(request.node) is None  # this test is not a lab test


@pytest.mark.parametrize("size", [1, 5, 64, len(INNER_OUTPUT)])
def test_inner_run_follows_the_progress_lines(size: int) -> None:
    echoed: list[str] = []
    inner = tier.InnerRun(tier.TierPlan({NODE: 240.0, f"{NODE}2[1]": 240.0, f"{NODE}3": 300.0, "not run": 1.0}),
                          echoed.append)
    for i in range(0, len(INNER_OUTPUT), size):
        inner.feed(INNER_OUTPUT[i : i + size])
    assert [(t.nodeid, t.outcome, t.seconds) for t in inner.finished] == [(NODE, "passed", 41.5),
                                                                          (f"{NODE}2[1]", "failed", 12.25)]
    assert inner.running is not None and inner.running.nodeid == f"{NODE}3"
    assert inner.running.bound_s == 300.0
    text = "\n".join(echoed)
    assert f"PASSED  {NODE} in 41.5 s (bound 240 s)" in text and f"start  {NODE}3 (bound 300 s)" in text
    assert f"FAILED {NODE}2[1] - AssertionError" in text
    assert not any(line.endswith(("] .", "] F")) for line in echoed)  # the -q progress dots are not echoed
    where = inner.where()
    assert f"running: {NODE}3 for" in where and "(bound 300 s)" in where
    assert "2 finished (1 failed, 1 passed), 1 not started" in where
    durations = inner.durations()
    assert "RUNNING" in durations[0] and durations[1].split()[:2] == ["41.50s", "passed"]
    assert inner.tail(2).splitlines()[-1].startswith(tier.PROGRESS_MARK)


def test_inner_run_watchdog(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(tier.time, "monotonic", lambda: now[0])
    inner = tier.InnerRun(tier.TierPlan({NODE: 100.0}), echo=lambda line: None)
    now[0] += tier.LAB_START_S - 1
    assert inner.watchdog() is None
    now[0] += 2
    assert "before the first inner test" in (inner.watchdog() or "")
    inner.feed(f"{tier.PROGRESS_MARK} start {NODE}\n".encode())
    now[0] += 100 + tier.STUCK_GRACE_S - 1
    assert inner.watchdog() is None  # within its bound and the grace for its own pytest-timeout
    now[0] += 2
    reason = inner.watchdog() or ""
    assert NODE in reason and "past its bound of 100 s" in reason and "stuck" in reason


def _fake_qemu(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "fake-qemu"
    script.write_text(f"#!/bin/sh\necho $$ > {tmp_path}/pid\necho 'PYVMM-LAB: start 0.5'\n{body}\n")
    script.chmod(0o755)
    ctl = tmp_path / "ctl"
    ctl.mkdir(exist_ok=True)
    return [str(script)]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_runner_watchdog_stops_the_lab(tmp_path: Path) -> None:
    cmd = _fake_qemu(tmp_path, "echo 'inner: hello'\nexec sleep 60")
    out = bytearray()
    t0 = time.monotonic()
    result = qemu._run_qemu(cmd, tmp_path / "ctl", LabOptions(command=["x"], timeout=50), out.extend,
                              watchdog=lambda: "inner test stuck" if b"hello" in out else None)
    assert time.monotonic() - t0 < 10
    assert result.status == qemu.STATUS_TIMEOUT and result.timed_out
    assert result.reason.startswith("inner test stuck; QEMU was stopped after")
    assert bytes(out) == b"inner: hello\n"
    assert _gone(int((tmp_path / "pid").read_text()))


def test_runner_stops_the_lab_when_the_caller_is_interrupted(tmp_path: Path) -> None:
    """pytest-timeout's SIGALRM raises in the caller's ``out`` or in the select wait: QEMU must not live on."""
    cmd = _fake_qemu(tmp_path, "echo 'inner: hello'\nexec sleep 60")

    def out(data: bytes) -> None:
        raise RuntimeError("the caller's own timeout")

    with pytest.raises(RuntimeError, match="own timeout"):
        qemu._run_qemu(cmd, tmp_path / "ctl", LabOptions(command=["x"], timeout=50), out)
    assert _gone(int((tmp_path / "pid").read_text()))
