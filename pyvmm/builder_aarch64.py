"""The aarch64 machine (the counterpart of pyvmm/builder_x86_64.py; both are a ``build(config, stack,
report, console_fd) -> Vmm``, chosen by pyvmm/builder.py): the same flat, ordered script for an aarch64
host's KVM.

What is shared with x86 is shared by import, unchanged: guest RAM, the console, the 16550 model (here on
MMIO instead of port I/O), the virtio-mmio transport and virtio-blk with their ioeventfds and irqfds, the
event loop and the vCPU loop.  What differs lives in ``pyvmm/arch/aarch64``: the memory map, the Image
loader, the device tree that announces every device (there is no ACPI and no ``virtio_mmio.device=`` on
aarch64: a command-line device's IRQ number would not be a GIC interrupt), the vGIC and vCPU init.
"""

from __future__ import annotations

import contextlib
import os

from pyvmm.arch.aarch64 import layout, machine
from pyvmm.arch.aarch64.devicetree import build_device_tree
from pyvmm.arch.aarch64.image import load_image, load_initrd_aarch64
from pyvmm.buildparts import (
    BuildReport,
    ConsoleFd,
    VmLink,
    add_exec_arg,
    attach_disks,
    create_vcpus,
    create_vm,
    irqfd,
    kernel_symbolizer,
    make_console,
    make_guest_reports,
)
from pyvmm.bus import Bus
from pyvmm.config import VmConfig
from pyvmm.devices.guestexit import GUEST_EXIT_SIZE
from pyvmm.devices.pvpanic import PVPANIC_MMIO_SIZE
from pyvmm.devices.serial import Serial16550
from pyvmm.errors import ConfigError
from pyvmm.eventloop import EventLoop
from pyvmm.loader.cmdline import Cmdline
from pyvmm.vmm import Vmm

CMDLINE_MAX = 2048  # COMMAND_LINE_SIZE on arm64 (arch/arm64/include/uapi/asm/setup.h)
UART_REGS = 8  # the 16550's register file; reg-io-width 1, reg-shift 0


def build(config: VmConfig, stack: contextlib.ExitStack, report: BuildReport, console_fd: ConsoleFd) -> Vmm:
    report.host = "aarch64 KVM"
    if config.cpus > layout.MAX_CPUS:
        raise ConfigError(f"at most {layout.MAX_CPUS} vCPUs on aarch64")
    if config.devices_via == "cmdline":
        raise ConfigError("--devices-via cmdline is x86 only: on aarch64 the device tree announces the devices")
    if config.gdb is not None:
        raise ConfigError("--gdb is x86_64 only so far: the aarch64 register set and page-table walk are not "
                          "written yet (docs/gdb.md)")

    try:
        ram = layout.ram_layout(config.memory)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    mem, _, vm = create_vm(ram, stack, machine.check_caps, huge_pages=config.debug.huge_pages,
                           kvm_device=config.debug.kvm_device)
    # The vGIC exists (with its addresses) before any vCPU; CTRL_INIT comes after them.
    gic = machine.create_vgic(vm)
    stack.callback(gic.close)
    report.notes.append(f"vGICv{gic.version}")

    # The Image, its initrd below the device tree, and the tree itself.
    kernel = load_image(mem, config.kernel)
    report.kernel_format = kernel.format
    fdt_addr = layout.fdt_addr(config.memory)
    initrd = load_initrd_aarch64(mem, config.initrd, kernel.kernel_end, fdt_addr) if config.initrd else None
    cmdline = Cmdline(CMDLINE_MAX - 1)
    cmdline.extend(config.cmdline)
    add_exec_arg(cmdline, config.exec_cmd)

    # Devices.
    loop = EventLoop()
    stack.callback(loop.close)
    mmio = Bus("mmio")
    pio = Bus("pio", unclaimed_read=0xFFFFFFFF)  # aarch64 has no port I/O; the vCPU loop wants a bus anyway
    link = VmLink()  # the devices made before the Vmm reach it through this
    stop = link.stop
    console = make_console(config, stack, console_fd, stop)
    irqfds: list[tuple[int, int]] = []  # registered once the vGIC is initialised (after the vCPUs)
    serial = Serial16550(irqfd(vm, stack, layout.UART_SPI, irqfds), console)
    mmio.add(layout.UART_ADDR, UART_REGS, serial, "uart")
    pvpanic, guest_exit = make_guest_reports(config, link)
    mmio.add(layout.PVPANIC_ADDR, PVPANIC_MMIO_SIZE, pvpanic, "pvpanic")
    mmio.add(layout.GUEST_EXIT_ADDR, GUEST_EXIT_SIZE, guest_exit, "guest-exit")
    attach_disks(config, vm, mem, mmio, loop, stack, report, slot=layout.virtio_mmio_slot,
                 window=layout.VIRTIO_MMIO_SIZE, cmdline=None, deferred_irqfds=irqfds, stop=stop)
    report.cmdline = str(cmdline)

    fdt = build_device_tree(ram=ram, cpus=config.cpus, cmdline=report.cmdline, initrd=initrd,
                            gic_version=gic.version,
                            virtio=[layout.virtio_mmio_slot(i) for i in range(len(config.disks))],
                            rng_seed=os.urandom(64))  # early entropy: the guest's CRNG is ready at once
    if len(fdt) > layout.FDT_MAX_SIZE:
        raise ConfigError(f"device tree of {len(fdt)} bytes exceeds {layout.FDT_MAX_SIZE}")
    mem.write(fdt_addr, fdt)

    # vCPUs last: they need the memory, the vGIC and the boot state.
    target = machine.preferred_target(vm)
    vcpus = create_vcpus(vm, stack, config.cpus,
                         lambda vcpu: machine.setup_vcpu(vcpu, target, entry=kernel.entry, fdt_addr=fdt_addr))
    gic.finalize()
    for fd, spi in irqfds:
        vm.irqfd(fd, spi)

    vmm = Vmm(vcpus, pio, mmio, loop, console, machine.Aarch64ExitHandler(), stack, timeout=config.timeout,
              stats=config.stats, profile=config.debug, serial=serial, mem=mem,
              symbolize=kernel_symbolizer(config.kernel))
    link.attach(vmm)
    return vmm
