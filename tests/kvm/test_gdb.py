"""The gdb server on a tiny guest (firmware/gdb.S), driven by the tests' own protocol client: software
and hardware breakpoints, registers read and written, a single step, guest memory through the page
tables, a watchpoint where the host has them, Ctrl-C, detach, kill, and bad input from the gdb side.

The VM runs on the test's main thread (as in `pyvmm run`); the client talks to it from a second thread
and records what it saw, and every step has a timeout on both sides.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyvmm.arch.x86_64 import debugprobe, hostkvm
from pyvmm.status import ExitStatus
from pyvmm.testing.tinyvm import Recorder, TinyVm
from tests.gdbclient import GdbClient, ProtocolError, stop_fields
from tests.kvm.conftest import PORT_BASE, PORT_SPAN, describe, reports

pytestmark = pytest.mark.kvm

SOFTWARE_HOST = hostkvm.detect().software
ALIAS = 0xFFFF_8000_0000_0000  # firmware/gdb.S maps guest-physical 0-4 GiB here as well
RAX, RBX, RCX, RIP, EFLAGS = 0, 1, 2, 16, 17
NEW_RBX = 0x0BAD_C0DE_F00D_CAFE
NEW_DATA = 0x1357_9BDF_2468_ACE0
ORIGINAL_DATA = 0x0123_4567_89AB_CDEF


def symbols(elf: Path) -> dict[str, int]:
    out = subprocess.run(["nm", str(elf)], check=True, capture_output=True, text=True).stdout
    return {name: int(addr, 16) for addr, _, name in (line.split() for line in out.splitlines())}


def le(value: int, size: int = 8) -> str:
    return value.to_bytes(size, "little").hex()


def run_with_client(vm: TinyVm, client_fn: Callable[[GdbClient, dict[str, Any]], None]) -> tuple[Any, dict[str, Any]]:
    """Run the VM here and ``client_fn`` against its gdb server on another thread; the client's assertion
    errors are re-raised here after the VM has ended."""
    seen: dict[str, Any] = {}
    errors: list[BaseException] = []

    def client_thread() -> None:
        client = GdbClient(vm.gdb_port, timeout=60)
        try:
            client_fn(client, seen)
        except BaseException as err:  # re-raised on the test thread
            errors.append(err)
            vm.vmm.request_stop(ExitStatus.VMM_ERROR, f"gdb client failed: {err!r}")
        finally:
            client.close()

    t = threading.Thread(target=client_thread, daemon=True)
    t.start()
    result = vm.run()
    t.join(30)
    if errors:
        raise errors[0]
    return result, seen


def test_breakpoints_registers_step_memory_interrupt_detach(firmware: Callable[..., Path]) -> None:
    sym = symbols(firmware("gdb", "elf"))
    probe = Recorder()

    def client(c: GdbClient, seen: dict[str, Any]) -> None:
        features = c.ask("qSupported:multiprocess+;swbreak+;hwbreak+;xmlRegisters=i386")
        assert "PacketSize=" in features and "qXfer:features:read+" in features, features
        xml = c.ask("qXfer:features:read:target.xml:0,ffff")
        assert xml.startswith("l") and "i386:x86-64" in xml and 'name="rip"' in xml, xml[:200]
        assert stop_fields(c.ask("?"))["signal"] == "05"
        assert c.ask("qfThreadInfo") == "m1" and c.ask("qsThreadInfo") == "l"
        assert c.ask("Hg1") == "OK"
        assert c.register(RIP) == sym["_start"]

        # a software breakpoint; reading memory there shows the instruction, not the int3
        bp = sym["break_here"]
        assert c.ask(f"Z0,{bp:x},1") == "OK"
        assert c.read_memory(bp, 3) == "4889d9"  # mov %rbx,%rcx
        stop = stop_fields(c.ask("vCont;c"))
        assert "swbreak" in stop and stop["thread"] == "1", stop
        regs = bytes.fromhex(c.ask("g"))
        reg = lambda n: int.from_bytes(regs[8 * n:8 * n + 8], "little")  # noqa: E731 (the first 17 are 64-bit)
        assert (reg(RIP), reg(RAX), reg(RBX), reg(RCX)) == (bp, 0x1122334455667788, 0x99AABBCCDDEEFF00, 0)

        # write a register, then step over the breakpoint as gdb does: remove it, step, (re-insert)
        assert c.set_register(RBX, NEW_RBX) == "OK"
        assert c.ask(f"z0,{bp:x},1") == "OK"
        stop = stop_fields(c.ask("vCont;s:1"))
        assert stop["signal"] == "05" and stop["thread"] == "1", stop
        assert c.register(RIP) == sym["after_mov"]
        assert c.register(RCX) == NEW_RBX

        # memory through the guest's page tables, at a virtual address that is not the physical one
        alias = ALIAS + sym["data"]
        assert c.read_memory(alias, 8) == le(ORIGINAL_DATA)
        assert c.ask(f"M{alias:x},8:{le(NEW_DATA)}") == "OK"
        assert c.read_memory(sym["data"], 8) == le(NEW_DATA)  # the same bytes through the identity map
        # a binary write (X) with the characters the protocol escapes
        payload = b"#$}*"
        escaped = b"".join(bytes((0x7D, b ^ 0x20)) for b in payload)
        c.send(b"X%x,4:" % (ALIAS + sym["counter"]) + escaped)
        assert c.reply() == "OK"
        assert c.read_memory(sym["counter"], 4) == payload.hex()
        assert c.read_memory(0xFFFF_9000_0000_0000, 4).startswith("E")  # not mapped
        assert c.read_memory(ALIAS + 0xE000_0000, 4).startswith("E")  # mapped, but no RAM there

        # a hardware breakpoint (DR0)
        assert c.ask(f"Z1,{sym['hw_here']:x},1") == "OK"
        stop = stop_fields(c.ask("vCont;c"))
        assert "hwbreak" in stop, stop
        assert c.register(RIP) == sym["hw_here"]
        assert c.ask(f"z1,{sym['hw_here']:x},1") == "OK"

        # a write watchpoint, where the host KVM has data breakpoints
        answer = c.ask(f"Z2,{sym['counter']:x},4")
        seen["watch"] = answer
        if answer == "OK":
            stop = stop_fields(c.ask("vCont;c"))
            assert int(stop["watch"], 16) == sym["counter"], stop
            assert c.register(RIP) == sym["after_write"]
            assert c.ask(f"z2,{sym['counter']:x},4") == "OK"

        # Ctrl-C stops the guest where it spins
        c.send("vCont;c")
        time.sleep(0.5)
        c.interrupt()
        stop = stop_fields(c.reply())
        assert stop["signal"] == "02", stop
        assert sym["spin"] <= c.register(RIP) < sym["spin_end"]
        seen["counter"] = c.read_memory(sym["counter"], 4)

        # let it finish, and detach: the guest runs on without gdb
        assert c.ask(f"M{sym['go_on']:x},4:01000000") == "OK"
        assert c.ask("D") == "OK"

    with TinyVm(firmware("gdb"), timeout=120, gdb=True) as vm:
        vm.add_pio(PORT_BASE, PORT_SPAN, probe, "probe")
        result, seen = run_with_client(vm, client)
    print(f"host: {hostkvm.detect().reason}; Z2 answered {seen['watch']!r}; exits {dict(result.exits)}")
    assert result.status == ExitStatus.OK, describe(result, probe)
    assert result.debug_exit == 0
    r = reports(probe)
    assert r[:2] == [NEW_RBX & 0xFFFFFFFF, NEW_RBX >> 32], [hex(v) for v in r]
    assert r[2:4] == [NEW_DATA & 0xFFFFFFFF, NEW_DATA >> 32]
    assert r[4:] == [0x600D600D]
    assert seen["counter"] == le(0x5A5A5A5A, 4)  # the guest's own store, after the client's X write
    # offered exactly where the host stops at data breakpoints (measured by the probe)
    assert seen["watch"] == ("OK" if debugprobe.probe().watchpoint else ""), debugprobe.probe()


def test_kill_ends_the_vm(firmware: Callable[..., Path]) -> None:
    def client(c: GdbClient, seen: dict[str, Any]) -> None:
        assert stop_fields(c.ask("?"))["signal"] == "05"
        c.send("k")

    with TinyVm(firmware("gdb"), timeout=60, gdb=True) as vm:
        result, _ = run_with_client(vm, client)
    assert result.status == ExitStatus.STOPPED, describe(result)
    assert "killed by gdb" in result.reason


def test_bad_input_gets_protocol_answers_and_never_kills_the_vm(firmware: Callable[..., Path]) -> None:
    sym = symbols(firmware("gdb", "elf"))
    probe = Recorder()

    def client(c: GdbClient, seen: dict[str, Any]) -> None:
        c.send_raw(b"hello, not a packet")  # noise between packets is skipped
        c.send_raw(b"$g#00")  # wrong checksum: '-', gdb would send it again
        assert c._byte(time.monotonic() + 10) == ord("-")
        assert c.ask("?").startswith("T05")
        answers = {
            "mzz,4": c.ask("mzz,4"),
            "m1": c.ask("m1"),
            "Z0 kind 7": c.ask(f"Z0,{sym['break_here']:x},7"),
            "Z1 x4": [c.ask(f"Z1,{sym['hw_here'] + i:x},1") for i in range(4)],
            "Z0 unmapped, no free slot": c.ask("Z0,ffff900000000000,1"),
            "z1 x4": [c.ask(f"z1,{sym['hw_here'] + i:x},1") for i in range(4)],
            "p999": c.ask("p999"),
            "Hg99": c.ask("Hg99"),
            "M short": c.ask(f"M{sym['data']:x},8:0011"),
            "X bad escape": c.ask(f"X{sym['data']:x},1:}}"),
            "qXfer other": c.ask("qXfer:features:read:other.xml:0,100"),
            "vCont;x": c.ask("vCont;x"),
            "G odd": c.ask("G0"),
            "qFoo": c.ask("qFoo"),
            "m huge": c.ask("mffffffffffffff00,100"),
            "P segment": c.set_register(18, 0x1234, 4),  # cs: loading selectors is not supported
        }
        seen["answers"] = answers
        # the registers and memory are unchanged by all that
        assert c.register(RIP) == sym["_start"]
        assert c.read_memory(sym["data"], 8) == le(ORIGINAL_DATA)
        # a second gdb is turned away while this one is attached
        with socket.create_connection(("127.0.0.1", vm.gdb_port), timeout=10) as other:
            other.settimeout(10)
            assert other.recv(16) == b""
        # let the guest finish once gdb is gone, then vanish in the middle of a packet
        assert c.ask(f"M{sym['go_on']:x},4:01000000") == "OK"
        c.send_raw(b"$m100000,")
        c.close()

    with TinyVm(firmware("gdb"), timeout=120, gdb=True) as vm:
        vm.add_pio(PORT_BASE, PORT_SPAN, probe, "probe")
        result, seen = run_with_client(vm, client)
    answers = seen["answers"]
    print(answers)
    assert answers["mzz,4"] == "E01" and answers["m1"] == "E01"
    assert answers["Z0 kind 7"] == "E16" and answers["Z0 unmapped, no free slot"] == "E0e"
    assert answers["Z1 x4"] == ["OK"] * 4 and answers["z1 x4"] == ["OK"] * 4
    assert answers["p999"] == "E16" and answers["Hg99"] == "E03"
    assert answers["M short"] == "E01" and answers["X bad escape"] == "E01"
    assert answers["qXfer other"].startswith("E") and answers["vCont;x"] == "E01"
    assert answers["G odd"] == "E01" and answers["qFoo"] == ""
    assert answers["m huge"].startswith("E") and answers["P segment"] == "E16"
    # gdb went away: the guest ran from where it was to its end, untouched by the breakpoint-free session
    assert result.status == ExitStatus.OK, describe(result, probe)
    assert reports(probe) == [0xDDEEFF00, 0x99AABBCC, ORIGINAL_DATA & 0xFFFFFFFF, ORIGINAL_DATA >> 32, 0x600D600D]


def test_client_protocol_error_is_reported() -> None:
    """The tests' client itself: a server that closes the connection is an error, not a hang."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    c = GdbClient(port, timeout=5)
    with pytest.raises((ProtocolError, OSError)):
        c.ask("?")
    c.close()
    server.close()
