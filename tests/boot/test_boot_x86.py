"""The default guest boots under pyvmm.

On a software-emulating host KVM (ours) guest user space cannot run (docs: host-kvm.md), so the
test asserts the kernel's own milestones up to ``Run /init as init process`` and that the VM then ends
by itself (the init panic); on a hardware KVM it asserts the initramfs's user-space markers and a
clean reboot (exit status 0).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.boot.conftest import Boot

pytestmark = pytest.mark.boot

KERNEL_MILESTONES = ("Linux version 6.1", "Command line:", "Serial: 8250/16550 driver", "Run /init as init process")


def _check_boot(b: Boot, software_kvm: bool) -> None:
    for line in KERNEL_MILESTONES:
        assert line in b.console, f"missing {line!r}\n{b.explain()}"
    if software_kvm:
        # user space cannot run here: the first syscall of /init kills it and the kernel panics
        assert b.status == 3, b.explain()
        assert "Attempted to kill init" in b.console, b.explain()
    else:
        assert "PYVMM-INIT: done" in b.console, b.explain()
        assert b.status == 0, b.explain()


def test_vmlinux_with_initrd(boot: Callable[..., Boot], images: Path, software_kvm: bool) -> None:
    b = boot("--kernel", str(images / "vmlinux"), "--initrd", str(images / "initrd.cpio.gz"), "--memory", "256M")
    _check_boot(b, software_kvm)
    assert "(elf)" in b.stderr
    if software_kvm:
        assert "kvm_pvm" in b.stderr and "clearcpuid=" in b.stderr  # workarounds applied and said


def test_bzimage_in_guest_decompressor(boot: Callable[..., Boot], images: Path, software_kvm: bool) -> None:
    b = boot("--kernel", str(images / "bzImage"), "--boot", "guest", "--initrd", str(images / "initrd.cpio.gz"),
             "--memory", "256M")
    _check_boot(b, software_kvm)
    assert "(bzImage)" in b.stderr
