"""Emulation assist for host KVMs that cannot emulate every instruction.

Some hosts run guest kernel code through KVM's instruction emulator (see docs/hosts.md: a
software KVM).  When that emulator meets an instruction it does not implement, ``KVM_RUN`` returns
``KVM_EXIT_INTERNAL_ERROR`` / ``KVM_INTERNAL_ERROR_EMULATION`` and re-entering does not help.  This
module reads the instruction at RIP through the guest's page tables and performs the few that are
safe to perform from user space.  Anything else stops the VM with RIP and the instruction bytes.

The table of cases (keep it in step with docs/hosts.md):

===============  =========================  ===================================================
instruction      where Linux 6.1 uses it    what the assist does
===============  =========================  ===================================================
``int3`` (cc)    int3_selftest, text poke   RIP += 1, inject #BP (a trap: the saved RIP is next)
``fwait`` (9b)   FPU code                   RIP += 1 (no x87 exception can be pending here)
``clac``/``stac``  exception entry with SMAP  clear/set RFLAGS.AC, RIP += 3
``ldmxcsr m32``  FPU init, kernel_fpu_begin  MXCSR <- m32 via KVM_SET_XSAVE (#GP: stop)
``stmxcsr m32``  FPU state save             m32 <- MXCSR
``popcnt r, r/m``  hweight (no POPCNT alt.)   compute, set ZF, clear the other arithmetic flags
===============  =========================  ===================================================
"""

from __future__ import annotations

import struct
from collections import Counter

from pyvmm.arch.x86_64.pagewalk import EFER_LMA, PagingMode, read_linear, write_linear
from pyvmm.errors import GuestMemoryError
from pyvmm.kvm import abi_x86_64 as x86
from pyvmm.kvm.vcpu import VcpuFd
from pyvmm.log import get_logger
from pyvmm.memory import GuestMemory

log = get_logger(__name__)

RFLAGS_CF = 1 << 0
RFLAGS_PF = 1 << 2
RFLAGS_AF = 1 << 4
RFLAGS_ZF = 1 << 6
RFLAGS_SF = 1 << 7
RFLAGS_OF = 1 << 11
RFLAGS_AC = 1 << 18
BP_VECTOR = 3
# kvm_xsave.region indices (u32 words) of MXCSR, MXCSR_MASK and XSTATE_BV's low half; the mask that
# applies when MXCSR_MASK reads 0 (SDM vol. 1, 11.6.6); the FP and SSE bits of XSTATE_BV
_XSAVE_MXCSR = 24 // 4
_XSAVE_MXCSR_MASK = 28 // 4
_XSAVE_XSTATE_BV = 512 // 4
_MXCSR_MASK_DEFAULT = 0xFFBF
_XFEATURE_FP_SSE = 0x3
MAX_INSN = 15

_LEGACY_PREFIXES = frozenset((0x66, 0x67, 0xF2, 0xF3, 0xF0, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65))
# kvm_regs field order differs from the x86 register encoding (SDM vol. 2, 2.1.5, table 2-2)
_GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


class EmulationFailure(Exception):
    """The host could not emulate an instruction and the assist cannot either."""

    def __init__(self, rip: int, insn: bytes, reason: str) -> None:
        super().__init__(f"unhandled emulation failure at RIP {rip:#x}: bytes [{insn.hex(' ')}]: {reason}")
        self.rip = rip
        self.insn = insn
        self.reason = reason


class _Decoded:
    """An instruction as far as it is decoded (a plain class: one is made per assisted instruction, and
    the dataclasses module is not worth its import on this path)."""

    __slots__ = ("ea", "length", "modrm", "opcode", "prefixes", "rex")

    def __init__(self, *, prefixes: bytes, rex: int, opcode: bytes, length: int) -> None:
        self.prefixes = prefixes
        self.rex = rex
        self.opcode = opcode
        self.length = length  # through the ModRM/SIB/displacement, if any
        self.modrm: int | None = None
        self.ea: int | None = None  # effective linear address of a memory operand


class EmulationAssist:
    """Performs the instructions the host KVM could not; counts what it did."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.counts: Counter[str] = Counter()

    def handle(self, vcpu: VcpuFd) -> str:
        """Perform the instruction at RIP; return its name, or raise :class:`EmulationFailure`."""
        regs = x86.kvm_regs()
        sregs = x86.kvm_sregs()
        vcpu.get("KVM_GET_REGS", x86.KVM_GET_REGS, regs)
        vcpu.get("KVM_GET_SREGS", x86.KVM_GET_SREGS, sregs)
        mode = PagingMode.from_sregs(sregs)
        long_mode = bool(sregs.efer & EFER_LMA) and bool(sregs.cs.l)
        rip_linear = regs.rip if long_mode else (sregs.cs.base + regs.rip) & 0xFFFFFFFF
        try:
            insn = self._fetch(mode, rip_linear)
        except GuestMemoryError as err:
            raise EmulationFailure(regs.rip, b"", f"cannot read the instruction: {err}") from err
        if not long_mode:
            raise EmulationFailure(regs.rip, insn, "the assist handles 64-bit mode only")
        try:
            name = self._execute(vcpu, regs, sregs, mode, insn)
        except GuestMemoryError as err:
            raise EmulationFailure(regs.rip, insn, f"operand not accessible: {err}") from err
        self.counts[name] += 1
        if self.counts[name] == 1:
            log.info("emulation assist: first %s at RIP %#x", name, regs.rip)
        return name

    def _fetch(self, mode: PagingMode, linear: int) -> bytes:
        # The instruction may end before a page boundary the guest did not map: read what is mapped.
        try:
            return read_linear(self.mem, mode, linear, MAX_INSN)
        except GuestMemoryError:
            first = 0x1000 - (linear & 0xFFF)
            return read_linear(self.mem, mode, linear, first)

    def _execute(self, vcpu: VcpuFd, regs: x86.kvm_regs, sregs: x86.kvm_sregs, mode: PagingMode,
                 insn: bytes) -> str:
        d = _decode_prefixes(insn)
        op = insn[len(d.prefixes) + (1 if d.rex else 0):]
        if not d.prefixes and not d.rex and op[:1] == b"\x9b":
            regs.rip += 1
            vcpu.set("KVM_SET_REGS", x86.KVM_SET_REGS, regs)
            return "fwait"
        if not d.prefixes and not d.rex and op[:1] == b"\xcc":
            regs.rip += 1
            vcpu.set("KVM_SET_REGS", x86.KVM_SET_REGS, regs)
            self._inject_bp(vcpu)
            return "int3"
        if op[:3] in (b"\x0f\x01\xca", b"\x0f\x01\xcb"):
            if op[2] == 0xCA:
                regs.rflags &= ~RFLAGS_AC
            else:
                regs.rflags |= RFLAGS_AC
            regs.rip += len(d.prefixes) + (1 if d.rex else 0) + 3
            vcpu.set("KVM_SET_REGS", x86.KVM_SET_REGS, regs)
            return "clac" if op[2] == 0xCA else "stac"
        if op[:2] == b"\x0f\xae" and len(op) > 2 and (op[2] >> 3) & 7 in (2, 3) and op[2] >> 6 != 3:
            return self._mxcsr(vcpu, regs, sregs, mode, insn, d)
        if b"\xf3" in d.prefixes and op[:2] == b"\x0f\xb8":
            return self._popcnt(vcpu, regs, sregs, insn, d)
        raise EmulationFailure(regs.rip, insn, "instruction not handled by the assist")

    def _inject_bp(self, vcpu: VcpuFd) -> None:
        events = x86.kvm_vcpu_events()
        vcpu.get("KVM_GET_VCPU_EVENTS", x86.KVM_GET_VCPU_EVENTS, events)
        events.exception.injected = 1
        events.exception.nr = BP_VECTOR
        events.exception.has_error_code = 0
        events.exception.pending = 0
        events.flags = 0
        vcpu.set("KVM_SET_VCPU_EVENTS", x86.KVM_SET_VCPU_EVENTS, events)

    def _mxcsr(self, vcpu: VcpuFd, regs: x86.kvm_regs, sregs: x86.kvm_sregs, mode: PagingMode,
               insn: bytes, d: _Decoded) -> str:
        _decode_modrm(insn, d, regs, sregs, opcode_len=2)
        assert d.ea is not None and d.modrm is not None
        # MXCSR through the XSAVE image: KVM_GET_FPU/KVM_SET_FPU leave kvm_fpu.mxcsr alone (it reads 0
        # and writes are dropped).  Legacy-area MXCSR and MXCSR_MASK at bytes 24/28 (SDM vol. 1, 10.5.1);
        # XSTATE_BV at byte 512 (13.4.2): with FP|SSE set, KVM_SET_XSAVE takes the legacy area as given.
        xs = x86.kvm_xsave()
        vcpu.get("KVM_GET_XSAVE", x86.KVM_GET_XSAVE, xs)
        if (d.modrm >> 3) & 7 == 2:
            value = struct.unpack("<I", read_linear(self.mem, mode, d.ea, 4))[0]
            supported = xs.region[_XSAVE_MXCSR_MASK] or _MXCSR_MASK_DEFAULT
            if value & ~supported:
                raise EmulationFailure(regs.rip, insn, f"ldmxcsr of reserved bits {value:#x} (#GP)")
            xs.region[_XSAVE_MXCSR] = value
            xs.region[_XSAVE_XSTATE_BV] |= _XFEATURE_FP_SSE
            vcpu.set("KVM_SET_XSAVE", x86.KVM_SET_XSAVE, xs)
            name = "ldmxcsr"
        else:
            write_linear(self.mem, mode, d.ea, struct.pack("<I", xs.region[_XSAVE_MXCSR]))
            name = "stmxcsr"
        regs.rip += d.length
        vcpu.set("KVM_SET_REGS", x86.KVM_SET_REGS, regs)
        return name

    def _popcnt(self, vcpu: VcpuFd, regs: x86.kvm_regs, sregs: x86.kvm_sregs, insn: bytes,
                d: _Decoded) -> str:
        _decode_modrm(insn, d, regs, sregs, opcode_len=2)
        assert d.modrm is not None
        width = 64 if d.rex & 8 else 16 if 0x66 in d.prefixes else 32
        mask = (1 << width) - 1
        if d.ea is None:
            src = getattr(regs, _GPR_NAMES[(d.modrm & 7) | ((d.rex & 1) << 3)]) & mask
        else:
            mode = PagingMode.from_sregs(sregs)
            src = int.from_bytes(read_linear(self.mem, mode, d.ea, width // 8), "little")
        result = bin(src).count("1")
        dst = _GPR_NAMES[((d.modrm >> 3) & 7) | ((d.rex & 4) << 1)]
        old = getattr(regs, dst)
        # A 32-bit destination zero-extends; a 16-bit one keeps the upper bits (SDM vol. 2, 3.4.1.1).
        new = result if width != 16 else (old & ~0xFFFF) | result
        setattr(regs, dst, new)
        regs.rflags &= ~(RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF)
        if src == 0:
            regs.rflags |= RFLAGS_ZF
        regs.rip += d.length
        vcpu.set("KVM_SET_REGS", x86.KVM_SET_REGS, regs)
        return "popcnt"


def _decode_prefixes(insn: bytes) -> _Decoded:
    i = 0
    while i < len(insn) and insn[i] in _LEGACY_PREFIXES:
        i += 1
    rex = insn[i] if i < len(insn) and 0x40 <= insn[i] <= 0x4F else 0
    return _Decoded(prefixes=insn[:i], rex=rex, opcode=b"", length=i + (1 if rex else 0))


def _decode_modrm(insn: bytes, d: _Decoded, regs: x86.kvm_regs, sregs: x86.kvm_sregs,
                  opcode_len: int) -> None:
    """Decode ModRM (+SIB, displacement) after the opcode; fill ``d.modrm``, ``d.ea``, ``d.length``.

    64-bit addressing only (SDM vol. 2, 2.2.1: ModRM/SIB with REX, RIP-relative when mod=00 rm=101).
    """
    pos = d.length + opcode_len
    modrm = insn[pos]
    pos += 1
    mod, rm = modrm >> 6, modrm & 7
    d.modrm = modrm
    if mod == 3:
        d.length = pos
        d.ea = None
        return
    addr = 0
    rip_relative = False
    if rm == 4:
        sib = insn[pos]
        pos += 1
        scale, index, base = sib >> 6, ((sib >> 3) & 7) | ((d.rex & 2) << 2), (sib & 7) | ((d.rex & 1) << 3)
        if index != 4:
            addr += getattr(regs, _GPR_NAMES[index]) << scale
        if (sib & 7) == 5 and mod == 0:
            addr += struct.unpack_from("<i", insn, pos)[0]
            pos += 4
        else:
            addr += getattr(regs, _GPR_NAMES[base])
    elif rm == 5 and mod == 0:
        rip_relative = True
        addr += struct.unpack_from("<i", insn, pos)[0]
        pos += 4
    else:
        addr += getattr(regs, _GPR_NAMES[rm | ((d.rex & 1) << 3)])
    if mod == 1:
        addr += struct.unpack_from("<b", insn, pos)[0]
        pos += 1
    elif mod == 2:
        addr += struct.unpack_from("<i", insn, pos)[0]
        pos += 4
    d.length = pos
    if rip_relative:
        addr += regs.rip + pos
    if 0x64 in d.prefixes:
        addr += sregs.fs.base
    elif 0x65 in d.prefixes:
        addr += sregs.gs.base
    if 0x67 in d.prefixes:
        addr &= 0xFFFFFFFF
    d.ea = addr & 0xFFFFFFFFFFFFFFFF
