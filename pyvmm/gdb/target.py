"""What the gdb server needs from an architecture: registers, address translation, guest debugging.

Each architecture provides one :class:`DebugTarget` (``pyvmm/arch/x86_64/gdbtarget.py``); the server
(:mod:`pyvmm.gdb.server`) and the all-stop control (:mod:`pyvmm.gdb.control`) use only these names and
never branch on the architecture.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pyvmm.kvm.vcpu import VcpuFd

# The Z/z packet types (GDB manual E.4 "Packets": 'Z type,addr,kind')
Z_SOFTWARE = 0
Z_HARDWARE = 1
Z_WRITE = 2
Z_READ = 3
Z_ACCESS = 4
SIGINT = int(signal.SIGINT)
SIGTRAP = int(signal.SIGTRAP)


@dataclass(frozen=True)
class Register:
    name: str
    bits: int


@dataclass(frozen=True)
class HwPoint:
    """A hardware breakpoint (Z1) or watchpoint (Z2-Z4) gdb asked for."""

    type: int
    addr: int
    length: int


@dataclass(frozen=True)
class StopWhy:
    """Why a vCPU stopped, as the stop reply says it (GDB manual E.3 "Stop Reply Packets")."""

    kind: str  # "swbreak", "hwbreak", "watch", "rwatch", "awatch", "step", "interrupt"
    addr: int | None = None  # the data address of a watchpoint

    @property
    def signal(self) -> int:
        return SIGINT if self.kind == "interrupt" else SIGTRAP


class DebugTarget(Protocol):
    """One architecture's side of debugging a guest through KVM."""

    xml: str  # the target description (GDB manual G "Target Descriptions")
    registers: Sequence[Register]  # in target description order: the 'g' packet's layout
    break_insn: bytes  # what a software breakpoint writes over the instruction
    break_kind: int  # the kind gdb gives in Z0 for it (the instruction's length in bytes)
    sw_breakpoints: bool  # this host's KVM stops the guest at the breakpoint instruction
    single_step: bool  # ... and after a single step
    hw_breakpoints: int  # how many Z1 at once (0: none)
    hw_watchpoints: int  # how many Z2-Z4 at once
    hw_slots: int  # how many of both together (x86: DR0-DR3 serve breakpoints and watchpoints alike)
    watch_types: frozenset[int]  # which of Z2/Z3/Z4 the hardware can do

    def describe(self) -> str:
        """What this host delivers, for the user (``--gdb``'s note)."""
        ...

    def read_registers(self, vcpu: VcpuFd) -> list[int | None]:
        """Every register's value in ``registers`` order; None where it cannot be read."""
        ...

    def write_registers(self, vcpu: VcpuFd, values: dict[int, int]) -> None:
        """Set the registers numbered in ``values``; ValueError for one that cannot be set so."""
        ...

    def program_counter(self, vcpu: VcpuFd) -> int:
        ...

    def translate(self, vcpu: VcpuFd, vaddr: int) -> int:
        """Guest virtual -> guest physical through the vCPU's page tables; GuestMemoryError if unmapped."""
        ...

    def check_hw_point(self, point: HwPoint) -> str | None:
        """None if the hardware can do ``point``, else why not."""
        ...

    def set_guest_debug(self, vcpu: VcpuFd, *, sw: bool, step: bool, hw: Sequence[HwPoint]) -> None:
        """``KVM_SET_GUEST_DEBUG`` for the next run: nothing set disables guest debugging."""
        ...

    def debug_exit(self, vcpu: VcpuFd, hw: Sequence[HwPoint], is_breakpoint: Callable[[int], bool]) -> StopWhy | None:
        """Decode a ``KVM_EXIT_DEBUG``; None when it was the guest's own exception (re-injected here)."""
        ...

    def emulation_breakpoint(self, vcpu: VcpuFd, is_breakpoint: Callable[[int], bool]) -> bool:
        """On an emulation failure: is the vCPU at one of gdb's software breakpoints?  (A software KVM
        that cannot emulate the breakpoint instruction reports it this way.)"""
        ...

    def freeze_clock(self) -> None:
        """The guest's clock stops while it is stopped (where KVM lets a VMM hold it)."""
        ...

    def thaw_clock(self) -> None:
        ...
