"""All-stop control of the vCPUs for the gdb server, and gdb's breakpoints and memory accesses.

All-stop (GDB manual E.10 "Remote Protocol: all-stop"): when one vCPU stops (a breakpoint, a single
step, Ctrl-C), every vCPU stops, and they all resume together; a single step runs only the stepped vCPU
while the others stay stopped.

How a vCPU stops: the vCPU loop (:mod:`pyvmm.vmm`) calls :meth:`Debugger.checkpoint` at every
``KVM_EXIT_INTR``; when the VM is paused, the vCPU thread *parks* there, outside ``KVM_RUN``, until
the server resumes it.  ``KVM_EXIT_INTR`` is a point where the guest state is complete (an I/O exit's
instruction finishes only at the next ``KVM_RUN``), so registers read while parked are exact.  To
pause, the server kicks every vCPU (``immediate_exit`` and a signal) and waits until all are parked.
A vCPU that hits a breakpoint or finishes a step records the event, pauses the others the same way,
wakes the server's event loop through an eventfd and parks.

Events from two vCPUs at once: the first is reported, the others are dropped; a dropped breakpoint
hit leaves its vCPU on the breakpoint instruction, so it hits again when resumed if the breakpoint is
still there (and runs the original instruction if gdb removed it).

While paused the guest's clock is held (where the target can) and the event loop's timers (the
``--timeout`` among them) are frozen, so that a guest stopped in gdb does not see time jump or run
into its timeout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pyvmm.errors import GuestMemoryError
from pyvmm.eventloop import EventLoop
from pyvmm.gdb.target import Z_HARDWARE, DebugTarget, HwPoint, StopWhy
from pyvmm.interrupt import EventFd
from pyvmm.kvm.vcpu import VcpuFd
from pyvmm.log import get_logger
from pyvmm.memory import GuestMemory

log = get_logger(__name__)

PAUSE_TIMEOUT_S = 10.0
PAGE = 0x1000


class PauseTimeout(Exception):
    pass


class Unsupported(Exception):
    """The host's KVM cannot do what gdb asked (measured: pyvmm/arch/x86_64/debugprobe.py)."""


def _check_ram(mem: GuestMemory, gpa: int, length: int) -> None:
    if not mem.contains(gpa, length):
        raise GuestMemoryError(f"guest physical {gpa:#x}+{length:#x} is outside guest RAM")


@dataclass
class _SwBreakpoint:
    gpa: int
    original: bytes


class Debugger:
    def __init__(self, vcpus: Sequence[VcpuFd], mem: GuestMemory, target: DebugTarget, loop: EventLoop, *,
                 kick: Callable[[], None], stopping: Callable[[], bool], start_paused: bool,
                 on_pause: Callable[[], None] = lambda: None) -> None:
        self.vcpus = {v.index: v for v in vcpus}
        self.mem = mem
        self.target = target
        self.loop = loop
        self._kick = kick
        self._on_pause = on_pause
        self._stopping = stopping
        self._cv = threading.Condition()
        self._paused = start_paused
        self._only: int | None = None  # while single-stepping: the one vCPU that runs
        self._stepping: int | None = None
        self._parked: set[int] = set()
        self._event: tuple[int, StopWhy] | None = None
        self.event_fd = EventFd()
        self.sw: dict[int, _SwBreakpoint] = {}  # guest virtual address -> where and what it replaced
        self.hw: list[HwPoint] = []
        self.sw_on_hw: set[int] = set()  # Z0 breakpoints held by a hardware slot (their page is not mapped)
        if start_paused:
            self.loop.freeze()

    # -- the vCPU threads' side (called from pyvmm.vmm's loop) -----------------------------------------
    def checkpoint(self, vcpu: VcpuFd) -> None:
        """At KVM_EXIT_INTR and before the first run: park while the VM is paused for gdb."""
        if self._paused or (self._only is not None and self._only != vcpu.index):
            self._park(vcpu)

    def debug_exit(self, vcpu: VcpuFd) -> None:
        why = self.target.debug_exit(vcpu, self.hw, self.is_breakpoint)
        if why is not None:
            if why.kind == "hwbreak" and self.target.program_counter(vcpu) in self.sw_on_hw:
                why = StopWhy("swbreak")  # what gdb asked for
            self._report(vcpu, why)

    def emulation_failure(self, vcpu: VcpuFd) -> bool:
        """True if the failure was one of gdb's breakpoints (then the vCPU has stopped for gdb)."""
        if self.sw and self.target.emulation_breakpoint(vcpu, self.is_breakpoint):
            self._report(vcpu, StopWhy("swbreak"))
            return True
        return False

    def after_assist(self, vcpu: VcpuFd) -> None:
        """The emulation assist performed an instruction: that ends a single step as well."""
        if self._stepping == vcpu.index:
            self._report(vcpu, StopWhy("step"))

    def vm_stopping(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def is_breakpoint(self, vaddr: int) -> bool:
        return vaddr in self.sw

    def _report(self, vcpu: VcpuFd, why: StopWhy) -> None:
        with self._cv:
            if self._event is None:
                self._event = (vcpu.index, why)
            self._paused = True
        self._kick()
        self.event_fd.write(1)
        self._park(vcpu)

    def _park(self, vcpu: VcpuFd) -> None:
        with self._cv:
            self._parked.add(vcpu.index)
            self._cv.notify_all()
            while (self._paused or (self._only is not None and self._only != vcpu.index)) and not self._stopping():
                self._cv.wait(1.0)
            self._parked.discard(vcpu.index)
        # kicks that came while parked were for the pause: the next KVM_RUN may enter the guest
        vcpu.run_state.immediate_exit = 1 if self._stopping() else 0

    # -- the server's side (the event loop thread) ---------------------------------------------------
    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self, timeout: float = PAUSE_TIMEOUT_S) -> None:
        """Stop every vCPU; return once all are parked (or the VM is ending)."""
        with self._cv:
            if not self._paused:
                self._paused = True
                self.target.freeze_clock()
                self.loop.freeze()
        self._kick()
        deadline = time.monotonic() + timeout
        with self._cv:
            while len(self._parked) < len(self.vcpus) and not self._stopping():
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(self.vcpus) - self._parked)
                    raise PauseTimeout(f"vCPU(s) {missing} did not stop within {timeout:g} s")
                self._cv.wait(min(left, 0.05))
                if len(self._parked) < len(self.vcpus):
                    self._kick()
        self._on_pause()  # what the guest printed up to here reaches the console now, not at resume

    def take_event(self) -> tuple[int, StopWhy] | None:
        with self._cv:
            event, self._event = self._event, None
            return event

    def resume(self, step: int | None = None) -> None:
        """Resume every vCPU, or run only ``step`` for one instruction."""
        for index, vcpu in self.vcpus.items():
            self.target.set_guest_debug(vcpu, sw=bool(self.sw), step=index == step, hw=self.hw)
        with self._cv:
            self._event = None
            self._stepping = step
            self._only = step
            if self._paused:
                self.target.thaw_clock()
                self.loop.thaw()
            self._paused = False
            self._cv.notify_all()

    def detach(self) -> None:
        """Remove every breakpoint, switch guest debugging off and let the guest run."""
        for vaddr in list(self.sw):
            self.remove_sw(vaddr)
        self.hw.clear()
        self.sw_on_hw.clear()
        self.resume(None)

    # -- breakpoints --------------------------------------------------------------------------------------
    def insert_sw(self, vcpu: VcpuFd, vaddr: int) -> None:
        """Z0: write the breakpoint instruction over guest code.  Where the address is not mapped yet (a
        kernel symbol while the guest still runs on its boot page tables) a free hardware breakpoint
        slot stands in, since those match virtual addresses; GuestMemoryError when there is none."""
        if vaddr in self.sw or vaddr in self.sw_on_hw:
            return
        n = len(self.target.break_insn)
        try:
            if not self.target.sw_breakpoints:
                raise Unsupported("this host's KVM does not stop the guest at a breakpoint instruction")
            gpa = self._span(vcpu, vaddr, n)
        except (GuestMemoryError, Unsupported):
            if self.insert_hw(HwPoint(Z_HARDWARE, vaddr, 1)) is not None:
                raise
            self.sw_on_hw.add(vaddr)
            return
        original = self.mem.read(gpa, n)
        self.mem.write(gpa, self.target.break_insn)
        self.sw[vaddr] = _SwBreakpoint(gpa, original)

    def remove_sw(self, vaddr: int) -> bool:
        if vaddr in self.sw_on_hw:
            self.sw_on_hw.discard(vaddr)
            return self.remove_hw(HwPoint(Z_HARDWARE, vaddr, 1))
        bp = self.sw.pop(vaddr, None)
        if bp is None:
            return False
        self.mem.write(bp.gpa, bp.original)
        return True

    def insert_hw(self, point: HwPoint) -> str | None:
        """Z1-Z4: None if inserted, else why not (no such hardware, no free slot, bad length)."""
        if (self.target.hw_breakpoints if point.type == Z_HARDWARE else self.target.hw_watchpoints) == 0:
            return "this host's KVM has no such hardware breakpoints"
        why = self.target.check_hw_point(point)
        if why is not None:
            return why
        if point in self.hw:
            return None
        is_break = point.type == 1
        used = sum(1 for p in self.hw if (p.type == 1) == is_break)
        limit = self.target.hw_breakpoints if is_break else self.target.hw_watchpoints
        if used >= limit:
            return f"all {limit} hardware {'breakpoint' if is_break else 'watchpoint'} slots are in use"
        if len(self.hw) >= self.target.hw_slots:
            return f"all {self.target.hw_slots} hardware slots (shared by breakpoints and watchpoints) are in use"
        self.hw.append(point)
        return None

    def remove_hw(self, point: HwPoint) -> bool:
        if point in self.hw:
            self.hw.remove(point)
            return True
        return False

    # -- memory -------------------------------------------------------------------------------------------
    def _span(self, vcpu: VcpuFd, vaddr: int, n: int) -> int:
        """The guest physical address of ``n`` bytes at ``vaddr`` that stay within one page."""
        if (vaddr & (PAGE - 1)) + n > PAGE:
            raise GuestMemoryError(f"{vaddr:#x}: a breakpoint across a page boundary")
        gpa = self.target.translate(vcpu, vaddr)
        _check_ram(self.mem, gpa, n)
        return gpa

    def read_memory(self, vcpu: VcpuFd, vaddr: int, length: int) -> bytes:
        """Up to ``length`` bytes at a guest virtual address: all of them, or those before the first one
        that is unmapped or outside RAM.  gdb's own breakpoint instructions read as what they replaced."""
        out = bytearray()
        addr = vaddr
        while len(out) < length:
            chunk = min(length - len(out), PAGE - (addr & (PAGE - 1)))
            try:
                gpa = self.target.translate(vcpu, addr)
                out += self.mem.read(gpa, chunk)
            except GuestMemoryError:
                break
            addr = (addr + chunk) & 0xFFFF_FFFF_FFFF_FFFF
        for bp_addr, bp in self.sw.items():
            for i, b in enumerate(bp.original):
                pos = (bp_addr + i - vaddr) & 0xFFFF_FFFF_FFFF_FFFF
                if pos < len(out):
                    out[pos] = b
        return bytes(out)

    def write_memory(self, vcpu: VcpuFd, vaddr: int, data: bytes) -> None:
        """Write at a guest virtual address, all or nothing (GuestMemoryError); a write over one of gdb's
        breakpoints changes what the breakpoint will restore and keeps the breakpoint."""
        pieces = []
        addr, pos = vaddr, 0
        while pos < len(data):
            chunk = min(len(data) - pos, PAGE - (addr & (PAGE - 1)))
            gpa = self.target.translate(vcpu, addr)
            _check_ram(self.mem, gpa, chunk)
            pieces.append((gpa, data[pos:pos + chunk]))
            addr, pos = (addr + chunk) & 0xFFFF_FFFF_FFFF_FFFF, pos + chunk
        for gpa, piece in pieces:
            self.mem.write(gpa, piece)
        n = len(self.target.break_insn)
        for bp in self.sw.values():
            for gpa, piece in pieces:
                lo, hi = max(gpa, bp.gpa), min(gpa + len(piece), bp.gpa + n)
                if lo < hi:
                    orig = bytearray(bp.original)
                    orig[lo - bp.gpa:hi - bp.gpa] = piece[lo - gpa:hi - gpa]
                    bp.original = bytes(orig)
                    self.mem.write(lo, self.target.break_insn[lo - bp.gpa:hi - bp.gpa])

    def close(self) -> None:
        self.event_fd.close()
