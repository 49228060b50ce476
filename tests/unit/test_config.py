from __future__ import annotations

from pathlib import Path

import pytest

from pyvmm.config import DiskConfig, VmConfig, parse_memory, parse_size
from pyvmm.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "value"),
    [("512M", 512 << 20), ("2G", 2 << 30), ("1GiB", 1 << 30), ("65536K", 64 << 20), ("256", 256 << 20),
     ("4096 KB", 4 << 20)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "12X", "-1M", "1.5G", "M"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="bad size"):
        parse_size(text)


@pytest.mark.parametrize(("text", "msg"), [("0", "too small"), ("16M", "too small"), ("4096G", "absurd")])
def test_memory_limits(text: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        parse_memory(text)


def test_disk_spec() -> None:
    d = DiskConfig.parse("path=a.img,readonly=on,serial=data0,cache=none,discard=off")
    assert d == DiskConfig(Path("a.img"), readonly=True, serial="data0", cache="none", discard=False)
    assert DiskConfig.parse("b.img").path == "b.img"
    assert DiskConfig.parse("b.img").snapshot is False
    assert DiskConfig.parse("path=c.img,snapshot=on") == DiskConfig(Path("c.img"), snapshot=True)


@pytest.mark.parametrize(
    ("spec", "msg"),
    [("path=a,cache=bogus", "cache mode"), ("path=a,speed=fast", "unknown"), ("readonly=on", "no path"),
     ("path=a,readonly=maybe", "on or off"), ("path=a,serial=" + "x" * 21, "20 bytes"),
     ("path=a,path=b", "twice"), ("path=a,junk", "key=value"), ("path=a,snapshot=maybe", "on or off")],
)
def test_disk_spec_errors(spec: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        DiskConfig.parse(spec)


def test_vmconfig_validation() -> None:
    with pytest.raises(ConfigError):
        VmConfig(kernel=Path("k"), boot="uefi")
    with pytest.raises(ConfigError):
        VmConfig(kernel=Path("k"), console="tcp:1")
    with pytest.raises(ConfigError):
        VmConfig(kernel=Path("k"), timeout=0)
    for bad in ({"timeout": float("nan")}, {"timeout": float("inf")}, {"console": "file:"}, {"cpus": 65},
                {"memory": 1000}, {"memory": (64 << 20) + 512}):
        with pytest.raises(ConfigError):
            VmConfig(kernel=Path("k"), **bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "msg"), [
    ({"cache": "bogus"}, "cache mode"), ({"serial": "x" * 21}, "20 bytes")
])
def test_disk_config_validates_however_it_is_made(kwargs: dict[str, object], msg: str) -> None:
    """The Python API takes DiskConfig objects too: they are checked like --disk strings."""
    values: dict[str, object] = {"path": Path("a.img"), **kwargs}
    with pytest.raises(ConfigError, match=msg):
        DiskConfig(**values)  # type: ignore[arg-type]
