"""The builder attaches ``snapshot=on`` disks: they only read their image, so the same image may back several
of them (and read-only disks) at once, never beside a writable disk (built, not run)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pyvmm.builder import build_vm
from pyvmm.config import CONSOLE_NONE, DiskConfig, VmConfig
from pyvmm.errors import ConfigError
from pyvmm.testing.kernels import make_elf

pytestmark = pytest.mark.kvm


def _config(tmp_path: Path, *disks: DiskConfig) -> VmConfig:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(make_elf([(0x1000000, b"\xf4" * 4096, 0x2000)], 0x1000000))
    return VmConfig(kernel=kernel, memory=64 << 20, console=CONSOLE_NONE, disks=disks)


def test_snapshot_disks_share_their_image(kvm: None, tmp_path: Path) -> None:
    image = tmp_path / "base.img"
    image.write_bytes(bytes(range(256)) * 4096)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    config = _config(tmp_path, DiskConfig(image, snapshot=True), DiskConfig(image, snapshot=True),
                     DiskConfig(image, readonly=True))
    vmm, report = build_vm(config, console_fd=None)
    vmm._cleanup.close()
    notes = [n for n in report.notes if n.startswith("vd")]
    assert [("(snapshot" in n, "(read-only" in n) for n in notes] == [(True, False), (True, False), (False, True)]
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest


def test_snapshot_beside_a_writable_use_is_refused(kvm: None, tmp_path: Path) -> None:
    image = tmp_path / "base.img"
    image.write_bytes(bytes(1 << 20))
    with pytest.raises(ConfigError, match="given twice"):
        build_vm(_config(tmp_path, DiskConfig(image), DiskConfig(image, snapshot=True)), console_fd=None)
