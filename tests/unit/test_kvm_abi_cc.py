"""Compare pyvmm's ctypes KVM ABI (pyvmm/kvm/abi.py, abi_x86_64.py) with the installed <linux/kvm.h>:
a C probe prints sizeof, every field's offsetof and sizeof (nested structs and the anonymous exit union
of kvm_run included), and the value of every KVM_* integer constant the modules define: all ioctl
request numbers, and the exit reasons, capabilities and flags."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from pyvmm.kvm import abi
from pyvmm.kvm import abi_x86_64 as x86

pytestmark = pytest.mark.needs_cc

HEADER = Path("/usr/include/linux/kvm.h")

# Python struct -> its C type.  Helpers without a C counterpart (kvm_enable_cap_args, the exit-union
# members, the vcpu-events sub-structs) are covered as members of the structs that embed them.
STRUCTS: dict[str, tuple[type[ctypes.Structure], str]] = {
    "kvm_run": (abi.kvm_run, "struct kvm_run"),
    "kvm_userspace_memory_region": (abi.kvm_userspace_memory_region, "struct kvm_userspace_memory_region"),
    "kvm_irq_level": (abi.kvm_irq_level, "struct kvm_irq_level"),
    "kvm_irqfd": (abi.kvm_irqfd, "struct kvm_irqfd"),
    "kvm_ioeventfd": (abi.kvm_ioeventfd, "struct kvm_ioeventfd"),
    "kvm_enable_cap": (abi.kvm_enable_cap, "struct kvm_enable_cap"),
    "kvm_one_reg": (abi.kvm_one_reg, "struct kvm_one_reg"),
    "kvm_create_device": (abi.kvm_create_device, "struct kvm_create_device"),
    "kvm_device_attr": (abi.kvm_device_attr, "struct kvm_device_attr"),
    "kvm_coalesced_mmio_zone": (abi.kvm_coalesced_mmio_zone, "struct kvm_coalesced_mmio_zone"),
    "kvm_coalesced_mmio": (abi.kvm_coalesced_mmio, "struct kvm_coalesced_mmio"),
    "kvm_coalesced_mmio_ring": (abi.kvm_coalesced_mmio_ring, "struct kvm_coalesced_mmio_ring"),  # + flex array
    "kvm_regs": (x86.kvm_regs, "struct kvm_regs"),
    "kvm_segment": (x86.kvm_segment, "struct kvm_segment"),
    "kvm_dtable": (x86.kvm_dtable, "struct kvm_dtable"),
    "kvm_sregs": (x86.kvm_sregs, "struct kvm_sregs"),
    "kvm_fpu": (x86.kvm_fpu, "struct kvm_fpu"),
    "kvm_cpuid_entry2": (x86.kvm_cpuid_entry2, "struct kvm_cpuid_entry2"),
    "kvm_cpuid2_header": (x86.kvm_cpuid2_header, "struct kvm_cpuid2"),  # the flexible array adds 0
    "kvm_msr_entry": (x86.kvm_msr_entry, "struct kvm_msr_entry"),
    "kvm_msrs_header": (x86.kvm_msrs_header, "struct kvm_msrs"),
    "kvm_msr_list_header": (x86.kvm_msr_list_header, "struct kvm_msr_list"),
    "kvm_lapic_state": (x86.kvm_lapic_state, "struct kvm_lapic_state"),
    "kvm_pit_config": (x86.kvm_pit_config, "struct kvm_pit_config"),
    "kvm_vcpu_events": (x86.kvm_vcpu_events, "struct kvm_vcpu_events"),
    "kvm_translation": (x86.kvm_translation, "struct kvm_translation"),
    "kvm_mp_state": (x86.kvm_mp_state, "struct kvm_mp_state"),
    "kvm_guest_debug": (x86.kvm_guest_debug, "struct kvm_guest_debug"),
    "kvm_debug_exit_arch": (x86.kvm_debug_exit_arch, "struct kvm_debug_exit_arch"),
    "kvm_clock_data": (x86.kvm_clock_data, "struct kvm_clock_data"),
}
if hasattr(x86, "kvm_xsave"):
    STRUCTS["kvm_xsave"] = (x86.kvm_xsave, "struct kvm_xsave")

# Python field path -> C member designator, where they differ.
C_NAMES = {
    ("kvm_run", "exit"): "padding",  # the anonymous union; its char padding[256] spans all of it
    ("kvm_vcpu_events", "triple_fault_pending"): "triple_fault.pending",
}
ANONYMOUS = {("kvm_run", "exit")}  # members of these are named without the prefix in C
PYTHON_ONLY_CONSTANTS = {"KVM_RUN_EXIT_OFFSET"}


def _fields(key: str, cls: type[ctypes.Structure | ctypes.Union], py: str = "", c: str = "",
            base: int = 0) -> list[tuple[str, str, int, int]]:
    """(python path, C designator, offset, size) for every field, recursing into nested structs."""
    out = []
    for name, ftype, *_ in cls._fields_:
        path = f"{py}{name}"
        desc = getattr(cls, name)
        cname = C_NAMES.get((key, path), f"{c}{name}")
        out.append((path, cname, base + desc.offset, desc.size))
        if isinstance(ftype, type) and issubclass(ftype, ctypes.Structure | ctypes.Union):
            prefix = c if (key, path) in ANONYMOUS else f"{cname}."
            out += _fields(key, ftype, f"{path}.", prefix, base + desc.offset)
    return out


def _constants(module: ModuleType) -> dict[str, int]:
    return {
        name: value for name, value in vars(module).items()
        if name.startswith("KVM_") and isinstance(value, int) and not isinstance(value, bool)
    }


def _is_request(value: int) -> bool:
    return (value >> 8) & 0xFF == 0xAE  # the KVMIO type byte of _IOC


CONSTANTS = {**_constants(abi), **_constants(x86)}
REQUESTS = {n: v for n, v in CONSTANTS.items() if _is_request(v)}


def _probe(tmp_path: Path) -> dict[str, int]:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (gcc/cc) on PATH")
    if not HEADER.exists():
        pytest.skip(f"{HEADER} missing (Debian: install linux-libc-dev)")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for key, (cls, ctype) in STRUCTS.items():
        lines.append(f'  printf("sizeof {key} %zu\\n", sizeof({ctype}));')
        for path, cname, _, _ in _fields(key, cls):
            lines.append(f'  printf("offset {key}.{path} %zu\\n", offsetof({ctype}, {cname}));')
            lines.append(f'  printf("size {key}.{path} %zu\\n", sizeof((({ctype} *)0)->{cname}));')
    for name in CONSTANTS:
        lines += [f"#ifdef {name}", f'  printf("const {name} %llu\\n", (unsigned long long)({name}));',
                  "#endif"]
    lines += ["  return 0;", "}"]
    src, exe = tmp_path / "kvm_probe.c", tmp_path / "kvm_probe"
    src.write_text("\n".join(lines) + "\n")
    build = subprocess.run([cc, "-Wall", "-o", str(exe), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {f"{kind} {name}": int(v) for kind, name, v in (line.split() for line in out.splitlines())}


@pytest.fixture(scope="module")
def c_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    return _probe(tmp_path_factory.mktemp("kvm_abi"))


@pytest.mark.parametrize("key", list(STRUCTS))
def test_struct_layout_matches_header(c_values: dict[str, int], key: str) -> None:
    cls, _ = STRUCTS[key]
    assert c_values[f"sizeof {key}"] == ctypes.sizeof(cls)
    bad = [
        f"{path}: python offset {off} size {size}, C offset {c_values[f'offset {key}.{path}']} "
        f"size {c_values[f'size {key}.{path}']}"
        for path, _, off, size in _fields(key, cls)
        if (c_values[f"offset {key}.{path}"], c_values[f"size {key}.{path}"]) != (off, size)
    ]
    assert not bad


def test_kvm_run_union_members(c_values: dict[str, int]) -> None:
    """The offsets the vCPU loop reads through the exit union, spelled out."""
    for path in ("exit.io.port", "exit.io.data_offset", "exit.mmio.phys_addr", "exit.mmio.data", "exit.mmio.len",
                 "exit.mmio.is_write", "exit.internal.suberror", "exit.internal.data",
                 "exit.system_event.type", "exit.system_event.data", "kvm_valid_regs", "s"):
        assert f"offset kvm_run.{path}" in c_values, path
    assert c_values["offset kvm_vcpu_events.exception_payload"] == 56


def test_coalesced_ring_abi_is_checked(c_values: dict[str, int]) -> None:
    """The coalesced-I/O pieces pyvmm reads without the kernel's help: the ring page and its entries."""
    for name in ("KVM_CAP_COALESCED_MMIO", "KVM_CAP_COALESCED_PIO", "KVM_REGISTER_COALESCED_MMIO",
                 "KVM_UNREGISTER_COALESCED_MMIO", "KVM_COALESCED_MMIO_PAGE_OFFSET"):
        assert f"const {name}" in c_values, name
    assert c_values["offset kvm_coalesced_mmio.pio"] == 12
    assert c_values["offset kvm_coalesced_mmio_zone.pio"] == 12


def test_request_numbers_match_header(c_values: dict[str, int]) -> None:
    assert len(REQUESTS) >= 30
    missing = [n for n in REQUESTS if f"const {n}" not in c_values]
    assert not missing, f"not in <linux/kvm.h>: {missing}"
    wrong = {n: f"{v:#x} != C {c_values[f'const {n}']:#x}" for n, v in REQUESTS.items()
             if c_values[f"const {n}"] != v}
    assert not wrong


def test_other_constants_match_header(c_values: dict[str, int]) -> None:
    others = {n: v for n, v in CONSTANTS.items() if n not in REQUESTS and n not in PYTHON_ONLY_CONSTANTS}
    missing = [n for n in others if f"const {n}" not in c_values]
    assert not missing, f"not in <linux/kvm.h>: {missing}"
    wrong = {n: (v, c_values[f"const {n}"]) for n, v in others.items() if c_values[f"const {n}"] != v}
    assert not wrong
