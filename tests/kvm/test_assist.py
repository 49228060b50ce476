"""Instructions the software host KVM cannot emulate, performed by the emulation assist
(firmware/assist.S), and one it cannot perform either (firmware/unhandled.S).

The guest-visible results are checked against values computed here, so the test holds on a hardware
KVM (where the instructions run natively) and on the software host (where they trap to the assist).
On the software host the assist's counters are checked too, for the cases that actually trapped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pyvmm.arch.x86_64 import hostkvm
from pyvmm.status import ExitStatus
from pyvmm.testing.tinyvm import Recorder, TinyVm
from tests.kvm.conftest import PORT_BASE, PORT_SPAN, describe, pairs64, reports

pytestmark = pytest.mark.kvm

SOFTWARE_HOST = hostkvm.detect().software

DEST_INIT = 0xDEADBEEFCAFEF00D
ZF = 1 << 6
# (operand width, source value) in the order of firmware/assist.S
POPCNT_CASES = [
    (64, 0xF0F000001234567F),  # popcnt %rcx, %rax
    (32, 0x00000003),  # popcnt %ecx, %esi (upper half of rcx ignored)
    (16, 0x8001),  # popcnt %cx, %di
    (64, 0x8000000000000001),  # popcnt %r9, %r10
    (64, 0),  # popcnt %rcx, %r11: ZF
    (64, 0x0123456789ABCDEF),  # popcntq pop_q(%rip), %r8
    (32, 0x80000001),  # popcntl 4(%rbx), %r12d
    (16, 0x7FF7),  # popcntw (%rbx,%rcx,2), %r13w
    (64, 0xFFFFFFFFFFFFFFFF),  # popcntq 16(%rbx), %r14
]
MXCSR_RESET, MXCSR_A, MXCSR_B = 0x1F80, 0x7F80, 0x3FA1
# how often each instruction the assist knows occurs in the guest
OCCURRENCES = {"int3": 1, "fwait": 1, "popcnt": len(POPCNT_CASES), "ldmxcsr": 3, "stmxcsr": 3}


def popcnt_expected(width: int, src: int) -> tuple[int, int]:
    """(destination after popcnt, arithmetic flags): SDM vol. 2 POPCNT; a 32-bit destination
    zero-extends, a 16-bit one keeps bits 63:16 (SDM vol. 1, 3.4.1.1); all flags cleared but ZF."""
    count = bin(src).count("1")
    dest = (DEST_INIT & ~0xFFFF) | count if width == 16 else count
    return dest, ZF if src == 0 else 0


def test_assisted_instructions_give_architectural_results(firmware: Callable[[str], Path]) -> None:
    probe = Recorder()
    with TinyVm(firmware("assist"), timeout=20) as vm:
        vm.add_pio(PORT_BASE, PORT_SPAN, probe, "probe")
        result = vm.run()
    print(f"host: {hostkvm.detect().reason}; assist {'on' if vm.assist else 'off'}")
    print(f"trapped to the assist: {dict(result.assist) or 'nothing'}; exits {dict(result.exits)}")
    assert result.status == ExitStatus.OK, describe(result, probe)
    assert result.debug_exit == 0
    r = reports(probe)

    # int3: handler called once; the saved RIP is the address after the int3 (a trap)
    assert r[0] == 1, "the #BP handler ran once"
    saved_rip, after_int3 = pairs64(r[1:5])
    assert saved_rip == after_int3
    # fwait: a no-op
    assert r[5] == 0xF0A17F0A
    # popcnt
    pos = 6
    for width, src in POPCNT_CASES:
        dest, flags = pairs64(r[pos : pos + 2])[0], r[pos + 2]
        assert (dest, flags) == popcnt_expected(width, src), f"popcnt{width} of {src:#x}"
        pos += 3
    # ldmxcsr / stmxcsr, with the effect visible through a later stmxcsr
    assert r[pos : pos + 3] == [MXCSR_RESET, MXCSR_A, MXCSR_B]
    assert r[pos + 3 :] == [0x600D600D]

    # Every trap the guest caused was handled by the assist, and only instructions it knows trapped.
    assert result.exits["internal_error"] == sum(result.assist.values())
    if SOFTWARE_HOST:
        for name, n in result.assist.items():
            assert name in OCCURRENCES and n <= OCCURRENCES[name], (name, n)
        assert result.assist, "on the software host at least int3 is expected to trap"
    else:
        assert not result.assist, "a hardware KVM runs these natively"


@pytest.mark.skipif(not SOFTWARE_HOST, reason="needs the software-emulating host KVM: hardware runs int3 natively")
def test_assist_off_stops_with_emulation_failure(firmware: Callable[[str], Path]) -> None:
    with TinyVm(firmware("assist"), assist=False, timeout=20) as vm:
        vm.add_pio(PORT_BASE, PORT_SPAN, Recorder(), "probe")
        result = vm.run()
    assert result.status == ExitStatus.EMULATION_FAILURE, describe(result)
    assert "assist off" in result.reason


CRC32_BYTES = "f2 48 0f 38 f1 d8"  # crc32q %rax, %rbx


@pytest.mark.skipif(not SOFTWARE_HOST, reason="a hardware KVM executes crc32 natively; nothing to stop on")
def test_unhandled_instruction_stops_with_rip_and_bytes(firmware: Callable[[str], Path]) -> None:
    probe = Recorder()
    with TinyVm(firmware("unhandled"), timeout=10) as vm:
        vm.add_pio(PORT_BASE, PORT_SPAN, probe, "probe")
        result = vm.run()
    print(f"stopped with: {result.reason}")
    assert result.status == ExitStatus.EMULATION_FAILURE, describe(result, probe)
    insn_addr = pairs64(reports(probe)[:2])[0]
    assert f"RIP {insn_addr:#x}" in result.reason
    assert CRC32_BYTES in result.reason
    assert result.debug_exit is None
    assert result.elapsed < 10
