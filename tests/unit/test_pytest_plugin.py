"""The pytest plugin: its settings (command line, environment, ini file), the rootdir trap of a path given
after a space, ``--pyvmm-require``, the log directory, ``booted_vm_session``, the console tail in a failure
report, and runs under pytest-xdist.

The inner test sessions run a fake ``pyvmm`` (tests/unit/conftest.py's) instead of a real VM: nothing
boots.  A run whose inner conftest replaces the plugin's ``VM`` (to use the fake everywhere) runs in a
subprocess, so the replacement cannot leak into this process.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.conftest import kvm_unavailable_reason

pytest_plugins = ["pytester"]

# What the plugin reads from the environment (and what changes the inner runs' behaviour): cleared for every
# test, so a developer's own settings cannot leak into the inner sessions.
PLUGIN_ENV = ("PYVMM_KERNEL", "PYVMM_INITRD", "PYVMM_DISK", "PYVMM_MEMORY", "PYVMM_TIMEOUT", "PYVMM_REQUIRE",
              "PYVMM_LOG_DIR", "PYVMM_IN_LAB", "PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER")

SHOW_IMAGES = """
    import dataclasses, json

    def test_show(pyvmm_images):
        fields = {k: None if v is None else str(v) for k, v in dataclasses.asdict(pyvmm_images).items()}
        print("IMAGES " + json.dumps(fields))
"""

NO_KERNEL = "no kernel: pass --pyvmm-kernel or build the default guest (make images)"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PLUGIN_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def needs_kvm() -> None:
    reason = kvm_unavailable_reason()  # vm_factory skips without /dev/kvm, even for a fake VM
    if reason:
        pytest.skip(reason)


def images_of(result: pytest.RunResult) -> dict[str, str | None]:
    """What the inner ``test_show`` printed (the run needs ``-s``)."""
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    for line in result.outlines:
        if "IMAGES " in line:  # after the test file's name
            fields: dict[str, str | None] = json.loads(line.partition("IMAGES ")[2])
            return fields
    raise AssertionError(f"no IMAGES line in\n{result.stdout.str()}")


def test_options_are_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(["*--pyvmm-kernel=PATH*", "*--pyvmm-initrd=PATH*", "*--pyvmm-disk=PATH*",
                                 "*--pyvmm-memory=SIZE*", "*--pyvmm-timeout=SECONDS*", "*--pyvmm-require*",
                                 "*--pyvmm-log-dir=DIR*"])
    for ini in ("pyvmm_kernel", "pyvmm_initrd", "pyvmm_disk", "pyvmm_memory", "pyvmm_timeout", "pyvmm_require",
                "pyvmm_log_dir"):
        result.stdout.fnmatch_lines([f"  {ini} (*"])


def test_command_line_beats_environment_beats_ini_beats_default(pytester: pytest.Pytester,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # pytest.ini at the project root, the tests (and the working directory) one level down: a relative
    # path in the ini file is relative to the ini file, one on the command line or in the environment to
    # the working directory.
    root = pytester.path
    sub = root / "sub"
    sub.mkdir()
    (root / "images" / "out").mkdir(parents=True)
    for path in (root / "images/out/vmlinux", root / "ini-vmlinux", sub / "env-vmlinux", sub / "cli-vmlinux"):
        path.write_bytes(b"k")
    (sub / "test_show.py").write_text(textwrap.dedent(SHOW_IMAGES))
    monkeypatch.chdir(sub)

    def run(*args: str) -> dict[str, str | None]:
        return images_of(pytester.runpytest("-s", "test_show.py", *args))

    (root / "pytest.ini").write_text("[pytest]\n")
    default = run()
    assert (default["kernel"], default["memory"], default["timeout"]) == (str(root / "images/out/vmlinux"),
                                                                          "256M", "600.0")
    assert (default["require"], default["log_dir"]) == ("False", None)

    (root / "pytest.ini").write_text("[pytest]\npyvmm_kernel = ini-vmlinux\npyvmm_memory = 128M\n"
                                     "pyvmm_timeout = 30\npyvmm_log_dir = ini-logs\n")
    ini = run()
    assert (ini["kernel"], ini["memory"], ini["timeout"]) == (str(root / "ini-vmlinux"), "128M", "30.0")
    assert ini["log_dir"] == str(root / "ini-logs")

    monkeypatch.setenv("PYVMM_KERNEL", "env-vmlinux")
    monkeypatch.setenv("PYVMM_MEMORY", "192M")
    monkeypatch.setenv("PYVMM_TIMEOUT", "40")
    monkeypatch.setenv("PYVMM_LOG_DIR", "env-logs")
    env = run()
    assert (env["kernel"], env["memory"], env["timeout"]) == (str(sub / "env-vmlinux"), "192M", "40.0")
    assert env["log_dir"] == str(sub / "env-logs")

    cli = run("--pyvmm-kernel=cli-vmlinux", "--pyvmm-memory=64M", "--pyvmm-timeout=50",
              "--pyvmm-log-dir=cli-logs")
    assert (cli["kernel"], cli["memory"], cli["timeout"]) == (str(sub / "cli-vmlinux"), "64M", "50.0")
    assert cli["log_dir"] == str(sub / "cli-logs")


def test_pyproject_ini_options_are_read(pytester: pytest.Pytester) -> None:
    (pytester.path / "vmlinux").write_bytes(b"k")
    pytester.makepyprojecttoml('[tool.pytest.ini_options]\npyvmm_kernel = "vmlinux"\npyvmm_require = "true"\n')
    pytester.makepyfile(SHOW_IMAGES)
    shown = images_of(pytester.runpytest("-s"))
    assert (shown["kernel"], shown["require"]) == (str(pytester.path / "vmlinux"), "True")


@pytest.mark.parametrize("args", [["--pyvmm-kernel", "/etc/passwd"], ["--pyvmm-log-dir", "/etc"]])
def test_a_path_after_a_space_must_not_move_the_rootdir(pytester: pytest.Pytester, args: list[str]) -> None:
    # pytest chooses its rootdir (and ini file) before it loads plugins, so it takes the value of an
    # option it does not know yet for a test path: the plugin refuses the run instead of using a wrong
    # rootdir and ignoring the project's ini file.
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(SHOW_IMAGES)
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: pyvmm: write {args[0]}={args[1]} (with '='): *rootdir*"])

    result = pytester.runpytest("-s", "=".join(args))  # the same option with '=': the project's rootdir
    result.stdout.fnmatch_lines([f"rootdir: {pytester.path}", "configfile: tox.ini"])
    assert result.ret == 0


def test_a_path_after_a_space_in_pytest_addopts_is_refused_too(pytester: pytest.Pytester,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(SHOW_IMAGES)
    monkeypatch.setenv("PYTEST_ADDOPTS", "--pyvmm-disk /etc/passwd")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: pyvmm: write --pyvmm-disk=/etc/passwd (with '='): *"])


def test_a_value_after_a_space_that_is_no_path_is_fine(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(SHOW_IMAGES)
    shown = images_of(pytester.runpytest("-s", "--pyvmm-memory", "128M", "--pyvmm-timeout", "20"))
    assert (shown["memory"], shown["timeout"]) == ("128M", "20.0")


@pytest.mark.parametrize("how", ["option", "env", "ini"])
def test_an_explicit_path_that_does_not_exist_is_a_usage_error(pytester: pytest.Pytester,
                                                               monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    pytester.makepyfile(SHOW_IMAGES)
    args = []
    if how == "option":
        args, source = ["--pyvmm-disk=no/such.img"], "--pyvmm-disk"
    elif how == "env":
        monkeypatch.setenv("PYVMM_DISK", "no/such.img")
        source = "PYVMM_DISK"
    else:
        pytester.makeini("[pytest]\npyvmm_disk = no/such.img\n")
        source = "pyvmm_disk in *tox.ini"
    result = pytester.runpytest(*args)  # with or without --pyvmm-require
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: pyvmm: disk image {pytester.path / 'no/such.img'} ({source}): "
                                 "no such file"])
    assert "Traceback" not in result.stderr.str()


def test_bad_values_are_usage_errors(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(SHOW_IMAGES)
    (pytester.path / "adir").mkdir()
    for env, value, message in [
        ("PYVMM_KERNEL", "adir", f"ERROR: pyvmm: kernel {pytester.path / 'adir'} (PYVMM_KERNEL) is a directory"),
        ("PYVMM_TIMEOUT", "soon", "ERROR: pyvmm: bad timeout 'soon' (PYVMM_TIMEOUT): *"),
        ("PYVMM_MEMORY", "lots", "ERROR: pyvmm: bad memory 'lots' (PYVMM_MEMORY): *"),
        ("PYVMM_REQUIRE", "maybe", "ERROR: pyvmm: bad require 'maybe' (PYVMM_REQUIRE): *"),
    ]:
        with monkeypatch.context() as env_now:
            env_now.setenv(env, value)
            result = pytester.runpytest()
        assert result.ret == pytest.ExitCode.USAGE_ERROR, env
        result.stderr.fnmatch_lines([message])


def test_require_turns_the_plugins_skips_into_failures(pytester: pytest.Pytester,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile("""
        def test_vm(vm_factory):
            vm_factory()
    """)
    kvm_reason = kvm_unavailable_reason()
    # Without /dev/kvm the fixture skips (an error at setup under require), else the missing kernel does
    # (a failure of the test itself).
    reason, failed = ("/dev/kvm*", "errors") if kvm_reason else (NO_KERNEL, "failed")

    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines([f"SKIPPED * {reason}"])

    def assert_fails(result: pytest.RunResult) -> None:
        result.assert_outcomes(**{failed: 1})
        result.stdout.fnmatch_lines([f"*{reason}*"])

    assert_fails(pytester.runpytest("--pyvmm-require"))
    monkeypatch.setenv("PYVMM_REQUIRE", "1")
    assert_fails(pytester.runpytest())
    monkeypatch.delenv("PYVMM_REQUIRE")
    pytester.makeini("[pytest]\npyvmm_require = true\n")
    assert_fails(pytester.runpytest())
    monkeypatch.setenv("PYVMM_REQUIRE", "0")  # the environment beats the ini file
    pytester.runpytest().assert_outcomes(skipped=1)


@pytest.mark.usefixtures("needs_kvm")
def test_log_dir_keeps_each_vms_console_and_log(pytester: pytest.Pytester, fake_pyvmm: Path) -> None:
    kernel = pytester.path / "vmlinux"
    kernel.write_bytes(b"k")
    pytester.makepyfile(test_logs=f"""
        import pytest

        @pytest.mark.parametrize("word", ["a/b"])
        def test_two_vms(vm_factory, word):
            for n in range(2):
                vm = vm_factory(python={str(fake_pyvmm)!r})
                vm.console.wait_for_shell(timeout=20)
                assert vm.run(f"echo console-of-{{n}}").status == 0

        def test_not_started(vm_factory):
            vm_factory(python={str(fake_pyvmm)!r}, start=False)
    """)
    result = pytester.runpytest(f"--pyvmm-kernel={kernel}", "--pyvmm-log-dir=logs/ci")
    result.assert_outcomes(passed=2)
    logs = pytester.path / "logs" / "ci"
    stem = "test_logs.py_test_two_vms_a_b"
    assert sorted(p.name for p in logs.iterdir()) == [
        f"{stem}.vm0.console.log", f"{stem}.vm0.pyvmm.log", f"{stem}.vm1.console.log", f"{stem}.vm1.pyvmm.log"]
    for n in (0, 1):
        assert f"console-of-{n}" in (logs / f"{stem}.vm{n}.console.log").read_text()
        assert f"pyvmm: kernel {kernel}" in (logs / f"{stem}.vm{n}.pyvmm.log").read_text()
    assert "console-of-1" not in (logs / f"{stem}.vm0.console.log").read_text()


# The inner conftest of the runs below: every VM the plugin makes runs the fake pyvmm.
FAKE_EVERYWHERE = """
    import functools
    import pyvmm.pytest_plugin

    pyvmm.pytest_plugin.VM = functools.partial(pyvmm.pytest_plugin.VM, python={fake!r})
"""


@pytest.fixture
def fake_guest(pytester: pytest.Pytester, fake_pyvmm: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """An inner project whose VMs are the fake; returns the options naming its kernel and initrd."""
    pytester.makeconftest(FAKE_EVERYWHERE.format(fake=str(fake_pyvmm)))
    for name in ("vmlinux", "initrd.img"):
        (pytester.path / name).write_bytes(b"k")
    monkeypatch.setenv("PYVMM_IN_LAB", "1")  # booted_vm* would skip on a software KVM host
    return ["--pyvmm-kernel=vmlinux", "--pyvmm-initrd=initrd.img"]


@pytest.mark.usefixtures("needs_kvm")
def test_booted_vm_session_is_one_guest_for_the_session(pytester: pytest.Pytester, fake_guest: list[str]) -> None:
    pytester.makepyfile(test_session="""
        def test_one(booted_vm_session):
            assert booted_vm_session.run("echo one").output == "one\\n"
            print("PID", booted_vm_session.pid)

        def test_two(booted_vm_session):
            print("PID", booted_vm_session.pid)
            assert booted_vm_session.run("echo two").status == 1, "deliberate failure"
    """)
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider", "--pyvmm-log-dir=logs", *fake_guest)
    result.assert_outcomes(passed=1, failed=1)
    pids = {line.partition("PID ")[2] for line in result.outlines if "PID " in line}
    assert len(pids) == 1, pids
    result.stdout.fnmatch_lines(["*- pyvmm session -*", "--- console tail ---", "*one*"])
    console = (pytester.path / "logs" / "booted_vm_session.session.console.log").read_text()
    assert "one" in console and "two" in console


@pytest.mark.usefixtures("needs_kvm")
def test_under_xdist_every_worker_has_its_own_vms_and_logs(pytester: pytest.Pytester, fake_guest: list[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile(test_xdist="""
        import os
        import pytest

        @pytest.mark.parametrize("n", [1, 2])
        def test_vm(vm_factory, booted_vm_session, n):
            worker = os.environ["PYTEST_XDIST_WORKER"]
            vm = vm_factory()
            vm.console.wait_for_shell(timeout=20)
            assert vm.run(f"echo test-{n}-on-{worker}").status == 0
            assert booted_vm_session.run(f"echo session-{n}-on-{worker}").status == 0
    """, test_plain="""
        def test_a(vm_factory):
            vm_factory()

        def test_b(vm_factory):
            vm_factory()
    """)
    monkeypatch.setenv("PYVMM_LOG_DIR", "logs")  # each worker reads the environment itself
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", "test_xdist.py", *fake_guest)
    result.assert_outcomes(passed=2)
    logs = pytester.path / "logs"
    tests = [(logs / f"test_xdist.py_test_vm_{n}.vm0.console.log").read_text() for n in (1, 2)]
    workers = []
    for n, console in zip((1, 2), tests, strict=True):
        [worker] = [w for w in ("gw0", "gw1") if f"test-{n}-on-{w}" in console]
        workers.append(worker)
        session = (logs / f"booted_vm_session-{worker}.session.console.log").read_text()
        assert f"session-{n}-on-{worker}" in session
        assert f"session-{3 - n}" not in session  # the other worker's guest
    assert sorted(workers) == ["gw0", "gw1"]

    # No images: a skip each, or with PYVMM_REQUIRE=1 a failure each, with the same reason.
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", "-rs", "test_plain.py")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines([f"SKIPPED * {NO_KERNEL}"])
    monkeypatch.setenv("PYVMM_REQUIRE", "1")
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", "test_plain.py")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([f"*{NO_KERNEL}*"])

    # A typo'd path is one usage error, before any worker starts.
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", "--pyvmm-kernel=vmlinxu",
                                           "test_plain.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: pyvmm: kernel {pytester.path / 'vmlinxu'} (--pyvmm-kernel): no such file"])


@pytest.mark.usefixtures("needs_kvm")
def test_failure_report_has_the_console_tail(pytester: pytest.Pytester, fake_pyvmm: Path, tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    pytester.makepyfile(test_inner=f"""
        def test_boots(vm_factory):
            vm = vm_factory(python={str(fake_pyvmm)!r}, memory="128M")
            vm.console.expect("Run /init")
            vm.console.wait_for_shell(timeout=20)
            assert vm.run("echo from-the-guest").output == "from-the-guest\\n"
            assert vm.run("echo second").status == 1, "deliberate failure"

        def test_passes(vm_factory):
            vm = vm_factory(python={str(fake_pyvmm)!r})
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
