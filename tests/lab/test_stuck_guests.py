"""Deliberately stuck guests on a KVM that runs like hardware (marker ``lab``): a guest that spins with no
exits and one that polls an unclaimed port end on their own ``--timeout``, and what a failing test would
show (:meth:`Guest.explain`, pyvmm's stderr) says where the vCPU was, by symbol, and whether it was stuck
or slow.  Hardware KVM differs from this host's software KVM in exactly what the report rests on: how the
guest is entered and how often it leaves."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.lab.conftest import Guest, bound_for

FIRMWARE = Path(__file__).resolve().parents[2] / "firmware" / "out"
STUCK_TIMEOUT_S = 4.0  # a tiny guest starts at once; the report needs a second of history


def _elf(name: str) -> Path:
    path = FIRMWARE / f"{name}.elf"
    if not path.is_file():
        pytest.skip(f"{path} is not built: run `make firmware`")
    return path


@pytest.mark.lab(bound_s=bound_for(STUCK_TIMEOUT_S, STUCK_TIMEOUT_S, host_s=10))
def test_stuck_and_slow_guests_fail_with_the_vcpu_report(pyvmm_run: Callable[..., Guest]) -> None:
    spin = pyvmm_run("--kernel", str(_elf("spin")), timeout=STUCK_TIMEOUT_S)
    assert spin.status == 5, spin.explain()
    # Entered by KVM (host interrupts take it out and back in), no exit to pyvmm, the same RIP twice.
    assert re.search(r"vCPU 0 stuck at 0x[0-9a-f]+ <spin\+0x0> in the guest; 0 exits in the last 1\.0 s; "
                     r"KVM entered the guest [1-9]\d* times", spin.explain()), spin.explain()
    assert "last console line: pyvmm spin guest: spinning" in spin.explain()

    poll = pyvmm_run("--kernel", str(_elf("pollport")), timeout=STUCK_TIMEOUT_S)
    assert poll.status == 5, poll.explain()
    m = re.search(r"vCPU 0 slow at 0x[0-9a-f]+ <poll\+0x[0-9a-f]+> in the (guest|VMM); (\d+) exits in the last "
                  r"1\.0 s", poll.explain())
    assert m is not None and int(m.group(2)) > 10, poll.explain()
