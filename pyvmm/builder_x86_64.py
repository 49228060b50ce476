"""The x86_64 machine, built in one flat, ordered script (the counterpart of pyvmm/builder_aarch64.py;
both are a ``build(config, stack, report, console_fd) -> Vmm``, chosen by pyvmm/builder.py).

Order matters and is commented where it does.  Resources go into the caller's ExitStack, so a failure
half-way releases what was made, in reverse order.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from pyvmm.arch.x86_64 import hostkvm, layout, machine, mptable
from pyvmm.arch.x86_64.acpi import tables as acpi_tables
from pyvmm.arch.x86_64.bootparams import build_e820, write_boot_params
from pyvmm.arch.x86_64.cpu import get_supported_cpuid
from pyvmm.arch.x86_64.initrd import load_initrd
from pyvmm.arch.x86_64.kernel import load_kernel
from pyvmm.buildparts import (
    BuildReport,
    ConsoleFd,
    VmLink,
    add_exec_arg,
    attach_disks,
    attach_gdb,
    create_vcpus,
    create_vm,
    irqfd,
    kernel_symbolizer,
    make_console,
    make_guest_reports,
)
from pyvmm.bus import Bus
from pyvmm.coalescing import coalesce_port_writes
from pyvmm.config import VmConfig
from pyvmm.devices.acpi_sleep import AcpiSleep
from pyvmm.devices.boottimer import BOOT_TIMER_SIZE, BootTimer
from pyvmm.devices.guestexit import GUEST_EXIT_SIZE
from pyvmm.devices.i8042 import I8042
from pyvmm.devices.pvpanic import PVPANIC_PORT_SIZE
from pyvmm.devices.rtc import CmosRtc
from pyvmm.devices.serial import Serial16550
from pyvmm.eventloop import EventLoop
from pyvmm.loader.cmdline import Cmdline
from pyvmm.status import ExitStatus
from pyvmm.vmm import Vmm

if TYPE_CHECKING:
    from pyvmm.gdb.target import DebugTarget
    from pyvmm.kvm.vm import VmFd
    from pyvmm.memory import GuestMemory

# Arguments every boot gets unless the user already gave the key: the serial console is ttyS0,
# reboot through the keyboard controller (the VMM sees it), no PCI bus to probe, and no keyboard behind
# that controller (pyvmm has none: its i8042 is there for the reset line).  Without i8042.nokbd Linux's
# atkbd driver probes for a keyboard with PS/2 commands that each wait for an answer until they time
# out; the probe runs in the background, but mounting the root and rebooting wait for every probe to
# finish (wait_for_device_probe), which cost 0.8-0.9 s per boot in the KVM lab.
DEFAULT_ARGS: tuple[tuple[str, str | None], ...] = (
    ("reboot", "k"), ("pci", "off"), ("8250.nr_uarts", "1"), ("i8042.nokbd", None))


def _debug_target(mem: GuestMemory, vm: VmFd) -> DebugTarget:
    """The gdb server's x86 side, with what this host's KVM really delivers (imported only for --gdb)."""
    from pyvmm.arch.x86_64 import debugprobe
    from pyvmm.arch.x86_64.gdbtarget import X86DebugTarget

    return X86DebugTarget(mem, vm, debugprobe.probe())


def build(config: VmConfig, stack: contextlib.ExitStack, report: BuildReport,
                  console_fd: ConsoleFd) -> Vmm:
    host = hostkvm.resolve(config.workarounds)
    report.host = host.reason

    ram = layout.ram_layout(config.memory)  # [(gpa, size)] around the device hole
    mem, kvm, vm = create_vm(ram, stack, machine.check_caps, huge_pages=config.debug.huge_pages,
                           kvm_device=config.debug.kvm_device)
    report.notes += machine.setup_platform(vm)  # irqchip before any irqfd or vCPU

    # The kernel, its initrd and the boot parameters.
    kernel = load_kernel(mem, config.kernel, boot=config.boot)  # type: ignore[arg-type]
    report.kernel_format = kernel.format
    initrd = load_initrd(mem, config.initrd, kernel, ram) if config.initrd else None
    cmdline = Cmdline(min(layout.CMDLINE_MAX - 1, kernel.cmdline_size))
    cmdline.extend(config.cmdline)
    add_exec_arg(cmdline, config.exec_cmd)
    for key, value in DEFAULT_ARGS:
        cmdline.add(key, value, if_absent=True)
    for arg in host.workaround_args:
        key, _, value = arg.partition("=")
        cmdline.add(key, value or None, if_absent=True)

    # Devices.  The event loop exists first: devices hand it their eventfds.
    loop = EventLoop()
    stack.callback(loop.close)
    pio = Bus("pio", unclaimed_read=0xFFFFFFFF)
    mmio = Bus("mmio")
    link = VmLink()  # the devices made before the Vmm reach it through this
    stop = link.stop
    console = make_console(config, stack, console_fd, stop)
    serial_irq = irqfd(vm, stack, layout.COM1_IRQ)
    serial = Serial16550(serial_irq, console)
    pio.add(layout.COM1_PORT, 8, serial, "com1")
    pio.add(layout.I8042_DATA_PORT, 5, I8042(lambda: stop(ExitStatus.OK, "guest reset (i8042)")), "i8042")
    pio.add(0x70, 2, CmosRtc(), "rtc")

    pio.add(layout.ACPI_SLEEP_CONTROL_PORT, 2, AcpiSleep(lambda: stop(ExitStatus.OK, "guest powered off (ACPI S5)")),
            "acpi-sleep")
    boot_timer = BootTimer()
    mmio.add(layout.BOOT_TIMER_ADDR, BOOT_TIMER_SIZE, boot_timer, "boot-timer")
    pvpanic, guest_exit = make_guest_reports(config, link)
    pio.add(layout.PVPANIC_PORT, PVPANIC_PORT_SIZE, pvpanic, "pvpanic")
    mmio.add(layout.GUEST_EXIT_ADDR, GUEST_EXIT_SIZE, guest_exit, "guest-exit")

    attach_disks(config, vm, mem, mmio, loop, stack, report, slot=layout.virtio_mmio_slot,
                 window=layout.VIRTIO_MMIO_SIZE, cmdline=cmdline if config.devices_via != "acpi" else None,
                 stop=stop)
    report.cmdline = str(cmdline)
    # Firmware tables in the BIOS area: the MP table for kernels without ACPI, and the ACPI tables, always
    # (a kernel without CONFIG_ACPI ignores them; one with ACPI takes its CPUs and IRQs from the MADT).
    # The DSDT lists the virtio-mmio devices unless they are announced on the command line only.
    virtio = [] if config.devices_via == "cmdline" else [
        acpi_tables.VirtioMmioDevice(base, layout.VIRTIO_MMIO_SIZE, irq)
        for base, irq in map(layout.virtio_mmio_slot, range(len(config.disks)))]
    acpi = acpi_tables.write(mem, config.cpus, virtio, pvpanic_port=layout.PVPANIC_PORT)
    mptable.write(mem, config.cpus)
    write_boot_params(mem, kernel, report.cmdline.encode(), initrd, build_e820(ram),
                      acpi_rsdp_addr=acpi.rsdp_addr)
    machine.write_boot_tables(mem)

    # vCPUs last: they need the memory, the irqchip and the boot state.
    supported = get_supported_cpuid(kvm)
    vcpus = create_vcpus(vm, stack, config.cpus, lambda vcpu: machine.setup_vcpu(
        vcpu, supported, config.cpus, entry=kernel.entry, hide_xsave=host.software))

    # The UART's THR writes through KVM's coalesced ring where the host has KVM_CAP_COALESCED_PIO: no exit
    # per console byte; exits on the UART's ports replay the ring first where the writes could change
    # their outcome (pyvmm/coalescing.py).
    coalesced = coalesce_port_writes(vm, vcpus[0], layout.COM1_PORT, 1, device=(layout.COM1_PORT, 8),
                                     enabled=config.debug.coalesced_pio)
    if coalesced is not None:
        report.notes.append(f"serial THR writes coalesced (KVM_CAP_COALESCED_PIO, "
                            f"{coalesced.ring.capacity}-entry ring)")

    arch = machine.X86ExitHandler(mem, assist=host.software)
    vmm = Vmm(vcpus, pio, mmio, loop, console, arch, stack, timeout=config.timeout, stats=config.stats,
              coalesced=coalesced, profile=config.debug, serial=serial, mem=mem, boot_timer=boot_timer,
              symbolize=kernel_symbolizer(config.kernel))
    link.attach(vmm)
    attach_gdb(config, vmm, mem, lambda: _debug_target(mem, vm), stack, report)
    return vmm

