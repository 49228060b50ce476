"""The VM's configuration as frozen records (pyvmm.record), and parsers for the strings users type.

Every parser raises :class:`~pyvmm.errors.ConfigError` with a message that names the offending value;
the CLI prints it as one line.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

from pyvmm.errors import ConfigError
from pyvmm.guestexec import check_exec
from pyvmm.record import field, record

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_SIZE_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}

MIN_MEMORY = 32 << 20
MAX_MEMORY = 1 << 40
MAX_CPUS = 64
CACHE_MODES = ("writeback", "none")
CONSOLE_STDIO = "stdio"
CONSOLE_NONE = "none"
CONSOLE_FILE = "file:"
DEVICES_VIA = ("both", "cmdline", "acpi")
BOOT_MODES = ("elf", "guest")
WORKAROUND_MODES = ("auto", "on", "off")


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
    """A guest RAM size: a size string, a bare number meaning MiB (as ``--memory 512``)."""
    return check_memory(parse_size(text), shown=repr(text))


# -- the checks every way of configuring a VM shares ------------------------------------------------
# VmConfig, the `pyvmm run` settings (flags, config file, `pyvmm config --print`) and the Python API all
# call these, so a value one of them accepts the others accept too.
def check_memory(size: int, *, shown: str | None = None) -> int:
    """A guest RAM size in bytes: 32M .. 1T, a multiple of 4 KiB."""
    what = shown or f"{size} bytes"
    if not isinstance(size, int) or isinstance(size, bool):
        raise ConfigError(f"bad memory size {size!r}: expected a number of bytes")
    if size < MIN_MEMORY:
        raise ConfigError(f"memory size {what} is too small: pyvmm needs at least {MIN_MEMORY >> 20}M")
    if size > MAX_MEMORY:
        raise ConfigError(f"memory size {what} is absurd: at most {MAX_MEMORY >> 30}G")
    if size % 4096:
        raise ConfigError(f"memory size {what} is not a multiple of 4 KiB")
    return size


def check_cpus(cpus: int) -> int:
    if not isinstance(cpus, int) or isinstance(cpus, bool) or not 1 <= cpus <= MAX_CPUS:
        raise ConfigError(f"bad cpu count {cpus!r}: expected 1..{MAX_CPUS}")
    return cpus


def check_timeout(timeout: float | None) -> float | None:
    """None (no limit) or a finite, positive number of seconds."""
    if timeout is None:
        return None
    if (not isinstance(timeout, int | float) or isinstance(timeout, bool) or not math.isfinite(timeout)
            or timeout <= 0):
        raise ConfigError(f"bad timeout {timeout!r}: expected a positive number of seconds")
    return timeout


def check_console(console: str) -> str:
    """``stdio``, ``none`` or ``file:PATH`` with a non-empty PATH."""
    if console == CONSOLE_FILE:
        raise ConfigError(f"console {console!r} needs a path: file:PATH")
    if not (console in (CONSOLE_STDIO, CONSOLE_NONE) or console.startswith(CONSOLE_FILE)):
        raise ConfigError(f"bad console {console!r}: expected stdio, none or file:PATH")
    return console


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"bad {what} {value!r}: expected {', '.join(choices[:-1])} or {choices[-1]}")
    return value


def parse_gdb_address(text: str) -> tuple[str, int]:
    """``--gdb``: ``PORT``, ``HOST:PORT`` or ``[IPV6]:PORT`` -> (host, port); loopback without a host."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"bad gdb address {text!r}: expected [HOST:]PORT, e.g. 1234 or 127.0.0.1:1234") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"bad gdb address {text!r}: port {port} is outside 0-65535")
    return host, port


VIRTIO_MMIO_VERSIONS = (1, 2)


def check_virtio_mmio_version(version: int) -> int:
    if version not in VIRTIO_MMIO_VERSIONS or isinstance(version, bool):
        raise ConfigError(f"bad virtio-mmio version {version!r}: expected 1 (legacy) or 2")
    return version


def check_gdb(text: str | None) -> str | None:
    if text is not None:
        parse_gdb_address(text)
    return text


MAX_DISK_QUEUES = 64
RING_LAYOUTS = ("auto", "split", "packed")


def _parse_queues(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"bad disk queue count {text!r}: expected 1..{MAX_DISK_QUEUES}") from None


def _parse_bool(key: str, value: str) -> bool:
    v = value.lower()
    if v in ("on", "yes", "true", "1"):
        return True
    if v in ("off", "no", "false", "0"):
        return False
    raise ConfigError(f"bad value {value!r} for {key}: expected on or off")


def file_names(rec: object, *names: str) -> None:
    """In a record's ``__post_init__``: its optional fields ``names`` hold file names as strings, whatever
    path-like value Python code gave (None stays None); pathlib is not imported on the run path."""
    for name in names:
        value = getattr(rec, name)
        if value is not None:
            object.__setattr__(rec, name, os.fspath(value))


@record
class DiskConfig:
    """One ``--disk``: a raw image file exposed as a virtio-blk device."""

    path: str  # a file name (a path-like object from Python code is turned into one)
    readonly: bool = False
    serial: str | None = None
    cache: str = "writeback"  # "writeback" (page cache, FLUSH = fdatasync) or "none" (O_DIRECT)
    discard: bool = True
    # Copy-on-write: the image is only read; the guest's writes go to a private overlay that is
    # discarded at exit (pyvmm.devices.virtio.snapshot).
    snapshot: bool = False
    # virtio-blk request queues (VIRTIO_BLK_F_MQ when more than one); None: one per vCPU
    queues: int | None = None
    # virtqueue layout: "auto" offers the packed one (virtio 1.2 §2.8) and the guest chooses, "split" does
    # not offer it, "packed" requires it
    ring: str = "auto"

    def __post_init__(self) -> None:
        # Checked here, not only in parse(), so that a DiskConfig made in Python is held to the same rules.
        if not str(self.path):
            raise ConfigError("a --disk has no path=")
        object.__setattr__(self, "path", os.fspath(self.path))
        if self.cache not in CACHE_MODES:
            raise ConfigError(f"bad cache mode {self.cache!r}: expected writeback or none")
        if self.serial is not None and len(self.serial.encode()) > 20:
            raise ConfigError(f"disk serial {self.serial!r} is longer than 20 bytes (virtio-blk GET_ID limit)")
        if self.ring not in RING_LAYOUTS:
            raise ConfigError(f"bad ring layout {self.ring!r}: expected auto, split or packed")
        if self.queues is not None and (isinstance(self.queues, bool) or not 1 <= self.queues <= MAX_DISK_QUEUES):
            raise ConfigError(f"bad disk queue count {self.queues!r}: expected 1..{MAX_DISK_QUEUES}")

    @classmethod
    def parse(cls, text: str) -> DiskConfig:
        """Parse ``path=IMG[,readonly=on][,serial=ID][,cache=writeback|none][,discard=on|off][,snapshot=on|off]
        [,queues=N][,ring=auto|split|packed]``.

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
        unknown = set(values) - {"path", "readonly", "ro", "serial", "cache", "discard", "snapshot", "queues", "ring"}
        if unknown:
            raise ConfigError(f"unknown --disk key(s) {', '.join(sorted(unknown))} in {where}")
        if not values.get("path"):
            raise ConfigError(f"--disk {where} has no path=")
        ro_text = values.get("readonly", values.get("ro", "off"))
        return cls(
            path=values["path"],
            readonly=_parse_bool("readonly", ro_text),
            serial=values.get("serial"),
            cache=values.get("cache", "writeback"),
            discard=_parse_bool("discard", values.get("discard", "on")),
            snapshot=_parse_bool("snapshot", values.get("snapshot", "off")),
            queues=_parse_queues(values["queues"]) if "queues" in values else None,
            ring=values.get("ring", "auto"),
        )


@record
class DebugKnobs:
    """Switches for measurements and debugging, read from the environment in this one place
    (docs/config.md "Debug knobs"); not options, because a normal run never wants them."""

    ioeventfd: bool = True  # PYVMM_NO_IOEVENTFD=1: virtqueue notifications as MMIO exits instead
    coalesced_pio: bool = True  # PYVMM_NO_COALESCED_PIO=1: every UART THR write exits
    huge_pages: bool = True  # PYVMM_NO_HUGEPAGES=1: guest RAM on 4 KiB pages (no MADV_HUGEPAGE)
    kvm_device: str | None = None  # PYVMM_KVM_DEVICE=PATH: the VM's KVM device node instead of /dev/kvm
    guest_profile_s: float = 0.0  # PYVMM_GUEST_PROFILE=SECONDS: sample the guest's PC this often
    guest_profile_out: str = "pyvmm-guest-profile.txt"  # PYVMM_GUEST_PROFILE_OUT=PATH: where the samples go

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> DebugKnobs:
        env = os.environ if env is None else env
        try:
            profile = float(env.get("PYVMM_GUEST_PROFILE") or 0)
        except ValueError:
            raise ConfigError(f"PYVMM_GUEST_PROFILE={env.get('PYVMM_GUEST_PROFILE')!r}: expected seconds") from None
        return cls(ioeventfd=not env.get("PYVMM_NO_IOEVENTFD"), coalesced_pio=not env.get("PYVMM_NO_COALESCED_PIO"),
                   huge_pages=not env.get("PYVMM_NO_HUGEPAGES"), kvm_device=env.get("PYVMM_KVM_DEVICE") or None,
                   guest_profile_s=max(profile, 0.0),
                   guest_profile_out=env.get("PYVMM_GUEST_PROFILE_OUT") or cls.guest_profile_out)


@record
class VmConfig:
    """Everything needed to build and run one VM."""

    # File names; a path-like object from Python code is turned into one (pathlib is not imported on
    # the run path: its import, with urllib.parse and ipaddress, costs about 50 ms in the KVM lab)
    kernel: str
    initrd: str | None = None
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
    # --panic-exit (default) / --no-panic-exit: a panic line on the console stops the VM (status 3)
    panic_exit: bool = True
    # virtio trace: the event classes to trace (pyvmm.trace.EVENT_CLASSES; empty = off) and where to
    # (None = stderr)
    trace: frozenset[str] = frozenset()
    trace_file: str | None = None
    # How the guest learns of the virtio-mmio devices (docs/acpi.md): "cmdline" (virtio_mmio.device=),
    # "acpi" (LNRO0005 devices in the DSDT) or "both" (default: kernels with either mechanism work)
    devices_via: str = "both"
    # --stats: count exits by kind and register and time them (the counting vCPU loop; pyvmm.exitstats)
    stats: bool = False
    # --exec: the command the guest's /init runs, its status reported back (pyvmm.guestexec)
    exec_cmd: str | None = None
    # --sandbox: `pyvmm run` confines itself with seccomp before the first KVM_RUN (pyvmm.sandbox)
    sandbox: bool = True
    # --gdb [HOST:]PORT: serve the GDB remote protocol there (pyvmm.gdb); --gdb-wait: the guest starts
    # stopped and runs when gdb says so
    gdb: str | None = None
    gdb_wait: bool = False
    # --virtio-mmio-version: 2 (virtio 1.x) or 1 (the legacy transport of virtio 1.2 §4.2.4)
    virtio_mmio_version: int = 2
    debug: DebugKnobs = field(default_factory=DebugKnobs.from_environ)

    def __post_init__(self) -> None:
        file_names(self, "kernel", "initrd", "trace_file")
        check_memory(self.memory)
        check_cpus(self.cpus)
        check_console(self.console)
        check_timeout(self.timeout)
        check_choice("boot mode", self.boot, BOOT_MODES)
        check_choice("workarounds mode", self.workarounds, WORKAROUND_MODES)
        check_choice("devices-via", self.devices_via, DEVICES_VIA)
        check_exec(self.exec_cmd)
        check_gdb(self.gdb)
        check_virtio_mmio_version(self.virtio_mmio_version)
        if self.gdb_wait and self.gdb is None:
            raise ConfigError("--gdb-wait needs --gdb [HOST:]PORT: there is nothing to wait for without it")
