"""A command in the guest and its status back on the host: ``pyvmm run --exec`` and ``VM.exec`` with the
default guest, whose /init (images/init.sh) runs the command and reports its status through the guest
exit device.  Needs guest user space (marker ``lab``)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvmm import VM
from tests.lab.conftest import BOOT_S, Guest, bound_for, vm_timeout

EXEC_TIMEOUT_S = vm_timeout(BOOT_S)
# The console is the kernel's too: a message it prints while the command runs lands between the command's
# lines (seen on a loaded host: the clocksource watchdog marking the TSC unstable).
KERNEL_LINE = re.compile(r"\[\s*\d+\.\d+\] ")


@pytest.mark.lab(bound_s=bound_for(EXEC_TIMEOUT_S))
def test_exec_returns_the_commands_status(pyvmm_run: Callable[..., Guest], images: Path) -> None:
    g = pyvmm_run("--kernel", str(images / "vmlinux"), "--initrd", str(images / "initrd.cpio.gz"),
                  "--memory", "128M", "--exec", "echo exec-says-$((6 * 7)); uname -m; exit 7",
                  timeout=EXEC_TIMEOUT_S)
    assert g.status == 32 + 7, g.explain()
    assert "guest exited with status 7 (guest exit device)" in g.stderr, g.explain()
    assert 'pyvmm.exec="echo exec-says-$((6 * 7)); uname -m; exit 7"' in g.stderr, g.explain()
    begin = g.console.index("PYVMM-EXEC: begin")
    assert g.console.index("exec-says-42", begin) < g.console.index("PYVMM-EXEC: end 7", begin), g.explain()
    assert "x86_64" in g.console[begin:], g.explain()


@pytest.mark.lab(bound_s=bound_for(EXEC_TIMEOUT_S))
def test_vm_exec_on_a_snapshot_root_disk(images: Path) -> None:
    rootfs = images / "rootfs.ext4"  # the image itself: snapshot=on never writes to it
    before = hashlib.sha256(rootfs.read_bytes()).hexdigest()
    # Double quotes cannot be written on a kernel command line: this one travels as pyvmm.exec64=
    cmd = 'echo "quoted words"; cat /etc/pyvmm-hello; echo changed > /etc/pyvmm-hello; sync; exit 0'
    vm = VM(images / "vmlinux", memory="256M", disks=[f"path={rootfs},snapshot=on"],
            cmdline="console=ttyS0 root=/dev/vda rw init=/init", timeout=EXEC_TIMEOUT_S, name="exec")
    status, output = vm.exec(cmd, timeout=EXEC_TIMEOUT_S + 30)
    assert status == 0 and vm.status == 0, vm.explain()
    assert "pyvmm.exec64=" in vm.log, vm.log
    own = "".join(line for line in output.splitlines(keepends=True) if not KERNEL_LINE.match(line))
    assert "quoted words\nhello from the pyvmm root disk\n" in own, (output, vm.explain())
    assert hashlib.sha256(rootfs.read_bytes()).hexdigest() == before  # the guest's write went to the overlay
