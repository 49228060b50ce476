"""Compare the ctypes boot_params / setup_header / boot_e820_entry with the installed
<asm/bootparam.h>, through a C probe printing sizeof and offsetof."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from pyvmm.arch.x86_64 import bootparams as bp

pytestmark = pytest.mark.needs_cc

HEADER = Path("/usr/include/x86_64-linux-gnu/asm/bootparam.h")
BP_FIELDS = [name for name, *_ in bp.boot_params._fields_ if not name.startswith("_pad")]
HDR_FIELDS = [name for name, *_ in bp.setup_header._fields_]


def _probe(tmp_path: Path) -> dict[str, int]:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (gcc/cc) on PATH")
    if not HEADER.exists():
        pytest.skip(f"{HEADER} missing (install linux-libc-dev)")
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <asm/bootparam.h>",
        "int main(void) {",
        '  printf("sizeof.boot_params %zu\\n", sizeof(struct boot_params));',
        '  printf("sizeof.setup_header %zu\\n", sizeof(struct setup_header));',
        '  printf("sizeof.boot_e820_entry %zu\\n", sizeof(struct boot_e820_entry));',
    ]
    lines += [f'  printf("bp.{f} %zu\\n", offsetof(struct boot_params, {f}));' for f in BP_FIELDS]
    lines += [f'  printf("hdr.{f} %zu\\n", offsetof(struct setup_header, {f}));' for f in HDR_FIELDS]
    lines += ["  return 0;", "}"]
    src, exe = tmp_path / "probe.c", tmp_path / "probe"
    src.write_text("\n".join(lines) + "\n")
    subprocess.run([cc, "-o", str(exe), str(src)], check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_bootparam_layout_matches_c(tmp_path: Path) -> None:
    c = _probe(tmp_path)
    assert c["sizeof.boot_params"] == ctypes.sizeof(bp.boot_params) == 4096
    assert c["sizeof.setup_header"] == ctypes.sizeof(bp.setup_header)
    assert c["sizeof.boot_e820_entry"] == ctypes.sizeof(bp.boot_e820_entry)
    mismatches = [f for f in BP_FIELDS if c[f"bp.{f}"] != getattr(bp.boot_params, f).offset]
    mismatches += [f for f in HDR_FIELDS if c[f"hdr.{f}"] != getattr(bp.setup_header, f).offset]
    assert not mismatches
