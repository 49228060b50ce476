"""The aarch64 machine around the vCPUs: the in-kernel vGIC (v3, v2 as a fallback), vCPU init with
in-kernel PSCI, the boot registers, and the exit handler.

Order, from Documentation/virt/kvm/devices/arm-vgic-v3.rst and api.rst: create the vGIC device and set its
base addresses before the vCPUs exist (``KVM_CREATE_DEVICE``, ``KVM_DEV_ARM_VGIC_GRP_ADDR``); create and
``KVM_ARM_VCPU_INIT`` every vCPU; then ``KVM_DEV_ARM_VGIC_GRP_NR_IRQS`` and
``KVM_DEV_ARM_VGIC_CTRL_INIT``.  Power off and reset come from the in-kernel PSCI as
``KVM_EXIT_SYSTEM_EVENT`` (api.rst 5, "KVM_EXIT_SYSTEM_EVENT"), which the generic vCPU loop maps to exit
statuses exactly as on x86.
"""

from __future__ import annotations

import ctypes

from pyvmm.arch.aarch64 import layout
from pyvmm.errors import KvmError
from pyvmm.kvm import abi
from pyvmm.kvm import abi_aarch64 as arm
from pyvmm.kvm.device import DeviceFd
from pyvmm.kvm.vcpu import VcpuFd
from pyvmm.kvm.vm import VmFd
from pyvmm.record import record
from pyvmm.status import ExitStatus
from pyvmm.vmm import ArchExitHandler

REQUIRED_CAPS = {
    "KVM_CAP_USER_MEMORY": abi.KVM_CAP_USER_MEMORY,
    "KVM_CAP_IRQFD": abi.KVM_CAP_IRQFD,
    "KVM_CAP_ONE_REG": abi.KVM_CAP_ONE_REG,
    "KVM_CAP_DEVICE_CTRL": abi.KVM_CAP_DEVICE_CTRL,
    "KVM_CAP_ARM_PSCI_0_2": arm.KVM_CAP_ARM_PSCI_0_2,
    "KVM_CAP_IMMEDIATE_EXIT": abi.KVM_CAP_IMMEDIATE_EXIT,
}
# GIC interrupt lines: 32 private + our SPIs, a multiple of 32 (arm-vgic-v3.rst, GRP_NR_IRQS).
NR_IRQS = 128


def check_caps(vm: VmFd) -> None:
    vm.require(REQUIRED_CAPS)


@record(frozen=False)
class Vgic:
    """The in-kernel interrupt controller: its KVM device and GIC version."""

    device: DeviceFd
    version: int

    def set_attr(self, group: int, attr: int, value: ctypes.c_uint32 | ctypes.c_uint64 | None, what: str) -> None:
        self.device.set_attr(group, attr, value, what)

    def finalize(self) -> None:
        """After every vCPU is initialised: the number of interrupt lines, then CTRL_INIT."""
        self.set_attr(arm.KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, ctypes.c_uint32(NR_IRQS), "NR_IRQS")
        self.set_attr(arm.KVM_DEV_ARM_VGIC_GRP_CTRL, arm.KVM_DEV_ARM_VGIC_CTRL_INIT, None, "CTRL_INIT")

    def close(self) -> None:
        self.device.close()


def create_vgic(vm: VmFd) -> Vgic:
    """A GICv3, or a GICv2 where the host has no v3 emulation.  The caller keeps the vCPU count within
    ``layout.MAX_CPUS`` (the redistributor frames must fit below the UART)."""
    for version in (3, 2):
        try:
            device = vm.create_device(arm.KVM_DEV_TYPE_ARM_VGIC_V3 if version == 3 else arm.KVM_DEV_TYPE_ARM_VGIC_V2,
                                      f"vGICv{version}")
        except KvmError:
            continue
        gic = Vgic(device, version)
        try:
            if version == 3:
                gic.set_attr(arm.KVM_DEV_ARM_VGIC_GRP_ADDR, arm.KVM_VGIC_V3_ADDR_TYPE_DIST,
                             ctypes.c_uint64(layout.GIC_DIST_ADDR), "distributor address")
                gic.set_attr(arm.KVM_DEV_ARM_VGIC_GRP_ADDR, arm.KVM_VGIC_V3_ADDR_TYPE_REDIST,
                             ctypes.c_uint64(layout.GIC_REDIST_ADDR), "redistributor address")
            else:
                gic.set_attr(arm.KVM_DEV_ARM_VGIC_GRP_ADDR, arm.KVM_VGIC_V2_ADDR_TYPE_DIST,
                             ctypes.c_uint64(layout.GIC_DIST_ADDR), "distributor address")
                gic.set_attr(arm.KVM_DEV_ARM_VGIC_GRP_ADDR, arm.KVM_VGIC_V2_ADDR_TYPE_CPU,
                             ctypes.c_uint64(layout.GIC_CPU_ADDR), "CPU interface address")
        except KvmError:
            gic.close()
            raise
        return gic
    raise KvmError("this host's KVM can create neither a vGICv3 nor a vGICv2 (KVM_CREATE_DEVICE)")


def preferred_target(vm: VmFd) -> arm.kvm_vcpu_init:
    init = arm.kvm_vcpu_init()
    vm.call("KVM_ARM_PREFERRED_TARGET", arm.KVM_ARM_PREFERRED_TARGET, init)
    return init


def set_one_reg(vcpu: VcpuFd, reg_id: int, value: int) -> None:
    """KVM_SET_ONE_REG of a register of any size (the id says which: 32, 64 or 128 bits)."""
    size = arm.reg_size(reg_id)
    buf = (ctypes.c_uint8 * size).from_buffer_copy(value.to_bytes(size, "little"))
    vcpu.set(f"KVM_SET_ONE_REG {reg_id:#x}", abi.KVM_SET_ONE_REG, abi.kvm_one_reg(id=reg_id, addr=ctypes.addressof(buf)))


def get_one_reg(vcpu: VcpuFd, reg_id: int) -> int:
    """KVM_GET_ONE_REG of a register of any size."""
    buf = (ctypes.c_uint8 * arm.reg_size(reg_id))()
    vcpu.get(f"KVM_GET_ONE_REG {reg_id:#x}", abi.KVM_GET_ONE_REG, abi.kvm_one_reg(id=reg_id, addr=ctypes.addressof(buf)))
    return int.from_bytes(bytes(buf), "little")


def setup_vcpu(vcpu: VcpuFd, target: arm.kvm_vcpu_init, *, entry: int, fdt_addr: int) -> None:
    """KVM_ARM_VCPU_INIT with PSCI 0.2; secondaries start powered off (the guest starts them with PSCI
    CPU_ON).  The boot vCPU enters the Image as booting.rst 4 asks: PC at the image, X0 = the device tree's
    physical address, X1-X3 = 0, EL1h with D, A, I, F masked (the MMU is off after the vCPU reset)."""
    init = arm.kvm_vcpu_init(target=target.target)
    init.features[0] = 1 << arm.KVM_ARM_VCPU_PSCI_0_2
    if vcpu.index > 0:
        init.features[0] |= 1 << arm.KVM_ARM_VCPU_POWER_OFF
    vcpu.set("KVM_ARM_VCPU_INIT", arm.KVM_ARM_VCPU_INIT, init)
    if vcpu.index == 0:
        set_one_reg(vcpu, arm.REG_PSTATE, arm.BOOT_PSTATE)
        for n in range(4):
            set_one_reg(vcpu, arm.reg_x(n), fdt_addr if n == 0 else 0)
        set_one_reg(vcpu, arm.REG_PC, entry)


class Aarch64ExitHandler(ArchExitHandler):
    def internal_error(self, vcpu: VcpuFd) -> tuple[ExitStatus, str] | None:
        st = vcpu.run_state.exit.internal
        return (ExitStatus.VMM_ERROR,
                f"KVM internal error on vCPU {vcpu.index}: suberror {st.suberror} at PC {self.program_counter(vcpu):#x}")

    def program_counter(self, vcpu: VcpuFd) -> int:
        return get_one_reg(vcpu, arm.REG_PC)
