"""The VM's configuration as frozen dataclasses, and parsers for the strings users type.

Every parser raises :class:`~pyvmm.errors.ConfigError` with a message that names the offending value;
the CLI prints it as one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_SIZE_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}

MIN_MEMORY = 32 << 20
MAX_MEMORY = 1 << 40


def parse_size(text: str, *, default_unit: str = "M") -> int:
    """Parse ``512M``, ``2G``, ``1GiB``, ``65536K`` or a bare number (in ``default_unit``) into bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"bad size {text!r}: expected a number with an optional K/M/G/T suffix, e.g. 512M")
    number, unit = int(m.group(1)), m.group(2).upper()
    if not unit and not m.group(3):
        unit = default_unit.upper()
    return number << _SIZE_SHIFT[unit]


def parse_memory(text: str) -> int:
    size = parse_size(text)
    if size < MIN_MEMORY:
        raise ConfigError(f"memory size {text!r} is too small: pyvmm needs at least {MIN_MEMORY >> 20}M")
    if size > MAX_MEMORY:
        raise ConfigError(f"memory size {text!r} is absurd: at most {MAX_MEMORY >> 30}G")
    if size % 4096:
        raise ConfigError(f"memory size {text!r} is not a multiple of 4 KiB")
    return size


def _parse_bool(key: str, value: str) -> bool:
    v = value.lower()
    if v in ("on", "yes", "true", "1"):
        return True
    if v in ("off", "no", "false", "0"):
        return False
    raise ConfigError(f"bad value {value!r} for {key}: expected on or off")


@dataclass(frozen=True)
class DiskConfig:
    """One ``--disk``: a raw image file exposed as a virtio-blk device."""

    path: Path
    readonly: bool = False
    serial: str | None = None
    cache: str = "writeback"  # "writeback" (page cache, FLUSH = fdatasync) or "none" (O_DIRECT)
    discard: bool = True

    @classmethod
    def parse(cls, text: str) -> DiskConfig:
        """Parse ``path=IMG[,readonly=on][,serial=ID][,cache=writeback|none][,discard=on|off]``.

        A bare ``IMG`` (no ``=``) is accepted as the path.
        """
        if "=" not in text.split(",", 1)[0]:
            text = "path=" + text
        values: dict[str, str] = {}
        for item in text.split(","):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"bad --disk item {item!r} in {text!r}: expected key=value")
            if key in values:
                raise ConfigError(f"--disk key {key!r} given twice in {text!r}")
            values[key] = value
        return cls.from_values(values, where=repr(text))

    @classmethod
    def from_values(cls, values: dict[str, str], *, where: str) -> DiskConfig:
        """Build from ``--disk`` keys and their text values (also used for ``[[disk]]`` config tables)."""
        unknown = set(values) - {"path", "readonly", "ro", "serial", "cache", "discard"}
        if unknown:
            raise ConfigError(f"unknown --disk key(s) {', '.join(sorted(unknown))} in {where}")
        if not values.get("path"):
            raise ConfigError(f"--disk {where} has no path=")
        cache = values.get("cache", "writeback")
        if cache not in ("writeback", "none"):
            raise ConfigError(f"bad cache mode {cache!r}: expected writeback or none")
        serial = values.get("serial")
        if serial is not None and len(serial.encode()) > 20:
            raise ConfigError(f"disk serial {serial!r} is longer than 20 bytes (virtio-blk GET_ID limit)")
        ro_text = values.get("readonly", values.get("ro", "off"))
        return cls(
            path=Path(values["path"]),
            readonly=_parse_bool("readonly", ro_text),
            serial=serial,
            cache=cache,
            discard=_parse_bool("discard", values.get("discard", "on")),
        )


CONSOLE_STDIO = "stdio"
DEVICES_VIA = ("both", "cmdline", "acpi")
CONSOLE_NONE = "none"


@dataclass(frozen=True)
class VmConfig:
    """Everything needed to build and run one VM."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = "console=ttyS0"
    memory: int = 512 << 20
    cpus: int = 1
    disks: tuple[DiskConfig, ...] = ()
    console: str = CONSOLE_STDIO  # "stdio", "none" or "file:PATH"
    # "elf": extract the ELF vmlinux from a bzImage on the host (fast); "guest": run its decompressor
    boot: str = "elf"
    # "auto": detect a software-emulating host KVM and apply workarounds; "on"/"off" force them
    workarounds: str = "auto"
    timeout: float | None = None
    exit_on_panic: bool = True
    # virtio trace: the event classes to trace (pyvmm.trace.EVENT_CLASSES; empty = off) and where to
    # (None = stderr)
    trace: frozenset[str] = frozenset()
    trace_file: Path | None = None
    # How the guest learns of the virtio-mmio devices (docs/acpi.md): "cmdline" (virtio_mmio.device=),
    # "acpi" (LNRO0005 devices in the DSDT) or "both" (default: kernels with either mechanism work)
    devices_via: str = "both"
    # --stats: count exits by kind and register and time them (the counting vCPU loop; pyvmm.exitstats)
    stats: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.boot not in ("elf", "guest"):
            raise ConfigError(f"bad boot mode {self.boot!r}: expected elf or guest")
        if self.workarounds not in ("auto", "on", "off"):
            raise ConfigError(f"bad workarounds mode {self.workarounds!r}: expected auto, on or off")
        if self.devices_via not in DEVICES_VIA:
            raise ConfigError(f"bad devices-via {self.devices_via!r}: expected {', '.join(DEVICES_VIA)}")
        if not 1 <= self.cpus <= 64:
            raise ConfigError(f"bad cpu count {self.cpus}: expected 1..64")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"bad timeout {self.timeout}: expected a positive number of seconds")
        if not (self.console in (CONSOLE_STDIO, CONSOLE_NONE) or self.console.startswith("file:")):
            raise ConfigError(f"bad console {self.console!r}: expected stdio, none or file:PATH")
