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
    allowed = ("pyvmm.memory", "pyvmm.interrupt", "pyvmm.errors", "pyvmm.config", "pyvmm.log", "pyvmm.statictypes",
               "pyvmm.devices")
    for path in (ROOT / "devices").rglob("*.py"):
        for mod in _imports(path):
            if mod.startswith("pyvmm"):
                assert mod.startswith(allowed), f"{path.relative_to(ROOT)} imports {mod}"


def test_loader_is_what_every_architecture_shares() -> None:
    """loader/ holds no architecture's boot protocol: that is under arch/, which may use loader/."""
    for path in (ROOT / "loader").rglob("*.py"):
        for mod in _imports(path):
            assert not mod.startswith(("pyvmm.arch", "pyvmm.kvm")), f"loader/{path.name} imports {mod}"


def test_kvm_layer_imports_nothing_above_it() -> None:
    for path in (ROOT / "kvm").rglob("*.py"):
        for mod in _imports(path):
            if mod.startswith("pyvmm"):
                assert mod.startswith((*LEAVES, "pyvmm.kvm")), f"{path.name} imports {mod}"


# Modules every layer may use: they import nothing from pyvmm.
LEAVES = ("pyvmm.errors", "pyvmm.statictypes")


def test_leaves_import_nothing_from_pyvmm() -> None:
    for leaf in LEAVES:
        mods = _imports(ROOT / f"{leaf.removeprefix('pyvmm.')}.py")
        assert not [m for m in mods if m.startswith("pyvmm")], leaf


def test_cli_holds_no_vm_logic() -> None:
    mods = _imports(ROOT / "cli.py")
    assert not any(m.startswith(("pyvmm.kvm", "pyvmm.arch", "pyvmm.devices")) for m in mods)


def _module_graph() -> dict[str, set[str]]:
    """pyvmm module -> the pyvmm modules it imports (anywhere in the file, TYPE_CHECKING and function-level
    imports too), each resolved to the most specific module that exists."""
    mods: dict[str, Path] = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names]  # a submodule, or a name in the module
            for name in names:
                target = resolve(name) if name.startswith("pyvmm") else None
                # a package's own submodules importing the package (its __init__) is no cycle of concern
                if target and target != mod and not mod.startswith(target + "."):
                    graph[mod].add(target)
    return graph


def test_no_import_cycles() -> None:
    graph = _module_graph()
    assert "pyvmm.builder" in graph and "pyvmm.vmm" in graph["pyvmm.runner"]  # the graph is real
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(mod: str) -> None:
        state[mod] = 1
        path.append(mod)
        for dep in sorted(graph[mod]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep):], dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_only_the_kvm_layer_issues_ioctls() -> None:
    """Everything above pyvmm/kvm/ holds typed KVM objects (Kvm -> VmFd -> VcpuFd/DeviceFd) and calls
    their methods; the ioctl helpers (and fcntl.ioctl) are the kvm layer's alone."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        if path.is_relative_to(ROOT / "kvm"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("pyvmm.kvm.ioctl", "fcntl"):
                names = {a.name for a in node.names}
                if (node.module == "pyvmm.kvm.ioctl" and names & {"ioctl", "ioctl_raw", "call"}) or "ioctl" in names:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {sorted(names)} from {node.module}")
            elif (isinstance(node, ast.Attribute) and node.attr == "ioctl" and isinstance(node.value, ast.Name)
                  and node.value.id == "fcntl"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} calls fcntl.ioctl")
    assert offenders == []


def test_the_builder_never_names_an_architecture() -> None:
    """builder.py is the one build script: every architectural difference is a Machine method
    (arch/*/board.py), and the architectures appear only in the table that picks the machine."""
    source = (ROOT / "builder.py").read_text()
    tree = ast.parse(source)
    table = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "MACHINES")
    lines = source.splitlines()
    rest = "\n".join(lines[:table.lineno - 1] + lines[table.end_lineno or table.lineno:])
    for word in ("x86", "aarch64", "arm64", "X86", "Aarch64"):
        assert word not in rest.split('"""', 2)[-1], f"builder.py names {word} outside MACHINES"
