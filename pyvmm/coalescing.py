"""Coalesced port writes: the UART's THR without an exit per byte, where KVM can.

Linux's 8250 console writes every byte to THR (port 0x3f8) and, in its console path, polls LSR (0x3fd)
before each: two exits per byte.  With ``KVM_CAP_COALESCED_PIO`` (api.rst 4.116,
"KVM_(UN)REGISTER_COALESCED_MMIO") a port zone can be registered whose writes KVM appends to the
coalesced ring (:mod:`pyvmm.kvm.coalesced`) instead of exiting; reads still exit.  The writes must reach
the device in guest order relative to every other access to it, so the ring is replayed

- before the VMM handles any exit on the device's registers (the vCPU loop's dispatch table wraps those
  addresses): an LSR read must see the bytes already sent, a THR write with DLAB set is a divisor-latch
  write that must come before the LCR write clearing DLAB, and a write the kernel could not put in a full
  ring arrives as an ordinary exit after the ones in it;
- from the event loop every few milliseconds (bytes echoed to a typed key show promptly);
- at the VM's stop, before the console is flushed.

- when the VM's end is decided (:meth:`pyvmm.vmm.Vmm.request_stop`): the console has seen every byte the
  guest wrote before it reset or powered off (a panic report right before a reset, say).

The ring is shared by every vCPU and drained from several threads: a lock serialises the replays (the
check for an empty ring, the common case, takes none).  It is re-entrant: a device a replay reaches may
end the VM, which replays the ring again on the same thread.  Without the capability nothing is registered and
every write exits as before; ``PYVMM_NO_COALESCED_PIO=1`` turns it off for measurements (the builder
reads it through ``VmConfig.debug``).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pyvmm.bus import Bus, Reader, Writer
from pyvmm.kvm.abi import KVM_CAP_COALESCED_MMIO, KVM_CAP_COALESCED_PIO
from pyvmm.kvm.coalesced import CoalescedRing
from pyvmm.kvm.vcpu import VcpuFd
from pyvmm.kvm.vm import VmFd


@dataclass(frozen=True)
class Zone:
    addr: int  # first port of the coalesced zone
    size: int
    device_base: int  # the device's register range: an exit on any of these replays the ring first
    device_size: int

    @property
    def label(self) -> str:
        return f"pio {self.addr:#x} write" if self.size == 1 else f"pio {self.addr:#x}+{self.size} write"


class CoalescedWrites:
    """The ring, the zones it serves, and the replay into the PIO/MMIO buses."""

    def __init__(self, ring: CoalescedRing, zones: list[Zone]) -> None:
        self.ring = ring
        self.zones = zones
        self._lock = threading.RLock()
        self._pio: Bus | None = None
        self._mmio: Bus | None = None
        self._pio_w: dict[int, Writer] = {}
        self._mmio_w: dict[int, Writer] = {}

    def bind(self, pio: Bus, mmio: Bus) -> None:
        """Where replayed writes go: the devices themselves (never the wrapped table entries, which
        would replay the ring again).  Called once the buses are complete, before the vCPUs run."""
        self._pio, self._mmio = pio, mmio
        self._pio_w = pio.handlers()[1]
        self._mmio_w = mmio.handlers()[1]

    def _deliver(self, addr: int, size: int, is_pio: bool, value: int) -> None:
        w = (self._pio_w if is_pio else self._mmio_w).get(addr)
        if w is not None:
            w(size, value)
            return
        bus = self._pio if is_pio else self._mmio
        if bus is not None:
            bus.write(addr, size, value)

    def drain(self) -> None:
        """Replay what the ring holds (from any thread).  Always under the lock, even when the ring looks
        empty: another thread may have consumed an entry and still be delivering it, and an access to the
        device must not overtake a write the guest made before it (a divisor byte before an LCR write)."""
        with self._lock:
            if not self.ring.empty():
                self.ring.drain(self._deliver)

    def wrap(self, readers: dict[int, Reader], writers: dict[int, Writer], pio: Bus) -> None:
        """Make every access to a zone's device replay the ring first (in the vCPU loop's PIO table)."""
        drain = self.drain
        for zone in self.zones:
            for port in range(zone.device_base, zone.device_base + zone.device_size):
                readers[port] = _drained_reader(readers.get(port) or functools.partial(pio.read, port), drain)
                writers[port] = _drained_writer(writers.get(port) or functools.partial(pio.write, port), drain)

    def counts(self) -> dict[str, int]:
        """Writes replayed so far, by zone (for --stats; with one zone, all of them are its)."""
        if len(self.zones) == 1:
            return {self.zones[0].label: self.ring.drained}
        return {"coalesced writes": self.ring.drained}


def _drained_reader(read: Reader, drain: Callable[[], None]) -> Reader:
    def drained_read(size: int) -> int:
        drain()
        return read(size)

    return drained_read


def _drained_writer(write: Writer, drain: Callable[[], None]) -> Writer:
    def drained_write(size: int, value: int) -> None:
        drain()
        write(size, value)

    return drained_write


def coalesce_port_writes(vm: VmFd, vcpu: VcpuFd, port: int, size: int, *,
                         device: tuple[int, int], enabled: bool = True) -> CoalescedWrites | None:
    """Register ``[port, port+size)`` as a coalesced PIO zone where KVM offers it, and return the ring's
    replayer; ``device`` is ``(base, size)`` of the device's registers.  None (nothing registered) without
    ``KVM_CAP_COALESCED_PIO`` or when not ``enabled``."""
    if not enabled:
        return None
    page = vm.check_extension(KVM_CAP_COALESCED_MMIO)  # the ring's page in the vCPU mapping; 0: none
    if page <= 0 or not vm.check_extension(KVM_CAP_COALESCED_PIO):
        return None
    ring = vcpu.coalesced_ring(page)  # before registering: writes must never go to a ring nobody reads
    vm.register_coalesced_mmio(port, size, pio=True)
    return CoalescedWrites(ring, [Zone(port, size, *device)])
