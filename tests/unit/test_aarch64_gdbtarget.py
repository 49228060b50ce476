"""The aarch64 gdb target against a fake vCPU (its registers in a dict behind KVM_GET/SET_ONE_REG): the
target description, the stack pointer in use, the debug registers it programs, and how each debug exit is
decoded, the guest's own BRK taken to its EL1 as the CPU would have."""

from __future__ import annotations

import ctypes
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pytest

from pyvmm.arch.aarch64 import gdbtarget as g
from pyvmm.gdb.target import Z_ACCESS, Z_HARDWARE, Z_WRITE, HwPoint
from pyvmm.kvm import abi
from pyvmm.kvm import abi_aarch64 as arm
from pyvmm.memory import GuestMemory


class FakeVm:
    def check_extension(self, cap: int) -> int:
        return {abi.KVM_CAP_SET_GUEST_DEBUG: 1, abi.KVM_CAP_GUEST_DEBUG_HW_BPS: 6,
                abi.KVM_CAP_GUEST_DEBUG_HW_WPS: 4}.get(cap, 0)


class FakeVcpu:
    index = 0

    def __init__(self) -> None:
        self.regs: dict[int, int] = {}
        self.debug: arm.kvm_guest_debug | None = None
        self.run_view = memoryview(bytearray(4096))

    def get(self, what: str, request: int, arg: ctypes.Structure) -> None:
        assert isinstance(arg, abi.kvm_one_reg) and request == abi.KVM_GET_ONE_REG
        size = 1 << ((arg.id >> 52) & 0xF)
        ctypes.memmove(arg.addr, self.regs.get(arg.id, 0).to_bytes(size, "little"), size)

    def set(self, what: str, request: int, arg: ctypes.Structure) -> None:
        if isinstance(arg, arm.kvm_guest_debug):
            self.debug = arm.kvm_guest_debug.from_buffer_copy(bytes(arg))
            return
        assert isinstance(arg, abi.kvm_one_reg) and request == abi.KVM_SET_ONE_REG
        size = 1 << ((arg.id >> 52) & 0xF)
        self.regs[arg.id] = int.from_bytes(ctypes.string_at(arg.addr, size), "little")

    def exit(self, hsr: int, far: int = 0) -> None:
        ex = arm.kvm_debug_exit_arch(hsr=hsr, far=far)
        self.run_view[g._EXIT_OFFSET:g._EXIT_OFFSET + ctypes.sizeof(ex)] = bytes(ex)


@pytest.fixture
def target() -> Iterator[g.Aarch64DebugTarget]:
    mem = GuestMemory.single(1 << 20)
    yield g.Aarch64DebugTarget(mem, FakeVm(), FakeVcpu())  # type: ignore[arg-type]
    mem.close()


def test_target_description_matches_the_register_order() -> None:
    root = ET.fromstring(g.TARGET_XML.split("?>", 1)[1].split(">", 1)[1])  # past the XML and DOCTYPE lines
    assert root.findtext("architecture") == "aarch64"
    names = [(r.get("name"), int(r.get("bitsize", 0))) for f in root.iter("feature") for r in f.iter("reg")]
    assert names == [(r.name, r.bits) for r in g.REGISTERS]
    assert [f.get("name") for f in root.iter("feature")] == ["org.gnu.gdb.aarch64.core", "org.gnu.gdb.aarch64.fpu"]
    assert names[31:34] == [("sp", 64), ("pc", 64), ("cpsr", 32)]


def test_capabilities_come_from_kvm(target: g.Aarch64DebugTarget) -> None:
    assert (target.sw_breakpoints, target.single_step, target.hw_breakpoints, target.hw_watchpoints) == (True, True, 6, 4)
    assert target.break_insn == bytes.fromhex("000020d4") and target.break_kind == 4  # BRK #0


@pytest.mark.parametrize(("mode", "sp_id"), [(g.PSR_MODE_EL1h, arm.REG_SP_EL1), (g.PSR_MODE_EL1t, arm.REG_SP),
                                             (g.PSR_MODE_EL0t, arm.REG_SP)])
def test_sp_is_the_one_in_use(target: g.Aarch64DebugTarget, mode: int, sp_id: int) -> None:
    vcpu = FakeVcpu()
    vcpu.regs.update({arm.REG_PSTATE: 0x6000_0000 | mode, arm.REG_SP: 0x1000, arm.REG_SP_EL1: 0x2000,
                      arm.REG_PC: 0xFFFF_8000_0801_0000, arm.reg_x(3): 33})
    values = target.read_registers(vcpu)  # type: ignore[arg-type]
    assert values[3] == 33 and values[31] == vcpu.regs[sp_id] and values[32] == 0xFFFF_8000_0801_0000
    assert values[33] == 0x6000_0000 | mode and len(values) == len(g.REGISTERS)
    target.write_registers(vcpu, {31: 0x3000, 33: 0x2000_0000 | mode, 34: 1 << 100})  # type: ignore[arg-type]
    assert vcpu.regs[sp_id] == 0x3000 and vcpu.regs[arm.REG_PSTATE] == 0x2000_0000 | mode
    assert vcpu.regs[g._V[0]] == 1 << 100


def test_debug_registers_for_breakpoints_and_watchpoints(target: g.Aarch64DebugTarget) -> None:
    vcpu = FakeVcpu()
    hw = [HwPoint(Z_HARDWARE, 0xFFFF_8000_0800_1000, 4), HwPoint(Z_WRITE, 0x1003, 2), HwPoint(Z_ACCESS, 0x2000, 8)]
    target.set_guest_debug(vcpu, sw=True, step=True, hw=hw)  # type: ignore[arg-type]
    d = vcpu.debug
    assert d is not None
    assert d.control == (abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_SINGLESTEP | arm.KVM_GUESTDBG_USE_SW_BP
                         | arm.KVM_GUESTDBG_USE_HW)
    assert (d.arch.dbg_bvr[0], d.arch.dbg_bcr[0]) == (0xFFFF_8000_0800_1000, 0x1E7)  # E, PMC=EL1+EL0, BAS=0xF
    # E, PAC=EL1+EL0, LSC=stores, BAS=bytes 3-4 of the doubleword at 0x1000
    assert (d.arch.dbg_wvr[0], d.arch.dbg_wcr[0]) == (0x1000, 1 | 0b11 << 1 | 0b10 << 3 | 0b11000 << 5)
    assert (d.arch.dbg_wvr[1], d.arch.dbg_wcr[1]) == (0x2000, 1 | 0b11 << 1 | 0b11 << 3 | 0xFF << 5)
    target.set_guest_debug(vcpu, sw=False, step=False, hw=[])  # type: ignore[arg-type]
    assert vcpu.debug is not None and vcpu.debug.control == 0
    assert target.check_hw_point(HwPoint(Z_WRITE, 0x1006, 4)) is not None  # crosses a doubleword


def test_debug_exits(target: g.Aarch64DebugTarget) -> None:
    vcpu = FakeVcpu()
    vcpu.regs[arm.REG_PC] = 0x4008_0000
    vcpu.exit(g.EC_BRK64 << g.ESR_EC_SHIFT | 1 << 25)
    assert target.debug_exit(vcpu, [], lambda pc: pc == 0x4008_0000) == g.StopWhy("swbreak")  # type: ignore[arg-type]
    vcpu.exit(g.EC_SOFTSTP_LOW << g.ESR_EC_SHIFT)
    assert target.debug_exit(vcpu, [], lambda pc: False) == g.StopWhy("step")  # type: ignore[arg-type]
    vcpu.exit(g.EC_BREAKPT_LOW << g.ESR_EC_SHIFT)
    assert target.debug_exit(vcpu, [], lambda pc: False) == g.StopWhy("hwbreak")  # type: ignore[arg-type]
    watch = HwPoint(Z_ACCESS, 0x2004, 4)
    vcpu.exit(g.EC_WATCHPT_LOW << g.ESR_EC_SHIFT, far=0x2006)
    assert target.debug_exit(vcpu, [watch], lambda pc: False) == g.StopWhy("awatch", 0x2004)  # type: ignore[arg-type]


def test_the_guests_own_brk_is_taken_to_its_el1(target: g.Aarch64DebugTarget) -> None:
    vcpu = FakeVcpu()
    esr = g.EC_BRK64 << g.ESR_EC_SHIFT | 1 << 25 | 0x800  # BRK #0x800: the kernel's BUG()
    vcpu.regs.update({arm.REG_PC: 0xFFFF_8000_0812_3454, arm.REG_PSTATE: g.PSR_MODE_EL1h | 0x2000_0000,
                      arm.REG_VBAR_EL1: 0xFFFF_8000_0801_0800})
    vcpu.exit(esr)
    assert target.debug_exit(vcpu, [], lambda pc: False) is None  # type: ignore[arg-type]
    r = vcpu.regs
    assert (r[arm.REG_ESR_EL1], r[arm.REG_ELR_EL1], r[arm.REG_SPSR_EL1]) == (esr, 0xFFFF_8000_0812_3454,
                                                                             g.PSR_MODE_EL1h | 0x2000_0000)
    assert r[arm.REG_PSTATE] == g.PSR_MODE_EL1h | g.PSR_DAIF
    assert r[arm.REG_PC] == 0xFFFF_8000_0801_0800 + 0x200  # current EL with SP_EL1, synchronous


def test_translation_with_the_mmu_off_is_identity(target: g.Aarch64DebugTarget) -> None:
    assert target.translate(FakeVcpu(), 0x4008_0000) == 0x4008_0000  # type: ignore[arg-type]
