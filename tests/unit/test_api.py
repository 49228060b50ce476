"""The Python API without KVM: the console protocol against a local shell, and the VM lifecycle against a
fake ``pyvmm`` (a script that prints a boot banner and hands its terminal to ``sh``, as a guest would)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pexpect
import pytest

from pyvmm import VM, CommandResult, Console, ConsoleEOF, ConsoleTimeout, VmTimeout
from pyvmm.errors import ConfigError

FAKE_PYVMM = f"""\
#!{sys.executable}
# Stands in for `python -m pyvmm run --config FILE --console stdio`: stderr is pyvmm's log, the terminal
# is the guest console, a shell is the guest; SIGTERM ends it with pyvmm's status 6.
import os, signal, subprocess, sys, tomllib
args = sys.argv[1:]
assert args[:3] == ["-m", "pyvmm", "run"] and "--console" in args, args
with open(args[args.index("--config") + 1], "rb") as f:
    conf = tomllib.load(f)
print(f"pyvmm: kernel {{conf['kernel']}}, memory {{conf['memory']}}", file=sys.stderr, flush=True)
os.write(1, b"Linux version 6.1-fake\\r\\nRun /init as init process\\r\\n")
sh = subprocess.Popen(["sh"], env={{"PATH": os.environ.get("PATH", "/usr/bin:/bin")}})
def stop(*_):
    sh.kill()
    print("pyvmm: stopped by SIGTERM", file=sys.stderr, flush=True)
    os._exit(6)
signal.signal(signal.SIGTERM, stop)
sys.exit(sh.wait())
"""


@pytest.fixture
def fake_pyvmm(tmp_path: Path) -> Path:
    path = tmp_path / "fake-pyvmm"
    path.write_text(FAKE_PYVMM)
    path.chmod(0o755)
    return path


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"not really a kernel")
    return path


@pytest.fixture
def shell() -> Console:
    child = pexpect.spawn("sh", encoding="utf-8", env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PS1": "$ "})
    console = Console(child)
    console.wait_for_shell(timeout=20)
    yield console  # type: ignore[misc]
    child.close(force=True)


# -- the marker protocol, on a local shell in a pty (any pexpect child works) --------------------------
def test_run_returns_status_and_output(shell: Console) -> None:
    assert shell.run("echo hello; echo world") == CommandResult(0, "hello\nworld\n")
    assert shell.run("printf 'no newline'") == CommandResult(0, "no newline")
    assert shell.run("false") == CommandResult(1, "")
    assert shell.run("f() { echo out; return 42; }; f") == CommandResult(42, "out\n")
    assert shell.run("printf '\\n\\n'").output == "\n\n"


def test_run_is_not_fooled_by_marker_lookalikes(shell: Console) -> None:
    fake = "__PYVMM_RC_0123456789ab=7__"
    result = shell.run(f"echo {fake}; echo __PYVMM_BEGIN_x; echo done")
    assert result == CommandResult(0, f"{fake}\n__PYVMM_BEGIN_x\ndone\n")


def test_run_timeout_and_expect_timeout_show_the_tail(shell: Console) -> None:
    shell.run("echo marker-before-timeout")
    with pytest.raises(ConsoleTimeout, match="marker-before-timeout") as info:
        shell.run("sleep 5", timeout=0.5)
    assert "marker-before-timeout" in info.value.tail
    with pytest.raises(TimeoutError):  # ConsoleTimeout is a TimeoutError too
        shell.expect("never printed", timeout=0.2)


def test_send_doubles_the_escape_character() -> None:
    class Child:
        def __init__(self) -> None:
            self.sent: list[str] = []
            self.logfile_read: object = None

        def send(self, s: str) -> int:
            self.sent.append(s)
            return len(s)

    child = Child()
    Console(child, escape="\x01").send("a\x01b")
    Console(child).send("c\x01")
    assert child.sent == ["a\x01\x01b", "c\x01"]


# -- the VM lifecycle against a fake pyvmm ------------------------------------------------------------
def test_vm_lifecycle(fake_pyvmm: Path, kernel: Path) -> None:
    with VM(kernel, memory="256M", python=str(fake_pyvmm), name="fake") as vm:
        assert vm.running and vm.pid
        match = vm.console.expect(r"Linux version (\S+)\r\n")
        assert match.group(1) == "6.1-fake"
        vm.console.expect_exact("Run /init as init process")
        vm.console.wait_for_shell(timeout=20)
        assert vm.run("echo guest; uname -s") == CommandResult(0, f"guest\n{os.uname().sysname}\n")
        assert vm.run("exit_with() { return $1; }; exit_with 5").status == 5
        with pytest.raises(VmTimeout):
            vm.wait(timeout=0.2)
        assert vm.stop(grace=10) == 6  # SIGTERM: pyvmm's "stopped from the host"
        tmpdir = Path(vm.args[vm.args.index("--config") + 1]).parent
        assert tmpdir.is_dir()
    assert not tmpdir.exists()  # cleaned up
    assert vm.status == 6 and not vm.running
    assert f"pyvmm: kernel {kernel}, memory 256M" in vm.log and "stopped by SIGTERM" in vm.log
    assert "Linux version 6.1-fake" in vm.console_text and "__PYVMM_RC_" in vm.console_text
    assert "exit status 6 (STOPPED)" in vm.explain() and "__PYVMM_RC_" in vm.console_tail(2)


def test_vm_wait_returns_the_guests_status(fake_pyvmm: Path, kernel: Path) -> None:
    vm = VM(kernel, python=str(fake_pyvmm)).start()
    try:
        vm.console.wait_for_shell(timeout=20)
        vm.console.sendline("exit 3")
        assert vm.wait(timeout=20) == 3
        with pytest.raises(ConsoleEOF, match="closed"):
            vm.console.expect("anything more", timeout=5)
    finally:
        vm.close()
    vm.close()  # idempotent


def test_vm_validates_its_options_before_starting(kernel: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no kernel"):
        VM()
    with pytest.raises(ConfigError, match="bad size"):
        VM(kernel, memory="lots")
    with pytest.raises(ConfigError, match="bad trace selector"):
        VM(kernel, trace="virtio.everything")
    cfg = tmp_path / "vm.toml"
    cfg.write_text(textwrap.dedent("""\
        kernel = "vmlinux"
        memory = "128M"
        [[disk]]
        path = "root.img"
        readonly = true
    """))
    vm = VM.from_config(cfg, memory=1 << 30, trace="virtio")
    assert vm.settings.kernel == tmp_path / "vmlinux" and vm.settings.memory == 1 << 30
    assert vm.settings.disks[0].path == tmp_path / "root.img" and vm.settings.disks[0].readonly
    assert vm.settings.trace == ("virtio",) and vm.settings.console == "stdio"
    assert not vm.running and "not started" in vm.explain()


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie has ended (its new parent may not reap it at once)


def test_vm_process_ends_with_its_parent(fake_pyvmm: Path, kernel: Path) -> None:
    """A test run killed outright (no cleanup) leaves no VM behind: the child has a parent-death signal."""
    code = (f"import os; from pyvmm import VM; vm = VM({str(kernel)!r}, python={str(fake_pyvmm)!r}).start(); "
            "vm.console.expect('Run /init'); print(vm.pid, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    pid = int(out.stdout)
    deadline = time.monotonic() + 20
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(pid)
