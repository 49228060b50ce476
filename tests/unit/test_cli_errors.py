"""Host-side mistakes: one line on stderr, exit status 2, no traceback (and nothing runs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest


def _pyvmm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True, timeout=60,
                          env=env, check=False)


def _elf_for(machine: int) -> bytes:
    """A 64-bit little-endian ELF header (Elf64_Ehdr) for ``machine``, no segments."""
    import struct

    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    return ident + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, 0x1000000, 64, 0, 0, 64, 56, 0, 64, 0, 0)


def _write(tmp: Path, name: str, data: bytes) -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


def _bzimage_header(version: int, payload: bytes = b"", xlf64: bool = True) -> bytes:
    img = bytearray(0x1000)
    img[0x1F1] = 1  # setup_sects
    img[0x1FE:0x200] = b"\x55\xaa"
    img[0x202:0x206] = b"HdrS"
    img[0x206:0x208] = version.to_bytes(2, "little")
    img[0x236:0x238] = (1 if xlf64 else 0).to_bytes(2, "little")
    return bytes(img) + payload


def _corrupt_bzimage(fmt: str) -> bytes:
    """A bzImage whose compressed payload has 16 bytes overwritten in the middle."""
    from pyvmm.testing.kernels import compress, make_bzimage, make_elf

    payload = bytearray(compress(fmt, make_elf([(0x1000000, b"\xf4" * 4096, 0x2000)], 0x1000000)))
    payload[len(payload) // 2 : len(payload) // 2 + 16] = b"\xaa" * 16
    return make_bzimage(bytes(payload))


def _arm64_image() -> bytes:
    """An arm64 Image header (booting.rst): image_size 1 MiB, magic "ARM\\x64" at byte 56."""
    img = bytearray(4096)
    img[16:24] = (1 << 20).to_bytes(8, "little")
    img[56:60] = b"ARM\x64"
    return bytes(img)


CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("missing kernel", lambda t: ["--kernel", str(t / "nope")], "no such file"),
    ("kernel is a directory", lambda t: ["--kernel", str(t)], "directory"),
    ("empty kernel", lambda t: ["--kernel", str(_write(t, "k", b""))], "empty"),
    ("not a kernel", lambda t: ["--kernel", str(_write(t, "k", b"hello world" * 100))], "not a Linux kernel"),
    ("arm64 ELF", lambda t: ["--kernel", str(_write(t, "k", _elf_for(183)))], "AArch64|aarch64|ARM"),
    ("arm64 Image", lambda t: ["--kernel", str(_write(t, "k", _arm64_image()))], "arm64 Image"),
    *[(f"corrupt {fmt} payload", lambda t, fmt=fmt: ["--kernel", str(_write(t, "k", _corrupt_bzimage(fmt)))],
       f"corrupt {fmt} payload") for fmt in ("gzip", "xz", "lz4", "zstd", "bzip2", "lzma")],
    ("truncated ELF", lambda t: ["--kernel", str(_write(t, "k", b"\x7fELF\x02\x01\x01"))], "ELF|truncated"),
    ("old boot protocol", lambda t: ["--kernel", str(_write(t, "k", _bzimage_header(0x0200)))], "protocol"),
    ("bad memory size", lambda t: ["--kernel", str(t / "k"), "--memory", "lots"], "bad size"),
    ("zero memory", lambda t: ["--kernel", str(t / "k"), "--memory", "0"], "too small"),
    ("absurd memory", lambda t: ["--kernel", str(t / "k"), "--memory", "9999G"], "absurd"),
    ("bad disk spec", lambda t: ["--kernel", str(t / "k"), "--disk", "path=x,color=red"], "unknown --disk"),
    ("bad console", lambda t: ["--kernel", str(t / "k"), "--console", "tcp:1234"], "bad console"),
]


@pytest.mark.parametrize(("name", "make_args", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_status_2(tmp_path: Path, name: str, make_args: Callable[[Path], list[str]],
                                            message: str) -> None:
    proc = _pyvmm("run", *make_args(tmp_path))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert re.search(message, lines[0]), lines[0]


def test_disk_smaller_than_a_sector(tmp_path: Path, kvm: None) -> None:
    """Needs /dev/kvm: disks are opened after the VM and its kernel exist."""
    from pyvmm.testing.kernels import make_elf

    kernel = _write(tmp_path, "vmlinux", make_elf([(0x1000000, b"\xf4" * 4096, 0x2000)], 0x1000000))
    disk = _write(tmp_path, "small.img", b"x" * 100)
    proc = _pyvmm("run", "--kernel", str(kernel), "--disk", f"path={disk}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "smaller than one 512-byte sector" in proc.stderr


def test_missing_kvm_device_from_the_cli(tmp_path: Path) -> None:
    kernel = _write(tmp_path, "vmlinux", _elf_for(62))
    env = dict(os.environ, PYVMM_KVM_DEVICE=str(tmp_path / "kvm"))
    proc = _pyvmm("run", "--kernel", str(kernel), env=env)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr


def test_no_permission_on_kvm_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Root bypasses file permissions, so EACCES is injected where the device is opened."""
    import errno

    from pyvmm.errors import KvmError
    from pyvmm.kvm import system

    def deny(path: str, flags: int) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(system.os, "open", deny)
    with pytest.raises(KvmError, match="no permission to open /dev/kvm: add yourself to the 'kvm' group"):
        system.Kvm()


def test_help_documents_exit_statuses() -> None:
    proc = _pyvmm("run", "--help")
    assert proc.returncode == 0
    for text in ("exit status:", "panicked", "--timeout", "Ctrl-A x", "snapshot=on"):
        assert text in proc.stdout


# (flags, the same values in a config file, the message)
INVALID: list[tuple[list[str], str, str]] = [
    (["--timeout", "-5", "--cpus", "100"], "timeout = -5.0\ncpus = 100\n", "timeout|cpu count"),
    (["--cpus", "100"], "cpus = 100\n", "bad cpu count 100: expected 1..64"),
    (["--cpus", "0"], "cpus = 0\n", "bad cpu count 0"),
    (["--timeout", "nan"], "timeout = nan\n", "timeout"),
    (["--timeout", "0"], "timeout = 0\n", "timeout"),
    (["--memory", "16M"], "memory = '16M'\n", "too small"),
    (["--console", "file:"], "console = 'file:'\n", "console 'file:' needs a path"),
    (["--console", "tcp:1"], "console = 'tcp:1'\n", "bad console"),
    (["--disk", "path=x.img,snapshot=maybe"], "disk = ['path=x.img,snapshot=maybe']\n", "bad value 'maybe' for snapshot"),
    (["--gdb", "localhost:gdb"], "gdb = 'localhost:gdb'\n", "bad gdb address 'localhost:gdb': expected \\[HOST:\\]PORT"),
    (["--gdb", "70000"], "gdb = '70000'\n", "port 70000 is outside 0-65535"),
    (["--gdb-wait"], "gdb-wait = true\n", "--gdb-wait needs --gdb"),
    (["--virtio-mmio-version", "3"], "virtio-mmio-version = 3\n", "invalid choice: 3|bad virtio-mmio version 3"),
]


def test_gdb_port_in_use_is_one_line(tmp_path: Path, kvm: None) -> None:
    """Needs /dev/kvm: the gdb server's socket is opened once the VM exists."""
    import socket

    from pyvmm.testing.kernels import make_elf

    kernel = _write(tmp_path, "vmlinux", make_elf([(0x1000000, b"\xf4" * 4096, 0x2000)], 0x1000000))
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        proc = _pyvmm("run", "--kernel", str(kernel), "--gdb", str(port), "--timeout", "5")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"--gdb {port}: cannot listen on 127.0.0.1 port {port}: Address already in use" in proc.stderr


@pytest.mark.parametrize("entry", ["run", "config --print", "run --config"])
@pytest.mark.parametrize(("flags", "toml", "message"), INVALID, ids=[" ".join(c[0]) for c in INVALID])
def test_invalid_values_are_refused_by_every_entry_point(tmp_path: Path, entry: str, flags: list[str], toml: str,
                                                         message: str) -> None:
    """`pyvmm run`, `pyvmm config --print` and `--config FILE` make the same checks: what `config --print`
    prints is always a file `--config` accepts."""
    kernel = ["--kernel", str(tmp_path / "vmlinux")]  # need not exist: the values are checked first
    if entry == "run --config":
        args = ["run", "--config", str(_write(tmp_path, "vm.toml", toml.encode())), *kernel]
    else:
        args = [*entry.split(), *kernel, *flags]
    proc = _pyvmm(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), proc.stderr
