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

from pyvmm import VM, CommandResult, Console, ConsoleEOF, ConsoleTimeout, GuestCommandError, VmTimeout
from pyvmm.api import PtyChild
from pyvmm.config import DiskConfig
from pyvmm.errors import ConfigError, VmmError


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
    (tmp_path / "root.img").write_bytes(bytes(4096))
    vm = VM.from_config(cfg, memory=1024, trace="virtio")
    assert vm.settings.kernel == str(tmp_path / "vmlinux") and vm.settings.memory == 1 << 30
    assert vm.settings.disks[0].path == str(tmp_path / "root.img") and vm.settings.disks[0].readonly
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


# -- memory sizes, missing files, what a failed wait tells ---------------------------------------------
def test_memory_integer_means_mib_like_the_cli_and_config_files(kernel: Path) -> None:
    assert VM(kernel, memory=512).settings.memory == 512 << 20
    assert VM(kernel, memory="512").settings.memory == 512 << 20  # as `--memory 512`
    assert VM(kernel, memory="1G").settings.memory == 1 << 30
    assert VM(kernel, memory="65536K").settings.memory == 64 << 20
    with pytest.raises(ConfigError, match="absurd"):
        VM(kernel, memory=512 << 20)  # bytes are no longer accepted as an integer: 512 Ti
    with pytest.raises(ConfigError, match="memory"):
        VM(kernel, memory=True)  # type: ignore[arg-type]


def test_vm_names_a_missing_file_before_starting(kernel: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    cases = [
        ({"kernel": tmp_path / "nope"}, "kernel", tmp_path / "nope"),
        ({"kernel": kernel, "initrd": tmp_path / "initrd.gz"}, "initrd", tmp_path / "initrd.gz"),
        ({"kernel": kernel, "disks": [str(disk), f"path={tmp_path}/gone.img,readonly=on"]}, "disk",
         tmp_path / "gone.img"),
        ({"kernel": kernel, "disks": [tmp_path / "gone2.img"]}, "disk", tmp_path / "gone2.img"),
        ({"kernel": tmp_path}, "kernel", tmp_path),  # a directory
    ]
    for kwargs, what, missing in cases:
        with pytest.raises(ConfigError) as info:
            VM(**kwargs)  # type: ignore[arg-type]
        message = str(info.value)
        assert message.startswith(what) and str(missing) in message and "\n" not in message, message
    vm = VM(kernel, disks=[disk, f"path={disk},snapshot=on", DiskConfig(disk, snapshot=True)])
    assert [d.snapshot for d in vm.settings.disks] == [False, True, True]


def test_console_errors_carry_the_exit_status_and_the_log(fake_pyvmm: Path, kernel: Path) -> None:
    with VM(kernel, memory=256, python=str(fake_pyvmm)) as vm:
        vm.console.wait_for_shell(timeout=20)
        with pytest.raises(ConsoleTimeout) as timeout:
            vm.run("sleep 5", timeout=0.5)
        assert timeout.value.status is None  # still running
        assert "pyvmm: kernel" in timeout.value.log_tail and "memory 256M" in timeout.value.log_tail
        assert "vm: running after" in str(timeout.value) and "pyvmm: kernel" in str(timeout.value)
        with pytest.raises(VmTimeout) as still:
            vm.wait(timeout=0.1)
        assert "pyvmm: kernel" in still.value.log_tail
        vm.console.sendline("echo bye >&2; exit 3")
        with pytest.raises(ConsoleEOF) as eof:
            vm.console.expect("never printed", timeout=20)
    assert eof.value.status == 3
    assert "pyvmm: kernel" in eof.value.log_tail and "bye" in eof.value.log_tail
    assert "exit status 3" in str(eof.value) and "pyvmm: kernel" in str(eof.value)


def test_console_errors_without_a_vm_have_no_status(shell: Console) -> None:
    with pytest.raises(ConsoleTimeout) as info:
        shell.expect("never printed", timeout=0.2)
    assert info.value.status is None and info.value.log_tail == ""
    assert "pyvmm log" not in str(info.value)


# -- VM.exec: one command, its status and its output ---------------------------------------------------
def test_vm_exec_returns_the_commands_status_and_output(fake_pyvmm: Path, kernel: Path) -> None:
    vm = VM(kernel, python=str(fake_pyvmm), name="exec")
    status, output = vm.exec("echo hello; echo world; exit 3", timeout=30)
    assert (status, output) == (3, "hello\nworld\n")
    assert vm.status == 35  # pyvmm's own status for "the guest reported 3"
    assert "PYVMM-EXEC: begin" in vm.console_text and "guest exited with status 3" in vm.log  # still readable
    assert VM(kernel, python=str(fake_pyvmm)).exec("printf 'no newline'", timeout=30) == (0, "no newline")
    assert VM(kernel, python=str(fake_pyvmm)).exec("exit 240", timeout=30).status == 240  # beyond 222: the log


def test_vm_exec_errors(fake_pyvmm: Path, kernel: Path) -> None:
    with pytest.raises(GuestCommandError, match="did not report a status") as info:
        VM(kernel, python=str(fake_pyvmm)).exec("PANIC", timeout=30)
    assert info.value.status == 3 and "Kernel panic" in str(info.value)
    with VM(kernel, python=str(fake_pyvmm)) as vm, pytest.raises(VmmError, match="not started"):
        vm.exec("true")
    with pytest.raises(ConfigError, match="needs a command"):
        VM(kernel, python=str(fake_pyvmm)).exec("  ")
    vm = VM(kernel, python=str(fake_pyvmm))
    with pytest.raises(VmTimeout):
        vm.exec("sleep 30", timeout=1)
    assert vm.status is not None and not vm.running  # stopped, and closed


def test_pty_child_close_stops_its_reader_first() -> None:
    # The other side stays open, so a reader blocked in read() would never return by itself.  close() must
    # stop the reader before the fd is closed: otherwise the fd number, reused by the next pipe this
    # process opens, would be read by the leftover thread (output stolen from an unrelated subprocess).
    import pty

    master, slave = pty.openpty()
    child = PtyChild(master)
    try:
        os.write(slave, b"hello\n")
        deadline = time.monotonic() + 5
        while "hello" not in child.transcript and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "hello" in child.transcript
        t0 = time.monotonic()
        child.close()
        assert time.monotonic() - t0 < 2 and not child._thread.is_alive()
        with pytest.raises(OSError):
            os.fstat(master)
        r, w = os.pipe()  # likely the old number again: nothing else may read it
        os.write(w, b"mine")
        assert os.read(r, 4) == b"mine"
        os.close(r)
        os.close(w)
        with pytest.raises(OSError):
            child.send("late")
        child.close()  # idempotent
    finally:
        os.close(slave)
