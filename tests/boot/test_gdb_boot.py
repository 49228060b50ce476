"""Debian's gdb stops the default guest's kernel in the virtio-blk driver: ``break virtio_queue_rq`` (set
before the kernel has its own page tables), ``bt`` shows the block layer above it, the request's sector
and length are read through the guest's page tables, ``continue`` reaches the completion in
``virtblk_done``, and after ``detach`` the kernel boots on to its /init.

All of that is kernel work, so it runs on the software-emulating host KVM too, which stops at
breakpoints (pyvmm/arch/x86_64/debugprobe.py measures it); a host whose KVM stops at none skips here,
and tests/lab/test_gdb_lab.py covers what gdb can do there.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvmm import VM
from pyvmm.arch.x86_64 import debugprobe
from tests.boot.conftest import BOOT_TIMEOUT_S
from tests.gdbsession import BREAKPOINT_SESSION, check_breakpoint_session, free_port, run_gdb, wait_for

pytestmark = pytest.mark.boot


def test_gdb_breaks_in_virtio_queue_rq(vm_factory: Callable[..., VM], images: Path, kvm: None, software_kvm: bool,
                                       tmp_path: Path) -> None:
    gdb = shutil.which("gdb")
    if gdb is None:
        pytest.skip("gdb is not installed (Debian package gdb; `make deps` installs it)")
    if not (images / "vmlinux.debug").is_file():
        pytest.skip("images/out/vmlinux.debug is missing: run `make images`")
    caps = debugprobe.probe()
    if not (caps.sw_breakpoint or caps.hw_breakpoint):
        pytest.skip(f"{caps.describe()}: tests/lab/test_gdb_lab.py covers what gdb can do on such a host")
    port = free_port()
    vm = vm_factory(kernel=images / "vmlinux", initrd=images / "initrd.cpio.gz", memory="256M",
                    disks=[f"path={images / 'rootfs.ext4'},readonly=on"], timeout=BOOT_TIMEOUT_S,
                    extra_args=["--gdb", str(port), "--gdb-wait"])
    wait_for("gdb server on", lambda: vm.log, lambda: vm.status is None, 60)
    out = run_gdb(gdb, images / "vmlinux.debug", port, BREAKPOINT_SESSION, tmp_path, timeout=BOOT_TIMEOUT_S)
    check_breakpoint_session(out)
    vm.console.expect_exact("Run /init as init process", timeout=BOOT_TIMEOUT_S)
    vm.wait(BOOT_TIMEOUT_S)
    if software_kvm:  # user space cannot run here: the first syscall of /init kills it (docs/hosts.md)
        assert vm.status == 3 and "Attempted to kill init" in vm.console_text, vm.explain()
    else:
        assert vm.status == 0, vm.explain()
