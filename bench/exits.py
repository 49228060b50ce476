"""Exit round trips: a PIO and an MMIO exit handled in Python, and ioeventfd vs a trapped QueueNotify.

The tiny guest ``firmware/exitloop.S`` runs N iterations of each phase (an empty loop, ``out``, ``in``,
an MMIO store and load to a Python device, a store to a virtio-mmio QueueNotify handled in Python, a
store to a QueueNotify with a registered ioeventfd) and marks the phase boundaries with a port write
the host timestamps.  Time per exit = phase time / N minus the empty loop's time per iteration.  One
run, all phases: machine noise hits them alike.

A second run of the same guest with the counting vCPU loop (``--stats``) splits each exit into the VMM's
share (from KVM_RUN's return to the next KVM_RUN, measured inside the loop) and the rest (the kernel and
the emulated guest).  Then ``firmware/thr.S`` writes N_THR bytes to the UART's THR, with and without
polling LSR, with and without KVM's coalesced PIO ring: exits and time per byte.
Usage: ``python bench/exits.py [--n N] [--n-thr N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyvmm.devices.virtio.block import VirtioBlock  # noqa: E402
from pyvmm.devices.virtio.disk import RawDisk  # noqa: E402
from pyvmm.devices.virtio.mmio import VirtioMmioTransport  # noqa: E402
from pyvmm.interrupt import CountingIrq  # noqa: E402
from pyvmm.status import ExitStatus  # noqa: E402
from pyvmm.testing.driverqueue import DriverQueue, setup_device  # noqa: E402
from pyvmm.testing.tinyvm import Recorder, TinyVm  # noqa: E402

OUT = ROOT / "bench" / "out"
FIRMWARE = ROOT / "firmware" / "out" / "exitloop.bin"
THR_FIRMWARE = ROOT / "firmware" / "out" / "thr.bin"
THR_MODE_POLL = 1  # firmware/thr.S
PORT_IN, PORT_LOOP = 0x510, 0x518
MMIO_PLAIN, NOTIFY_BASE, EVENTFD_BASE = 0xD000_0000, 0xD000_1000, 0xD000_2000
QUEUE_NOTIFY = 0x50
PHASES = ("empty loop (no exit)", "PIO out (Python)", "PIO in (Python)", "MMIO store (Python)",
          "MMIO load (Python)", "QueueNotify trapped (virtio-mmio, Python)", "QueueNotify ioeventfd (no exit)")


class Null:
    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class Control:
    """Offset 0 reads N; a write at offset 2 (PORT_READY) marks a phase boundary."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.marks: list[tuple[float, int]] = []

    def read(self, offset: int, size: int) -> int:
        return self.n if offset == 0 else 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.marks.append((time.perf_counter(), value))


# The register each exiting phase of exitloop.S hits, as --stats names it.
PHASE_KEYS = {1: ("pio", PORT_LOOP, "write"), 2: ("pio", PORT_LOOP, "read"), 3: ("mmio", MMIO_PLAIN, "write"),
              4: ("mmio", MMIO_PLAIN, "read"), 5: ("mmio", NOTIFY_BASE + QUEUE_NOTIFY, "write")}


def measure(n: int, *, stats: bool = False) -> dict[str, object]:
    control = Control(n)
    with tempfile.TemporaryDirectory() as tmp, TinyVm(FIRMWARE, timeout=300, stats=stats) as vm:
        image = Path(tmp) / "disk.img"
        image.write_bytes(bytes(1 << 20))
        # A real virtio-blk transport behind the trapped QueueNotify, initialised as a driver would,
        # so each notify walks the real path (locks, process_queue on an empty ring, EVENT_IDX re-arm).
        blk = VirtioBlock(RawDisk(image))
        transport = VirtioMmioTransport(blk, vm.mem, CountingIrq())
        setup_device(transport, [DriverQueue(vm.mem, 16 << 20, 256, data_size=1 << 16)])
        vm.add_pio(PORT_IN, 8, control, "control")
        vm.add_pio(PORT_LOOP, 4, Null(), "loop")
        vm.add_mmio(MMIO_PLAIN, 0x1000, Null(), "plain")
        vm.add_mmio(NOTIFY_BASE, 0x1000, transport, "virtio-trapped")
        vm.add_mmio(EVENTFD_BASE, 0x1000, Null(), "virtio-eventfd")
        efd = vm.ioeventfd(EVENTFD_BASE + QUEUE_NOTIFY, 4)
        result = vm.run()
        signalled = efd.read()
        blk.close()
    if result.status != ExitStatus.OK or [v for _, v in control.marks] != list(range(len(PHASES) + 1)):
        raise RuntimeError(f"exitloop guest failed: {result.reason}; marks {control.marks}")
    times = [b[0] - a[0] for a, b in zip(control.marks, control.marks[1:], strict=False)]
    loop = times[0] / n
    rows = [{"phase": name, "us_per_iter": t / n * 1e6, "us_per_exit": max(t / n - loop, 0.0) * 1e6}
            for name, t in zip(PHASES, times, strict=True)]
    if result.stats is not None:
        for i, key in PHASE_KEYS.items():
            count = result.stats.count(*key)
            vmm_s = sum(r.handle_s for r in result.stats.rows if (r.kind, r.addr, r.access) == key)
            rows[i]["vmm_us_per_exit"] = vmm_s / count * 1e6 if count else 0.0
    return {"n": n, "rows": rows, "eventfd_count": signalled, "exits": dict(result.exits)}


def measure_thr(n: int) -> list[dict[str, object]]:
    """firmware/thr.S: n bytes to COM1's THR, with and without polling LSR, with and without coalescing."""
    out: list[dict[str, object]] = []
    for mode, label in ((0, "THR only"), (THR_MODE_POLL, "LSR poll + THR (Linux console)")):
        for coalesced in (False, True):
            with TinyVm(THR_FIRMWARE, timeout=300, coalesced_pio=coalesced) as vm:
                vm.add_pio(PORT_IN, 8, Recorder(reads={0: [n, mode]}), "control")
                active = vm.coalesced is not None
                result = vm.run()
            if result.status != ExitStatus.OK or len(vm.serial.data) != n:
                raise RuntimeError(f"thr guest failed: {result.reason}; {len(vm.serial.data)} of {n} bytes")
            out.append({"guest": label, "coalesced": active, "bytes": n, "io_exits": result.exits["io"],
                        "us_per_byte": result.elapsed / n * 1e6})
            if coalesced and not active:
                out[-1]["note"] = "no KVM_CAP_COALESCED_PIO on this host"
    return out


def table(res: dict[str, object]) -> str:
    rows = res["rows"]
    assert isinstance(rows, list)
    head = f"{'phase':44} {'us/iter':>9} {'us/exit':>9} {'exits/s':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        per = r["us_per_exit"]
        rate = f"{1e6 / per:,.0f}" if per > 0 and not r["phase"].startswith("empty") else "-"
        lines.append(f"{r['phase']:44} {r['us_per_iter']:>9.2f} {per:>9.2f} {rate:>10}")
    trapped, efd = rows[5]["us_per_iter"], rows[6]["us_per_iter"]
    lines.append(f"ioeventfd saves {trapped - efd:.2f} us per QueueNotify on the vCPU thread ({trapped:.2f} -> "
                 f"{efd:.2f} us per loop iteration, {trapped / efd:.1f}x); N = {res['n']} per phase")
    return "\n".join(lines)


def split_table(res: dict[str, object]) -> str:
    rows = res["rows"]
    assert isinstance(rows, list)
    head = f"{'phase':44} {'VMM us/exit':>12} {'rest us/exit':>13}"
    lines = [head, "-" * len(head)]
    for i in PHASE_KEYS:
        r = rows[i]
        lines.append(f"{r['phase']:44} {r['vmm_us_per_exit']:>12.2f} {max(r['us_per_exit'] - r['vmm_us_per_exit'], 0):>13.2f}")
    return "\n".join(lines)


def thr_table(rows: list[dict[str, object]]) -> str:
    head = f"{'guest':32} {'coalesced':>9} {'bytes':>6} {'io exits':>9} {'us/byte':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        note = f"  ({r['note']})" if "note" in r else ""
        lines.append(f"{r['guest']:32} {'yes' if r['coalesced'] else 'no':>9} {r['bytes']:>6} {r['io_exits']:>9} "
                     f"{r['us_per_byte']:>8.2f}{note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="iterations per phase (default 20000)")
    ap.add_argument("--n-thr", type=int, default=3000, help="bytes the UART guest writes (default 3000)")
    args = ap.parse_args(argv)
    res = measure(max(args.n, 1))
    print("exit round trips (tiny guest firmware/exitloop.S; minus the empty loop's cost)")
    print(table(res))
    split = measure(max(args.n, 1), stats=True)
    print("\nwhere an exit's time goes (a second run with the counting loop of --stats): VMM = KVM_RUN's "
          "return to the next KVM_RUN; rest = the first table's us/exit minus that (kernel, emulated guest)")
    print(split_table(split))
    res["vmm_split"] = split["rows"]
    thr = measure_thr(max(args.n_thr, 1))
    print("\nUART transmit (tiny guest firmware/thr.S): exits and wall time per byte, THR writes through KVM's "
          "coalesced PIO ring or not")
    print(thr_table(thr))
    res["thr"] = thr
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "exits.json").write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
