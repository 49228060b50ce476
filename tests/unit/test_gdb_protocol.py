"""The gdb server without KVM: the protocol's framing (pyvmm.gdb.rsp) on any split of the byte stream,
and the server's answers (pyvmm.gdb.server) over a fake architecture whose "page tables" map virtual
0x8000_0000 + x to physical x, with a fake vCPU."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from pyvmm.errors import GuestMemoryError
from pyvmm.eventloop import EventLoop
from pyvmm.gdb import rsp
from pyvmm.gdb.control import Debugger
from pyvmm.gdb.server import GdbServer
from pyvmm.gdb.target import Z_ACCESS, Z_HARDWARE, Z_WRITE, HwPoint, Register, StopWhy
from pyvmm.interrupt import EventFd
from pyvmm.memory import GuestMemory
from tests.gdbclient import framed

VBASE = 0x8000_0000
RAM = 0x10000


# -- framing ---------------------------------------------------------------------------------------------
def test_frame_and_checksum_follow_the_manual() -> None:
    # GDB manual E.1: the checksum is the modulo-256 sum of the data, two lowercase hex digits
    assert rsp.frame(b"OK") == b"$OK#9a"
    assert rsp.frame(b"") == b"$#00"
    assert rsp.checksum(b"g") == 0x67


def test_reader_handles_every_split_of_the_stream() -> None:
    stream = b"+" + framed(b"qSupported:swbreak+") + b"\x03" + b"-" + framed(b"m100,4") + framed(b"X10,2:}\x03}\x04")
    want = [rsp.Ack(True), rsp.Packet(b"qSupported:swbreak+"), rsp.Interrupt(), rsp.Ack(False),
            rsp.Packet(b"m100,4"), rsp.Packet(b"X10,2:}\x03}\x04")]
    rng = random.Random(7)
    for _ in range(200):
        reader = rsp.PacketReader()
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(0, 8)))
        events: list[rsp.Event] = []
        for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            events += reader.feed(stream[a:b])
        assert events == want


def test_reader_reports_bad_checksums_and_skips_noise() -> None:
    reader = rsp.PacketReader()
    events = reader.feed(b"garbage$g#00$g#zz" + framed(b"?"))
    assert [type(e) for e in events] == [rsp.BadPacket, rsp.BadPacket, rsp.Packet]
    assert events[2] == rsp.Packet(b"?")


def test_reader_drops_overlong_packets_and_restarts_on_dollar() -> None:
    reader = rsp.PacketReader(max_packet=8)
    events = reader.feed(framed(b"m" + b"1" * 20) + b"$trunc" + framed(b"g"))
    assert isinstance(events[0], rsp.BadPacket) and "longer" in events[0].why
    assert events[1] == rsp.Packet(b"g")  # the '$' restarted the packet that was cut off


def test_escape_round_trip() -> None:
    data = bytes(range(256))
    escaped = rsp.escape(data)
    assert not set(escaped) & {ord("#"), ord("$"), ord("*")}
    assert rsp.unescape(escaped) == data
    with pytest.raises(ValueError):
        rsp.unescape(b"ab}")


# -- the server over a fake target -----------------------------------------------------------------------
class FakeTarget:
    xml = '<?xml version="1.0"?><target><architecture>fake</architecture>' + "<!-- pad -->" * 200 + "</target>"
    registers: Sequence[Register] = (Register("r0", 64), Register("pc", 64), Register("flags", 32),
                                     Register("v0", 128))
    break_insn = b"\xcc"
    break_kind = 1
    sw_breakpoints = True
    single_step = True
    hw_breakpoints = 2
    hw_watchpoints = 1
    hw_slots = 3
    watch_types = frozenset({Z_WRITE, Z_ACCESS})

    def __init__(self) -> None:
        self.regs: list[int | None] = [1, VBASE + 0x100, 0x202, None]
        self.debug_calls: list[tuple[bool, bool, tuple[HwPoint, ...]]] = []
        self.clock: list[str] = []

    def describe(self) -> str:
        return "a fake"

    def read_registers(self, vcpu: Any) -> list[int | None]:
        return list(self.regs)

    def write_registers(self, vcpu: Any, values: dict[int, int]) -> None:
        if 2 in values and values[2] > 0xFFFF:
            raise ValueError("flags: no")
        for n, v in values.items():
            self.regs[n] = v

    def program_counter(self, vcpu: Any) -> int:
        return self.regs[1] or 0

    def translate(self, vcpu: Any, vaddr: int) -> int:
        if not VBASE <= vaddr < VBASE + 2 * RAM:  # the upper half is mapped past the end of RAM
            raise GuestMemoryError(f"{vaddr:#x} not mapped")
        return vaddr - VBASE

    def check_hw_point(self, point: HwPoint) -> str | None:
        return None if point.type == Z_HARDWARE or point.length in (1, 2, 4, 8) else "bad length"

    def set_guest_debug(self, vcpu: Any, *, sw: bool, step: bool, hw: Sequence[HwPoint]) -> None:
        self.debug_calls.append((sw, step, tuple(hw)))

    def debug_exit(self, vcpu: Any, hw: Sequence[HwPoint], is_breakpoint: Callable[[int], bool]) -> StopWhy | None:
        return StopWhy("step")

    def emulation_breakpoint(self, vcpu: Any, is_breakpoint: Callable[[int], bool]) -> bool:
        return False

    def freeze_clock(self) -> None:
        self.clock.append("freeze")

    def thaw_clock(self) -> None:
        self.clock.append("thaw")


class Harness:
    """A server whose vCPUs are already parked (as after an attach), without sockets in the way."""

    def __init__(self) -> None:
        self.mem = GuestMemory.single(RAM)
        self.mem.write(0x100, b"\x90\x90\x90\x90")
        self.target = FakeTarget()
        self.loop = EventLoop()
        self.killed: list[str] = []
        vcpus = [SimpleNamespace(index=0, run_state=SimpleNamespace(immediate_exit=0)),
                 SimpleNamespace(index=1, run_state=SimpleNamespace(immediate_exit=0))]
        self.debugger = Debugger(vcpus, self.mem, self.target, self.loop, kick=lambda: None,  # type: ignore[arg-type]
                                 stopping=lambda: False, start_paused=True)
        self.debugger._parked = {0, 1}
        self.server = GdbServer(self.debugger, self.target, self.loop, host="127.0.0.1", port=0,
                                kill=self.killed.append, exit_code=lambda: 0)
        self.sent: list[bytes] = []
        self.server._send = self.sent.append  # type: ignore[method-assign]

    def ask(self, packet: str | bytes) -> str | None:
        reply = self.server.handle(packet.encode() if isinstance(packet, str) else packet)
        return None if reply is None else reply.decode("latin-1")

    def close(self) -> None:
        self.server.close()
        self.debugger.close()
        self.loop.close()
        self.mem.close()


@pytest.fixture
def h() -> Any:
    harness = Harness()
    yield harness
    harness.close()


def test_qsupported_and_target_description_in_chunks(h: Harness) -> None:
    reply = h.ask("qSupported:multiprocess+;swbreak+;hwbreak+")
    assert reply is not None
    features = dict(f.partition("=")[::2] for f in reply.split(";"))
    assert int(features["PacketSize"], 16) == rsp.MAX_PACKET
    assert "qXfer:features:read+" in features and "swbreak+" in features
    text, offset = "", 0
    while True:
        chunk = h.ask(f"qXfer:features:read:target.xml:{offset:x},100")
        assert chunk is not None and chunk[0] in "ml"
        text += chunk[1:]
        offset += len(chunk) - 1
        if chunk[0] == "l":
            break
    assert text == FakeTarget.xml
    assert h.ask("qXfer:features:read:target.xml:ffff,10") == "l"


def test_registers_g_p_G_P(h: Harness) -> None:
    g = h.ask("g")
    # little-endian per register; an unreadable one is 'xx' for each byte
    assert g == "0100000000000000" + "0001008000000000" + "02020000" + "xx" * 16
    assert h.ask("p1") == "0001008000000000"
    assert h.ask("p9") == "E16"
    assert h.ask("P0=efbeadde00000000") == "OK" and h.target.regs[0] == 0xDEADBEEF
    assert h.ask("P2=00000100") == "E16"  # the target refused the value
    assert h.ask("P0=12") == "E01"  # wrong width
    new = "0200000000000000" + "0002008000000000" + "03020000" + "xx" * 16
    assert h.ask("G" + new) == "OK"
    assert h.target.regs[:3] == [2, VBASE + 0x200, 0x203]
    assert h.ask("G" + new[:-3]) == "E01"


def test_memory_through_translation_partial_reads_and_faults(h: Harness) -> None:
    assert h.ask(f"m{VBASE + 0x100:x},4") == "90909090"
    # a read that runs off the end of RAM returns what could be read; nothing readable is an error
    assert h.ask(f"m{VBASE + RAM - 2:x},4") == "0000"
    assert h.ask(f"m{VBASE + RAM:x},4") == "E0e"
    assert h.ask("m10,4") == "E0e"
    assert h.ask(f"M{VBASE + 0x200:x},2:abcd") == "OK" and h.mem.read(0x200, 2) == b"\xab\xcd"
    assert h.ask(f"M{VBASE + RAM - 1:x},2:abcd") == "E0e"
    assert h.mem.read(RAM - 1, 1) == b"\x00"  # all or nothing
    assert h.ask(b"X%x,3:}\x03}\x04}]" % (VBASE + 0x300)) == "OK"
    assert h.mem.read(0x300, 3) == b"#$}"
    assert h.ask(f"X{VBASE:x},0:") == "OK"  # gdb's probe for X support


def test_software_breakpoints_are_hidden_from_reads_and_survive_writes(h: Harness) -> None:
    addr = VBASE + 0x101
    assert h.ask(f"Z0,{addr:x},1") == "OK"
    assert h.mem.read(0x100, 4) == b"\x90\xcc\x90\x90"
    assert h.ask(f"m{VBASE + 0x100:x},4") == "90909090"
    # gdb writes over the breakpointed byte: the write lands in what the breakpoint restores
    assert h.ask(f"M{addr:x},1:55") == "OK"
    assert h.mem.read(0x101, 1) == b"\xcc"
    assert h.ask(f"m{addr:x},1") == "55"
    assert h.ask(f"z0,{addr:x},1") == "OK"
    assert h.mem.read(0x101, 1) == b"\x55"
    assert h.ask(f"Z0,{addr:x},4") == "E16"  # not this architecture's breakpoint kind


def test_software_breakpoint_on_an_unmapped_address_takes_a_hardware_slot(h: Harness) -> None:
    # a kernel symbol before the kernel's page tables exist: a hardware slot matches the virtual address
    assert h.ask("Z0,10,1") == "OK"
    assert h.debugger.hw == [HwPoint(Z_HARDWARE, 0x10, 1)] and h.debugger.sw_on_hw == {0x10}
    assert h.ask("Z0,20,1") == "OK"
    assert h.ask("Z0,30,1") == "E0e"  # both slots taken
    assert h.ask(f"Z1,{VBASE:x},1") == "E1c"
    assert h.ask("z0,10,1") == "OK" and h.debugger.hw == [HwPoint(Z_HARDWARE, 0x20, 1)]
    h.debugger.target.regs[1] = 0x20  # type: ignore[attr-defined]
    h.target.debug_exit = lambda vcpu, hw, is_bp: StopWhy("hwbreak")  # type: ignore[method-assign]
    h.debugger._report = lambda vcpu, why: setattr(h, "why", why)  # type: ignore[method-assign]
    h.debugger.debug_exit(h.debugger.vcpus[0])
    assert h.why == StopWhy("swbreak")  # type: ignore[attr-defined]


def test_hardware_points_slots_and_unsupported_types(h: Harness) -> None:
    assert h.ask(f"Z1,{VBASE:x},1") == "OK"
    assert h.ask(f"Z1,{VBASE + 4:x},1") == "OK"
    assert h.ask(f"Z1,{VBASE + 8:x},1") == "E1c"  # the two slots are in use
    assert h.ask(f"Z3,{VBASE:x},4") == ""  # read watchpoints: not supported, gdb falls back
    assert h.ask(f"Z2,{VBASE:x},3") == "E16"
    assert h.ask(f"Z2,{VBASE:x},4") == "OK"
    assert h.ask(f"Z4,{VBASE + 8:x},4") == "E1c"
    assert h.ask(f"z2,{VBASE:x},4") == "OK"
    assert h.ask(f"Z4,{VBASE + 8:x},4") == "OK"
    assert h.ask("Z9,0,1") == ""


def test_breakpoints_and_watchpoints_share_the_slots(h: Harness) -> None:
    """x86's DR0-DR3 serve both kinds: past the shared count nothing more is programmed (a fifth point
    would land in DR4-DR7)."""
    h.target.hw_slots = 2
    assert h.ask(f"Z1,{VBASE:x},1") == "OK"
    assert h.ask(f"Z2,{VBASE + 8:x},4") == "OK"
    assert h.ask(f"Z1,{VBASE + 4:x},1") == "E1c"  # a breakpoint slot is free, the shared ones are not
    assert len(h.debugger.hw) == 2
    assert h.ask(f"z2,{VBASE + 8:x},4") == "OK"
    assert h.ask(f"Z1,{VBASE + 4:x},1") == "OK"


def test_resume_and_step_program_guest_debugging(h: Harness) -> None:
    assert h.ask(f"Z0,{VBASE + 0x100:x},1") == "OK"
    assert h.ask("vCont?") == "vCont;c;C;s;S"
    assert h.ask("vCont;s:2;c") is None  # no reply until the guest stops
    assert h.target.debug_calls[-2:] == [(True, False, ()), (True, True, ())]  # only vCPU 1 steps
    assert h.debugger._only == 1 and not h.debugger.paused
    assert h.target.clock == ["thaw"] and h.server.running
    assert h.ask("vCont;c:1") is None
    assert h.target.debug_calls[-2:] == [(True, False, ()), (True, False, ())]
    assert h.ask("vCont;s:9") == "E03"


def test_stop_replies_threads_and_queries(h: Harness) -> None:
    h.ask("qSupported:swbreak+")
    h.server.last_stop = (1, StopWhy("swbreak"))
    assert h.ask("?") == "T05swbreak:;thread:2;"
    h.server.last_stop = (0, StopWhy("watch", VBASE + 8))
    assert h.ask("?") == f"T05watch:{VBASE + 8:x};thread:1;"
    h.server.last_stop = (0, StopWhy("interrupt"))
    assert h.ask("?") == "T02thread:1;"
    assert h.ask("qfThreadInfo") == "m1,2" and h.ask("qsThreadInfo") == "l"
    assert h.ask("Hg2") == "OK" and h.ask("qC") == "QC2"
    assert h.ask("Hg3") == "E03" and h.ask("T3") == "E03" and h.ask("T2") == "OK"
    assert bytes.fromhex(h.ask("qThreadExtraInfo,2") or "") == b"vCPU 1"
    assert h.ask("qAttached") == "1"
    assert h.ask("qOffsets") == "" and h.ask("vMustReplyEmpty") == ""


def test_malformed_packets_never_raise(h: Harness) -> None:
    rng = random.Random(11)
    alphabet = b"gGpPmMXzZcCsSvHTqQ?:;,=-0123456789abcdefxyz}"
    for _ in range(3000):
        packet = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
        if packet[:1] in (b"k", b"D") or packet.startswith(b"vKill"):
            continue
        h.server.running = False
        h.debugger._paused = True
        h.ask(packet)  # any reply, never an exception


def test_kill_and_detach(h: Harness) -> None:
    assert h.ask(f"Z0,{VBASE + 0x100:x},1") == "OK"
    assert h.ask("D") is None
    assert h.sent == [b"OK"]
    assert h.mem.read(0x100, 1) == b"\x90"  # breakpoints removed
    assert h.target.debug_calls[-1] == (False, False, ())  # guest debugging off
    assert not h.debugger.paused
    assert h.ask("k") is None and h.killed == ["killed by gdb (k packet)"]


def test_event_loop_freeze_holds_timers() -> None:
    """While the guest is stopped for gdb the loop's timers (the --timeout among them) wait, and run
    later by the time they were held."""
    loop = EventLoop()
    wake = EventFd()
    fired: list[float] = []
    start = time.monotonic()
    loop.call_at(start + 0.05, lambda: (fired.append(time.monotonic()), loop.stop()))
    loop.freeze()
    loop.add(wake.fd, lambda: (wake.read(), loop.thaw()))
    threading.Timer(0.2, lambda: wake.write(1)).start()
    loop.run()
    loop.close()
    wake.close()
    assert fired[0] - start >= 0.24
