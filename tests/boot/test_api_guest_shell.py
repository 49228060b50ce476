"""The Python API against a real guest shell: ``booted_vm`` and ``run(cmd) -> (status, output)``.

Needs guest user space, so ``booted_vm`` skips on a software-emulating host KVM (ours); it runs on a
hardware KVM or inside the KVM lab:
``python -m pyvmm.lab run -- .venv/bin/python -m pytest -p no:cacheprovider tests/boot/test_api_guest_shell.py``.
"""

from __future__ import annotations

import pytest

from pyvmm import VM

pytestmark = pytest.mark.boot


def test_commands_in_the_guest_shell(booted_vm: VM) -> None:
    status, output = booted_vm.run("uname -sr")
    assert status == 0 and output.startswith("Linux 6.1"), booted_vm.explain()
    assert booted_vm.run("mount -t proc proc /proc").status == 0, booted_vm.explain()
    assert "init=/bin/sh" in booted_vm.run("cat /proc/cmdline").output
    assert booted_vm.run("test -b /dev/vda").status == 0  # the root disk, on virtio-blk
    assert booted_vm.run("false") == (1, "")
    assert booted_vm.run("printf 'a\\nb'") == (0, "a\nb")
    booted_vm.console.sendline("sync; reboot -f")
    assert booted_vm.wait(120) == 0, booted_vm.explain()  # reboot=k: the i8042 reset ends the VM
