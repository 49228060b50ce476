"""One minute of mixed disk I/O in a real guest: pyvmm stays flat and every round of data verifies.

The default guest with its root on a snapshot disk and a scratch disk as vdb runs
pyvmm.testing.soak.guest_script for 60 s: rounds of raw writes to vdb and file writes to the root, with
flushes, each read back after dropping the guest's caches and compared.  pyvmm's RSS (without the guest's
RAM) and its open fds are sampled every 2 s from outside.  ``make soak`` runs it for 10 minutes."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvmm.testing.soak import MiB, guest_soak, judge, table
from tests.lab.conftest import BOOT_S, bound_for, vm_timeout

SOAK_S = 60.0
WARMUP_SAMPLES = 15  # 30 s: the boot and the first rounds


@pytest.mark.lab(bound_s=bound_for(vm_timeout(BOOT_S + SOAK_S)))
def test_a_minute_of_mixed_io(images: Path, tmp_path: Path) -> None:
    result = guest_soak(images, tmp_path, SOAK_S, boot_s=vm_timeout(BOOT_S))
    explain = (f"pyvmm status {result.status}\n{result.stderr}\n--- console tail ---\n"
               + "\n".join(result.console.splitlines()[-20:]) + "\n" + "\n".join(table(result.samples, 5)))
    assert result.status == 0 and result.bad == 0 and result.rounds >= 3, explain
    verdict = judge(result.samples, warmup=WARMUP_SAMPLES, rss_growth_max=16 * MiB, what="pyvmm")
    assert verdict.ok, "\n".join(verdict.lines) + "\n" + explain
