"""A GDB remote-protocol server in the VMM: ``pyvmm run --gdb [HOST:]PORT``.

Serves one gdb at a time over TCP, on pyvmm's event loop (no thread of its own).  The packets are those
of the GDB manual, appendix E "GDB Remote Serial Protocol" (section numbers below refer to it):

- E.4 "Packets": ``?``, ``g``/``G``, ``p``/``P``, ``m``/``M``/``X``, ``c``/``s``/``C``/``S``, ``vCont``,
  ``Z``/``z`` 0-4, ``H``, ``T``, ``k``, ``D``;
- E.3 "Stop Reply Packets": ``T`` with ``thread:``, ``swbreak:``/``hwbreak:``/``watch:``/``awatch:``;
  ``W`` when the VM ends while gdb waits for the guest;
- E.5 "General Query Packets": ``qSupported`` (``PacketSize``, ``qXfer:features:read``, ``swbreak``,
  ``hwbreak``, ``vContSupported``, ``QStartNoAckMode``), ``qXfer:features:read:target.xml`` (the
  architecture's target description, appendix G), ``qfThreadInfo``/``qsThreadInfo``, ``qC``,
  ``qAttached``, ``qThreadExtraInfo``;
- E.8 "Interrupts": a 0x03 byte stops a running guest (Ctrl-C in gdb).

Each vCPU is a gdb thread, numbered from 1 (vCPU 0 is thread 1).  All-stop only: see
:mod:`pyvmm.gdb.control`.  Memory addresses are guest *virtual* addresses, translated through the page
tables of the thread gdb selected with ``Hg``.  Unknown packets get the empty reply ("not supported"),
malformed ones ``E`` followed by an errno-like number, and nothing gdb sends can stop the VM except ``k``.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable

from pyvmm.errors import GuestMemoryError, KvmError
from pyvmm.eventloop import EventLoop
from pyvmm.gdb import rsp
from pyvmm.gdb.control import Debugger, PauseTimeout, Unsupported
from pyvmm.gdb.target import Z_HARDWARE, Z_SOFTWARE, DebugTarget, HwPoint, StopWhy
from pyvmm.kvm.vcpu import VcpuFd
from pyvmm.log import get_logger

log = get_logger(__name__)

# Error replies: 'E' and two hex digits; gdb shows the number.  Linux errno values, as gdbserver uses.
E_MALFORMED = b"E01"
E_NO_THREAD = b"E03"
E_FAULT = b"E0e"
E_INVALID = b"E16"
E_NO_SPACE = b"E1c"
E_UNSUPPORTED = b"E5f"  # EOPNOTSUPP: this host's KVM cannot (an empty reply would make gdb poke int3 itself)
SEND_TIMEOUT_S = 5.0
_HEX = re.compile(rb"^[0-9a-fA-F]+$")


class ParseError(ValueError):
    pass


def _hex(text: bytes) -> int:
    if not _HEX.match(text):
        raise ParseError(f"not a hex number: {text[:20]!r}")
    return int(text, 16)


def _addr_len(text: bytes) -> tuple[int, int]:
    addr, sep, length = text.partition(b",")
    if not sep:
        raise ParseError("expected ADDR,LENGTH")
    return _hex(addr), _hex(length)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


class GdbServer:
    def __init__(self, debugger: Debugger, target: DebugTarget, loop: EventLoop, *, host: str, port: int,
                 kill: Callable[[str], None], exit_code: Callable[[], int]) -> None:
        self.debugger = debugger
        self.target = target
        self.loop = loop
        self._kill = kill
        self._exit_code = exit_code
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # lifetime: listening from the build on (before the sandbox, which refuses new sockets) to close()
        self.sock = socket.create_server((host, port), family=family, backlog=1)
        self.sock.setblocking(False)
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self.conn: socket.socket | None = None
        self.reader = rsp.PacketReader()
        self.no_ack = False
        self.running = False  # gdb resumed the guest and waits for a stop reply
        self.gdb_features: set[str] = set()
        self.last_reply = b""
        self.threads = sorted(debugger.vcpus)
        self.g_thread = self.threads[0]
        self.c_thread: int | None = None
        self.last_stop: tuple[int, StopWhy] = (self.threads[0], StopWhy("stopped"))
        self.attached_once = False
        loop.add(self.sock.fileno(), self._accept)
        loop.add(debugger.event_fd.fd, self._on_event)

    # -- connections --------------------------------------------------------------------------------------
    def _accept(self) -> None:
        try:
            conn, peer = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            log.warning("gdb: accept failed: %s", err)
            return
        if self.conn is not None:
            log.warning("gdb: a second connection from %s refused (one gdb at a time)", peer)
            conn.close()
            return
        conn.settimeout(SEND_TIMEOUT_S)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = conn
        self.reader = rsp.PacketReader()
        self.no_ack = False
        self.gdb_features = set()
        self.last_reply = b""
        self.attached_once = True
        self.loop.add(conn.fileno(), self._readable)
        log.info("gdb attached from %s:%s; the guest is stopped", *peer[:2])
        self._stop_guest()
        self.running = False
        if self.last_stop[1].kind not in ("swbreak", "hwbreak", "watch", "awatch", "rwatch", "step"):
            self.last_stop = (self.g_thread, StopWhy("stopped"))

    def _disconnect(self, why: str) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            self.loop.remove(conn.fileno())
            conn.close()
        self.running = False
        log.info("gdb detached (%s); the guest runs on", why)
        try:
            self.debugger.detach()
        except KvmError as err:
            log.warning("gdb: detaching failed: %s", err)

    def _readable(self) -> None:
        conn = self.conn
        if conn is None:
            return
        try:
            data = conn.recv(65536)
        except (TimeoutError, BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._disconnect(f"connection error: {err.strerror}")
            return
        if not data:
            self._disconnect("connection closed")
            return
        for event in self.reader.feed(data):
            if self.conn is None:
                break
            if isinstance(event, rsp.Packet):
                if not self.no_ack:
                    self._send_raw(b"+")
                reply = self.handle(event.data)
                if reply is not None:
                    self._send(reply)
            elif isinstance(event, rsp.BadPacket):
                log.debug("gdb: bad packet: %s", event.why)
                if not self.no_ack:
                    self._send_raw(b"-")
            elif isinstance(event, rsp.Ack):
                if not event.good and self.last_reply and not self.no_ack:
                    self._send_raw(self.last_reply)
            else:
                self._interrupt()

    def _send(self, payload: bytes) -> None:
        packet = rsp.frame(payload)
        self.last_reply = packet
        self._send_raw(packet)

    def _send_raw(self, data: bytes) -> None:
        if self.conn is None:
            return
        try:
            self.conn.sendall(data)
        except OSError as err:
            self._disconnect(f"send failed: {err.strerror or err}")

    # -- stops --------------------------------------------------------------------------------------------
    def _stop_guest(self) -> bool:
        try:
            self.debugger.pause()
        except PauseTimeout as err:
            log.warning("gdb: %s", err)
            return False
        return True

    def _interrupt(self) -> None:
        if not self.running:
            return
        self._stop_guest()
        self.running = False
        event = self.debugger.take_event()
        self.last_stop = event if event is not None else (self.g_thread, StopWhy("interrupt"))
        self.g_thread = self.last_stop[0]
        self._send(self.stop_reply())

    def _on_event(self) -> None:
        self.debugger.event_fd.read()
        if not self.running:
            return
        self._stop_guest()
        event = self.debugger.take_event()
        if event is None:
            return
        self.running = False
        self.last_stop = event
        self.g_thread = event[0]
        self._send(self.stop_reply())

    def vm_ended(self) -> None:
        """The VM has stopped for good: tell a waiting gdb the 'process' exited, and close."""
        if self.conn is not None and self.running:
            self._send(f"W{self._exit_code() & 0xFF:02x}".encode())
        self.close()

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            self.loop.remove(conn.fileno())
            conn.close()
        if self.sock.fileno() >= 0:
            self.loop.remove(self.sock.fileno())
            self.sock.close()
        self.loop.remove(self.debugger.event_fd.fd)

    def stop_reply(self) -> bytes:
        index, why = self.last_stop
        out = f"T{why.signal:02x}"
        if why.kind in ("swbreak", "hwbreak") and f"{why.kind}+" in self.gdb_features:
            out += f"{why.kind}:;"
        elif why.kind in ("watch", "rwatch", "awatch") and why.addr is not None:
            out += f"{why.kind}:{why.addr:x};"
        return (out + f"thread:{index + 1:x};").encode()

    # -- packets ------------------------------------------------------------------------------------------
    def handle(self, data: bytes) -> bytes | None:
        """The reply to one packet (None: no reply now; a stop reply follows when the guest stops)."""
        if not data:
            return b""
        try:
            return self._dispatch(data)
        except ParseError as err:
            log.debug("gdb: malformed packet %r: %s", data[:40], err)
            return E_MALFORMED
        except GuestMemoryError as err:
            log.debug("gdb: %s", err)
            return E_FAULT
        except Unsupported as err:
            log.info("gdb: %s", err)
            return E_UNSUPPORTED
        except KvmError as err:
            log.warning("gdb: %s", err)
            return E_INVALID

    def _dispatch(self, data: bytes) -> bytes | None:
        cmd, rest = data[:1], data[1:]
        if cmd == b"?":
            return self.stop_reply()
        if cmd == b"g":
            return self._read_all_registers()
        if cmd == b"G":
            return self._write_all_registers(rest)
        if cmd == b"p":
            return self._read_register(_hex(rest))
        if cmd == b"P":
            num, sep, value = rest.partition(b"=")
            if not sep:
                raise ParseError("expected N=VALUE")
            return self._write_register(_hex(num), value)
        if cmd == b"m":
            addr, length = _addr_len(rest)
            length = min(length, (rsp.MAX_PACKET - 32) // 2)
            mem = self.debugger.read_memory(self._vcpu(self.g_thread), addr, length)
            return mem.hex().encode() if mem or not length else E_FAULT
        if cmd in (b"M", b"X"):
            return self._write_memory(cmd, rest)
        if cmd in (b"c", b"C", b"s", b"S"):
            return self._legacy_resume(cmd, rest)
        if cmd == b"v":
            return self._v_packet(data)
        if cmd in (b"Z", b"z"):
            return self._breakpoint(cmd == b"Z", rest)
        if cmd == b"H":
            return self._set_thread(rest)
        if cmd == b"T":
            return b"OK" if self._thread_index(rest) is not None else E_NO_THREAD
        if cmd == b"k":
            self._disconnect("killed by gdb")
            self._kill("killed by gdb (k packet)")
            return None
        if cmd == b"D":
            self._send(b"OK")
            self._disconnect("gdb detached")
            return None
        if cmd == b"q":
            return self._query(data)
        if data == b"QStartNoAckMode":
            self._send(b"OK")
            self.no_ack = True
            return None
        return b""

    # registers
    def _vcpu(self, index: int) -> VcpuFd:
        return self.debugger.vcpus[index]

    def _encode(self, num: int, value: int | None) -> str:
        size = self.target.registers[num].bits // 8
        if value is None:
            return "xx" * size
        return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little").hex()

    def _read_all_registers(self) -> bytes:
        values = self.target.read_registers(self._vcpu(self.g_thread))
        return "".join(self._encode(n, v) for n, v in enumerate(values)).encode()

    def _read_register(self, num: int) -> bytes:
        if num >= len(self.target.registers):
            return E_INVALID
        return self._encode(num, self.target.read_registers(self._vcpu(self.g_thread))[num]).encode()

    def _decode(self, num: int, text: bytes) -> int | None:
        size = self.target.registers[num].bits // 8
        if len(text) != 2 * size:
            raise ParseError(f"register {num}: {len(text)} hex digits for {size} bytes")
        if text.lower() == b"xx" * size:
            return None
        try:
            return int.from_bytes(bytes.fromhex(text.decode("ascii")), "little")
        except (ValueError, UnicodeDecodeError):
            raise ParseError(f"register {num}: not hex") from None

    def _write_registers(self, values: dict[int, int]) -> bytes:
        try:
            self.target.write_registers(self._vcpu(self.g_thread), values)
        except ValueError as err:
            log.info("gdb: %s", err)
            return E_INVALID
        return b"OK"

    def _write_register(self, num: int, text: bytes) -> bytes:
        if num >= len(self.target.registers):
            return E_INVALID
        value = self._decode(num, text)
        return self._write_registers({num: value}) if value is not None else b"OK"

    def _write_all_registers(self, text: bytes) -> bytes:
        old = self.target.read_registers(self._vcpu(self.g_thread))
        values: dict[int, int] = {}
        pos = 0
        for num, reg in enumerate(self.target.registers):
            size = 2 * (reg.bits // 8)
            if pos + size > len(text):
                break  # gdb may send fewer registers than the description has
            value = self._decode(num, text[pos:pos + size])
            pos += size
            if value is not None and value != old[num]:
                values[num] = value
        if pos != len(text):
            raise ParseError(f"G packet of {len(text)} hex digits does not end at a register")
        return self._write_registers(values) if values else b"OK"

    # memory
    def _write_memory(self, cmd: bytes, rest: bytes) -> bytes:
        head, sep, payload = rest.partition(b":")
        if not sep:
            raise ParseError("expected ADDR,LENGTH:DATA")
        addr, length = _addr_len(head)
        if cmd == b"M":
            try:
                data = bytes.fromhex(payload.decode("ascii"))
            except (ValueError, UnicodeDecodeError):
                raise ParseError("M data is not hex") from None
        else:
            try:
                data = rsp.unescape(payload)
            except ValueError as err:
                raise ParseError(str(err)) from None
        if len(data) != length:
            raise ParseError(f"{length} bytes announced, {len(data)} sent")
        if data:
            self.debugger.write_memory(self._vcpu(self.g_thread), addr, data)
        return b"OK"

    # execution
    def _set_pc(self, index: int, addr_text: bytes) -> None:
        if addr_text:
            pc = next(i for i, r in enumerate(self.target.registers) if r.name in ("rip", "pc"))
            self.target.write_registers(self._vcpu(index), {pc: _hex(addr_text)})

    def _resume(self, step: int | None) -> None:
        self.running = True
        self.debugger.resume(step)

    def _legacy_resume(self, cmd: bytes, rest: bytes) -> bytes | None:
        if cmd in (b"C", b"S"):  # a signal number first: there are no signals to deliver to a VM
            _sig, _, rest = rest.partition(b";")
        thread = self.c_thread if self.c_thread is not None else self.last_stop[0]
        if cmd in (b"s", b"S") and not self.target.single_step:
            return E_UNSUPPORTED
        self._set_pc(thread, rest)
        self._resume(thread if cmd in (b"s", b"S") else None)
        return None

    def _v_packet(self, data: bytes) -> bytes | None:
        if data == b"vCont?":
            return b"vCont;c;C;s;S" if self.target.single_step else b"vCont;c;C"
        if data.startswith(b"vCont;"):
            step: int | None = None
            for action in data[6:].split(b";"):
                kind, _, thread = action.partition(b":")
                if kind[:1] not in (b"c", b"C", b"s", b"S"):
                    return E_MALFORMED
                if kind[:1] in (b"s", b"S") and not self.target.single_step:
                    return E_UNSUPPORTED
                if kind[:1] in (b"s", b"S") and step is None:
                    index = self._thread_index(thread) if thread else self.last_stop[0]
                    if index is None or index < 0:
                        return E_NO_THREAD
                    step = index
            self._resume(step)
            return None
        if data.startswith(b"vKill"):
            self._send(b"OK")
            self._disconnect("killed by gdb")
            self._kill("killed by gdb (vKill packet)")
            return None
        return b""

    def _breakpoint(self, insert: bool, rest: bytes) -> bytes:
        fields = rest.split(b";")[0].split(b",")
        if len(fields) != 3:
            raise ParseError("expected TYPE,ADDR,KIND")
        ztype, addr, kind = _hex(fields[0]), _hex(fields[1]), _hex(fields[2])
        if ztype == Z_SOFTWARE:
            if kind != self.target.break_kind:
                return E_INVALID
            if insert:
                self.debugger.insert_sw(self._vcpu(self.g_thread), addr)
            else:
                self.debugger.remove_sw(addr)
            return b"OK"
        if ztype > 4:
            return b""
        is_break = ztype == Z_HARDWARE
        if (self.target.hw_breakpoints if is_break else self.target.hw_watchpoints) == 0:
            return b""
        if not is_break and ztype not in self.target.watch_types:
            return b""  # not supported: gdb then tries what the target can do
        point = HwPoint(ztype, addr, 1 if is_break else kind)
        if not insert:
            self.debugger.remove_hw(point)
            return b"OK"
        why = self.debugger.insert_hw(point)
        if why is None:
            return b"OK"
        log.info("gdb: %s", why)
        return E_NO_SPACE if "slots" in why else E_INVALID

    # threads
    def _thread_index(self, text: bytes) -> int | None:
        """A thread-id (hex, vCPU index + 1; -1 all, 0 any) -> the vCPU index, -1 for all, None if none."""
        if text in (b"-1",):
            return -1
        if text == b"0":
            return self.g_thread
        tid = _hex(text)
        return tid - 1 if tid - 1 in self.debugger.vcpus else None

    def _set_thread(self, rest: bytes) -> bytes:
        op, tid = rest[:1], rest[1:]
        index = self._thread_index(tid)
        if index is None:
            return E_NO_THREAD
        if op == b"g":
            self.g_thread = self.g_thread if index == -1 else index
        elif op == b"c":
            self.c_thread = None if index == -1 else index
        else:
            return E_MALFORMED
        return b"OK"

    # queries
    def _query(self, data: bytes) -> bytes:
        if data.startswith(b"qSupported"):
            _, _, features = data.partition(b":")
            self.gdb_features = {f.decode(errors="replace") for f in features.split(b";") if f}
            return (f"PacketSize={rsp.MAX_PACKET:x};qXfer:features:read+;swbreak+;hwbreak+;"
                    "vContSupported+;QStartNoAckMode+").encode()
        if data.startswith(b"qXfer:features:read:"):
            annex, _, span = data[len(b"qXfer:features:read:"):].partition(b":")
            if annex != b"target.xml":
                return b"E00"
            offset, length = _addr_len(span)
            xml = self.target.xml.encode()
            chunk = xml[offset:offset + min(length, rsp.MAX_PACKET // 2)]
            more = offset + len(chunk) < len(xml)
            return (b"m" if more else b"l") + rsp.escape(chunk)
        if data == b"qfThreadInfo":
            return b"m" + b",".join(f"{i + 1:x}".encode() for i in self.threads)
        if data == b"qsThreadInfo":
            return b"l"
        if data == b"qC":
            return f"QC{self.g_thread + 1:x}".encode()
        if data.startswith(b"qAttached"):
            return b"1"  # the guest existed before gdb came: quitting gdb detaches, it does not kill
        if data.startswith(b"qThreadExtraInfo,"):
            index = self._thread_index(data.split(b",", 1)[1])
            if index is None or index < 0:
                return E_NO_THREAD
            return f"vCPU {index}".encode().hex().encode()
        if data.startswith(b"qSymbol"):
            return b"OK"
        return b""
