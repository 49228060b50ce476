"""The dependency rules of the architecture (pyvmm/ layers: kvm/ -> plumbing -> devices), held by reading imports with ast."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "pyvmm"


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_devices_never_import_kvm_or_arch() -> None:
    allowed = ("pyvmm.memory", "pyvmm.interrupt", "pyvmm.errors", "pyvmm.config", "pyvmm.devices")
    for path in (ROOT / "devices").rglob("*.py"):
        for mod in _imports(path):
            if mod.startswith("pyvmm"):
                assert mod.startswith(allowed), f"{path.relative_to(ROOT)} imports {mod}"


def test_kvm_layer_imports_nothing_above_it() -> None:
    for path in (ROOT / "kvm").rglob("*.py"):
        for mod in _imports(path):
            if mod.startswith("pyvmm"):
                assert mod.startswith(("pyvmm.kvm", "pyvmm.errors")), f"{path.name} imports {mod}"


def test_cli_holds_no_vm_logic() -> None:
    mods = _imports(ROOT / "cli.py")
    assert not any(m.startswith(("pyvmm.kvm", "pyvmm.arch", "pyvmm.devices")) for m in mods)
