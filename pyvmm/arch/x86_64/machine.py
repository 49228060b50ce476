"""The x86_64 machine around the vCPUs: in-kernel irqchip and PIT, vCPU boot state, the legacy
devices a PC guest expects, and the exit handler that runs the emulation assist.
"""

from __future__ import annotations

import errno

from pyvmm.arch.x86_64 import cpu, layout
from pyvmm.errors import KvmError
from pyvmm.kvm import abi
from pyvmm.kvm import abi_x86_64 as x86
from pyvmm.kvm.vcpu import VcpuFd
from pyvmm.kvm.vm import VmFd
from pyvmm.log import get_logger
from pyvmm.memory import GuestMemory
from pyvmm.statictypes import TYPE_CHECKING
from pyvmm.status import ExitStatus
from pyvmm.vmm import ArchExitHandler

if TYPE_CHECKING:
    from pyvmm.arch.x86_64.assist import EmulationAssist

log = get_logger(__name__)

# Where KVM's VMX code may put its three-page TSS and the identity-map page: just below the 4 GiB
# boundary, inside the device hole and clear of the IOAPIC/LAPIC pages.
TSS_ADDR = 0xFFFB_D000
REQUIRED_CAPS = {
    "KVM_CAP_IRQCHIP": abi.KVM_CAP_IRQCHIP,
    "KVM_CAP_USER_MEMORY": abi.KVM_CAP_USER_MEMORY,
    "KVM_CAP_IRQFD": abi.KVM_CAP_IRQFD,
    "KVM_CAP_PIT2": abi.KVM_CAP_PIT2,
    "KVM_CAP_IMMEDIATE_EXIT": abi.KVM_CAP_IMMEDIATE_EXIT,
}


def check_caps(vm: VmFd) -> None:
    vm.require(REQUIRED_CAPS)


def setup_platform(vm: VmFd) -> list[str]:
    """TSS (VMX only; optional), in-kernel PIC/IOAPIC/LAPIC, PIT.  Returns notes for the user."""
    notes = []
    try:
        vm.call("KVM_SET_TSS_ADDR", x86.KVM_SET_TSS_ADDR, TSS_ADDR)
    except KvmError as err:
        if not isinstance(err.__cause__, OSError) or err.__cause__.errno != errno.EINVAL:
            raise
        notes.append("KVM_SET_TSS_ADDR refused (not a VMX host): skipped")
    vm.create_irqchip()
    vm.call("KVM_CREATE_PIT2", x86.KVM_CREATE_PIT2, x86.kvm_pit_config(flags=x86.KVM_PIT_SPEAKER_DUMMY))
    return notes


def setup_vcpu(vcpu: VcpuFd, supported_cpuid: list[x86.kvm_cpuid_entry2], cpu_count: int, *,
               entry: int, hide_xsave: bool) -> None:
    # hide_xsave is set on a software-emulating host, which also needs the SMP PV features off
    cpu.set_cpuid(vcpu, cpu.guest_cpuid(supported_cpuid, vcpu.index, cpu_count, hide_xsave=hide_xsave,
                                        hide_smp_pv=hide_xsave))
    cpu.set_msrs(vcpu, cpu.boot_msrs())
    cpu.setup_lapic(vcpu)
    cpu.setup_fpu(vcpu)
    if vcpu.index == 0:
        cpu.setup_long_mode(vcpu)
        cpu.setup_boot_regs(vcpu, entry, layout.ZERO_PAGE_ADDR)


def write_boot_tables(mem: GuestMemory) -> None:
    cpu.write_gdt(mem)
    cpu.write_identity_page_tables(mem)


class X86ExitHandler(ArchExitHandler):
    """Runs the emulation assist on emulation failures when the host needs it."""

    def __init__(self, mem: GuestMemory, *, assist: bool) -> None:
        self.assist: EmulationAssist | None = None
        if assist:  # only hosts whose KVM emulates in software need it: imported for them
            from pyvmm.arch.x86_64.assist import EmulationAssist

            self.assist = EmulationAssist(mem)

    def internal_error(self, vcpu: VcpuFd) -> tuple[ExitStatus, str] | None:
        st = vcpu.run_state.exit.internal
        if st.suberror != abi.KVM_INTERNAL_ERROR_EMULATION:
            data = " ".join(f"{st.data[i]:#x}" for i in range(min(st.ndata, 16)))
            return ExitStatus.VMM_ERROR, f"KVM internal error on vCPU {vcpu.index}: suberror {st.suberror} [{data}]"
        if self.assist is None:
            regs = x86.kvm_regs()
            vcpu.get("KVM_GET_REGS", x86.KVM_GET_REGS, regs)
            return (ExitStatus.EMULATION_FAILURE,
                    f"emulation failure on vCPU {vcpu.index} at RIP {regs.rip:#x} (assist off: --workarounds on "
                    "enables it)")
        from pyvmm.arch.x86_64.assist import EmulationFailure

        try:
            self.assist.handle(vcpu)
        except EmulationFailure as err:
            return ExitStatus.EMULATION_FAILURE, f"vCPU {vcpu.index}: {err}"
        return None

    def program_counter(self, vcpu: VcpuFd) -> int:
        regs = x86.kvm_regs()
        vcpu.get("KVM_GET_REGS", x86.KVM_GET_REGS, regs)
        return int(regs.rip)

    def summary(self) -> list[str]:
        if self.assist is None or not self.assist.counts:
            return []
        done = ", ".join(f"{name} x{n}" for name, n in sorted(self.assist.counts.items()))
        return [f"emulation assist performed: {done}"]
