"""The config file: every CLI option has a key, round trips, CLI flags override, errors name the key."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from pyvmm import cli
from pyvmm.config import DiskConfig
from pyvmm.configfile import FIELD_NAMES, FILE_KEYS, RunSettings, format_size, load_file, resolve
from pyvmm.errors import ConfigError

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
               DiskConfig(tmp_path / "data.img", readonly=True, serial="data0", cache="none", discard=False)),
    )
    vm = s.vm_config()
    assert vm.exit_on_panic is False and vm.trace == {"notify", "irq"} and vm.memory == 1 << 30


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
    assert s.memory == 256 << 20 and s.panic_exit and s.trace == () and s.kernel == Path("bz")
    assert s.disks == (DiskConfig(Path("/x.img"), readonly=True),)  # --disk replaces the file's list
    assert s.cmdline == "console=ttyS0 root=/dev/vda rw"  # untouched keys keep the file's value
    assert s.vm_config().trace == frozenset()


def test_disk_as_spec_string_and_memory_as_mib(tmp_path: Path) -> None:
    s = resolve(_write(tmp_path, 'kernel = "/k"\nmemory = 384\ndisk = ["path=a.img,readonly=on"]\n'), {})
    assert s.memory == 384 << 20 and s.disks == (DiskConfig(tmp_path / "a.img", readonly=True),)


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
                                "discard": True}]
    # what it printed is a config file that gives the same configuration
    again = _pyvmm("config", "--config", str(_write(tmp_path, proc.stdout, "printed.toml")), cwd=tmp_path)
    assert tomllib.loads(again.stdout) == printed


def test_cli_config_errors_are_one_line(tmp_path: Path) -> None:
    proc = _pyvmm("run", "--config", str(_write(tmp_path, "memory = 'x'\n")), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "bad size" in proc.stderr
    proc = _pyvmm("run", cwd=tmp_path)
    assert proc.returncode == 2 and "no kernel" in proc.stderr and proc.stderr.count("\n") == 1
