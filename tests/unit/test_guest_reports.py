"""How the guest itself says how it ended: the pvpanic device, the guest exit device, the mapping of a
guest status to pyvmm's exit status, and ``--exec`` (the kernel argument, /init's parsing of it, the
output between the markers)."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest

from pyvmm.config import VmConfig
from pyvmm.devices.guestexit import MAGIC, REG_MAGIC, REG_STATUS, REG_VERSION, GuestExit
from pyvmm.devices.pvpanic import PVPANIC_CRASH_LOADED, PVPANIC_PANICKED, PvPanic, describe
from pyvmm.errors import ConfigError, LoaderError
from pyvmm.guestexec import EXEC64_KEY, EXEC_KEY, command_output, exec_arg
from pyvmm.loader.cmdline import Cmdline
from pyvmm.status import GUEST_STATUS_BASE, ExitStatus, guest_exit_code, guest_status_of
from pyvmm.vmm import VmResult

INIT = Path(__file__).resolve().parents[2] / "images" / "init.sh"


# -- pvpanic ------------------------------------------------------------------------------------------
def test_pvpanic_offers_both_events_and_reports_writes() -> None:
    seen: list[int] = []
    dev = PvPanic(seen.append)
    assert dev.read(0, 1) == PVPANIC_PANICKED | PVPANIC_CRASH_LOADED == 3  # include/uapi/misc/pvpanic.h
    assert dev.read(1, 1) == 0  # the reserved byte of the MMIO binding
    dev.write(0, 1, PVPANIC_PANICKED)
    dev.write(0, 1, PVPANIC_CRASH_LOADED | 0xF0)  # unknown bits are dropped
    dev.write(0, 1, 0xF0)  # nothing known: no event
    dev.write(1, 1, PVPANIC_PANICKED)  # reserved byte: ignored
    assert seen == [PVPANIC_PANICKED, PVPANIC_CRASH_LOADED]
    assert dev.events == 3
    assert describe(3) == "panicked, crash kernel loaded"


# -- the guest exit device ----------------------------------------------------------------------------
@pytest.mark.parametrize("console_first", [True, False])
def test_a_panic_verdict_names_every_report_of_it(console_first: bool) -> None:
    """Whichever stop comes first (the console's panic line or pvpanic's report, each after its grace), the
    reason names both; a reset after the panic keeps the panic as the verdict."""
    import contextlib

    from pyvmm.bus import Bus
    from pyvmm.console import ConsoleOutput
    from pyvmm.eventloop import EventLoop
    from pyvmm.vmm import ArchExitHandler, Vmm

    loop = EventLoop()
    console = ConsoleOutput(None, on_panic=lambda line: None)
    vmm = Vmm([], Bus("pio"), Bus("mmio"), loop, console, ArchExitHandler(), contextlib.ExitStack())
    try:
        console(b"[    1.25] Kernel panic - not syncing: VFS: Unable to mount root fs\n")
        vmm.note_panic("reported by pvpanic (panicked)")
        if console_first:
            vmm.request_stop(ExitStatus.GUEST_PANIC, "guest kernel panic: [    1.25] Kernel panic - not syncing: "
                                                     "VFS: Unable to mount root fs")
        else:
            vmm.request_stop(ExitStatus.OK, "guest reset (i8042)")
        result = vmm.result
        assert result is not None and result.status == ExitStatus.GUEST_PANIC
        assert "Kernel panic - not syncing" in result.reason and "reported by pvpanic (panicked)" in result.reason
    finally:
        loop.close()


def test_guest_exit_registers() -> None:
    statuses: list[int] = []
    dev = GuestExit(statuses.append)
    assert dev.read(REG_MAGIC, 4) == MAGIC == int.from_bytes(b"pyex", "little")
    assert dev.read(REG_MAGIC, 1) == ord("p") and dev.read(REG_MAGIC, 2) == int.from_bytes(b"py", "little")
    assert dev.read(REG_VERSION, 4) == 1
    assert dev.read(REG_STATUS, 4) == 0 and dev.read(0x100, 4) == 0
    dev.write(0x0, 4, 5)  # not the status register: ignored
    dev.write(REG_STATUS, 4, 7)
    dev.write(REG_STATUS, 4, 0x1_2C)  # the low 8 bits, like exit(3): 300 -> 44
    dev.write(REG_STATUS, 1, 0)
    assert statuses == [7, 44, 0]


# -- exit statuses ------------------------------------------------------------------------------------
def test_a_guest_status_never_looks_like_one_of_pyvmms() -> None:
    own = {int(s) for s in ExitStatus}
    assert max(own) < GUEST_STATUS_BASE
    assert guest_exit_code(0) == 0  # "all is well" on both sides
    for n in range(1, 256):
        code = guest_exit_code(n)
        assert code not in own and GUEST_STATUS_BASE < code <= 255
        assert guest_status_of(code) == (n if code < 255 else None)
    assert [guest_exit_code(n) for n in (1, 3, 222, 223, 255)] == [33, 35, 254, 255, 255]
    with pytest.raises(ValueError):
        guest_exit_code(256)


def test_result_exit_code() -> None:
    assert VmResult(ExitStatus.OK, "x", guest_status=7).exit_code == 39
    assert VmResult(ExitStatus.OK, "x", guest_status=0).exit_code == 0
    assert VmResult(ExitStatus.OK, "x").exit_code == 0
    assert VmResult(ExitStatus.TIMEOUT, "x").exit_code == 5


# -- --exec: the kernel argument ----------------------------------------------------------------------
@pytest.mark.parametrize(("cmd", "key"), [
    ("uname -r", EXEC_KEY),
    ("true", EXEC_KEY),
    ("echo 'single quotes' $HOME | wc -c; exit 3", EXEC_KEY),
    ('echo "double"', EXEC64_KEY),
    ("printf 'a\\nb'\necho two lines", EXEC64_KEY),
    ("echo é", EXEC64_KEY),
])
def test_exec_arg(cmd: str, key: str) -> None:
    k, value = exec_arg(cmd)
    assert k == key
    if key == EXEC64_KEY:
        assert base64.b64decode(value).decode() == cmd and value.isascii() and " " not in value
    else:
        assert value == cmd
    line = Cmdline(2047)
    line.add(k, value)  # representable on a kernel command line
    assert str(line) in (f'{key}="{value}"', f"{key}={value}")


@pytest.mark.parametrize("cmd", ["", "   ", "a\0b"])
def test_exec_refuses_what_cannot_run(cmd: str) -> None:
    with pytest.raises(ConfigError):
        exec_arg(cmd)
    with pytest.raises(ConfigError):
        VmConfig(kernel=Path("/k"), exec_cmd=cmd)


def test_a_command_too_long_for_the_command_line_is_one_error() -> None:
    with pytest.raises(LoaderError, match="limit"):
        Cmdline(2047).add(*exec_arg("x" * 3000))


def test_command_output_between_the_markers() -> None:
    def console(output: str, status: int = 0) -> str:
        text = f"[ 1.0] Run /init\nPYVMM-INIT: done\nPYVMM-EXEC: begin\n{output}\nPYVMM-EXEC: end {status}\n"
        return text.replace("\n", "\r\n")

    assert command_output(console("6.1.0\n")) == "6.1.0\n"
    assert command_output(console("no newline")) == "no newline"
    assert command_output(console("")) == ""
    assert command_output(console("a\n\nPYVMM-EXEC: end 9 (in the output)\nb\n")) == \
        "a\n\nPYVMM-EXEC: end 9 (in the output)\nb\n"
    assert command_output("PYVMM-EXEC: begin\r\npartial") == "partial"  # the guest died meanwhile
    assert command_output("no command ran\n") is None


# -- --exec: what images/init.sh makes of the command line ---------------------------------------------
SH = shutil.which("busybox") or shutil.which("sh")


def _init_parse(cmdline: str) -> str | None:
    """Run init.sh's own parsing of the command line (the lines from ``cmdline=`` to the ``esac`` that
    ends it) under busybox sh, with ``cmdline`` in place of /proc/cmdline."""
    text = INIT.read_text()
    start = text.index('cmdline=" $(cat /proc/cmdline)"')
    end = text.index("esac", text.index('case "$cmdline" in', start)) + len("esac")
    script = text[start:end].replace("$(cat /proc/cmdline)", '$PYVMM_TEST_CMDLINE')
    script += '\nif [ -n "$exec_given" ]; then printf "%s" "$exec_cmd"; else printf "<none>"; fi\n'
    assert SH is not None
    args = [SH, "sh", "-c", script] if SH.endswith("busybox") else [SH, "-c", script]
    proc = subprocess.run(args, env={"PYVMM_TEST_CMDLINE": cmdline, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and not proc.stderr, (args[0], cmdline, proc)
    return None if proc.stdout == "<none>" else proc.stdout


@pytest.mark.skipif(SH is None, reason="no sh")
@pytest.mark.parametrize("cmd", [
    "uname -r", "true", "echo 'x y' | wc -c; exit 3", 'echo "double quoted"', "printf 'a\\nb'\nexit 4",
    "echo é",
])
def test_init_reads_back_what_exec_arg_wrote(cmd: str) -> None:
    line = Cmdline(2047).extend("console=ttyS0 root=/dev/vda")
    line.add(*exec_arg(cmd)).add("reboot", "k")
    assert _init_parse(str(line)) == cmd, str(line)


@pytest.mark.skipif(SH is None, reason="no sh")
def test_init_without_exec_and_with_a_hand_written_one() -> None:
    assert _init_parse("console=ttyS0 pyvmm.shell=1") is None
    assert _init_parse("console=ttyS0 xpyvmm.exec=nope") is None
    assert _init_parse('console=ttyS0 pyvmm.exec="ls -l /" quiet') == "ls -l /"
    assert _init_parse("pyvmm.exec=true") == "true"


def test_a_guest_writing_pvpanic_in_a_loop_cannot_flood_the_log(caplog: pytest.LogCaptureFixture,
                                                               tmp_path: Path) -> None:
    """With --no-panic-exit each report is only a log line: a guest that repeats it gets the first few and
    then every power of two, with the running count."""
    from pyvmm.buildparts import VmLink, make_guest_reports

    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"x")
    pvpanic, _ = make_guest_reports(VmConfig(kernel=kernel, panic_exit=False), VmLink())
    with caplog.at_level("WARNING"):
        for _ in range(1000):
            pvpanic.write(0, 1, PVPANIC_PANICKED)
    lines = [r.getMessage() for r in caplog.records if "pvpanic" in r.getMessage()]
    assert 8 <= len(lines) <= 8 + 7  # 1..8, then 16, 32, ..., 512
    assert lines[-1].endswith("(512 reports so far)")
