"""Run the ``lab`` tier inside the KVM lab, once per pytest session, on a host that needs the lab.

Not marked ``lab`` itself: it runs on the host, starts ``python -m pyvmm.lab run -- python -m pytest -m lab
tests/lab`` and passes when every lab test passed in there (none skipped).  On a hardware-KVM host, or
inside the lab, it skips: the ``lab`` tests run directly there.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pyvmm.lab import LabOptions, in_lab, run, unavailable_reason
from tests.lab.conftest import LAB_TIER_SUMMARY, direct_unavailable_reason

ROOT = Path(__file__).resolve().parents[2]
LAB_TIER_TIMEOUT_S = 900.0  # a bound for the whole lab run; it takes about a minute here
MIN_LAB_TESTS = 3


def test_lab_tier(images: Path, tmp_path: Path) -> None:
    if in_lab():
        pytest.skip("already inside the KVM lab")
    if direct_unavailable_reason() is None:
        pytest.skip("this host's KVM runs guest user space: the lab tests run directly")
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    scratch = tmp_path / "scratch"
    junit = scratch / "junit.xml"
    command = [sys.executable, "-m", "pytest", "-m", "lab", "tests/lab", "-q", "-rfEs",
               "-p", "no:cacheprovider", f"--junitxml={junit}", "--durations=5"]
    output = bytearray()
    result = run(LabOptions(command=command, cwd=ROOT, scratch=scratch, timeout=LAB_TIER_TIMEOUT_S),
                 out=output.extend)
    text = output.decode(errors="replace")
    print(text)  # pytest shows it on failure (and with -s)
    timing = (f"lab boot {result.boot_s:.1f} s, tests {result.command_s:.1f} s, " if result.boot_s is not None
              else "")
    assert result.status == 0, (f"lab run: exit status {result.status} {result.reason}\n{text}\n"
                                f"--- lab console ---\n{result.boot_log[-4000:]}")
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    LAB_TIER_SUMMARY.append(f"{counts['tests']} lab tests inside the KVM lab: {counts}; "
                            f"{timing}total {result.total_s:.1f} s")
    assert counts["failures"] == counts["errors"] == counts["skipped"] == 0, text
    assert counts["tests"] >= MIN_LAB_TESTS, text
