"""What guest debugging this host's KVM really delivers, measured with a probe VM before gdb is offered it.

``KVM_SET_GUEST_DEBUG`` is accepted everywhere, but what it does differs by host (docs/hosts.md):

- a hardware KVM intercepts ``int3`` (``KVM_GUESTDBG_USE_SW_BP``), honours DR0-DR3 instruction and data
  breakpoints (``KVM_GUESTDBG_USE_HW_BP``) and single steps;
- the software KVM of our development machines cannot emulate ``int3`` and stops with an emulation
  failure at it (which pyvmm turns into the breakpoint stop), honours instruction breakpoints and single
  steps, and never stops at a data breakpoint;
- the KVM lab (a KVM inside QEMU's TCG with nested SVM) single-steps, but delivers ``int3`` to the guest
  and never stops at a debug register.

So each case is tried once, in a VM of its own: 64 KiB of RAM, one vCPU in 64-bit mode on pyvmm's boot
GDT and identity map (the mode a kernel runs in: a software KVM emulates ``int3`` in real mode but not in
64-bit mode), code at 0x1000.  A probe ends with ``out %al, $0x98`` when the instruction ran without
stopping; the IDT is empty, so an exception delivered to the probe guest ends it in a triple fault
(``KVM_EXIT_SHUTDOWN``).  Each probe has a bound on the exits it may take.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import cache

from pyvmm.arch.x86_64 import cpu
from pyvmm.errors import KvmError
from pyvmm.kvm import abi
from pyvmm.kvm import abi_x86_64 as x86
from pyvmm.kvm.system import Kvm
from pyvmm.log import get_logger
from pyvmm.memory import GuestMemory

log = get_logger(__name__)

RAM = 0x10000
CODE = 0x1000
DATA = 0x2000
PORT_RAN_ON = 0x98
_OUT_RAN_ON = bytes((0xE6, PORT_RAN_ON))  # out %al, $0x98
_MAX_EXITS = 8
# DR7 (SDM vol. 3, 17.2.4): G0 and R/W0, LEN0 for slot 0
_DR7_G0 = 1 << 1
_DR7_WRITE_1BYTE = 0b01 << 16


@dataclass(frozen=True)
class GuestDebugCaps:
    """What stops a guest on this host: how a software breakpoint arrives ("debug-exit": KVM_EXIT_DEBUG,
    "emulation-failure": an emulation failure at the int3, "" : it does not), and whether hardware
    instruction breakpoints, data breakpoints and single steps stop it."""

    sw_breakpoint: str
    hw_breakpoint: bool
    watchpoint: bool
    single_step: bool

    def describe(self) -> str:
        yes = [name for name, ok in (("software breakpoints", bool(self.sw_breakpoint)),
                                     ("hardware breakpoints", self.hw_breakpoint),
                                     ("watchpoints", self.watchpoint), ("single steps", self.single_step)) if ok]
        no = [name for name, ok in (("software breakpoints", bool(self.sw_breakpoint)),
                                    ("hardware breakpoints", self.hw_breakpoint),
                                    ("watchpoints", self.watchpoint), ("single steps", self.single_step)) if not ok]
        return f"this KVM delivers {', '.join(yes) or 'no debug stops'}" + (f"; not {', '.join(no)}" if no else "")


class _ProbeVm:
    def __init__(self, stack: contextlib.ExitStack) -> None:
        kvm = Kvm()
        stack.callback(kvm.close)
        self.vm = kvm.create_vm()
        stack.callback(self.vm.close)
        self.mem = GuestMemory.single(RAM)
        stack.callback(self.mem.close)
        region = self.mem.regions[0]
        self.vm.set_user_memory_region(0, region.gpa, region.size, region.host_addr)
        self.vcpu = self.vm.create_vcpu(0)
        stack.callback(self.vcpu.close)
        # 64-bit mode needs the long-mode CPUID bit before EFER.LME is accepted
        cpu.set_cpuid(self.vcpu, cpu.guest_cpuid(cpu.get_supported_cpuid(kvm), 0, 1, hide_xsave=True,
                                                 hide_smp_pv=True))

    def run(self, code: bytes, *, control: int, debugreg: dict[int, int] | None = None) -> str:
        """Run ``code`` at 0x1000; return "debug:<vector>", "emulation-failure", "ran-on", "delivered"
        (a triple fault) or "other:<exit>"."""
        self.mem.fill(0, RAM)
        cpu.write_gdt(self.mem)
        cpu.write_identity_page_tables(self.mem)
        self.mem.write(CODE, code + _OUT_RAN_ON)
        cpu.setup_long_mode(self.vcpu)
        self.vcpu.set("KVM_SET_REGS", x86.KVM_SET_REGS, x86.kvm_regs(rip=CODE, rflags=2, rsp=0x8000))
        dbg = x86.kvm_guest_debug(control=control)
        for n, value in (debugreg or {}).items():
            dbg.arch.debugreg[n] = value
        self.vcpu.set("KVM_SET_GUEST_DEBUG", x86.KVM_SET_GUEST_DEBUG, dbg)
        try:
            for _ in range(_MAX_EXITS):
                reason = self.vcpu.run()
                if reason == abi.KVM_EXIT_DEBUG:
                    return f"debug:{self.vcpu.run_view[abi.kvm_run.exit.offset]}"
                if reason == abi.KVM_EXIT_INTERNAL_ERROR:
                    return "emulation-failure"
                if reason == abi.KVM_EXIT_IO:
                    port = int.from_bytes(bytes(self.vcpu.run_view[abi.kvm_run.exit.offset + 2:
                                                                   abi.kvm_run.exit.offset + 4]), "little")
                    return "ran-on" if port == PORT_RAN_ON else f"io:{port:#x}"
                if reason == abi.KVM_EXIT_SHUTDOWN:
                    return "delivered"
                if reason != abi.KVM_EXIT_INTR:
                    return f"other:{abi.EXIT_NAMES.get(reason, reason)}"
            return "no-end"
        finally:
            self.vcpu.set("KVM_SET_GUEST_DEBUG", x86.KVM_SET_GUEST_DEBUG, x86.kvm_guest_debug())


@cache
def probe() -> GuestDebugCaps:
    """Measure once per process (a few small VMs; milliseconds on a hardware KVM)."""
    enable = abi.KVM_GUESTDBG_ENABLE
    try:
        with contextlib.ExitStack() as stack:
            p = _ProbeVm(stack)
            sw = p.run(b"\x90\xcc", control=enable | x86.KVM_GUESTDBG_USE_SW_BP)
            hw = p.run(b"\x90\x90", control=enable | x86.KVM_GUESTDBG_USE_HW_BP,
                       debugreg={0: CODE + 1, 7: _DR7_G0})
            watch = p.run(b"\x88\x04\x25" + DATA.to_bytes(4, "little") + b"\x90",  # mov %al, 0x2000
                          control=enable | x86.KVM_GUESTDBG_USE_HW_BP,
                          debugreg={0: DATA, 7: _DR7_G0 | _DR7_WRITE_1BYTE})
            step = p.run(b"\x90\x90", control=enable | abi.KVM_GUESTDBG_SINGLESTEP)
    except KvmError as err:
        log.warning("guest debugging probe failed: %s", err)
        return GuestDebugCaps("", False, False, False)
    log.debug("guest debugging probe: int3 %s, DR0 exec %s, DR0 write %s, single step %s", sw, hw, watch, step)
    sw_kind = {"debug:3": "debug-exit", "emulation-failure": "emulation-failure"}.get(sw, "")
    return GuestDebugCaps(sw_kind, hw == "debug:1", watch == "debug:1", step == "debug:1")
