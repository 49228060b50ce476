"""Many VMs in one process give back everything: 20 tiny firmware VMs built, run and torn down one
after another in this process (pyvmm.testing.soak.vm_loop); after the first few, the open fds and threads
never grow and the RSS stays within a small bound.  ``make soak`` runs the longer version."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pyvmm.testing.soak import MiB, judge, table, vm_loop

pytestmark = pytest.mark.kvm


def test_twenty_vms_in_one_process_leak_nothing(firmware: Callable[..., Path]) -> None:
    samples = vm_loop(firmware("guestexit", "elf"), 20)
    verdict = judge(samples, warmup=3, rss_growth_max=8 * MiB, what="20 VMs")
    assert verdict.ok, "\n".join(verdict.lines + table(samples))
