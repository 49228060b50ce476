"""The default guest boots under pyvmm.

On a software-emulating host KVM (ours) guest user space cannot run (docs: hosts.md), so the
test asserts the kernel's own milestones up to ``Run /init as init process`` and that the VM then ends
by itself (the init panic); on a hardware KVM it asserts the initramfs's user-space markers and a
clean reboot (exit status 0).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pyvmm import VM
from tests.boot.conftest import BOOT_TIMEOUT_S

pytestmark = pytest.mark.boot

KERNEL_MILESTONES = ("Linux version 6.1", "Command line:", "Serial: 8250/16550 driver", "Run /init as init process")


def _check_boot(vm: VM, software_kvm: bool) -> None:
    # The milestones in the order the kernel prints them, as they come (console.expect), then the end.
    for line in KERNEL_MILESTONES:
        vm.console.expect_exact(line, timeout=BOOT_TIMEOUT_S)
    vm.wait(BOOT_TIMEOUT_S)
    for line in KERNEL_MILESTONES:
        assert line in vm.console_text, f"missing {line!r}\n{vm.explain()}"
    if software_kvm:
        # user space cannot run here: the first syscall of /init kills it and the kernel panics
        assert vm.status == 3, vm.explain()
        assert "Attempted to kill init" in vm.console_text, vm.explain()
    else:
        assert "PYVMM-INIT: done" in vm.console_text, vm.explain()
        assert vm.status == 0, vm.explain()


def test_vmlinux_with_initrd(vm_factory: Callable[..., VM], images: Path, kvm: None, software_kvm: bool) -> None:
    vm = vm_factory(kernel=images / "vmlinux", initrd=images / "initrd.cpio.gz", memory="256M",
                    timeout=BOOT_TIMEOUT_S)
    _check_boot(vm, software_kvm)
    assert "(elf)" in vm.log
    if software_kvm:
        assert "kvm_pvm" in vm.log and "clearcpuid=" in vm.log  # workarounds applied and said


def test_bzimage_in_guest_decompressor(vm_factory: Callable[..., VM], images: Path, kvm: None,
                                       software_kvm: bool) -> None:
    vm = vm_factory(kernel=images / "bzImage", boot="guest", initrd=images / "initrd.cpio.gz", memory="256M",
                    timeout=BOOT_TIMEOUT_S)
    _check_boot(vm, software_kvm)
    assert "(bzImage)" in vm.log
