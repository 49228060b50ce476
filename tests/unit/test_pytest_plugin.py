"""The pytest plugin: options, the ``vm_factory`` fixture, and the console tail in a failure report.

The inner test session runs a fake ``pyvmm`` (tests/unit/test_api.py's) instead of a real VM.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import kvm_unavailable_reason
from tests.unit.test_api import FAKE_PYVMM

pytest_plugins = ["pytester"]


def test_options_are_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(["*--pyvmm-kernel=PATH*", "*--pyvmm-initrd=PATH*", "*--pyvmm-disk=PATH*",
                                 "*--pyvmm-memory=SIZE*", "*--pyvmm-timeout=SECONDS*"])


def test_failure_report_has_the_console_tail(pytester: pytest.Pytester, tmp_path: Path) -> None:
    reason = kvm_unavailable_reason()  # vm_factory skips without /dev/kvm, even for a fake VM
    if reason:
        pytest.skip(reason)
    fake = tmp_path / "fake-pyvmm"
    fake.write_text(FAKE_PYVMM)
    fake.chmod(0o755)
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    pytester.makepyfile(test_inner=f"""
        def test_boots(vm_factory):
            vm = vm_factory(python={str(fake)!r}, memory="128M")
            vm.console.expect("Run /init")
            vm.console.wait_for_shell(timeout=20)
            assert vm.run("echo from-the-guest").output == "from-the-guest\\n"
            assert vm.run("echo second").status == 1, "deliberate failure"

        def test_passes(vm_factory):
            vm = vm_factory(python={str(fake)!r})
            vm.console.expect("Linux version")
    """)
    result = pytester.runpytest_subprocess(f"--pyvmm-kernel={kernel}", "--pyvmm-memory=64M")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*deliberate failure*",
        "*- pyvmm vm0 -*",
        "vm0: running after *",
        "--- pyvmm log ---",
        f"pyvmm: kernel {kernel}, memory 128M",
        "--- console tail ---",
        "*from-the-guest*",
    ])
    assert "pyvmm vm1" not in result.stdout.str()  # only a failing test gets the section
