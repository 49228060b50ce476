"""The aarch64 side of the gdb server: registers, page-table translation and KVM guest debugging.

Registers: the layout gdb knows for aarch64 (GDB manual G.5.2 "AArch64 Features": org.gnu.gdb.aarch64.core
with X0-X30, SP, PC and CPSR; org.gnu.gdb.aarch64.fpu with V0-V31, FPSR and FPCR), each read and written
with ``KVM_GET/SET_ONE_REG`` (api.rst 4.68, "ARM64 registers").  SP is the stack pointer the vCPU is using:
SP_EL1 in EL1h, SP_EL0 otherwise (PSTATE.SP).

Guest debugging (api.rst 4.59 ``KVM_SET_GUEST_DEBUG``, arch/arm64/include/uapi/asm/kvm.h): software
breakpoints are ``BRK #0`` with ``KVM_GUESTDBG_USE_SW_BP``, single steps ``KVM_GUESTDBG_SINGLESTEP``,
hardware breakpoints and watchpoints DBGBVR/DBGBCR and DBGWVR/DBGWCR pairs with ``KVM_GUESTDBG_USE_HW``
(Arm ARM D2.9 "Breakpoint instruction exceptions", D2.10 "Breakpoint exceptions", D2.11 "Watchpoint
exceptions", D2.12 "Software Step exceptions"; KVM_CAP_GUEST_DEBUG_HW_BPS/WPS say how many).  A debug exit
carries the exception's syndrome (ESR_EL2: the exception class in bits 31:26, arch/arm64/include/asm/esr.h)
and, for a watchpoint, the data address.  With software breakpoints on, every ``BRK`` of the guest exits
to pyvmm: one gdb did not plant (the kernel's BUG() and WARN() are ``BRK``) is given back to the guest by
taking the exception it would have taken (Arm ARM D1.10 "Exception entry": ESR_EL1, ELR_EL1, SPSR_EL1,
PSTATE EL1h with D, A, I, F masked, PC at the synchronous vector of VBAR_EL1).

While the guest is stopped its virtual counter is held (``KVM_REG_ARM_TIMER_CNT`` read at the stop and
written back at the resume: KVM keeps the counter's offset, one for the whole VM).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence

from pyvmm.arch.aarch64.machine import get_one_reg, set_one_reg
from pyvmm.arch.aarch64.pagewalk import Translation, translate
from pyvmm.errors import KvmError
from pyvmm.gdb.target import Z_ACCESS, Z_HARDWARE, Z_READ, Z_WRITE, HwPoint, Register, StopWhy
from pyvmm.kvm import abi
from pyvmm.kvm import abi_aarch64 as arm
from pyvmm.kvm.vcpu import VcpuFd
from pyvmm.kvm.vm import VmFd
from pyvmm.log import get_logger
from pyvmm.memory import GuestMemory

log = get_logger(__name__)

# Exception classes of ESR (arch/arm64/include/asm/esr.h ESR_ELx_EC_*): from the guest (a lower EL)
ESR_EC_SHIFT = 26
EC_BREAKPT_LOW = 0x30
EC_SOFTSTP_LOW = 0x32
EC_WATCHPT_LOW = 0x34
EC_BRK64 = 0x3C
BRK_0 = 0xD420_0000  # BRK #0 (Arm ARM C6.2.39), gdb's aarch64 breakpoint

# DBGBCR/DBGWCR fields (Arm ARM D13.3): E (bit 0), PMC/PAC (bits 2:1; 0b11: EL1 and EL0), BAS (bits 8:5 of
# a breakpoint: all four bytes of the instruction; bits 12:5 of a watchpoint: the bytes of its doubleword),
# LSC (bits 4:3 of a watchpoint: 0b01 loads, 0b10 stores, 0b11 both)
_BCR = 1 | 0b11 << 1 | 0xF << 5
_LSC = {Z_READ: 0b01, Z_WRITE: 0b10, Z_ACCESS: 0b11}
_WATCH_KIND = {Z_WRITE: "watch", Z_READ: "rwatch", Z_ACCESS: "awatch"}

# PSTATE (asm/ptrace.h): the mode in bits 3:0 (EL0t 0, EL1t 4, EL1h 5), D A I F in bits 9:6
PSR_MODE_MASK = 0xF
PSR_MODE_EL0t = 0x0
PSR_MODE_EL1t = 0x4
PSR_MODE_EL1h = 0x5
PSR_DAIF = 0x3C0
# Offsets of the synchronous vectors in VBAR_EL1's table (Arm ARM D1.10.2 "Exception vectors")
_VECTOR = {PSR_MODE_EL1t: 0x000, PSR_MODE_EL1h: 0x200, PSR_MODE_EL0t: 0x400}

_EXIT_OFFSET = abi.kvm_run.exit.offset
_FP = arm.kvm_regs.fp_regs.offset


def _fp_reg(offset: int, size_flag: int) -> int:
    return arm.KVM_REG_ARM64 | size_flag | arm.KVM_REG_ARM_CORE | (_FP + offset) // 4


_V = [_fp_reg(arm.user_fpsimd_state.vregs.offset + 16 * i, arm.KVM_REG_SIZE_U128) for i in range(32)]
_FPSR = _fp_reg(arm.user_fpsimd_state.fpsr.offset, arm.KVM_REG_SIZE_U32)
_FPCR = _fp_reg(arm.user_fpsimd_state.fpcr.offset, arm.KVM_REG_SIZE_U32)

REGISTERS: tuple[Register, ...] = (
    *(Register(f"x{i}", 64) for i in range(31)),
    Register("sp", 64),
    Register("pc", 64),
    Register("cpsr", 32),
    *(Register(f"v{i}", 128) for i in range(32)),
    Register("fpsr", 32),
    Register("fpcr", 32),
)
_NUM = {r.name: i for i, r in enumerate(REGISTERS)}

_CPSR_FLAGS = (("SP", 0), ("nRW", 4), ("F", 6), ("I", 7), ("A", 8), ("D", 9), ("SS", 21), ("IL", 20),
               ("PAN", 22), ("UAO", 23), ("V", 28), ("C", 29), ("Z", 30), ("N", 31))
_VECTORS = (("v2d", "ieee_double", 2), ("v2u", "uint64", 2), ("v2i", "int64", 2), ("v4f", "ieee_single", 4),
            ("v4u", "uint32", 4), ("v4i", "int32", 4), ("v8u", "uint16", 8), ("v8i", "int16", 8),
            ("v16u", "uint8", 16), ("v16i", "int8", 16), ("v1u", "uint128", 1), ("v1i", "int128", 1))
_UNIONS = (("vnd", (("f", "v2d"), ("u", "v2u"), ("s", "v2i"))), ("vns", (("f", "v4f"), ("u", "v4u"), ("s", "v4i"))),
           ("vnh", (("u", "v8u"), ("s", "v8i"))), ("vnb", (("u", "v16u"), ("s", "v16i"))),
           ("vnq", (("u", "v1u"), ("s", "v1i"))),
           ("aarch64v", (("d", "vnd"), ("s", "vns"), ("h", "vnh"), ("b", "vnb"), ("q", "vnq"))))

TARGET_XML = (
    '<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target version="1.0">'
    "<architecture>aarch64</architecture>"
    '<feature name="org.gnu.gdb.aarch64.core">'
    '<flags id="cpsr_flags" size="4">'
    + "".join(f'<field name="{n}" start="{b}" end="{b}"/>' for n, b in _CPSR_FLAGS)
    + '<field name="EL" start="2" end="3"/></flags>'
    + "".join(f'<reg name="x{i}" bitsize="64"/>' for i in range(31))
    + '<reg name="sp" bitsize="64" type="data_ptr"/><reg name="pc" bitsize="64" type="code_ptr"/>'
    '<reg name="cpsr" bitsize="32" type="cpsr_flags"/></feature>'
    '<feature name="org.gnu.gdb.aarch64.fpu">'
    + "".join(f'<vector id="{i}" type="{t}" count="{c}"/>' for i, t, c in _VECTORS)
    + "".join(f'<union id="{u}">' + "".join(f'<field name="{n}" type="{t}"/>' for n, t in fields) + "</union>"
              for u, fields in _UNIONS)
    + "".join(f'<reg name="v{i}" bitsize="128" type="aarch64v"/>' for i in range(32))
    + '<reg name="fpsr" bitsize="32"/><reg name="fpcr" bitsize="32"/></feature></target>'
)


def _sp_id(pstate: int) -> int:
    """The stack pointer in use: SP_EL1 in EL1h, SP_EL0 (kvm_regs.regs.sp) in EL1t and EL0."""
    return arm.REG_SP_EL1 if pstate & PSR_MODE_MASK == PSR_MODE_EL1h else arm.REG_SP


class Aarch64DebugTarget:
    xml = TARGET_XML
    registers: Sequence[Register] = REGISTERS
    break_insn = BRK_0.to_bytes(4, "little")
    break_kind = 4
    watch_types = frozenset({Z_WRITE, Z_READ, Z_ACCESS})
    sw_breakpoints: bool
    single_step: bool

    def __init__(self, mem: GuestMemory, vm: VmFd, clock_vcpu: VcpuFd) -> None:
        self.mem = mem
        # What this host's KVM offers (api.rst 8.x: KVM_CAP_SET_GUEST_DEBUG, KVM_CAP_GUEST_DEBUG_HW_BPS/WPS)
        debug = bool(vm.check_extension(abi.KVM_CAP_SET_GUEST_DEBUG))
        self.sw_breakpoints = self.single_step = debug
        self.hw_breakpoints = min(vm.check_extension(abi.KVM_CAP_GUEST_DEBUG_HW_BPS), arm.KVM_ARM_MAX_DBG_REGS) if debug else 0
        self.hw_watchpoints = min(vm.check_extension(abi.KVM_CAP_GUEST_DEBUG_HW_WPS), arm.KVM_ARM_MAX_DBG_REGS) if debug else 0
        self.hw_slots = self.hw_breakpoints + self.hw_watchpoints  # separate registers for each kind
        self._clock_vcpu = clock_vcpu
        self._clock: int | None = None
        self._clock_ok = True

    def describe(self) -> str:
        if not self.sw_breakpoints:
            return "this host's KVM has no guest debugging (KVM_CAP_SET_GUEST_DEBUG): registers and memory only"
        return (f"software breakpoints (BRK) and single steps; {self.hw_breakpoints} hardware breakpoints and "
                f"{self.hw_watchpoints} watchpoints")

    # -- registers --------------------------------------------------------------------------------------
    def read_registers(self, vcpu: VcpuFd) -> list[int | None]:
        out: list[int | None] = [get_one_reg(vcpu, arm.reg_x(i)) for i in range(31)]
        pstate = get_one_reg(vcpu, arm.REG_PSTATE)
        out += [get_one_reg(vcpu, _sp_id(pstate)), get_one_reg(vcpu, arm.REG_PC), pstate & 0xFFFF_FFFF]
        try:
            out += [get_one_reg(vcpu, v) for v in _V]
            out += [get_one_reg(vcpu, _FPSR), get_one_reg(vcpu, _FPCR)]
        except KvmError:  # a vCPU without FP/SIMD state (not seen with KVM): gdb shows them unavailable
            out += [None] * (len(REGISTERS) - len(out))
        return out

    def write_registers(self, vcpu: VcpuFd, values: dict[int, int]) -> None:
        for num, value in values.items():
            name = REGISTERS[num].name
            if name.startswith("x"):
                set_one_reg(vcpu, arm.reg_x(int(name[1:])), value)
            elif name == "sp":
                set_one_reg(vcpu, _sp_id(get_one_reg(vcpu, arm.REG_PSTATE)), value)
            elif name == "pc":
                set_one_reg(vcpu, arm.REG_PC, value)
            elif name == "cpsr":
                pstate = get_one_reg(vcpu, arm.REG_PSTATE)
                set_one_reg(vcpu, arm.REG_PSTATE, (pstate & ~0xFFFF_FFFF) | value)
            elif name.startswith("v"):
                set_one_reg(vcpu, _V[int(name[1:])], value)
            elif name == "fpsr":
                set_one_reg(vcpu, _FPSR, value)
            elif name == "fpcr":
                set_one_reg(vcpu, _FPCR, value)

    def program_counter(self, vcpu: VcpuFd) -> int:
        return get_one_reg(vcpu, arm.REG_PC)

    # -- memory -----------------------------------------------------------------------------------------
    def translate(self, vcpu: VcpuFd, vaddr: int) -> int:
        regs = Translation(*(get_one_reg(vcpu, r) for r in (arm.REG_SCTLR_EL1, arm.REG_TCR_EL1, arm.REG_TTBR0_EL1,
                                                        arm.REG_TTBR1_EL1)))
        return translate(self.mem, regs, vaddr)

    # -- guest debugging --------------------------------------------------------------------------------
    def check_hw_point(self, point: HwPoint) -> str | None:
        if point.type == Z_HARDWARE:
            return None if point.addr % 4 == 0 else f"an instruction address is 4-byte aligned ({point.addr:#x})"
        if not 1 <= point.length <= 8 or (point.addr % 8) + point.length > 8:
            return f"a watchpoint covers 1 to 8 bytes within one aligned doubleword ({point.length} at {point.addr:#x})"
        return None

    def set_guest_debug(self, vcpu: VcpuFd, *, sw: bool, step: bool, hw: Sequence[HwPoint]) -> None:
        dbg = arm.kvm_guest_debug()
        control = (arm.KVM_GUESTDBG_USE_SW_BP if sw else 0) | (abi.KVM_GUESTDBG_SINGLESTEP if step else 0)
        if hw:
            control |= arm.KVM_GUESTDBG_USE_HW
            b = w = 0
            for p in hw:
                if p.type == Z_HARDWARE:
                    dbg.arch.dbg_bvr[b], dbg.arch.dbg_bcr[b] = p.addr, _BCR
                    b += 1
                else:
                    bas = ((1 << p.length) - 1) << (p.addr % 8)
                    dbg.arch.dbg_wvr[w] = p.addr & ~7
                    dbg.arch.dbg_wcr[w] = 1 | 0b11 << 1 | _LSC[p.type] << 3 | bas << 5
                    w += 1
        dbg.control = control | abi.KVM_GUESTDBG_ENABLE if control else 0
        vcpu.set("KVM_SET_GUEST_DEBUG", arm.KVM_SET_GUEST_DEBUG, dbg)

    def debug_exit(self, vcpu: VcpuFd, hw: Sequence[HwPoint], is_breakpoint: Callable[[int], bool]) -> StopWhy | None:
        ex = arm.kvm_debug_exit_arch.from_buffer_copy(
            bytes(vcpu.run_view[_EXIT_OFFSET:_EXIT_OFFSET + ctypes.sizeof(arm.kvm_debug_exit_arch)]))
        ec = ex.hsr >> ESR_EC_SHIFT
        if ec == EC_BRK64:
            if is_breakpoint(self.program_counter(vcpu)):
                return StopWhy("swbreak")
            self._guest_brk(vcpu, ex.hsr)  # the guest's own BRK (BUG, WARN): its exception, not gdb's
            return None
        if ec == EC_SOFTSTP_LOW:
            return StopWhy("step")
        if ec == EC_BREAKPT_LOW:
            return StopWhy("hwbreak")
        if ec == EC_WATCHPT_LOW:
            for p in hw:
                if p.type != Z_HARDWARE and p.addr & ~7 <= ex.far < (p.addr & ~7) + 8:
                    return StopWhy(_WATCH_KIND[p.type], p.addr)
            return StopWhy("watch", ex.far)
        log.warning("vCPU %d: debug exit with syndrome %#x that gdb did not ask for", vcpu.index, ex.hsr)
        return StopWhy("step")

    def _guest_brk(self, vcpu: VcpuFd, esr: int) -> None:
        """Take the guest's BRK exception to its EL1 as the CPU would have without gdb."""
        pstate = get_one_reg(vcpu, arm.REG_PSTATE)
        vector = _VECTOR.get(pstate & PSR_MODE_MASK)
        if vector is None:  # not from EL0 or EL1 in AArch64: nothing the guest kernel could have taken
            log.warning("vCPU %d: BRK in PSTATE %#x: left to gdb", vcpu.index, pstate)
            return
        set_one_reg(vcpu, arm.REG_ESR_EL1, esr)
        set_one_reg(vcpu, arm.REG_ELR_EL1, self.program_counter(vcpu))
        set_one_reg(vcpu, arm.REG_SPSR_EL1, pstate)
        set_one_reg(vcpu, arm.REG_PSTATE, PSR_MODE_EL1h | PSR_DAIF)
        set_one_reg(vcpu, arm.REG_PC, get_one_reg(vcpu, arm.REG_VBAR_EL1) + vector)

    def emulation_breakpoint(self, vcpu: VcpuFd, is_breakpoint: Callable[[int], bool]) -> bool:
        return False  # KVM on arm64 reports BRK as a debug exit, never as an emulation failure

    # -- the guest's clock ------------------------------------------------------------------------------
    def freeze_clock(self) -> None:
        if not self._clock_ok:
            return
        try:
            self._clock = get_one_reg(self._clock_vcpu, arm.KVM_REG_ARM_TIMER_CNT)
        except KvmError as err:
            log.debug("virtual counter not held: %s", err)
            self._clock_ok = False

    def thaw_clock(self) -> None:
        if self._clock is None:
            return
        value, self._clock = self._clock, None
        try:
            set_one_reg(self._clock_vcpu, arm.KVM_REG_ARM_TIMER_CNT, value)
        except KvmError as err:
            log.debug("virtual counter not restored: %s", err)
            self._clock_ok = False
