"""``pyvmm run --trace virtio``: one readable line per host-side event of a virtio request.

The devices emit compact event strings through a hook (``VirtioMmioTransport(..., trace=hook)``):
``"<kind> key=value ..."``, e.g. ``"pop head=3 r=16 w=4097 descs=16r,4096w,1w"``.  A :class:`Tracer`
turns each into a line with a timestamp, the device name and an explanation::

    +12.345678 vda  notify  queue 0: QueueNotify written by the guest, caught by an ioeventfd

Tracing is off by default and then costs nothing: the builder passes no hook at all (``trace=None``), and
every emitting site tests ``if trace is not None`` before it builds a string.

Selectors (``--trace``, comma-separated): ``virtio`` (every class), or ``virtio.<class>`` for one of
:data:`EVENT_CLASSES`; ``none`` (or an empty string) turns tracing off.  The classes follow one request:

========  =================================================================================
setup     the driver set the device up (DRIVER_OK): its queues, their layout (split or packed)
notify    the driver kicked a queue (QueueNotify via an ioeventfd, or a trapped MMIO write)
pop       the device popped a descriptor chain off the available ring (buffers, lengths, direction)
req       the device decoded the request in the chain (virtio-blk: type, sector, bytes)
io        the device finished the request's I/O on the host (status, data bytes)
used      the device put the chain in the used ring (length written, new used idx)
irq       the device raised its interrupt (via irqfd) or the driver's event index suppressed it
ack       the guest acknowledged the interrupt (InterruptACK)
reset     the device needs a reset (a chain it could not parse)
========  =================================================================================
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable

from pyvmm.errors import ConfigError
from pyvmm.statictypes import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import TextIO

TraceHook = Callable[[str], None]

EVENT_CLASSES = ("setup", "notify", "pop", "req", "io", "used", "irq", "ack", "reset")
TRACE_OFF = ("none", "off")
_KIND_CLASS = {"needs": "reset", "ready": "setup"}  # raw event word -> class, where they differ


def parse_selectors(items: Iterable[str]) -> frozenset[str]:
    """Expand selectors (``virtio``, ``virtio.irq``, ``none``; comma-separated) into event classes."""
    classes: set[str] = set()
    for item in items:
        for sel in (s.strip() for s in item.split(",")):
            if not sel or sel in TRACE_OFF:
                continue
            if sel == "virtio":
                classes.update(EVENT_CLASSES)
                continue
            group, _, cls = sel.partition(".")
            if group != "virtio" or cls not in EVENT_CLASSES:
                raise ConfigError(
                    f"bad trace selector {sel!r}: expected virtio, none, or virtio.<class> with <class> one of "
                    + ", ".join(EVENT_CLASSES))
            classes.add(cls)
    return frozenset(classes)


def _fields(words: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for w in words:
        key, sep, value = w.partition("=")
        if sep:
            out[key] = value
    return out


def _descs(text: str) -> str:
    """``16r,4096w,1w`` -> ``[16 out, 4096 in, 1 in]`` (out/in as the driver's virtqueue_add_sgs says)."""
    parts = []
    for d in filter(None, text.split(",")):
        parts.append(f"{d[:-1]} {'in' if d.endswith('w') else 'out'}")
    return "[" + ", ".join(parts) + "]"


def describe(event: str, *, irq: str = "") -> tuple[str, str]:
    """``(class, explanation)`` for one raw event string (see the module docstring)."""
    words = event.split()
    kind = words[0] if words else "?"
    cls = _KIND_CLASS.get(kind, kind)
    f = _fields(words[1:])
    if kind == "ready":
        layout = f.get("layout", "?")
        why = " (VIRTIO_F_RING_PACKED negotiated)" if layout == "packed" else ""
        return cls, (f"DRIVER_OK: {f.get('queues', '?')} queue(s) live, {layout} virtqueue layout{why}, "
                     f"features {f.get('features', '?')}")
    if kind == "notify":
        via = "caught by an ioeventfd" if f.get("via") == "ioeventfd" else "trapped as an MMIO exit"
        return cls, f"queue {f.get('q', '?')}: QueueNotify written by the guest, {via}"
    if kind == "pop":
        n = len(list(filter(None, f.get("descs", "").split(","))))
        return cls, (f"head {f.get('head')}: chain of {n} descriptor{'s' if n != 1 else ''} "
                     f"{_descs(f.get('descs', ''))}, device reads {f.get('r')} B, may write {f.get('w')} B")
    if kind == "req":
        what = f"type {f.get('type')}"
        if "sector" in f:
            what += f", sector {f['sector']}"
        size = f"{f['segments']} segment(s)" if "segments" in f else f"{f.get('bytes', '?')} data bytes"
        return cls, f"head {f.get('head')}: {what}, {size}"
    if kind == "io":
        return cls, (f"head {f.get('head')}: I/O done on the host, status {f.get('status')}, "
                     f"{f.get('data', '?')} data bytes written into guest buffers")
    if kind == "used":
        if "slot" in f:  # a packed queue: the used descriptor's slot in the one ring
            return cls, (f"buffer {f.get('head')}: used descriptor written, len {f.get('len')}, next used slot "
                         f"{f.get('slot')} (wrap {f.get('wrap')})")
        return cls, (f"head {f.get('head')}: returned in the used ring, len {f.get('len')}, "
                     f"used.idx now {f.get('idx')}")
    if kind == "irq":
        what = words[1] if len(words) > 1 else ""
        if what == "used":
            return cls, "used buffer: InterruptStatus |= 0x1, interrupt sent" + (f" via {irq}" if irq else "")
        if what == "config":
            return cls, ("configuration change: InterruptStatus |= 0x2, interrupt sent"
                         + (f" via {irq}" if irq else ""))
        if what == "suppressed":
            return cls, "used ring advanced, no interrupt: the driver asked for none yet (used_event / NO_INTERRUPT)"
    if kind == "ack":
        return cls, f"guest wrote InterruptACK {f.get('value', '?')}, InterruptStatus now {f.get('status', '?')}"
    if kind == "needs":
        return cls, "device needs reset (a chain it could not parse): InterruptStatus |= 0x2" + (
            f", interrupt via {irq}" if irq else "")
    return cls, " ".join(words[1:])


class Tracer:
    """Formats device events into timestamped lines on one stream; safe to call from any thread."""

    def __init__(self, classes: frozenset[str], out: TextIO | None = None, *,
                 clock: Callable[[], float] = time.monotonic, t0: float | None = None) -> None:
        self.classes = classes
        self.out = out if out is not None else sys.stderr
        self._clock = clock
        self.t0 = clock() if t0 is None else t0
        self._lock = threading.Lock()
        self._owned: TextIO | None = None

    @classmethod
    def open(cls, classes: frozenset[str], path: os.PathLike[str] | str | None) -> Tracer:
        """A tracer writing to ``path`` (truncated; line-buffered), or to stderr when ``path`` is None."""
        if path is None:
            return cls(classes)
        try:
            f = open(path, "w", buffering=1, encoding="utf-8")  # noqa: SIM115 (closed by close())
        except OSError as err:
            raise ConfigError(f"cannot open trace file {path}: {err.strerror}") from err
        tracer = cls(classes, f)
        tracer._owned = f
        return tracer

    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()
            self._owned = None

    def hook(self, device: str, *, irq: str = "") -> TraceHook | None:
        """The callable to hand a device named ``device`` (None when no class is selected)."""
        if not self.classes:
            return None

        def emit(event: str) -> None:
            cls, text = describe(event, irq=irq)
            if cls in self.classes:
                self.write(device, cls, text)

        return emit

    def write(self, device: str, cls: str, text: str) -> None:
        line = f"+{self._clock() - self.t0:.6f} {device:<4} {cls:<6}  {text}\n"
        with self._lock:
            try:
                self.out.write(line)
                self.out.flush()
            except (OSError, ValueError):
                pass  # a closed or broken trace stream must not stop the VM
