"""Run the ``lab`` tier inside the KVM lab, once per pytest session, on a host that needs the lab.

Not marked ``lab`` itself: it runs on the host, starts ``python -m pyvmm.lab run -- python -m pytest -m lab
tests/lab`` and passes when every lab test passed in there (none skipped).  On a hardware-KVM host, or
inside the lab, it skips: the ``lab`` tests run directly there.

Its bounds come from the inner tests' own (tier.py): the lab run's timeout is their sum plus the lab's
start-up, and a watchdog stops the lab early when one inner test runs past its bound (its own
pytest-timeout inside should have ended it) or nothing happens for too long.  The inner run's per-test
results are echoed to this run's terminal as they come, and its durations go to the terminal summary.
"""

from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pyvmm.lab import LabOptions, run
from tests.lab import tier
from tests.lab.conftest import LAB_TIER_SUMMARY, TIER_PLAN, tier_skip_reason

MIN_LAB_TESTS = 3
TAIL_LINES = 80  # of the inner output, in a failure message (all of it is in inner-output.txt)


def test_lab_tier(images: Path, tmp_path: Path, request: pytest.FixtureRequest,
                  capsys: pytest.CaptureFixture[str]) -> None:
    reason = tier_skip_reason()
    if reason:
        pytest.skip(reason)
    # Made by conftest.py before this test's pytest-timeout started (its bound comes from the plan).
    plan = request.node.stash.get(TIER_PLAN, None)
    if isinstance(plan, Exception):
        pytest.fail(str(plan))
    if plan is None:
        plan = tier.plan()
    assert len(plan.bounds) >= MIN_LAB_TESTS, f"only {len(plan.bounds)} lab tests selected: {plan.bounds}"

    reporter = request.config.pluginmanager.get_plugin("terminalreporter")

    def echo(line: str) -> None:
        with capsys.disabled():  # live on the terminal, with or without -s
            if reporter is not None:
                reporter.write_line(f"  {line}")
                reporter.flush()
            else:
                print(f"  {line}", file=sys.__stdout__, flush=True)

    echo(f"KVM lab tier: {len(plan.bounds)} lab tests inside one lab run, bounds "
         f"{sum(plan.bounds.values()):g} s + lab start {tier.LAB_START_S:g} s -> lab timeout "
         f"{plan.lab_timeout_s:g} s")
    scratch = tmp_path / "scratch"
    junit = scratch / "junit.xml"
    command = [sys.executable, "-m", "pytest", *tier.INNER_SELECTION, "-q", "-rfEs", "--color=no",
               "-o", "console_output_style=classic", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    inner = tier.InnerRun(plan, echo)
    all_output = tmp_path / "inner-output.txt"

    def details() -> str:
        return (f"{inner.where()}\n--- inner pytest output, last {TAIL_LINES} lines (all: {all_output}) ---\n"
                f"{inner.tail(TAIL_LINES)}")

    own_timeout = None
    try:
        result = run(LabOptions(command=command, cwd=tier.ROOT, scratch=scratch, timeout=plan.lab_timeout_s,
                                env={**os.environ, tier.PROGRESS_ENV: "1"}),
                     out=inner.feed, watchdog=inner.watchdog)
    except pytest.fail.Exception as err:  # this test's own pytest-timeout; the runner has stopped QEMU
        own_timeout = str(err)
    finally:
        inner.finish()
        all_output.write_text("\n".join(inner.lines) + "\n")
    headline = len(LAB_TIER_SUMMARY)
    if own_timeout is None:
        timing = (f"lab boot {result.boot_s:.1f} s, tests {result.command_s:.1f} s, "
                  if result.boot_s is not None else "")
        timing += f"total {result.total_s:.1f} s"
    else:
        timing = "stopped by this test's own timeout"
    LAB_TIER_SUMMARY.append(f"{len(inner.finished)} of {len(plan.bounds)} lab tests ran inside the KVM lab; "
                            f"{timing} (lab timeout {plan.lab_timeout_s:g} s)")
    if inner.finished or inner.running:
        LAB_TIER_SUMMARY.append("slowest lab tests inside the lab (setup + call + teardown):")
        LAB_TIER_SUMMARY.extend(inner.durations())
    if own_timeout is not None:
        pytest.fail(f"{own_timeout}\n{details()}", pytrace=False)
    if result.status != 0:
        pytest.fail(f"lab run: exit status {result.status} {result.reason}\n{details()}\n"
                    f"--- lab console before the command ---\n{result.boot_log[-1500:]}", pytrace=False)
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    LAB_TIER_SUMMARY[headline] += f"; junit {counts}"
    not_passed = [f"{t.nodeid} {t.outcome} in {t.seconds or 0:.1f} s" for t in inner.finished
                  if t.outcome != "passed"]
    if counts["failures"] or counts["errors"] or counts["skipped"]:
        pytest.fail(f"inner lab tests not passed: {', '.join(not_passed)}\n{details()}", pytrace=False)
    if counts["tests"] < MIN_LAB_TESTS:
        pytest.fail(f"only {counts['tests']} lab tests ran inside the lab\n{details()}", pytrace=False)
