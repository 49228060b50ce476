"""Kernel symbols for the stop report: System.map parsing, the ELF symbol table, finding a System.map next
to the kernel, physical-to-virtual translation, and that nothing is read before the first lookup."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pyvmm.loader.symbols import (
    KernelSymbols,
    SymbolTable,
    find_system_map,
    read_elf_symbols,
    read_system_map,
)
from pyvmm.testing.kernels import make_bzimage, make_elf

# Shaped like a real x86_64 System.map (`nm -n vmlinux` minus a, N, U and w symbols): aliases at one address,
# an absolute symbol (phys_startup_64, which vmlinux.lds.S defines as startup_64 - LOAD_OFFSET), data
# after the text.
SYSTEM_MAP = """\
0000000000000000 D __per_cpu_start
0000000001000000 A phys_startup_64
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff81000070 T secondary_startup_64
ffffffff81001000 T __start_notes
ffffffff81001000 T do_one_initcall
ffffffff81234500 t serial8250_console_write
ffffffff81234600 W arch_cpu_idle
ffffffff81234600 T default_idle
ffffffff81300000 T _etext
this line is not a symbol
ffffffff82000000 D jiffies

ffffffff82000100 B _end
"""


def _map(tmp_path: Path, text: str = SYSTEM_MAP, name: str = "System.map") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_system_map_lookup_and_aliases(tmp_path: Path) -> None:
    syms = read_system_map(_map(tmp_path))
    assert syms.lookup(0xFFFFFFFF81000000) == "startup_64+0x0"  # not _text or _stext: kallsyms' choice
    assert syms.lookup(0xFFFFFFFF81000075) == "secondary_startup_64+0x5"
    assert syms.lookup(0xFFFFFFFF81001004) == "do_one_initcall+0x4"  # not the linker-made __start_notes
    assert syms.lookup(0xFFFFFFFF81234557) == "serial8250_console_write+0x57"
    assert syms.lookup(0xFFFFFFFF81234601) == "default_idle+0x1"  # the strong symbol, not the weak one
    assert syms.lookup(0xFFFFFFFF82000010) == "jiffies+0x10"
    assert syms.address("serial8250_console_write") == 0xFFFFFFFF81234500
    assert syms.address("no_such_symbol") is None


def test_system_map_physical_addresses_map_to_the_kernel_text(tmp_path: Path) -> None:
    """Before the kernel switches to its virtual mapping, RIP is physical (pyvmm enters at phys_startup_64)."""
    syms = read_system_map(_map(tmp_path))
    assert syms.lookup(0x1000000) == "startup_64+0x0"
    assert syms.lookup(0x1234557) == "serial8250_console_write+0x57"


def test_system_map_misses(tmp_path: Path) -> None:
    syms = read_system_map(_map(tmp_path))
    assert syms.lookup(0xFFFF888000000000) is None  # below the first kernel symbol, not a physical address
    assert syms.lookup(0xFFFFFFFFFF600000) is None  # past the last symbol
    assert syms.lookup(0x10) is None  # the per-CPU area and absolute symbols are no code
    assert syms.address("phys_startup_64") is None


def test_system_map_without_phys_startup_has_no_translation(tmp_path: Path) -> None:
    text = "\n".join(line for line in SYSTEM_MAP.splitlines() if "phys_startup_64" not in line)
    syms = read_system_map(_map(tmp_path, text))
    assert syms.lookup(0x1000000) is None
    assert syms.lookup(0xFFFFFFFF81000000) == "startup_64+0x0"


def test_symbol_table_from_entries() -> None:
    t = SymbolTable.build([(0x1000, "a"), (0x1010, "b")], end=0x1020)
    assert (t.lookup(0xFFF), t.lookup(0x1000), t.lookup(0x101F), t.lookup(0x1020)) == (None, "a+0x0", "b+0xf", None)
    assert len(t) == 2


def test_find_system_map_next_to_the_kernel(tmp_path: Path) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    bz = boot / "bzImage"
    bz.write_bytes(b"not read")
    assert find_system_map(bz) is None
    _map(boot)
    assert find_system_map(bz) == boot / "System.map"
    # Debian's /boot: vmlinuz-VERSION with System.map-VERSION beside it
    deb = tmp_path / "deb"
    deb.mkdir()
    (deb / "vmlinuz-6.1.0-28-amd64").write_bytes(b"not read")
    _map(deb, name="System.map-6.1.0-28-amd64")
    assert find_system_map(deb / "vmlinuz-6.1.0-28-amd64") == deb / "System.map-6.1.0-28-amd64"


def test_kernel_symbols_read_nothing_until_the_first_lookup(tmp_path: Path) -> None:
    bz = tmp_path / "bzImage"
    bz.write_bytes(make_bzimage(b"\x90" * 64))
    syms = KernelSymbols(bz)  # what the builder makes at start-up: no System.map exists yet
    _map(tmp_path)
    assert syms.lookup(0xFFFFFFFF81234557) == "serial8250_console_write+0x57"
    assert syms.source == str(tmp_path / "System.map")


def test_kernel_symbols_without_any_symbols(tmp_path: Path) -> None:
    assert KernelSymbols(tmp_path / "missing").lookup(0x1000) is None
    elf = tmp_path / "vmlinux"
    elf.write_bytes(make_elf([(0x1000000, b"\xeb\xfe", 2)], 0x1000000))  # no section headers, no symtab
    syms = KernelSymbols(elf)
    assert syms.lookup(0x1000000) is None
    assert syms.source is None
    assert read_elf_symbols(elf) is None


def test_corrupt_elf_gives_no_symbols(tmp_path: Path) -> None:
    bad = tmp_path / "vmlinux"
    bad.write_bytes(b"\x7fELF\x02\x01\x01" + b"\xff" * 100)
    assert read_elf_symbols(bad) is None
    assert KernelSymbols(bad).lookup(0x1000) is None


# -- ELF files made by the host's compiler -----------------------------------------------------------------

C_SOURCE = """
int counter;
static int helper(int x) { counter += x; return counter * 3; }
void spin(void) { for (;;) __asm__ volatile(""); }
void _start(void) { helper(2); spin(); }
"""
ASM_SOURCE = """
	.equ ABSOLUTE_CONST, 0x200010
	.text
	.globl _start
_start:	nop
	nop
loop:	jmp loop
"""
# A kernel-like layout: linked at a high virtual address, loaded at a low physical one (AT()).
LINKER_SCRIPT = """
ENTRY(_start)
SECTIONS {
  . = 0xffffffff80200000;
  .text : AT(0x200000) { *(.text*) }
  .bss : AT(0x300000) { *(.bss*) *(COMMON) }
  /DISCARD/ : { *(.note*) }
}
"""


def _cc(tmp_path: Path, name: str, source: str, *flags: str) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (gcc/cc) on PATH to build a test ELF")
    src = tmp_path / name
    src.write_text(source)
    out = tmp_path / (src.stem + ".elf")
    cmd = [cc, "-O1", "-nostdlib", "-static", "-fno-pic", "-no-pie", "-fno-asynchronous-unwind-tables",
           "-o", str(out), str(src), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"{cc} could not build the test ELF: {proc.stderr.strip()[:300]}")
    return out


def _nm(path: Path) -> dict[str, int]:
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) not on PATH")
    out = subprocess.run([nm, str(path)], capture_output=True, text=True, check=True).stdout
    return {parts[2]: int(parts[0], 16) for parts in map(str.split, out.splitlines()) if len(parts) == 3}


@pytest.mark.needs_cc
def test_elf_symtab_agrees_with_nm(tmp_path: Path) -> None:
    elf = _cc(tmp_path, "guest.c", C_SOURCE, "-Wl,-Ttext=0x200000")
    syms = read_elf_symbols(elf)
    assert syms is not None
    nm = _nm(elf)
    for name in ("_start", "spin", "helper"):
        if name not in nm:  # helper may be inlined away
            continue
        assert syms.address(name) == nm[name], name
        assert syms.lookup(nm[name]) == f"{name}+0x0"
        assert syms.lookup(nm[name] + 1) == f"{name}+0x1"
    assert syms.lookup(nm["counter"]) == "counter+0x0"  # data symbols name data addresses
    kernel = KernelSymbols(elf)
    assert kernel.lookup(nm["spin"]) == "spin+0x0"
    assert kernel.source == f"{elf} (ELF symbol table)"


@pytest.mark.needs_cc
def test_elf_labels_count_and_absolute_symbols_do_not(tmp_path: Path) -> None:
    """Assembler labels (STT_NOTYPE) name code, as in firmware/ and in vmlinux's entry code; an .equ
    constant (SHN_ABS) is no address even when its value looks like one."""
    elf = _cc(tmp_path, "guest.S", ASM_SOURCE, "-Wl,-Ttext=0x200000")
    syms = read_elf_symbols(elf)
    assert syms is not None
    assert syms.lookup(0x200000) == "_start+0x0"
    assert syms.lookup(0x200002) == "loop+0x0"
    assert syms.lookup(0x200003) == "loop+0x1"
    assert syms.lookup(0x200010) is None  # past the end of .text, where only ABSOLUTE_CONST points
    assert syms.lookup(0x1FFFFF) is None


@pytest.mark.needs_cc
def test_elf_physical_addresses_translate_through_the_program_headers(tmp_path: Path) -> None:
    script = tmp_path / "kernel.lds"
    script.write_text(LINKER_SCRIPT)
    elf = _cc(tmp_path, "kernel.c", C_SOURCE, "-mcmodel=kernel", f"-Wl,-T,{script}")
    syms = read_elf_symbols(elf)
    assert syms is not None
    spin = syms.address("spin")
    assert spin is not None and spin >= 0xFFFFFFFF80200000
    assert syms.lookup(spin) == "spin+0x0"
    assert syms.lookup(spin - 0xFFFFFFFF80000000) == "spin+0x0"  # the same code seen at its physical address


@pytest.mark.needs_cc
def test_stripped_elf_falls_back_to_system_map(tmp_path: Path) -> None:
    elf = _cc(tmp_path, "guest.c", C_SOURCE, "-Wl,-Ttext=0x200000", "-s")
    assert read_elf_symbols(elf) is None
    _map(tmp_path, "0000000000200000 T from_the_map\n0000000000200100 T _etext\n")
    assert KernelSymbols(elf).lookup(0x200004) == "from_the_map+0x4"
