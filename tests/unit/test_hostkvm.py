from __future__ import annotations

from pathlib import Path

from pyvmm.arch.x86_64 import hostkvm


def test_detects_software_kvm_from_sysfs(tmp_path: Path) -> None:
    assert not hostkvm.detect(tmp_path).software
    assert hostkvm.detect(tmp_path).workaround_args == ()
    (tmp_path / "kvm_pvm").mkdir()
    host = hostkvm.detect(tmp_path)
    assert host.software and "kvm_pvm" in host.reason
    assert any(a.startswith("clearcpuid=") for a in host.workaround_args)


def test_forced_modes(tmp_path: Path) -> None:
    assert hostkvm.resolve("on", tmp_path).software
    (tmp_path / "kvm_pvm").mkdir()
    assert not hostkvm.resolve("off", tmp_path).software
    assert hostkvm.resolve("auto", tmp_path).software
