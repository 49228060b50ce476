"""A minimal VM for the tiny guests of ``firmware/``: run a flat 64-bit binary to its debug-exit write.

Built from pyvmm's real pieces in the order ``builder.py`` uses (guest RAM, VM, in-kernel irqchip and
PIT, memory slots, boot GDT and identity map, vCPU 0 in long mode at the load address, PIO/MMIO buses,
event loop, :class:`~pyvmm.vmm.Vmm` with the x86 exit handler), minus the kernel loader and the
devices.  The serial port is a byte recorder (or the device a test passes as ``com1``), and a write to
``layout.DEBUG_EXIT_PORT`` stops the VM.  ``coalesced_pio=True`` registers COM1's THR as a coalesced
port zone as the real VMM does (where KVM can; :attr:`TinyVm.coalesced` is None where it cannot), and
``stats=True`` runs the counting vCPU loop (``TinyResult.stats``), and ``gdb=True`` serves the GDB
remote protocol on a free loopback port (``gdb_port``) with the guest stopped at its entry.
A test adds its own devices and eventfds before :meth:`TinyVm.run`::

    with TinyVm(Path("firmware/out/pio.bin")) as vm:
        vm.add_pio(0x510, 8, Recorder(reads={0: 0x42}), "probe")
        result = vm.run()

The emulation assist is on when :func:`pyvmm.arch.x86_64.hostkvm.detect` finds a software KVM, as in
the real VMM.  No pytest import: this module ships with pyvmm.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.arch.x86_64 import cpu, debugprobe, hostkvm, layout, machine
from pyvmm.arch.x86_64.gdbtarget import X86DebugTarget
from pyvmm.bus import Bus, BusDevice
from pyvmm.coalescing import coalesce_port_writes
from pyvmm.console import ConsoleOutput
from pyvmm.eventloop import EventLoop
from pyvmm.exitstats import ExitStats
from pyvmm.gdb.control import Debugger
from pyvmm.gdb.server import GdbServer
from pyvmm.interrupt import EventFd
from pyvmm.kvm.system import Kvm
from pyvmm.loader.symbols import KernelSymbols
from pyvmm.memory import GuestMemory
from pyvmm.status import ExitStatus
from pyvmm.stopreport import VcpuReport
from pyvmm.vmm import Vmm

LOAD_ADDR = layout.HIMEM_START  # firmware/Makefile links at 0x100000
DEFAULT_MEMORY = 64 * layout.MiB
DEFAULT_TIMEOUT = 20.0


@dataclass
class TinyResult:
    status: ExitStatus
    reason: str
    serial: bytes  # what the guest wrote to COM1's data register
    debug_exit: int | None  # the value written to the debug-exit port; None if it never was
    exits: Counter[str]  # exits to user space by kind (io, mmio, internal_error, ...)
    assist: Counter[str]  # instructions the emulation assist performed, by name
    elapsed: float
    details: list[str] = field(default_factory=list)
    vcpu_report: list[VcpuReport] = field(default_factory=list)  # after a timeout: where the vCPU was
    stats: ExitStats | None = None  # with TinyVm(stats=True)


class Recorder:
    """A bus device that records every write and answers reads from a table (default ``default``).

    ``reads`` maps an offset to a value, or to a list of values served in turn (the last repeats).
    """

    def __init__(self, reads: dict[int, int | list[int]] | None = None, *, default: int = 0) -> None:
        self.reads: dict[int, int | list[int]] = dict(reads or {})
        self.default = default
        self.writes: list[tuple[int, int, int]] = []  # (offset, size, value)
        self.read_log: list[tuple[int, int]] = []  # (offset, size)
        self._lock = threading.Lock()

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            self.read_log.append((offset, size))
            entry = self.reads.get(offset, self.default)
            if isinstance(entry, list):
                entry = entry.pop(0) if len(entry) > 1 else entry[0]
            value = entry
        return value & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self.writes.append((offset, size, value))

    def values(self, offset: int | None = None) -> list[int]:
        """The values written (at ``offset`` only, if given), in order."""
        return [v for o, _, v in self.writes if offset is None or o == offset]


class _SerialRecorder:
    """COM1 just enough for a polling writer: THR captured, LSR always "transmitter empty".  ``events``
    has every access in the order the device saw them: ``("r", offset)`` and ``("w", offset, value)``."""

    LSR = 5
    LSR_THRE_TEMT = 0x60

    def __init__(self) -> None:
        self.data = bytearray()
        self.events: list[tuple[str, int] | tuple[str, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.events.append(("r", offset))
        return self.LSR_THRE_TEMT if offset == self.LSR else 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.events.append(("w", offset, value))
        if offset == 0:
            self.data.append(value & 0xFF)


class _DebugExit:
    def __init__(self, vm: TinyVm) -> None:
        self._vm = vm

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self._vm.debug_exit_value = value
        self._vm.vmm.request_stop(ExitStatus.OK, f"debug exit {value:#x}")


class TinyVm:
    """One vCPU, ``memory`` bytes of RAM, ``binary`` loaded at 0x100000 and entered in long mode.
    ``symbols``: a file with the binary's symbols (``firmware/out/NAME.elf``) for the stop report."""

    def __init__(self, binary: Path | bytes, *, memory: int = DEFAULT_MEMORY, assist: bool | None = None,
                 timeout: float = DEFAULT_TIMEOUT, symbols: Path | None = None, stats: bool = False,
                 coalesced_pio: bool = False, com1: BusDevice | None = None,
                 console: ConsoleOutput | None = None, gdb: bool = False) -> None:
        self.host = hostkvm.detect()
        self.assist = self.host.software if assist is None else assist
        self.debug_exit_value: int | None = None
        self._eventfds: list[EventFd] = []  # outlive the run, so a test can read their counters
        self._ran = False
        image = binary if isinstance(binary, bytes) else binary.read_bytes()
        stack = contextlib.ExitStack()  # handed to the Vmm, which closes it at the end of its run
        self._stack = stack
        try:
            self._build(stack, image, memory, timeout, stats=stats, coalesced_pio=coalesced_pio, com1=com1,
                        console=console)
            if gdb:
                self._attach_gdb(stack)
        except BaseException:
            stack.close()
            raise
        if symbols is not None:
            self.vmm.symbolize = KernelSymbols(symbols).lookup

    def _build(self, stack: contextlib.ExitStack, image: bytes, memory: int, timeout: float, *, stats: bool,
               coalesced_pio: bool, com1: BusDevice | None, console: ConsoleOutput | None) -> None:
        self.mem = GuestMemory(layout.ram_layout(memory))
        stack.callback(self.mem.close)
        kvm = Kvm()
        stack.callback(kvm.close)
        self.vm = kvm.create_vm()
        stack.callback(self.vm.close)
        machine.check_caps(self.vm)
        self.notes = machine.setup_platform(self.vm)  # irqchip before any irqfd or vCPU
        for slot, region in enumerate(self.mem.regions):
            self.vm.set_user_memory_region(slot, region.gpa, region.size, region.host_addr)
        self.mem.write(LOAD_ADDR, image)
        machine.write_boot_tables(self.mem)

        self.loop = EventLoop()
        stack.callback(self.loop.close)
        self.pio = Bus("pio", unclaimed_read=0xFFFFFFFF)
        self.mmio = Bus("mmio")
        self.serial = _SerialRecorder()
        self.pio.add(layout.COM1_PORT, 8, com1 if com1 is not None else self.serial, "com1")
        self.pio.add(layout.DEBUG_EXIT_PORT, 1, _DebugExit(self), "debug-exit")

        vcpu = self.vm.create_vcpu(0)
        stack.callback(vcpu.close)
        machine.setup_vcpu(vcpu, cpu.get_supported_cpuid(kvm), 1, entry=LOAD_ADDR,
                           hide_xsave=self.host.software)
        self.vcpu = vcpu
        self.exit_handler = machine.X86ExitHandler(self.mem, assist=self.assist)
        self.coalesced = (coalesce_port_writes(self.vm, vcpu, layout.COM1_PORT, 1, device=(layout.COM1_PORT, 8))
                          if coalesced_pio else None)
        self.vmm = Vmm([vcpu], self.pio, self.mmio, self.loop, console or ConsoleOutput(None), self.exit_handler,
                       stack, timeout=timeout, stats=stats, coalesced=self.coalesced)

    def _attach_gdb(self, stack: contextlib.ExitStack) -> None:
        """The gdb server on a free loopback port (:attr:`gdb_port`), the guest stopped until gdb continues it."""
        target = X86DebugTarget(self.mem, self.vm, debugprobe.probe())
        vmm = self.vmm
        self.debugger = Debugger(vmm.vcpus, self.mem, target, self.loop, kick=vmm.kick_vcpus,
                                 stopping=lambda: vmm.stopping, start_paused=True, on_pause=vmm.flush_output)
        stack.callback(self.debugger.close)
        self.gdb = GdbServer(self.debugger, target, self.loop, host="127.0.0.1", port=0,
                             kill=lambda why: vmm.request_stop(ExitStatus.STOPPED, why),
                             exit_code=lambda: vmm.result.exit_code if vmm.result is not None else 0)
        stack.callback(self.gdb.close)
        vmm.debug = self.debugger
        vmm.on_stop.append(self.gdb.vm_ended)
        self.gdb_port = self.gdb.address[1]

    # -- what a test adds before the run --------------------------------------------------------------
    def add_pio(self, port: int, size: int, device: BusDevice, name: str) -> None:
        self.pio.add(port, size, device, name)

    def add_mmio(self, addr: int, size: int, device: BusDevice, name: str) -> None:
        self.mmio.add(addr, size, device, name)

    def eventfd(self) -> EventFd:
        """A non-blocking eventfd that stays open until :meth:`close` (after the run)."""
        efd = EventFd()
        self._eventfds.append(efd)
        return efd

    def irqfd(self, gsi: int) -> EventFd:
        """An eventfd bound to ``gsi`` with ``KVM_IRQFD``: writing it raises the interrupt (edge)."""
        efd = self.eventfd()
        self.vm.irqfd(efd.fd, gsi)
        return efd

    def ioeventfd(self, addr: int, length: int, *, datamatch: int | None = None, pio: bool = False) -> EventFd:
        """An eventfd KVM signals (instead of exiting) on a guest write to ``addr``."""
        efd = self.eventfd()
        self.vm.ioeventfd(efd.fd, addr, length, datamatch=datamatch, pio=pio)
        return efd

    # -- running --------------------------------------------------------------------------------------
    def run(self) -> TinyResult:
        """Run to the debug-exit write (or a stop: timeout, emulation failure, shutdown); once only.
        Releases the VM, its vCPU and guest RAM; eventfds stay readable until :meth:`close`."""
        if self._ran:
            raise RuntimeError("a TinyVm runs once")
        self._ran = True
        r = self.vmm.run()
        counts = self.exit_handler.assist.counts if self.exit_handler.assist is not None else Counter[str]()
        return TinyResult(status=r.status, reason=r.reason, serial=bytes(self.serial.data),
                          debug_exit=self.debug_exit_value, exits=r.exits, assist=Counter(counts),
                          elapsed=r.elapsed, details=r.details, vcpu_report=r.vcpu_report, stats=r.stats)

    def close(self) -> None:
        if not self._ran:  # never ran: the Vmm's cleanup stack was not closed yet
            self._ran = True
            self._stack.close()
        for efd in self._eventfds:
            efd.close()
        self._eventfds.clear()

    def __enter__(self) -> TinyVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
