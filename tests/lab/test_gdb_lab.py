"""Debian's gdb against the default guest's kernel through ``pyvmm run --gdb``, where guest user space runs:
the guest waits for gdb, gdb works on it, detaches, and the guest then boots to the end of its --exec
command.  What gdb does depends on what this host's KVM stops at (measured by
pyvmm/arch/x86_64/debugprobe.py): with breakpoints, stop in ``virtio_queue_rq`` and continue to
``virtblk_done`` (tests/gdbsession.py); without them (the KVM lab), registers, memory, single steps, and
a breakpoint gdb is told it cannot have.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm.arch.x86_64 import debugprobe
from tests.gdbsession import (
    BREAKPOINT_SESSION,
    STEP_SESSION,
    check_breakpoint_session,
    check_step_session,
    free_port,
    run_gdb,
    wait_for,
)
from tests.lab.conftest import BOOT_S, VM_GRACE_S, bound_for, vm_timeout

GDB_S = 120.0  # gdb reading vmlinux.debug and the stops, under the lab's emulated CPU
VM_TIMEOUT_S = vm_timeout(BOOT_S) + GDB_S


@pytest.mark.lab(bound_s=bound_for(VM_TIMEOUT_S))
def test_gdb_session_then_the_guest_boots_on(images: Path, tmp_path: Path) -> None:
    gdb = shutil.which("gdb")
    if gdb is None:
        pytest.skip("gdb is not installed (Debian package gdb; `make deps` installs it)")
    debug_vmlinux = images / "vmlinux.debug"
    if not debug_vmlinux.is_file():
        pytest.skip("images/out/vmlinux.debug is missing: run `make images`")
    caps = debugprobe.probe()
    breakpoints = bool(caps.sw_breakpoint) or caps.hw_breakpoint
    port = free_port()
    console, stderr = tmp_path / "console.log", tmp_path / "pyvmm.err"
    cmd = [sys.executable, "-m", "pyvmm", "run", "--kernel", str(images / "vmlinux"),
           "--initrd", str(images / "initrd.cpio.gz"), "--disk", f"path={images / 'rootfs.ext4'},readonly=on",
           "--memory", "256M", "--exec", "cat /sys/block/vda/size", "--console", f"file:{console}",
           "--timeout", f"{VM_TIMEOUT_S:g}", "--gdb", str(port), "--gdb-wait"]
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for("gdb server on", lambda: stderr.read_text(errors="replace"), lambda: proc.poll() is None, 60)
        out = run_gdb(gdb, debug_vmlinux, port, BREAKPOINT_SESSION if breakpoints else STEP_SESSION, tmp_path,
                      timeout=GDB_S + BOOT_S)
        status = proc.wait(timeout=VM_TIMEOUT_S + VM_GRACE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = stderr.read_text(errors="replace")
    text = console.read_text(errors="replace")
    print(f"--- pyvmm stderr ---\n{log}\n--- console tail ---\n{text[-3000:]}")
    assert f"gdb: {caps.describe()}" in log  # the user is told what this host delivers
    if breakpoints:
        check_breakpoint_session(out)
    else:
        check_step_session(out)
    # gdb gone, the guest booted on and ran its command: the disk's size in sectors, then status 0
    assert status == 0, log
    assert "131072" in text, text[-2000:]
