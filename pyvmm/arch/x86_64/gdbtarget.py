"""The x86_64 side of the gdb server: registers, page-table translation and KVM guest debugging.

Registers: the amd64 layout gdb knows (GDB manual G.5.1 "i386 Features": org.gnu.gdb.i386.core with
the general, segment and x87 registers, org.gnu.gdb.i386.sse, org.gnu.gdb.i386.segments for the FS and
GS bases), and pyvmm's own feature with the control registers and EFER, which gdb shows as
``$cr3`` and in ``info registers system``.

Guest debugging (api.rst 4.59 ``KVM_SET_GUEST_DEBUG``, asm/kvm.h): software breakpoints are ``int3``
(0xcc) with ``KVM_GUESTDBG_USE_SW_BP``, so a ``#BP`` exits to pyvmm as ``KVM_EXIT_DEBUG`` (exception 3,
the address of the ``int3``); one gdb did not plant is the guest's own and goes back to it with
``KVM_GUESTDBG_INJECT_BP``.  Hardware breakpoints and watchpoints are DR0-DR3 with DR7 (SDM vol. 3,
17.2.4 "Debug Control Register (DR7)": an enable bit per slot, then R/W and LEN fields of two bits
each from bit 16); the exit's DR6 says which slot fired (B0-B3) or that a single step ended (BS).

A software KVM that cannot emulate ``int3`` stops with an emulation failure instead (docs/hosts.md);
:meth:`X86DebugTarget.emulation_breakpoint` recognises gdb's breakpoints there.  Which of these stops a
host delivers at all is measured before gdb is offered them (:mod:`pyvmm.arch.x86_64.debugprobe`).
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable, Sequence

from pyvmm.arch.x86_64.debugprobe import GuestDebugCaps
from pyvmm.arch.x86_64.pagewalk import EFER_LMA, PagingMode, translate
from pyvmm.errors import KvmError
from pyvmm.gdb.target import Z_ACCESS, Z_HARDWARE, Z_WRITE, HwPoint, Register, StopWhy
from pyvmm.kvm import abi
from pyvmm.kvm import abi_x86_64 as x86
from pyvmm.kvm.vcpu import VcpuFd
from pyvmm.kvm.vm import VmFd
from pyvmm.log import get_logger
from pyvmm.memory import GuestMemory

log = get_logger(__name__)

BP_VECTOR = 3
DB_VECTOR = 1
DR6_BS = 1 << 14
# DR7 fields per slot n (SDM vol. 3, figure 17-2): G(n) at bit 2n+1, R/W(n) at 16+4n, LEN(n) at 18+4n
_DR7_RW = {Z_HARDWARE: 0b00, Z_WRITE: 0b01, Z_ACCESS: 0b11}
_DR7_LEN = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}
_EXIT_OFFSET = abi.kvm_run.exit.offset

_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_SEGS = ("cs", "ss", "ds", "es", "fs", "gs")
_X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
_SYS = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")

REGISTERS: tuple[Register, ...] = (
    *(Register(n, 64) for n in _GPRS),
    Register("rip", 64),
    Register("eflags", 32),
    *(Register(n, 32) for n in _SEGS),
    *(Register(f"st{i}", 80) for i in range(8)),
    *(Register(n, 32) for n in _X87_CONTROL),
    *(Register(f"xmm{i}", 128) for i in range(16)),
    Register("mxcsr", 32),
    Register("fs_base", 64),
    Register("gs_base", 64),
    *(Register(n, 64) for n in _SYS),
)
_NUM = {r.name: i for i, r in enumerate(REGISTERS)}
RIP = _NUM["rip"]


def _flags(ident: str, size: int, fields: Sequence[tuple[str, int]]) -> str:
    body = "".join(f'<field name="{n}" start="{b}" end="{b}"/>' for n, b in fields)
    return f'<flags id="{ident}" size="{size}">{body}</flags>'


def _regs(names: Sequence[str], bits: int, type_: str, extra: str = "") -> str:
    return "".join(f'<reg name="{n}" bitsize="{bits}" type="{type_}"{extra}/>' for n in names)


_EFLAGS = (("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9), ("DF", 10),
           ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18), ("VIF", 19), ("VIP", 20), ("ID", 21))
_MXCSR = (("IE", 0), ("DE", 1), ("ZE", 2), ("OE", 3), ("UE", 4), ("PE", 5), ("DAZ", 6), ("IM", 7), ("DM", 8),
          ("ZM", 9), ("OM", 10), ("UM", 11), ("PM", 12), ("FZ", 15))
_VECTORS = (("v4f", "ieee_single", 4), ("v2d", "ieee_double", 2), ("v16i8", "int8", 16), ("v8i16", "int16", 8),
            ("v4i32", "int32", 4), ("v2i64", "int64", 2))

TARGET_XML = (
    '<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target version="1.0">'
    "<architecture>i386:x86-64</architecture>"
    '<feature name="org.gnu.gdb.i386.core">'
    + _flags("i386_eflags", 4, [f for f in _EFLAGS if f[0]])
    + _regs(_GPRS, 64, "int64")
    + '<reg name="rip" bitsize="64" type="code_ptr"/><reg name="eflags" bitsize="32" type="i386_eflags"/>'
    + _regs(_SEGS, 32, "int32")
    + _regs([f"st{i}" for i in range(8)], 80, "i387_ext")
    + _regs(_X87_CONTROL, 32, "int", ' group="float"')
    + "</feature>"
    '<feature name="org.gnu.gdb.i386.sse">'
    + "".join(f'<vector id="{i}" type="{t}" count="{c}"/>' for i, t, c in _VECTORS)
    + '<union id="vec128"><field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>'
    '<field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>'
    '<field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>'
    '<field name="uint128" type="uint128"/></union>'
    + _flags("i386_mxcsr", 4, _MXCSR)
    + _regs([f"xmm{i}" for i in range(16)], 128, "vec128")
    + '<reg name="mxcsr" bitsize="32" type="i386_mxcsr" group="vector"/>'
    "</feature>"
    '<feature name="org.gnu.gdb.i386.segments">'
    + _regs(("fs_base", "gs_base"), 64, "int")
    + "</feature>"
    '<feature name="org.pyvmm.x86.system">'
    + _regs(_SYS, 64, "int", ' group="system"')
    + "</feature></target>"
)

# kvm_xsave.region word of MXCSR (SDM vol. 1, 10.5.1: byte 24 of the legacy area); KVM_GET_FPU does not
# report it (pyvmm/arch/x86_64/assist.py)
_XSAVE_MXCSR = 24 // 4
_XSAVE_XSTATE_BV = 512 // 4
_XFEATURE_FP_SSE = 0x3


def _x87_tag(abridged: int, fpr: bytes) -> int:
    """The full x87 tag word from FXSAVE's abridged one (SDM vol. 1, 10.5.1.1): per register 00 valid,
    01 zero, 10 special, 11 empty.  ``fpr`` is the eight 16-byte register slots in ST order; tags are by
    physical register, which this approximates with ST order (gdb only shows them)."""
    tag = 0
    for i in range(8):
        if not abridged & (1 << i):
            t = 0b11
        else:
            mant, exp = struct.unpack_from("<QH", fpr, 16 * i)
            exp &= 0x7FFF
            if exp == 0x7FFF or (exp == 0 and mant):
                t = 0b10
            elif exp == 0 and mant == 0:
                t = 0b01
            else:
                t = 0b00 if mant >> 63 else 0b10
        tag |= t << (2 * i)
    return tag


class X86DebugTarget:
    xml = TARGET_XML
    registers: Sequence[Register] = REGISTERS
    break_insn = b"\xcc"
    break_kind = 1
    watch_types = frozenset({Z_WRITE, Z_ACCESS})  # x86 has no read-only data breakpoint

    def __init__(self, mem: GuestMemory, vm: VmFd, caps: GuestDebugCaps) -> None:
        self.mem = mem
        self.vm = vm
        # What this host's KVM really stops at (pyvmm/arch/x86_64/debugprobe.py): gdb is offered only that.
        # DR0-DR3 are shared between breakpoints and watchpoints; without data breakpoints gdb falls back
        # to software watchpoints (single steps).
        self.caps = caps
        self.sw_breakpoints = bool(caps.sw_breakpoint)
        self.single_step = caps.single_step
        self.hw_breakpoints = 4 if caps.hw_breakpoint else 0
        self.hw_watchpoints = 4 if caps.watchpoint else 0
        self.hw_slots = 4
        supported = vm.check_extension(abi.KVM_CAP_SET_GUEST_DEBUG2)
        # Interrupts stay blocked during a single step where KVM can (else a step lands in the timer
        # interrupt's handler more often than not)
        self._block_irq = bool(supported & x86.KVM_GUESTDBG_BLOCKIRQ)
        self._clock: int | None = None
        self._clock_ok = True

    def describe(self) -> str:
        return self.caps.describe()

    # -- registers --------------------------------------------------------------------------------------
    def _state(self, vcpu: VcpuFd) -> tuple[x86.kvm_regs, x86.kvm_sregs]:
        regs, sregs = x86.kvm_regs(), x86.kvm_sregs()
        vcpu.get("KVM_GET_REGS", x86.KVM_GET_REGS, regs)
        vcpu.get("KVM_GET_SREGS", x86.KVM_GET_SREGS, sregs)
        return regs, sregs

    def read_registers(self, vcpu: VcpuFd) -> list[int | None]:
        regs, sregs = self._state(vcpu)
        out: list[int | None] = [getattr(regs, n) for n in _GPRS]
        out += [regs.rip, regs.rflags & 0xFFFFFFFF]
        out += [getattr(sregs, n).selector for n in _SEGS]
        fpu = x86.kvm_fpu()
        try:
            vcpu.get("KVM_GET_FPU", x86.KVM_GET_FPU, fpu)
        except KvmError:
            out += [None] * (8 + 8 + 16 + 1)
        else:
            fpr = bytes(fpu.fpr)
            out += [int.from_bytes(fpr[16 * i:16 * i + 10], "little") for i in range(8)]
            out += [fpu.fcw, fpu.fsw, _x87_tag(fpu.ftwx, fpr), 0, fpu.last_ip & 0xFFFFFFFF, 0,
                    fpu.last_dp & 0xFFFFFFFF, fpu.last_opcode]
            xmm = bytes(fpu.xmm)
            out += [int.from_bytes(xmm[16 * i:16 * i + 16], "little") for i in range(16)]
            out.append(self._mxcsr(vcpu))
        out += [sregs.fs.base, sregs.gs.base]
        out += [getattr(sregs, n) for n in _SYS]
        return out

    def _mxcsr(self, vcpu: VcpuFd) -> int | None:
        xs = x86.kvm_xsave()
        try:
            vcpu.get("KVM_GET_XSAVE", x86.KVM_GET_XSAVE, xs)
        except KvmError:
            return None
        return int(xs.region[_XSAVE_MXCSR])

    def write_registers(self, vcpu: VcpuFd, values: dict[int, int]) -> None:
        regs, sregs = self._state(vcpu)
        fpu: x86.kvm_fpu | None = None
        set_regs = set_sregs = False
        for num, value in values.items():
            name = REGISTERS[num].name
            if name in _GPRS or name == "rip":
                setattr(regs, name, value)
                set_regs = True
            elif name == "eflags":
                regs.rflags = (regs.rflags & ~0xFFFFFFFF) | value
                set_regs = True
            elif name in _SEGS:
                if getattr(sregs, name).selector != value:
                    raise ValueError(f"{name}: loading a segment selector is not supported")
            elif name in ("fs_base", "gs_base"):
                getattr(sregs, name[:2]).base = value
                set_sregs = True
            elif name in _SYS:
                setattr(sregs, name, value)
                set_sregs = True
            elif name.startswith(("st", "xmm")):
                if fpu is None:
                    fpu = x86.kvm_fpu()
                    vcpu.get("KVM_GET_FPU", x86.KVM_GET_FPU, fpu)
                i = int(name.removeprefix("st").removeprefix("xmm"))
                slot = fpu.fpr[i] if name.startswith("st") else fpu.xmm[i]
                width = 10 if name.startswith("st") else 16
                ctypes.memmove(slot, value.to_bytes(width, "little"), width)
            elif name == "mxcsr":
                self._set_mxcsr(vcpu, value)
            elif name in ("fctrl", "fstat", "fop"):
                if fpu is None:
                    fpu = x86.kvm_fpu()
                    vcpu.get("KVM_GET_FPU", x86.KVM_GET_FPU, fpu)
                field = {"fctrl": "fcw", "fstat": "fsw", "fop": "last_opcode"}[name]
                setattr(fpu, field, value & 0xFFFF)
            # ftag and the x87 pointers are read-only here: KVM keeps the abridged tag
        if set_regs:
            vcpu.set("KVM_SET_REGS", x86.KVM_SET_REGS, regs)
        if set_sregs:
            vcpu.set("KVM_SET_SREGS", x86.KVM_SET_SREGS, sregs)
        if fpu is not None:
            vcpu.set("KVM_SET_FPU", x86.KVM_SET_FPU, fpu)

    def _set_mxcsr(self, vcpu: VcpuFd, value: int) -> None:
        xs = x86.kvm_xsave()
        vcpu.get("KVM_GET_XSAVE", x86.KVM_GET_XSAVE, xs)
        xs.region[_XSAVE_MXCSR] = value
        xs.region[_XSAVE_XSTATE_BV] |= _XFEATURE_FP_SSE
        vcpu.set("KVM_SET_XSAVE", x86.KVM_SET_XSAVE, xs)

    def program_counter(self, vcpu: VcpuFd) -> int:
        regs, sregs = self._state(vcpu)
        return int(regs.rip) if self._long_mode(sregs) else int((sregs.cs.base + regs.rip) & 0xFFFFFFFF)

    @staticmethod
    def _long_mode(sregs: x86.kvm_sregs) -> bool:
        return bool(sregs.efer & EFER_LMA) and bool(sregs.cs.l)

    # -- memory -----------------------------------------------------------------------------------------
    def translate(self, vcpu: VcpuFd, vaddr: int) -> int:
        sregs = x86.kvm_sregs()
        vcpu.get("KVM_GET_SREGS", x86.KVM_GET_SREGS, sregs)
        mode = PagingMode.from_sregs(sregs)
        return translate(self.mem, mode, vaddr)

    # -- guest debugging --------------------------------------------------------------------------------
    def check_hw_point(self, point: HwPoint) -> str | None:
        if point.type == Z_HARDWARE:
            return None
        if point.type not in self.watch_types:
            return "x86 debug registers cannot watch reads alone (use awatch)"
        if point.length not in _DR7_LEN or point.addr % point.length:
            return f"a watchpoint covers 1, 2, 4 or 8 bytes at an aligned address ({point.length} at {point.addr:#x})"
        return None

    def set_guest_debug(self, vcpu: VcpuFd, *, sw: bool, step: bool, hw: Sequence[HwPoint],
                        inject_bp: bool = False) -> None:
        dbg = x86.kvm_guest_debug()
        control = 0
        if sw:
            control |= x86.KVM_GUESTDBG_USE_SW_BP
        if step:
            control |= abi.KVM_GUESTDBG_SINGLESTEP | (x86.KVM_GUESTDBG_BLOCKIRQ if self._block_irq else 0)
        if hw:
            control |= x86.KVM_GUESTDBG_USE_HW_BP
            dr7 = 0
            for n, p in enumerate(hw):
                dbg.arch.debugreg[n] = p.addr
                length = 0 if p.type == Z_HARDWARE else _DR7_LEN[p.length]
                dr7 |= (1 << (2 * n + 1)) | (_DR7_RW[p.type] << (16 + 4 * n)) | (length << (18 + 4 * n))
            dbg.arch.debugreg[7] = dr7
        if inject_bp:
            control |= x86.KVM_GUESTDBG_INJECT_BP
        dbg.control = control | abi.KVM_GUESTDBG_ENABLE if control else 0
        vcpu.set("KVM_SET_GUEST_DEBUG", x86.KVM_SET_GUEST_DEBUG, dbg)

    def debug_exit(self, vcpu: VcpuFd, hw: Sequence[HwPoint], is_breakpoint: Callable[[int], bool]) -> StopWhy | None:
        ex = x86.kvm_debug_exit_arch.from_buffer_copy(
            bytes(vcpu.run_view[_EXIT_OFFSET:_EXIT_OFFSET + ctypes.sizeof(x86.kvm_debug_exit_arch)]))
        if ex.exception == BP_VECTOR:
            if is_breakpoint(ex.pc):
                return StopWhy("swbreak")
            # the guest's own int3: give it the #BP it would have had without gdb
            self.set_guest_debug(vcpu, sw=True, step=False, hw=hw, inject_bp=True)
            return None
        if ex.exception == DB_VECTOR:
            for n, p in enumerate(hw):
                if ex.dr6 & (1 << n):
                    if p.type == Z_HARDWARE:
                        return StopWhy("hwbreak")
                    return StopWhy("watch" if p.type == Z_WRITE else "awatch", p.addr)
            if ex.dr6 & DR6_BS:
                return StopWhy("step")
        log.warning("vCPU %d: debug exit with exception %d, DR6 %#x that gdb did not ask for", vcpu.index,
                    ex.exception, ex.dr6)
        return StopWhy("step")

    def emulation_breakpoint(self, vcpu: VcpuFd, is_breakpoint: Callable[[int], bool]) -> bool:
        st = vcpu.run_state.exit.internal
        if st.suberror != abi.KVM_INTERNAL_ERROR_EMULATION:
            return False
        pc = self.program_counter(vcpu)
        if not is_breakpoint(pc):
            return False
        try:
            return self.mem.read(self.translate(vcpu, pc), 1) == self.break_insn
        except Exception:  # not readable: not ours to claim
            return False

    # -- the guest's clock ------------------------------------------------------------------------------
    def freeze_clock(self) -> None:
        """Hold kvmclock while the guest is stopped (KVM_GET_CLOCK now, KVM_SET_CLOCK at thaw)."""
        if not self._clock_ok:
            return
        data = x86.kvm_clock_data()
        try:
            self.vm.call("KVM_GET_CLOCK", x86.KVM_GET_CLOCK, data)
        except KvmError as err:
            log.debug("kvmclock not held: %s", err)
            self._clock_ok = False
            return
        self._clock = int(data.clock)

    def thaw_clock(self) -> None:
        if self._clock is None:
            return
        data = x86.kvm_clock_data(clock=self._clock)
        self._clock = None
        try:
            self.vm.call("KVM_SET_CLOCK", x86.KVM_SET_CLOCK, data)
        except KvmError as err:
            log.debug("kvmclock not restored: %s", err)
            self._clock_ok = False
