"""The config file: every CLI option has a key, round trips, CLI flags override, errors name the key."""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import tomllib
from pathlib import Path
from typing import cast
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm import cli
from pyvmm.config import DiskConfig
from pyvmm.configfile import FIELD_NAMES, FILE_KEYS, RunSettings, format_size, load_file, resolve
from pyvmm.errors import ConfigError
from pyvmm.record import replace

FULL = """\
kernel = "k/vmlinux"
initrd = "/abs/initrd.gz"
cmdline = "console=ttyS0 root=/dev/vda rw"
memory = "1G"
cpus = 1
console = "file:console.log"
boot = "guest"
workarounds = "off"
timeout = 200
panic-exit = false
trace = ["virtio.notify", "virtio.irq"]
trace-file = "trace.txt"
verbose = 2
quiet = true

[[disk]]
path = "root.img"

[[disk]]
path = "data.img"
readonly = true
serial = "data0"
cache = "none"
discard = false

[[disk]]
path = "base.img"
snapshot = true
"""


def _write(tmp: Path, text: str, name: str = "vm.toml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def _run_parser() -> argparse.ArgumentParser:
    sub = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["run"]


def test_every_run_option_has_a_config_key() -> None:
    dests = {a.dest for a in _run_parser()._actions} - {"help", "config"}
    assert dests == FIELD_NAMES == set(FILE_KEYS.values())
    # and the key is the long option's name
    for action in _run_parser()._actions:
        if action.dest in FIELD_NAMES:
            key = next(k for k, v in FILE_KEYS.items() if v == action.dest)
            assert f"--{key}" in action.option_strings, (key, action.option_strings)


def test_file_values_and_relative_paths(tmp_path: Path) -> None:
    s = resolve(_write(tmp_path, FULL), {})
    assert s == RunSettings(
        kernel=tmp_path / "k/vmlinux", initrd=Path("/abs/initrd.gz"), cmdline="console=ttyS0 root=/dev/vda rw",
        memory=1 << 30, cpus=1, console=f"file:{tmp_path}/console.log", boot="guest", workarounds="off",
        timeout=200.0, panic_exit=False, trace=("virtio.notify", "virtio.irq"), trace_file=tmp_path / "trace.txt",
        verbose=2, quiet=True,
        disks=(DiskConfig(tmp_path / "root.img"),
               DiskConfig(tmp_path / "data.img", readonly=True, serial="data0", cache="none", discard=False),
               DiskConfig(tmp_path / "base.img", snapshot=True)),
    )
    vm = s.vm_config()
    assert vm.panic_exit is False and vm.trace == {"notify", "irq"} and vm.memory == 1 << 30


def test_round_trip(tmp_path: Path) -> None:
    original = resolve(_write(tmp_path, FULL), {})
    text = original.to_toml(header="test")
    elsewhere = tmp_path / "other" / "dir"
    elsewhere.mkdir(parents=True)
    assert resolve(_write(elsewhere, text), {}) == original  # absolute paths: loads the same anywhere
    defaults = RunSettings(kernel=Path("/k"))
    assert resolve(_write(elsewhere, defaults.to_toml(), "d.toml"), {}) == defaults


def test_flags_override_the_file(tmp_path: Path) -> None:
    cfg = _write(tmp_path, FULL)
    s = resolve(cfg, {"memory": "256M", "panic_exit": True, "trace": ["none"], "disks": ["path=/x.img,ro=on"],
                      "kernel": Path("bz")})
    assert s.memory == 256 << 20 and s.panic_exit and s.trace == () and s.kernel == "bz"
    assert s.disks == (DiskConfig(Path("/x.img"), readonly=True),)  # --disk replaces the file's list
    assert s.cmdline == "console=ttyS0 root=/dev/vda rw"  # untouched keys keep the file's value
    assert s.vm_config().trace == frozenset()


def test_disk_as_spec_string_and_memory_as_mib(tmp_path: Path) -> None:
    s = resolve(_write(tmp_path, 'kernel = "/k"\nmemory = 384\ndisk = ["path=a.img,readonly=on", "b.img,snapshot=on"]\n'),
                {})
    assert s.memory == 384 << 20
    assert s.disks == (DiskConfig(tmp_path / "a.img", readonly=True), DiskConfig(tmp_path / "b.img", snapshot=True))


@pytest.mark.parametrize(("text", "message"), [
    ("kernal = '/k'", "unknown key 'kernel'|unknown key 'kernal'"),
    ("trace_file = 't'", "did you mean 'trace-file'"),
    ("memory = 'lots'", "bad size"),
    ("cpus = 'two'", "cpus = 'two': expected a non-negative integer"),
    ("timeout = -1", "timeout = -1: expected a positive number"),
    ("panic-exit = 'no'", "expected true or false"),
    ("trace = 'virtio.nope'", "bad trace selector"),
    ("[[disk]]\nreadonly = true", "has no path="),
    ("[[disk]]\npath = 'a'\ncolour = 'red'", "unknown --disk key"),
    ("[[disk]]\npath = 'a'\nreadonly = 'yes'", r"disk\[0\]\.readonly = 'yes': expected true or false"),
    ("[[disk]]\npath = 'a'\nsnapshot = 'on'", r"disk\[0\]\.snapshot = 'on': expected true or false"),
    # the checks `pyvmm run` makes are made when the file is read, naming the key
    ("cpus = 100", r"vm\.toml: cpus: bad cpu count 100: expected 1\.\.64"),
    ("cpus = 0", "bad cpu count 0"),
    ("boot = 'uefi'", "vm.toml: boot: bad boot mode 'uefi'"),
    ("workarounds = 'maybe'", "workarounds: bad workarounds mode"),
    ("devices-via = 'pci'", "devices-via: bad devices-via"),
    ("timeout = nan", "expected a positive number"),
    ("console = 'file:'", "vm.toml: console: .*needs a path"),
    ("console = 'tcp:1'", "vm.toml: console: bad console"),
    ("kernel = ", "not valid TOML"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_file(_write(tmp_path, text + "\n"))


def test_missing_file_and_missing_kernel(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_file(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="no kernel"):
        resolve(None, {}).vm_config()


def test_format_size() -> None:
    assert [format_size(n) for n in (512 << 20, 2 << 30, 1536 << 20, 4096 + 1024, 1000)] == [
        "512M", "2G", "1536M", "5K", "1000B"]


def _pyvmm(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, check=False)


def test_config_print_shows_the_effective_configuration(tmp_path: Path) -> None:
    cfg = _write(tmp_path, textwrap.dedent("""\
        kernel = "vmlinux"
        memory = "1G"
        trace = "virtio"
        [[disk]]
        path = "root.img"
    """))
    proc = _pyvmm("config", "--print", "--config", str(cfg), "--memory", "2G", "--trace-file", "t.txt",
                  "--no-panic-exit", "-v", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = tomllib.loads(proc.stdout)
    assert printed["kernel"] == str(tmp_path / "vmlinux")
    assert printed["memory"] == "2G" and printed["trace"] == "virtio" and printed["panic-exit"] is False
    assert printed["trace-file"] == str(tmp_path / "t.txt") and printed["verbose"] == 1
    assert printed["disk"] == [{"path": str(tmp_path / "root.img"), "readonly": False, "cache": "writeback",
                                "discard": True, "snapshot": False}]
    # what it printed is a config file that gives the same configuration
    again = _pyvmm("config", "--config", str(_write(tmp_path, proc.stdout, "printed.toml")), cwd=tmp_path)
    assert tomllib.loads(again.stdout) == printed


def test_cli_config_errors_are_one_line(tmp_path: Path) -> None:
    proc = _pyvmm("run", "--config", str(_write(tmp_path, "memory = 'x'\n")), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "bad size" in proc.stderr
    proc = _pyvmm("run", cwd=tmp_path)
    assert proc.returncode == 2 and "no kernel" in proc.stderr and proc.stderr.count("\n") == 1


# -- one validation for `pyvmm run`, `pyvmm config --print` and `--config FILE` -------------------------
@pytest.mark.parametrize(("values", "message"), [
    ({"cpus": 100}, "bad cpu count 100"), ({"cpus": 0}, "bad cpu count 0"),
    ({"timeout": -5.0}, "bad timeout"), ({"timeout": float("inf")}, "bad timeout"),
    ({"console": "file:"}, "needs a path"), ({"console": "tcp:1"}, "bad console"),
    ({"boot": "uefi"}, "bad boot mode"), ({"memory": 1 << 20}, "too small"), ({"verbose": -1}, "verbose"),
])
def test_run_settings_are_checked_however_they_are_made(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunSettings(**values)  # type: ignore[arg-type]
    flags = {k: f"{v >> 20}M" if k == "memory" else v for k, v in values.items()}  # --memory takes a size
    with pytest.raises(ConfigError, match=message):
        resolve(None, flags)


def _toml_str(text: str) -> str:
    """A TOML basic string that escapes everything but printable ASCII (independent of to_toml)."""
    def one(c: str) -> str:
        if " " <= c <= "~" and c not in '"\\':
            return c
        return f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"
    return '"' + "".join(one(c) for c in text) + '"'


def _toml_item(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_item(v) for v in value) + "]"
    return _toml_str(str(value))


def _as_argv(opts: dict[str, object]) -> list[str]:
    argv: list[str] = []
    for key, value in opts.items():
        if key in ("quiet", "stats"):
            argv += [f"--{key}"] if value else []
        elif key == "panic-exit":
            argv.append("--panic-exit" if value else "--no-panic-exit")
        elif key == "sandbox":
            argv.append(f"--sandbox={'on' if value else 'off'}")
        elif key == "verbose":
            argv += ["-v"] * cast(int, value)
        elif key in ("trace", "disk"):
            argv += [f"--{key}={v}" for v in cast(list[str], value)]
        elif isinstance(value, float):
            argv.append(f"--{key}={value!r}")
        else:
            argv.append(f"--{key}={value}")
    return argv


def _main(argv: list[str]) -> tuple[int, str, list[str], list[RunSettings]]:
    """cli.main in this process: (status, stdout, error lines, settings a `run` would have booted)."""
    errors: list[str] = []
    ran: list[RunSettings] = []
    out = io.StringIO()

    def fake_run(settings: RunSettings) -> int:
        ran.append(settings)
        return 0

    with (contextlib.redirect_stdout(out), mock.patch.object(cli, "print_err", errors.append),
          mock.patch.object(cli, "_run", fake_run), mock.patch.object(cli.log, "configure")):
        try:
            status = cli.main(argv)
        except SystemExit as exc:  # argparse's own refusals
            status = int(cast(int, exc.code))
    return status, out.getvalue(), errors, ran


def _absolute(s: RunSettings) -> RunSettings:
    """What `config --print` writes for relative paths: the same paths made absolute."""
    def ab(p: str | None) -> str | None:
        return None if p is None else os.path.abspath(p)
    console = "file:" + os.path.abspath(s.console[5:]) if s.console.startswith("file:") else s.console
    disks = tuple(replace(d, path=os.path.abspath(d.path)) for d in s.disks)
    return replace(s, kernel=ab(s.kernel), initrd=ab(s.initrd), trace_file=ab(s.trace_file),
                               console=console, disks=disks)


_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0"), max_size=12)
_DISK = st.builds(
    lambda path, opts: ",".join([f"path={path}", *opts]),
    st.sampled_from(["/img/root.img", "rel.img", "a b.img", "x=y.img", ""]),
    st.lists(st.sampled_from(["readonly=on", "ro=off", "snapshot=on", "snapshot=off", "cache=none",
                              "cache=writeback", "discard=off", "serial=data0", "serial=" + "s" * 21,
                              "cache=fast", "snapshot=perhaps", "serial=ü"]), max_size=3, unique=True),
)
OPTIONS = st.fixed_dictionaries({}, optional={
    "kernel": st.sampled_from(["/boot/vmlinux", "rel/bzImage"]),
    "initrd": st.sampled_from(["/boot/initrd.gz", "initrd.cpio"]),
    "cmdline": st.one_of(_TEXT, st.just("console=ttyS0 \x7f\x1b[0m \"q\" \\ é 𝄞")),
    "memory": st.one_of(st.sampled_from(["512M", "1G", "64M", "16M", "33M", "65540K", "4096G", "lots", "0", "1T"]),
                        st.integers(0, 70000).map(str)),
    "cpus": st.integers(-2, 70),
    "console": st.sampled_from(["stdio", "none", "file:", "file:/tmp/console.log", "file:rel.log", "tcp:1"]),
    "boot": st.sampled_from(["elf", "guest"]),
    "workarounds": st.sampled_from(["auto", "on", "off"]),
    "devices-via": st.sampled_from(["both", "cmdline", "acpi"]),
    "timeout": st.one_of(st.floats(), st.sampled_from([0.0, -5.0, 1e-300, 5.0, 1e300])),
    "panic-exit": st.booleans(),
    "trace": st.lists(st.sampled_from(["virtio", "virtio.irq", "virtio.notify,virtio.ack", "none", "virtio.nope"]),
                      max_size=3),
    "trace-file": st.sampled_from(["/tmp/trace.txt", "trace.txt"]),
    "verbose": st.integers(0, 3),
    "quiet": st.booleans(),
    "stats": st.booleans(),
    "exec": st.one_of(_TEXT, st.just('echo "hi" && exit 3')),
    "sandbox": st.booleans(),
    "disk": st.lists(_DISK, max_size=3),
})


@settings(max_examples=200, deadline=None)
@given(opts=OPTIONS)
def test_config_print_output_is_always_accepted_back(opts: dict[str, object]) -> None:
    """Whatever `pyvmm config --print` accepts it prints as a file `--config` accepts, with the same VmConfig;
    whatever it refuses, `pyvmm run` refuses from flags and from a file, all with status 2 and one line."""
    argv = _as_argv(opts)
    status, printed, errors, _ = _main(["config", "--print", *argv])
    run_status, _, run_errors, ran = _main(["run", *argv])
    with tempfile.TemporaryDirectory() as tmp:
        if status == 0:
            assert run_status == 0 and len(ran) == 1, run_errors
            cfg = _write(Path(tmp), printed)
            again, reprinted, errors, _ = _main(["config", "--print", "--config", str(cfg)])
            assert again == 0, (errors, printed)
            assert reprinted.splitlines()[1:] == printed.splitlines()[1:]  # all but the header line
            from_file_status, _, errors, from_file = _main(["run", "--config", str(cfg)])
            assert from_file_status == 0 and from_file == [_absolute(ran[0])], errors
            if ran[0].kernel is not None:
                assert from_file[0].vm_config() == _absolute(ran[0]).vm_config()
        else:
            assert status == run_status == 2 and not ran
            assert len(errors) == 1 and "\n" not in errors[0] and errors == run_errors
            # the same values in a config file are refused too
            text = "".join(f"{k} = {_toml_item(v)}\n" for k, v in opts.items())
            file_status, _, file_errors, ran = _main(["run", "--config", str(_write(Path(tmp), text))])
            assert file_status == 2 and not ran and len(file_errors) == 1, (text, file_errors)
