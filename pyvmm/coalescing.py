"""Coalesced port writes: the UART's THR without an exit per byte, where KVM can.

Linux's 8250 console writes every byte to THR (port 0x3f8) and, in its console path, polls LSR (0x3fd)
before each: two exits per byte.  With ``KVM_CAP_COALESCED_PIO`` (api.rst 4.116,
"KVM_(UN)REGISTER_COALESCED_MMIO") a port zone can be registered whose writes KVM appends to the
coalesced ring (:mod:`pyvmm.kvm.coalesced`) instead of exiting; reads still exit.  The writes must reach
the device in guest order relative to every access to it whose outcome they could change, so the ring is
replayed

- before the VMM handles any exit on the device's registers that could tell (the vCPU loop's dispatch
  table wraps those addresses): a THR write with DLAB set is a divisor-latch write that must come before
  the LCR write clearing DLAB; a THR write sets the THRE interrupt an IIR read reports; a write the
  kernel could not put in a full ring arrives as an ordinary exit after the ones in it.  A read the
  device says the queued writes cannot change is served without the replay (``ordered_reader``): the
  16550's LSR, polled before every console byte, outside loopback;
- from the event loop every few milliseconds (bytes echoed to a typed key show promptly);
- when the VM's end is decided (:meth:`pyvmm.vmm.Vmm.request_stop`): the console has seen every byte the
  guest wrote before it reset or powered off (a panic report right before a reset, say);
- at the VM's stop, before the console is flushed.

A replay hands the device each run of writes to one register in one call where it takes runs
(``write_run``): a console line is one call, not one per byte.

The ring is shared by every vCPU and drained from several threads: a lock serialises the replays.  It is
re-entrant: a device a replay reaches may end the VM, which replays the ring again on the same thread.
Without the capability nothing is registered and every write exits as before;
``PYVMM_NO_COALESCED_PIO=1`` turns it off for measurements (the builder reads it through
``VmConfig.debug``).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

from pyvmm.bus import Bus, DispatchTable, Reader, Writer
from pyvmm.kvm.abi import KVM_CAP_COALESCED_MMIO, KVM_CAP_COALESCED_PIO
from pyvmm.kvm.coalesced import CoalescedRing
from pyvmm.kvm.vcpu import VcpuFd
from pyvmm.kvm.vm import VmFd
from pyvmm.statictypes import NamedTuple


class Zone(NamedTuple):
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
        self._pio_w: DispatchTable[Writer] = DispatchTable(lambda addr: None)
        self._mmio_w: DispatchTable[Writer] = DispatchTable(lambda addr: None)
        self._runs: dict[tuple[int, bool], Callable[[int, list[int]], None]] = {}

    def bind(self, pio: Bus, mmio: Bus) -> None:
        """Where replayed writes go: the devices themselves (never the wrapped table entries, which
        would replay the ring again).  Called once the buses are complete, before the vCPUs run."""
        self._pio, self._mmio = pio, mmio
        self._pio_w = pio.handlers()[1]
        self._mmio_w = mmio.handlers()[1]
        self._runs = {}
        for zone in self.zones:
            hit = pio.find(zone.addr)
            write_run = getattr(hit[0], "write_run", None) if hit is not None else None
            if write_run is not None:
                self._runs[(zone.addr, True)] = functools.partial(write_run, zone.addr - zone.device_base)

    def _deliver(self, addr: int, size: int, is_pio: bool, value: int) -> None:
        w = (self._pio_w if is_pio else self._mmio_w)[addr]
        if w is not None:
            w(size, value)
            return
        bus = self._pio if is_pio else self._mmio
        if bus is not None:
            bus.write(addr, size, value)

    def _deliver_run(self, addr: int, size: int, is_pio: bool, values: list[int]) -> None:
        """Consecutive writes of one size to one address (a line of console output): in one call where the
        device takes a run of writes (``write_run``), else one by one."""
        write_run = self._runs.get((addr, is_pio))
        if write_run is not None:
            write_run(size, values)
        else:
            for value in values:
                self._deliver(addr, size, is_pio, value)

    def drain(self) -> None:
        """Replay what the ring holds (from any thread).  Always under the lock, even when the ring looks
        empty: another thread may have consumed an entry and still be delivering it, and an access to the
        device must not overtake a write the guest made before it (a divisor byte before an LCR write).
        Writes are delivered in runs (consecutive writes to one register); a run whose device raises does
        not stop the later ones, and the first error is raised at the end."""
        with self._lock:
            runs = self.ring.take_runs()
            if not runs:
                return
            error: BaseException | None = None
            for addr, size, is_pio, values in runs:
                try:
                    self._deliver_run(addr, size, is_pio, values)
                except Exception as err:  # the later writes still reach their devices
                    error = error or err
            if error is not None:
                raise error

    def wrap(self, readers: DispatchTable[Reader], writers: DispatchTable[Writer], pio: Bus) -> None:
        """Make every access to a zone's device replay the ring first (in the vCPU loop's PIO table), except
        reads the device serves itself, replaying only when the queued writes could change them
        (``ordered_reader``)."""
        drain = self.drain
        for zone in self.zones:
            hit = pio.find(zone.device_base)
            ordered = getattr(hit[0], "ordered_reader", None) if hit is not None else None
            for port in range(zone.device_base, zone.device_base + zone.device_size):
                own = ordered(port - zone.device_base, drain) if ordered is not None else None
                readers[port] = own or _drained_reader(readers[port] or functools.partial(pio.read, port), drain)
                writers[port] = _drained_writer(writers[port] or functools.partial(pio.write, port), drain)

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
