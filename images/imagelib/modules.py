"""Kernel modules in load order, from their ``.modinfo`` ``depends=`` (a Debian kernel package ships no
modules.dep: depmod runs in its postinst)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from imagelib.cache import BuildError
from imagelib.elf import elf_section


def modinfo(ko: Path) -> dict[str, str]:
    info: dict[str, str] = {}
    for item in elf_section(ko.read_bytes(), ".modinfo").split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            info.setdefault(key, value)
    return info


def module_closure(moddir: Path, wanted: Sequence[str]) -> list[Path]:
    """The .ko files of `wanted` and their dependencies, dependencies first; built-in ones are skipped."""
    by_name = {p.name[:-3].replace("-", "_"): p for p in moddir.rglob("*.ko")}
    builtin = {
        Path(line).name[:-3].replace("-", "_") for line in (moddir / "modules.builtin").read_text().split()
    }
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen or name in builtin:
            return
        if name in chain:
            raise BuildError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in by_name:
            raise BuildError(f"kernel module {name} is neither built in nor in {moddir}")
        deps = [d for d in modinfo(by_name[name]).get("depends", "").split(",") if d]
        for dep in deps:
            visit(dep.replace("-", "_"), (*chain, name))
        seen.add(name)
        order.append(by_name[name])

    for name in wanted:
        visit(name, ())
    return order


def modules_dep(moddir: Path, modules: Sequence[Path]) -> str:
    """A modules.dep for ``modules`` (paths relative to ``moddir``, each line's dependencies in load order
    reversed, as depmod writes them), so that modprobe works in a root without depmod's output."""
    lines = []
    for m in modules:
        deps = module_closure(moddir, [m.name[:-3].replace("-", "_")])[:-1]
        lines.append(f"{m.relative_to(moddir)}: {' '.join(str(d.relative_to(moddir)) for d in reversed(deps))}")
    return "\n".join(lines) + "\n"
