"""The GDB remote serial protocol's framing: packets, checksums, acknowledgments, escapes, interrupts.

From the GDB manual, appendix E "GDB Remote Serial Protocol":

- E.1 "Overview": a packet is ``$`` *data* ``#`` *cc*, where *cc* is the modulo-256 sum of the data bytes
  as two hex digits.  The receiver answers ``+`` (good) or ``-`` (checksum mismatch: send it again),
  unless both sides agreed on ``QStartNoAckMode``.  In binary data (``X``, ``qXfer`` replies) the bytes
  ``#``, ``$``, ``}`` and ``*`` are sent as ``}`` followed by the byte XOR 0x20.  Replies may be
  run-length encoded (``*``); gdb never sends that, and pyvmm does not either.
- E.8 "Interrupts": a single 0x03 byte outside any packet asks the target to stop.

:class:`PacketReader` turns a byte stream into these events, whatever way the stream is split, and
never raises on garbage: bytes outside a packet are skipped, a packet whose checksum does not match is
reported as bad (the server answers ``-``), and a packet longer than the limit is dropped as bad.
"""

from __future__ import annotations

from dataclasses import dataclass

# What pyvmm tells gdb in qSupported (PacketSize is in hex there): the largest packet it accepts.
MAX_PACKET = 0x4000
_ESCAPED = frozenset(b"#$}*")


@dataclass(frozen=True)
class Packet:
    data: bytes


@dataclass(frozen=True)
class BadPacket:
    """A packet with a checksum that does not match, or too long: answered with ``-``."""

    why: str


@dataclass(frozen=True)
class Ack:
    good: bool  # '+' or '-'


@dataclass(frozen=True)
class Interrupt:
    """A 0x03 byte outside a packet (Ctrl-C in gdb)."""


Event = Packet | BadPacket | Ack | Interrupt


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def frame(data: bytes) -> bytes:
    """``$data#cc``; ``data`` must already be escaped where it holds binary."""
    return b"$" + data + b"#" + f"{checksum(data):02x}".encode()


def escape(data: bytes) -> bytes:
    out = bytearray()
    for b in data:
        if b in _ESCAPED:
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """The binary payload of an ``X`` packet; a trailing lone ``}`` is malformed (ValueError)."""
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == 0x7D:
            nxt = next(it, None)
            if nxt is None:
                raise ValueError("escape character at the end of the data")
            out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


class PacketReader:
    """Feed bytes as they arrive; :meth:`feed` returns the complete events in order."""

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self.max_packet = max_packet
        self._state = "idle"  # idle | data | sum1 | sum2
        self._data = bytearray()
        self._sum = bytearray()
        self._too_long = False

    def feed(self, chunk: bytes) -> list[Event]:
        events: list[Event] = []
        for b in chunk:
            if self._state == "idle":
                if b == 0x24:  # '$'
                    self._start()
                elif b == 0x2B:  # '+'
                    events.append(Ack(True))
                elif b == 0x2D:  # '-'
                    events.append(Ack(False))
                elif b == 0x03:
                    events.append(Interrupt())
                # anything else between packets is noise: skipped
            elif self._state == "data":
                if b == 0x23:  # '#'
                    self._state = "sum1"
                elif b == 0x24:  # a '$' inside a packet: the previous one was cut off; start again
                    self._start()
                elif len(self._data) >= self.max_packet:
                    self._too_long = True
                else:
                    self._data.append(b)
            else:
                self._sum.append(b)
                if self._state == "sum1":
                    self._state = "sum2"
                    continue
                self._state = "idle"
                events.append(self._finish())
        return events

    def _start(self) -> None:
        self._state = "data"
        self._data.clear()
        self._sum.clear()
        self._too_long = False

    def _finish(self) -> Event:
        data = bytes(self._data)
        if self._too_long:
            return BadPacket(f"packet longer than {self.max_packet} bytes")
        try:
            want = int(self._sum.decode("ascii"), 16)
        except (UnicodeDecodeError, ValueError):
            return BadPacket(f"checksum {bytes(self._sum)!r} is not hex")
        if want != checksum(data):
            return BadPacket(f"checksum mismatch: {want:02x} sent, {checksum(data):02x} computed")
        return Packet(data)
