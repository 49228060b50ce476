"""SMP: ``--cpus 2`` brings up two CPUs in the default guest.

The default kernel has no ACPI, so it finds the CPUs in the MP table (pyvmm/arch/x86_64/mptable.py) and
starts the AP with INIT/SIPI through KVM's in-kernel local APIC.  The test stops at the kernel's SMP
summary: on a software-emulating host KVM the rest of a two-vCPU boot is much slower than the
one-vCPU boot (docs/acpi.md), and the bring-up is what this test is about.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pyvmm import VM
from tests.boot.conftest import BOOT_TIMEOUT_S

pytestmark = pytest.mark.boot


def test_two_cpus_come_up(vm_factory: Callable[..., VM], images: Path, kvm: None) -> None:
    vm = vm_factory(kernel=images / "vmlinux", initrd=images / "initrd.cpio.gz", memory="256M", cpus=2,
                    timeout=BOOT_TIMEOUT_S)
    vm.console.expect_exact("found SMP MP-table", timeout=BOOT_TIMEOUT_S)
    vm.console.expect_exact("smpboot: Allowing 2 CPUs, 0 hotplug CPUs", timeout=BOOT_TIMEOUT_S)
    vm.console.expect_exact("smp: Brought up 1 node, 2 CPUs", timeout=BOOT_TIMEOUT_S)
    vm.console.expect_exact("smpboot: Total of 2 processors activated", timeout=BOOT_TIMEOUT_S)
    vm.stop()
    assert "2 vCPU(s)" in vm.log, vm.explain()
