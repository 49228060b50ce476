"""Every document the code, the tests and the docs point to is in the repository: each ``*.md`` named
anywhere in the tracked files, and each ``pyvmm/...py`` or ``tests/...py`` path named in the README and
docs/ (so a rename cannot leave a dangling pointer behind)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MD_REF = re.compile(r"(?<![\w./-])([\w./-]+\.md)\b")
CODE_REF = re.compile(r"(?<![\w./-])((?:pyvmm|tests|bench|images|firmware)/[\w./-]+\.(?:py|sh|S|config))\b")


def _tracked() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / p for p in out.splitlines() if not p.startswith("images/out/")]


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
        return ""


def _resolves(ref: str, where: Path) -> bool:
    if ref.startswith("/"):
        return False  # a path outside the repository: not there for a reader of a clone
    candidates = [ROOT / ref, where.parent / ref, ROOT / "docs" / ref]
    return any(c.is_file() for c in candidates)


def test_every_markdown_reference_resolves() -> None:
    missing = []
    for path in _tracked():
        for ref in MD_REF.findall(_text(path)):
            if not _resolves(ref, path):
                missing.append(f"{path.relative_to(ROOT)}: {ref}")
    assert not missing, "\n".join(missing)


def test_code_paths_in_the_docs_exist() -> None:
    docs = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = [f"{d.relative_to(ROOT)}: {ref}" for d in docs for ref in CODE_REF.findall(_text(d))
               if not (ROOT / ref).exists()]
    assert not missing, "\n".join(missing)
