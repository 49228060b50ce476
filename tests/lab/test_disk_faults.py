"""A real guest whose root disk starts failing: pyvmm keeps running and the guest ends cleanly.

``pyvmm run`` runs from a small script that first puts the disk behind a FaultyDisk
(pyvmm/testing/faultydisk.py): every write fails with EIO once the guest has read the disk's last 4 KiB.
The guest (``--exec``, the root on a snapshot of the default root disk) boots with a healthy disk, arms
the fault with a raw read of that last block, writes and syncs a file, and reports what it saw.  Its
writes fail (dd says so, the kernel logs I/O errors), pyvmm logs them rate-limited and keeps serving,
and the guest's status still comes back through the guest exit device.  Needs guest user space (``lab``).
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.lab.conftest import BOOT_S, Guest, bound_for, vm_timeout

FAULT_TIMEOUT_S = vm_timeout(BOOT_S + 20)

SCRIPT = textwrap.dedent("""\
    import os, sys
    from pyvmm import cli
    from pyvmm.testing.faultydisk import Fault, install
    size = int(os.environ["PYVMM_TEST_DISK_SIZE"])
    install([Fault("write", "eio", armed_by=(size - 4096, size))])
    sys.exit(cli.main(sys.argv[1:]))
""")

GUEST = ("dd if=/dev/vda of=/dev/null bs=4096 skip=$(( $(blockdev --getsize64 /dev/vda) / 4096 - 1 )) count=1; "
         "echo FAULT-ARMED; "
         "dd if=/dev/zero of=/fault-test bs=4096 count=64 conv=fsync; echo \"FAULT-DD: $?\"; "
         "sync; echo FAULT-SYNCED; "
         "dmesg | grep -c -i 'error' | sed 's/^/FAULT-KERNEL-ERRORS: /'; exit 0")


@pytest.mark.lab(bound_s=bound_for(FAULT_TIMEOUT_S))
def test_root_disk_that_fails_its_writes(images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         pyvmm_run: Callable[..., Guest]) -> None:
    rootfs = images / "rootfs.ext4"
    monkeypatch.setenv("PYVMM_TEST_DISK_SIZE", str(rootfs.stat().st_size))
    script = tmp_path / "faulty_pyvmm.py"
    script.write_text(SCRIPT)
    g = pyvmm_run("--kernel", str(images / "vmlinux"), "--memory", "256M", "--disk", f"path={rootfs},snapshot=on",
                  "--cmdline", "console=ttyS0 root=/dev/vda rw init=/init", "--exec", GUEST,
                  timeout=FAULT_TIMEOUT_S, command=[sys.executable, str(script)])
    assert g.status == 0, g.explain()  # the command's status 0, reported through the guest exit device
    assert "FAULT-ARMED" in g.console and "FAULT-SYNCED" in g.console, g.explain()
    assert "FAULT-DD: 0" not in g.console, g.explain()  # the writes really failed
    errors = [line for line in g.console.splitlines() if line.startswith("FAULT-KERNEL-ERRORS: ")]
    assert errors and int(errors[-1].split()[-1]) > 0, g.explain()
    assert "virtio-blk: I/O error: [Errno 5] injected eio on write" in g.stderr, g.explain()
