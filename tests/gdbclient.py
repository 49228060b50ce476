"""A small GDB remote-protocol client for the tests: what gdb sends, written from the GDB manual
(appendix E), independent of pyvmm's server code."""

from __future__ import annotations

import socket
import time


class ProtocolError(AssertionError):
    pass


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def framed(data: bytes) -> bytes:
    return b"$" + data + b"#%02x" % checksum(data)


class GdbClient:
    def __init__(self, port: int, *, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.create_connection((host, port), timeout=timeout)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.timeout = timeout
        self.buf = b""
        self.acks = True

    def close(self) -> None:
        self.sock.close()

    def _fill(self, deadline: float) -> None:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ProtocolError("the server closed the connection")
        self.buf += chunk

    def _byte(self, deadline: float) -> int:
        while not self.buf:
            self._fill(deadline)
        b, self.buf = self.buf[0], self.buf[1:]
        return b

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, data: bytes | str) -> None:
        """Send a packet and wait for its acknowledgment (resending on '-')."""
        payload = data.encode() if isinstance(data, str) else data
        for _ in range(3):
            self.send_raw(framed(payload))
            if not self.acks:
                return
            ack = self._byte(time.monotonic() + self.timeout)
            if ack == ord("+"):
                return
            if ack != ord("-"):
                raise ProtocolError(f"expected an ack, got {bytes([ack])!r}")
        raise ProtocolError(f"{payload[:40]!r} refused three times")

    def reply(self, timeout: float | None = None) -> str:
        """The next packet from the server (checksum verified, acknowledged)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while self._byte(deadline) != ord("$"):
            pass
        data = bytearray()
        while (b := self._byte(deadline)) != ord("#"):
            data.append(b)
        want = int(bytes([self._byte(deadline), self._byte(deadline)]), 16)
        if want != checksum(bytes(data)):
            raise ProtocolError(f"bad checksum on {bytes(data)[:40]!r}")
        if self.acks:
            self.send_raw(b"+")
        return data.decode("latin-1")

    def ask(self, data: bytes | str, timeout: float | None = None) -> str:
        self.send(data)
        return self.reply(timeout)

    def interrupt(self) -> None:
        self.send_raw(b"\x03")

    # conveniences
    def read_memory(self, addr: int, length: int) -> str:
        return self.ask(f"m{addr:x},{length:x}")

    def register(self, num: int) -> int:
        text = self.ask(f"p{num:x}")
        if text.startswith("E"):
            raise ProtocolError(f"p{num:x}: {text}")
        return int.from_bytes(bytes.fromhex(text), "little")

    def set_register(self, num: int, value: int, size: int = 8) -> str:
        return self.ask(f"P{num:x}={value.to_bytes(size, 'little').hex()}")


def stop_fields(reply: str) -> dict[str, str]:
    """'T05swbreak:;thread:01;' -> {'signal': '05', 'swbreak': '', 'thread': '01'}."""
    if not reply.startswith("T"):
        raise ProtocolError(f"not a T stop reply: {reply!r}")
    out = {"signal": reply[1:3]}
    for item in reply[3:].split(";"):
        if item:
            key, _, value = item.partition(":")
            out[key] = value
    return out
