"""Compare pyvmm's arm64 ctypes KVM ABI (pyvmm/kvm/abi_aarch64.py) with Debian's arm64 kernel headers
(linux-libc-dev-arm64-cross, /usr/aarch64-linux-gnu/include) on an x86 host: the cross compiler turns a
probe of ``const unsigned long long`` values (sizeof, offsetof, every KVM_* constant) into assembly, and
the test reads the values back from its ``.xword`` directives.  Nothing is run, so no arm64 machine or
emulator is needed."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pyvmm.kvm import abi_aarch64 as arm
from tests.unit.test_kvm_abi_cc import _constants, _fields

pytestmark = pytest.mark.needs_cc

CROSS_CC = "aarch64-linux-gnu-gcc"
HEADERS = Path("/usr/aarch64-linux-gnu/include/asm/kvm.h")

STRUCTS: dict[str, tuple[type[ctypes.Structure], str]] = {
    "kvm_vcpu_init": (arm.kvm_vcpu_init, "struct kvm_vcpu_init"),
    "kvm_regs": (arm.kvm_regs, "struct kvm_regs"),
    "user_pt_regs": (arm.user_pt_regs, "struct user_pt_regs"),
    "user_fpsimd_state": (arm.user_fpsimd_state, "struct user_fpsimd_state"),
    "kvm_guest_debug_arch": (arm.kvm_guest_debug_arch, "struct kvm_guest_debug_arch"),
    "kvm_guest_debug": (arm.kvm_guest_debug, "struct kvm_guest_debug"),
    "kvm_debug_exit_arch": (arm.kvm_debug_exit_arch, "struct kvm_debug_exit_arch"),
}
C_NAMES = {"reserved": "__reserved"}
PYTHON_ONLY = {("kvm_regs", "pad")}  # explicit padding that C leaves implicit
CONSTANTS = _constants(arm)
# Values written in Python that the headers spell as expressions or enums; still compared.
ENUMS = {"KVM_DEV_TYPE_ARM_VGIC_V2", "KVM_DEV_TYPE_ARM_VGIC_V3"}
# Register ids pyvmm computes, against the header's own macros.
CORE = "KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG"
REGISTER_IDS = {
    "REG_SP_EL1": f"{CORE}(sp_el1)",
    "REG_ELR_EL1": f"{CORE}(elr_el1)",
    "REG_SPSR_EL1": f"{CORE}(spsr[KVM_SPSR_EL1])",
    "REG_SCTLR_EL1": "ARM64_SYS_REG(3, 0, 1, 0, 0)",
    "REG_TTBR0_EL1": "ARM64_SYS_REG(3, 0, 2, 0, 0)",
    "REG_TTBR1_EL1": "ARM64_SYS_REG(3, 0, 2, 0, 1)",
    "REG_TCR_EL1": "ARM64_SYS_REG(3, 0, 2, 0, 2)",
    "REG_ESR_EL1": "ARM64_SYS_REG(3, 0, 5, 2, 0)",
    "REG_FAR_EL1": "ARM64_SYS_REG(3, 0, 6, 0, 0)",
    "REG_VBAR_EL1": "ARM64_SYS_REG(3, 0, 12, 0, 0)",
}


def _c_name(path: str) -> str:
    return ".".join(C_NAMES.get(part, part) for part in path.split("."))


@pytest.fixture(scope="module")
def arm64_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which(CROSS_CC)
    if cc is None:
        pytest.skip(f"{CROSS_CC} is not installed (Debian: gcc-aarch64-linux-gnu)")
    if not HEADERS.exists():
        pytest.skip(f"{HEADERS} missing (Debian: linux-libc-dev-arm64-cross)")
    probes: dict[str, str] = {}
    for key, (cls, ctype) in STRUCTS.items():
        probes[f"sizeof {key}"] = f"sizeof({ctype})"
        for path, _, _, _ in _fields(key, cls):
            if (key, path) in PYTHON_ONLY:
                continue
            probes[f"offset {key}.{path}"] = f"offsetof({ctype}, {_c_name(path)})"
            probes[f"size {key}.{path}"] = f"sizeof((({ctype} *)0)->{_c_name(path)})"
    for name in CONSTANTS:
        probes[f"const {name}"] = name
    for name, expr in REGISTER_IDS.items():
        probes[f"reg {name}"] = expr
    names = list(probes)
    # asm/kvm.h spells the vGIC v3 sizes with SZ_64K, which only the kernel's own sizes.h defines
    lines = ["#include <stddef.h>", "#include <linux/kvm.h>", "#define SZ_64K 0x10000"]
    lines += [f"const unsigned long long v{i} = (unsigned long long)({probes[n]});" for i, n in enumerate(names)]
    tmp = tmp_path_factory.mktemp("kvm_abi_aarch64")
    src, asm = tmp / "probe.c", tmp / "probe.s"
    src.write_text("\n".join(lines) + "\n")
    build = subprocess.run([cc, "-S", "-O0", "-o", str(asm), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    # a value is ".xword N", or ".zero 8" for 0
    found = {int(i): int(v or 0) & (2**64 - 1)
             for i, v in re.findall(r"^v(\d+):\s*\n\s*(?:\.xword\s+(-?\d+)|\.zero\s+8)", asm.read_text(), re.M)}
    assert len(found) == len(names), "could not read every probe value from the assembly"
    return {names[i]: v for i, v in found.items()}


@pytest.mark.parametrize("key", list(STRUCTS))
def test_arm64_struct_layout_matches_header(arm64_values: dict[str, int], key: str) -> None:
    cls, _ = STRUCTS[key]
    assert arm64_values[f"sizeof {key}"] == ctypes.sizeof(cls)
    bad = [f"{path}: python ({off}, {size}) C ({arm64_values[f'offset {key}.{path}']}, "
           f"{arm64_values[f'size {key}.{path}']})"
           for path, _, off, size in _fields(key, cls) if (key, path) not in PYTHON_ONLY
           and (arm64_values[f"offset {key}.{path}"], arm64_values[f"size {key}.{path}"]) != (off, size)]
    assert not bad


def test_arm64_constants_match_header(arm64_values: dict[str, int]) -> None:
    assert len(CONSTANTS) >= 25
    assert set(CONSTANTS) >= ENUMS
    wrong = {n: (hex(v), hex(arm64_values[f"const {n}"])) for n, v in CONSTANTS.items()
             if arm64_values[f"const {n}"] != v}
    assert not wrong


def test_core_register_ids(arm64_values: dict[str, int]) -> None:
    """KVM_REG_ARM_CORE_REG(name) = offsetof(struct kvm_regs, name) / 4 (asm/kvm.h), for PC, PSTATE, X0."""
    base = arm.KVM_REG_ARM64 | arm.KVM_REG_SIZE_U64 | arm.KVM_REG_ARM_CORE
    assert base | arm64_values["offset kvm_regs.regs.pc"] // 4 == arm.REG_PC
    assert base | arm64_values["offset kvm_regs.regs.pstate"] // 4 == arm.REG_PSTATE
    assert arm.reg_x(0) == base | arm64_values["offset kvm_regs.regs.regs"] // 4
    assert arm.reg_x(30) == arm.reg_x(0) + 60
    with pytest.raises(ValueError):
        arm.reg_x(31)


def test_register_ids_match_the_headers_macros(arm64_values: dict[str, int]) -> None:
    wrong = {n: (hex(getattr(arm, n)), hex(arm64_values[f"reg {n}"])) for n in REGISTER_IDS
             if arm64_values[f"reg {n}"] != getattr(arm, n)}
    assert not wrong


def test_register_size_from_id() -> None:
    """linux/kvm.h: an id's KVM_REG_SIZE field is log2 of the size in bytes."""
    assert arm.reg_size(arm.REG_PC) == 8
    assert arm.reg_size(arm.KVM_REG_ARM64 | arm.KVM_REG_SIZE_U32) == 4
    assert arm.reg_size(arm.KVM_REG_ARM64 | arm.KVM_REG_SIZE_U128) == 16
