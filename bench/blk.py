"""virtio-blk device model without KVM, side by side with its limit (plain preadv/pwritev, fio psync).

``DriverQueue`` (the guest driver's half) drives the real ``VirtioMmioTransport`` + ``VirtioBlock`` +
``RawDisk`` over a ``GuestMemory`` on a scratch image, once through the page cache and once with
``O_DIRECT`` (``cache=none``).  Workloads: 4 KiB random read/write (requests/s) and 1 MiB sequential
read/write (MB/s), at queue depth 1 (publish one chain, notify, reap) and 32 (publish 32, one notify,
reap 32).  The limit is a plain ``os.preadv``/``os.pwritev`` loop on the same descriptor, into the same
guest-memory buffers, with the same sizes and offsets.  Device and limit alternate in rounds and the
median round counts, so a noisy machine slows both alike.

``dev/s`` counts only the time inside ``notify`` (what the VMM spends); ``e2e/s`` adds the driver
model's own cost (publishing and reaping in Python), which a real guest pays in its kernel instead.

Usage: ``python bench/blk.py [--seconds S] [--profile]``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyvmm.devices.virtio.block import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VirtioBlock  # noqa: E402
from pyvmm.devices.virtio.disk import RawDisk  # noqa: E402
from pyvmm.devices.virtio.mmio import VirtioMmioTransport  # noqa: E402
from pyvmm.interrupt import CountingIrq  # noqa: E402
from pyvmm.memory import GuestMemory  # noqa: E402
from pyvmm.testing.driverqueue import DriverQueue, PackedDriverQueue, setup_device  # noqa: E402

OUT = ROOT / "bench" / "out"
IMAGE_SIZE = 64 << 20
QSIZE = 256
HDR = struct.Struct("<IIQ")
KiB, MiB = 1024, 1 << 20
WORKLOADS = (  # name, request type, block size, random?
    ("randread-4k", VIRTIO_BLK_T_IN, 4 * KiB, True),
    ("randwrite-4k", VIRTIO_BLK_T_OUT, 4 * KiB, True),
    ("seqread-1m", VIRTIO_BLK_T_IN, 1 * MiB, False),
    ("seqwrite-1m", VIRTIO_BLK_T_OUT, 1 * MiB, False),
)
DEPTHS = (1, 32)


@dataclass
class Row:
    cache: str  # "page" or "direct"
    workload: str
    qd: int
    dev_per_s: float  # requests/s counting only the device's time (notify)
    e2e_per_s: float  # requests/s including the Python driver model
    limit_per_s: float  # plain preadv/pwritev loop, same sizes
    fio_per_s: float | None
    block: int

    @property
    def ratio(self) -> float:
        return self.dev_per_s / self.limit_per_s if self.limit_per_s else 0.0


class Rig:
    """Guest memory, one virtio-blk device on ``image`` and a driver queue with ``depth`` request slots."""

    def __init__(self, image: Path, *, direct: bool, block: int, depth: int, packed: bool = False) -> None:
        self.block = block
        self.depth = depth
        data = depth * (block + 4096) + MiB
        self.mem = GuestMemory.single(((data + 2 * MiB) + MiB - 1) // MiB * MiB)
        self.disk = RawDisk(image, direct=direct)
        self.dev = VirtioBlock(self.disk, queue_size=QSIZE)
        self.irq = CountingIrq()
        self.t = VirtioMmioTransport(self.dev, self.mem, self.irq)
        # the split ring (§2.7), or the packed one (§2.8): a packed driver negotiates VIRTIO_F_RING_PACKED
        self.q: DriverQueue | PackedDriverQueue = (PackedDriverQueue if packed else DriverQueue)(
            self.mem, 0x10000, QSIZE, data_size=data)
        setup_device(self.t, [self.q])
        # One slot per request in flight: header (16 B), data (page-aligned), status byte.
        self.slots = []
        for _ in range(depth):
            hdr = self.q.alloc(16, align=64)
            status = self.q.alloc(1, align=64)
            buf = self.q.alloc(block, align=4096)
            self.slots.append((hdr, buf, status))
        self.notify_time = 0.0

    def close(self) -> None:
        self.dev.close()
        self.mem.close()

    def batch(self, rtype: int, offsets: list[int]) -> None:
        """Publish one request per offset (len(offsets) <= depth), notify once, reap them all."""
        q, mem = self.q, self.mem
        writable = rtype == VIRTIO_BLK_T_IN
        for (hdr, buf, status), off in zip(self.slots, offsets, strict=False):
            mem.pack_into(HDR, hdr, rtype, 0, off // 512)
            q.add_raw_chain([(hdr, 16, False), (buf, self.block, writable), (status, 1, True)])
        t0 = time.perf_counter()
        self.t.notify(0)
        self.notify_time += time.perf_counter() - t0
        used = q.get_used()
        if len(used) != len(offsets):
            raise RuntimeError(f"{len(used)} of {len(offsets)} requests completed")
        for _, _, status in self.slots[: len(offsets)]:
            if mem.read(status, 1) != b"\0":
                raise RuntimeError(f"request failed with status {mem.read(status, 1)[0]}")


def offsets_for(block: int, rand: bool, n: int, seed: int = 1) -> list[int]:
    count = IMAGE_SIZE // block
    if rand:
        rng = random.Random(seed)
        return [rng.randrange(count) * block for _ in range(n)]
    return [(i % count) * block for i in range(n)]


def run_device(rig: Rig, rtype: int, offsets: list[int], seconds: float) -> tuple[float, float]:
    """(device-only requests/s, end-to-end requests/s) over at least ``seconds``."""
    rig.notify_time = 0.0
    done = 0
    t0 = time.perf_counter()
    i = 0
    while True:
        batch = offsets[i : i + rig.depth]
        if len(batch) < rig.depth:
            i = 0
            batch = offsets[: rig.depth]
        rig.batch(rtype, batch)
        done += len(batch)
        i += rig.depth
        if done % 64 < rig.depth and time.perf_counter() - t0 >= seconds:
            break
    elapsed = time.perf_counter() - t0
    return done / rig.notify_time, done / elapsed


def run_limit(rig: Rig, rtype: int, offsets: list[int], seconds: float) -> float:
    """Plain preadv/pwritev on the device's own descriptor into the same guest buffers."""
    fd = rig.disk.fd
    views = [[rig.mem.view(buf, rig.block)] for _, buf, _ in rig.slots]
    op: Callable[[int, list[memoryview], int], int] = os.preadv if rtype == VIRTIO_BLK_T_IN else os.pwritev
    n = len(offsets)
    done = 0
    t0 = time.perf_counter()
    while True:
        for j in range(64):
            op(fd, views[j % len(views)], offsets[(done + j) % n])
        done += 64
        if time.perf_counter() - t0 >= seconds:
            break
    return done / (time.perf_counter() - t0)


def run_fio(image: Path, direct: bool, rw: str, block: int, seconds: float) -> float | None:
    """fio with the psync engine (one thread, synchronous: the same model as the device); IOPS."""
    fio = shutil.which("fio")
    if fio is None:
        return None
    cmd = [fio, "--name=b", f"--filename={image}", "--ioengine=psync", f"--rw={rw}", f"--bs={block}",
           f"--size={IMAGE_SIZE}", f"--direct={int(direct)}", "--time_based", f"--runtime={seconds:.1f}s",
           "--output-format=json", "--randrepeat=1", "--norandommap", "--invalidate=0"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60 + seconds, check=True).stdout
        job = json.loads(out[out.index("{"):])["jobs"][0]
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError):
        return None
    side = job["read"] if "read" in rw else job["write"]
    return float(side["iops"])


def make_image(directory: Path) -> Path:
    image = directory / "blk-bench.img"
    with open(image, "wb") as f:
        chunk = random.Random(7).randbytes(MiB)
        for _ in range(IMAGE_SIZE // MiB):
            f.write(chunk)
    return image


def measure(seconds: float, rounds: int, image: Path) -> list[Row]:
    rows: list[Row] = []
    for cache in ("page", "direct"):
        direct = cache == "direct"
        for name, rtype, block, rand in WORKLOADS:
            offsets = offsets_for(block, rand, 4096)
            fio_rw = {"randread-4k": "randread", "randwrite-4k": "randwrite",
                      "seqread-1m": "read", "seqwrite-1m": "write"}[name]
            fio_iops = run_fio(image, direct, fio_rw, block, max(1.0, seconds * rounds))
            for qd in DEPTHS:
                rig = Rig(image, direct=direct, block=block, depth=qd)
                try:
                    if direct and not rig.disk.direct:
                        return rows  # no O_DIRECT on this filesystem: the page-cache rows stand alone
                    rig.batch(rtype, offsets[:qd])  # warm up
                    dev, e2e, lim = [], [], []
                    for _ in range(rounds):  # alternate, so machine noise hits both alike
                        d, e = run_device(rig, rtype, offsets, seconds)
                        dev.append(d)
                        e2e.append(e)
                        lim.append(run_limit(rig, rtype, offsets, seconds))
                finally:
                    rig.close()
                rows.append(Row(cache, name, qd, statistics.median(dev), statistics.median(e2e),
                                statistics.median(lim), fio_iops, block))
    return rows


class QueueSet:
    """One virtio-blk device with ``queues`` request queues, and a driver thread per queue that publishes
    ``depth`` 4 KiB random reads at a time on its queue, notifies it and reaps them (the multiqueue case:
    each queue served on the thread that notifies it, as pyvmm's queue workers do)."""

    def __init__(self, image: Path, *, direct: bool, queues: int, depth: int) -> None:
        self.mem = GuestMemory.single(queues * 8 * MiB)
        self.disk = RawDisk(image, direct=direct)
        self.dev = VirtioBlock(self.disk, queue_size=QSIZE, num_queues=queues)
        self.t = VirtioMmioTransport(self.dev, self.mem, CountingIrq())
        self.qs = [DriverQueue(self.mem, i * 8 * MiB + 0x10000, QSIZE, data_size=4 * MiB) for i in range(queues)]
        setup_device(self.t, self.qs)
        self.depth = depth
        self.slots = [[(q.alloc(16, align=64), q.alloc(4096, align=4096), q.alloc(1, align=64)) for _ in range(depth)]
                      for q in self.qs]

    def close(self) -> None:
        self.dev.close()
        self.mem.close()

    def run(self, seconds: float) -> float:
        """Requests/s over all queues together, wall clock."""
        counts = [0] * len(self.qs)
        stop = time.perf_counter() + seconds

        def drive(i: int) -> None:
            q, rng = self.qs[i], random.Random(i)
            while time.perf_counter() < stop:
                for hdr, buf, status in self.slots[i]:
                    self.mem.pack_into(HDR, hdr, VIRTIO_BLK_T_IN, 0, rng.randrange(IMAGE_SIZE // 4096) * 8)
                    q.add_raw_chain([(hdr, 16, False), (buf, 4096, True), (status, 1, True)])
                self.t.notify(i)
                counts[i] += len(q.get_used())

        t0 = time.perf_counter()
        threads = [threading.Thread(target=drive, args=(i,)) for i in range(len(self.qs))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return sum(counts) / (time.perf_counter() - t0)


def measure_layouts(seconds: float, rounds: int, image: Path) -> list[tuple[str, int, float]]:
    """4 KiB random reads through the page cache, QD 1 and 32, on a split and on a packed ring
    (layout, qd, device requests/s: the time inside notify)."""
    out = []
    offsets = offsets_for(4096, True, 4096)
    for qd in DEPTHS:
        for layout in ("split", "packed"):
            rig = Rig(image, direct=False, block=4096, depth=qd, packed=layout == "packed")
            try:
                rig.batch(VIRTIO_BLK_T_IN, offsets[:qd])
                out.append((layout, qd, statistics.median(run_device(rig, VIRTIO_BLK_T_IN, offsets, seconds)[0]
                                                          for _ in range(rounds))))
            finally:
                rig.close()
    return out


def measure_queues(seconds: float, rounds: int, image: Path) -> list[tuple[str, int, float]]:
    """4 KiB random reads at QD 32 per queue, one queue and two, side by side (cache, queues, req/s)."""
    out = []
    for cache in ("page", "direct"):
        for queues in (1, 2):
            qs = QueueSet(image, direct=cache == "direct", queues=queues, depth=32)
            try:
                if cache == "direct" and not qs.disk.direct:
                    break
                out.append((cache, queues, statistics.median(qs.run(seconds) for _ in range(rounds))))
            finally:
                qs.close()
    return out


def profile(image: Path, seconds: float) -> str:
    """cProfile of the device's hot path: 4 KiB random reads at QD 32 through the page cache."""
    rig = Rig(image, direct=False, block=4 * KiB, depth=32)
    offsets = offsets_for(4 * KiB, True, 4096)
    prof = cProfile.Profile()
    try:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for i in range(0, 4096, 32):
                batch = offsets[i : i + 32]
                for (hdr, buf, status), off in zip(rig.slots, batch, strict=True):
                    rig.mem.pack_into(HDR, hdr, VIRTIO_BLK_T_IN, 0, off // 512)
                    rig.q.add_raw_chain([(hdr, 16, False), (buf, 4096, True), (status, 1, True)])
                prof.enable()
                rig.t.notify(0)
                prof.disable()
                rig.q.get_used()
    finally:
        rig.close()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12)
    return s.getvalue()


def fmt_rate(row: Row, value: float | None) -> str:
    if value is None:
        return "-"
    if row.block >= MiB:
        return f"{value * row.block / 1e6:,.0f} MB/s"
    return f"{value:,.0f}/s"


def table(rows: list[Row]) -> str:
    head = f"{'cache':7} {'workload':13} {'qd':>3} {'device':>12} {'e2e':>12} {'preadv limit':>13} " \
           f"{'fio psync':>12} {'dev/limit':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.cache:7} {r.workload:13} {r.qd:>3} {fmt_rate(r, r.dev_per_s):>12} "
                     f"{fmt_rate(r, r.e2e_per_s):>12} {fmt_rate(r, r.limit_per_s):>13} "
                     f"{fmt_rate(r, r.fio_per_s):>12} {r.ratio:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=0.4, help="per round and case (default 0.4)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--dir", type=Path, default=OUT, help="where the scratch image goes (not tmpfs: O_DIRECT)")
    args = ap.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    image = make_image(args.dir)
    try:
        rows = measure(args.seconds, args.rounds, image)
        multi = measure_queues(args.seconds, args.rounds, image)
        layouts = measure_layouts(args.seconds, args.rounds, image)
        prof = "" if args.no_profile else profile(image, 2.0)
    finally:
        image.unlink()
    print("virtio-blk device model vs its limit (median of rounds; device = time inside notify)")
    print(table(rows))
    print("\nsplit vs packed virtqueue, 4 KiB random reads, page cache; device requests/s (time inside notify)")
    for layout, qd, rate in layouts:
        print(f"  {layout:7} qd {qd:>2}  {rate:>12,.0f}/s")
    print("\n1 vs 2 request queues (VIRTIO_BLK_F_MQ), 4 KiB random reads, QD 32 per queue, a driver thread per"
          " queue; requests/s, wall clock")
    for cache, queues, rate in multi:
        print(f"  {cache:7} {queues} queue{'s' if queues > 1 else ' '}  {rate:>12,.0f}/s")
    if prof:
        print("\nhot path (cProfile, 4 KiB random reads, QD 32, page cache; top by own time):")
        print("\n".join(prof.strip().splitlines()[:30]))
    result: dict[str, object] = {
        "rows": [asdict(r) | {"ratio": r.ratio} for r in rows],
        "queues": [{"cache": c, "queues": n, "per_s": r} for c, n, r in multi],
        "layouts": [{"layout": layout, "qd": qd, "per_s": r} for layout, qd, r in layouts],
        "fio": shutil.which("fio") is not None,
        "profile": prof,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "blk.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
