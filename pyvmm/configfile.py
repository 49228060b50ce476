"""The ``pyvmm run`` settings in three layers: defaults <- a TOML config file <- command-line flags.

A config file (``pyvmm run --config vm.toml``; schema in docs/config.md) has one key per ``pyvmm run``
option, named like the long option without the dashes in front (``trace-file = "t.txt"`` is
``--trace-file t.txt``), and one ``[[disk]]`` table per ``--disk``.  Relative paths in a file are
relative to the file's directory.  A flag on the command line replaces the file's value; ``--disk`` flags
replace the file's whole disk list.

:class:`RunSettings` is the merged result: :meth:`RunSettings.vm_config` makes the :class:`VmConfig`
the builder takes, :meth:`RunSettings.to_toml` prints it as a config file (``pyvmm config --print``)
that loads back to the same settings.

Every value is checked by the same functions (:data:`CHECKS`, from :mod:`pyvmm.config`) whichever way it
came: a flag, a config file key, or the Python API; so ``pyvmm run``, ``pyvmm config --print`` and
``--config FILE`` accept exactly the same settings, and what ``config --print`` writes loads back.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping

from pyvmm.config import (
    BOOT_MODES,
    CONSOLE_FILE,
    CONSOLE_STDIO,
    DEVICES_VIA,
    WORKAROUND_MODES,
    DiskConfig,
    VmConfig,
    check_choice,
    check_console,
    check_cpus,
    check_gdb,
    check_memory,
    check_timeout,
    check_virtio_mmio_version,
    file_names,
    parse_memory,
)
from pyvmm.errors import ConfigError
from pyvmm.guestexec import check_exec
from pyvmm.record import fields, record, replace
from pyvmm.statictypes import TYPE_CHECKING
from pyvmm.trace import parse_selectors

if TYPE_CHECKING:
    from typing import Any


def _check_verbose(level: int) -> int:
    if not isinstance(level, int) or isinstance(level, bool) or level < 0:
        raise ConfigError(f"bad verbose level {level!r}: expected 0 or more")
    return level


# The checks of the values `pyvmm run` takes, by config file key (= long option name).  RunSettings runs
# all of them whenever it is made; a config file runs each on its key as it is read, to name the key.
CHECKS: dict[str, Callable[[Any], object]] = {
    "memory": check_memory,
    "cpus": check_cpus,
    "console": check_console,
    "timeout": check_timeout,
    "boot": lambda v: check_choice("boot mode", v, BOOT_MODES),
    "workarounds": lambda v: check_choice("workarounds mode", v, WORKAROUND_MODES),
    "devices-via": lambda v: check_choice("devices-via", v, DEVICES_VIA),
    "verbose": _check_verbose,
    "trace": parse_selectors,
    "exec": check_exec,
    "gdb": check_gdb,
    "virtio-mmio-version": check_virtio_mmio_version,
}


@record
class RunSettings:
    """Every ``pyvmm run`` option, merged from the defaults, a config file and the command line."""

    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = "console=ttyS0"
    memory: int = 512 << 20
    cpus: int = 1
    disks: tuple[DiskConfig, ...] = ()
    console: str = CONSOLE_STDIO
    boot: str = "elf"
    workarounds: str = "auto"
    timeout: float | None = None
    panic_exit: bool = True
    trace: tuple[str, ...] = ()
    trace_file: str | None = None
    verbose: int = 0
    quiet: bool = False
    devices_via: str = "both"
    stats: bool = False
    exec: str | None = None
    sandbox: bool = True
    gdb: str | None = None
    gdb_wait: bool = False
    virtio_mmio_version: int = 2

    def __post_init__(self) -> None:
        file_names(self, "kernel", "initrd", "trace_file")
        for key, check in CHECKS.items():
            check(getattr(self, FILE_KEYS[key]))
        if self.gdb_wait and self.gdb is None:
            raise ConfigError("--gdb-wait needs --gdb [HOST:]PORT: there is nothing to wait for without it")

    def vm_config(self) -> VmConfig:
        """The VM configuration (raises :class:`ConfigError` when no kernel was given)."""
        if self.kernel is None:
            raise ConfigError("no kernel: give --kernel PATH, or kernel = \"PATH\" in the --config file")
        return VmConfig(
            kernel=self.kernel, initrd=self.initrd, cmdline=self.cmdline, memory=self.memory, cpus=self.cpus,
            disks=self.disks, console=self.console, boot=self.boot, workarounds=self.workarounds,
            timeout=self.timeout, panic_exit=self.panic_exit, trace=parse_selectors(self.trace),
            trace_file=self.trace_file, devices_via=self.devices_via, stats=self.stats, exec_cmd=self.exec,
            sandbox=self.sandbox, gdb=self.gdb, gdb_wait=self.gdb_wait, virtio_mmio_version=self.virtio_mmio_version,
        )

    def to_toml(self, *, header: str = "") -> str:
        """This configuration as a config file (paths made absolute, so it works from any directory)."""
        out = [f"# {line}" for line in header.splitlines()]

        def put(key: str, value: object, unset: str = "") -> None:
            if value is None:
                out.append(f"# {key}: not set{unset}")
            else:
                out.append(f"{key} = {_toml_value(value)}")

        put("kernel", _abs(self.kernel), " (pyvmm run needs one)")
        put("initrd", _abs(self.initrd))
        put("cmdline", self.cmdline)
        put("memory", format_size(self.memory))
        put("cpus", self.cpus)
        put("console", _abs_console(self.console))
        put("boot", self.boot)
        put("workarounds", self.workarounds)
        put("devices-via", self.devices_via)
        put("timeout", self.timeout, " (no time limit)")
        put("panic-exit", self.panic_exit)
        put("trace", ",".join(self.trace) if self.trace else "none")
        put("trace-file", _abs(self.trace_file), " (trace lines go to stderr)")
        put("verbose", self.verbose)
        put("quiet", self.quiet)
        put("stats", self.stats)
        put("exec", self.exec, " (the guest's init runs as it likes)")
        put("sandbox", self.sandbox)
        put("gdb", self.gdb, " (no gdb server)")
        put("gdb-wait", self.gdb_wait)
        put("virtio-mmio-version", self.virtio_mmio_version)
        for disk in self.disks:
            out += ["", "[[disk]]"]
            put("path", _abs(disk.path))
            put("readonly", disk.readonly)
            if disk.serial is not None:
                put("serial", disk.serial)
            put("cache", disk.cache)
            put("discard", disk.discard)
            put("snapshot", disk.snapshot)
            if disk.queues is not None:
                put("queues", disk.queues)
            if disk.ring != "auto":
                put("ring", disk.ring)
        return "\n".join(out) + "\n"


def format_size(size: int) -> str:
    """``536870912`` -> ``512M``: the largest of G/M/K that divides the size (bytes otherwise)."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return f"{size}B"


def _abs(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(path)


def _abs_console(console: str) -> str:
    if console.startswith(CONSOLE_FILE):
        return CONSOLE_FILE + os.path.abspath(console.removeprefix(CONSOLE_FILE))
    return console


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    try:
        text.encode()
    except UnicodeEncodeError:  # e.g. a path of non-UTF-8 bytes (surrogate escapes from the command line)
        raise ConfigError(f"{text!r} cannot be written in a config file: TOML is UTF-8 text") from None
    # A JSON string is a valid TOML basic string (TOML v1.0.0 "String": the same escapes; json.dumps
    # emits no "\/"), except that TOML also wants DEL (U+007F) escaped, which JSON leaves as it is.
    import json  # for `config --print` only

    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


# -- reading a config file -------------------------------------------------------------------------
# TOML key -> RunSettings field.  The keys are the long option names of `pyvmm run`.
FILE_KEYS = {
    "kernel": "kernel", "initrd": "initrd", "cmdline": "cmdline", "memory": "memory", "cpus": "cpus",
    "disk": "disks", "console": "console", "boot": "boot", "workarounds": "workarounds",
    "timeout": "timeout", "panic-exit": "panic_exit", "trace": "trace", "trace-file": "trace_file",
    "verbose": "verbose", "quiet": "quiet", "devices-via": "devices_via", "stats": "stats", "exec": "exec",
    "sandbox": "sandbox", "gdb": "gdb", "gdb-wait": "gdb_wait", "virtio-mmio-version": "virtio_mmio_version",
}


def load_file(path: str) -> dict[str, Any]:
    """Read a config file into RunSettings field values (only the keys it sets)."""
    import tomllib  # only with --config: its parser is most of the cost of importing it
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path}: not valid TOML: {err}") from None
    return _from_mapping(data, base=os.path.dirname(path), where=path)


def _from_mapping(data: Mapping[str, Any], *, base: str, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = FILE_KEYS.get(key)
        if name is None:
            hint = f" (did you mean {key.replace('_', '-')!r}?)" if key.replace("_", "-") in FILE_KEYS else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; the keys are: {', '.join(FILE_KEYS)}")
        out[name] = _convert(key, value, base=base, where=f"{where}: {key}")
        if key in CHECKS:
            try:
                CHECKS[key](out[name])
            except ConfigError as err:
                raise ConfigError(f"{where}: {key}: {err}") from None
    return out


def _need(ok: bool, where: str, expected: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"{where} = {value!r}: expected {expected}")


def _path(value: object, base: str, where: str) -> str:
    _need(isinstance(value, str) and bool(value), where, "a path (a non-empty string)", value)
    return os.path.join(base, str(value))  # an absolute path stays as it is


def _convert(key: str, value: object, *, base: str, where: str) -> Any:
    if key in ("kernel", "initrd", "trace-file"):
        return _path(value, base, where)
    if key in ("cmdline", "boot", "workarounds", "devices-via", "exec", "gdb"):
        _need(isinstance(value, str), where, "a string", value)
        return value
    if key == "console":
        _need(isinstance(value, str), where, "stdio, none or \"file:PATH\"", value)
        text = str(value)
        if text == CONSOLE_FILE:  # checked before the path is joined to the file's directory
            return text
        return CONSOLE_FILE + os.path.join(base, text.removeprefix(CONSOLE_FILE)) if text.startswith(CONSOLE_FILE) else text
    if key == "memory":
        # An integer means MiB, like a bare number on the command line.
        _need(isinstance(value, str | int) and not isinstance(value, bool), where,
              "a size such as \"512M\" (or a number of MiB)", value)
        return parse_memory(str(value))
    if key == "virtio-mmio-version":
        _need(isinstance(value, int) and not isinstance(value, bool), where, "1 or 2", value)
        return value
    if key in ("cpus", "verbose"):
        _need(isinstance(value, int) and not isinstance(value, bool) and value >= 0, where,
              "a non-negative integer", value)
        return value
    if key == "timeout":
        _need(isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
              and value > 0, where, "a positive number of seconds", value)
        assert isinstance(value, int | float)  # for the type checker: _need has checked it
        return float(value)
    if key in ("panic-exit", "quiet", "stats", "sandbox", "gdb-wait"):
        _need(isinstance(value, bool), where, "true or false", value)
        return value
    if key == "trace":
        items = [value] if isinstance(value, str) else value
        _need(isinstance(items, list) and all(isinstance(s, str) for s in items), where,
              "a selector string (\"virtio\", \"virtio.irq,virtio.ack\", \"none\") or a list of them", value)
        assert isinstance(items, list)
        return normalise_trace([str(s) for s in items])
    if key == "disk":
        _need(isinstance(value, list), where, "an array of [[disk]] tables or --disk spec strings", value)
        assert isinstance(value, list)
        return tuple(_disk(d, base, f"{where}[{i}]") for i, d in enumerate(value))
    raise AssertionError(key)


def _disk(value: object, base: str, where: str) -> DiskConfig:
    if isinstance(value, str):
        disk = DiskConfig.parse(value)
    else:
        _need(isinstance(value, dict), where, "a [[disk]] table or a --disk spec string", value)
        assert isinstance(value, dict)
        table: dict[str, object] = value
        texts: dict[str, str] = {}
        for k, v in table.items():
            if k in ("readonly", "discard", "snapshot"):
                _need(isinstance(v, bool), f"{where}.{k}", "true or false", v)
                texts[k] = "on" if v else "off"
            elif k == "queues":
                _need(isinstance(v, int) and not isinstance(v, bool), f"{where}.{k}", "a number of queues", v)
                texts[k] = str(v)
            else:
                _need(isinstance(v, str), f"{where}.{k}", "a string", v)
                texts[k] = str(v)
        disk = DiskConfig.from_values(texts, where=where)
    return replace(disk, path=os.path.join(base, disk.path))


def normalise_trace(items: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Validate trace selectors and flatten them (``["virtio.irq,virtio.ack"]`` -> two selectors)."""
    parse_selectors(items)
    flat = tuple(s.strip() for item in items for s in item.split(",") if s.strip())
    # "none" clears everything given before it: `--trace none` turns off the file's trace
    if any(s in ("none", "off") for s in flat):
        last = max(i for i, s in enumerate(flat) if s in ("none", "off"))
        flat = flat[last + 1:]
    return flat


# -- the command line ------------------------------------------------------------------------------
def from_cli(values: Mapping[str, Any]) -> dict[str, Any]:
    """RunSettings field values from parsed ``pyvmm run`` flags (only those the user gave).

    ``values`` maps field names to what argparse produced: strings for sizes, disk specs and selectors.
    """
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name == "memory":
            out[name] = parse_memory(value)
        elif name == "disks":
            out[name] = tuple(DiskConfig.parse(d) for d in value)
        elif name == "trace":
            out[name] = normalise_trace(value)
        elif name in FIELD_NAMES:
            out[name] = value
        else:
            raise AssertionError(f"not a run option: {name}")
    return out


FIELD_NAMES = frozenset(fields(RunSettings))


def resolve(config_file: str | None, cli_values: Mapping[str, Any]) -> RunSettings:
    """Defaults <- the config file (if any) <- the command line."""
    merged: dict[str, Any] = load_file(config_file) if config_file is not None else {}
    merged.update(from_cli(cli_values))
    return RunSettings(**merged)  # checks every value (CHECKS)
