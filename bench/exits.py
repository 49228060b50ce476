"""Exit round trips: a PIO and an MMIO exit handled in Python, and ioeventfd vs a trapped QueueNotify.

The tiny guest ``firmware/exitloop.S`` runs N iterations of each phase (an empty loop, ``out``, ``in``,
an MMIO store and load to a Python device, a store to a virtio-mmio QueueNotify handled in Python, a
store to a QueueNotify with a registered ioeventfd) and marks the phase boundaries with a port write
the host timestamps.  Time per exit = phase time / N minus the empty loop's time per iteration.  One
run, all phases: machine noise hits them alike.  Usage: ``python bench/exits.py [--n N]``.
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
from pyvmm.testing.tinyvm import TinyVm  # noqa: E402

OUT = ROOT / "bench" / "out"
FIRMWARE = ROOT / "firmware" / "out" / "exitloop.bin"
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


def measure(n: int) -> dict[str, object]:
    control = Control(n)
    with tempfile.TemporaryDirectory() as tmp, TinyVm(FIRMWARE, timeout=300) as vm:
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
    return {"n": n, "rows": rows, "eventfd_count": signalled, "exits": dict(result.exits)}


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


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="iterations per phase (default 20000)")
    args = ap.parse_args(argv)
    res = measure(max(args.n, 1))
    print("exit round trips (tiny guest firmware/exitloop.S; minus the empty loop's cost)")
    print(table(res))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "exits.json").write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
