"""virtio-blk multiqueue in a real guest: a 2-vCPU default guest whose root disk has one request queue
per vCPU (VIRTIO_BLK_F_MQ, virtio 1.2 §5.2), in the packed layout the guest negotiates (§2.8; ring=auto).
Linux's blk-mq shows two hardware queues, two writers pinned one to each CPU write at the same time, and
the data comes back intact in the guest after its page cache is dropped and on the host with e2fsprogs;
600 direct 4 KiB reads then take more than the ring's 256 slots, so a queue's wrap counters turn.  The virtio trace shows the
packed layout and notifications on both queues.  Needs guest user space (marker ``lab``)."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.lab.conftest import BOOT_S, Guest, bound_for, vm_timeout
from tests.lab.test_guest_userspace import _debugfs_cat

MQ_TIMEOUT_S = vm_timeout(BOOT_S)
SIZE = 4 << 20  # per writer
SCRIPT = f"""\
echo "MQ-QUEUES: $(ls /sys/block/vda/mq | tr '\\n' ' ')"
echo "MQ-CPUS: $(nproc)"
taskset -c 0 sh -c 'yes mq-writer-0 | head -c {SIZE} > /mq0; sync' &
taskset -c 1 sh -c 'yes mq-writer-1 | head -c {SIZE} > /mq1; sync' &
wait
echo 3 > /proc/sys/vm/drop_caches
sha256sum /mq0 /mq1 | sed 's/^/MQ-SHA: /'
taskset -c 0 dd if=/dev/vda of=/dev/null bs=4k count=600 iflag=direct 2>/dev/null && echo "MQ-DIRECT: read"
"""


def _content(word: str) -> bytes:
    line = f"{word}\n".encode()
    return (line * (SIZE // len(line) + 1))[:SIZE]


@pytest.mark.lab(bound_s=bound_for(MQ_TIMEOUT_S))
def test_two_queues_on_a_two_cpu_guest(pyvmm_run: Callable[..., Guest], images: Path, tmp_path: Path) -> None:
    if shutil.which("debugfs") is None or shutil.which("e2fsck") is None:
        pytest.skip("e2fsprogs (debugfs, e2fsck) is not installed")
    rootfs = tmp_path / "rootfs.ext4"
    shutil.copyfile(images / "rootfs.ext4", rootfs)
    trace = tmp_path / "trace.txt"
    g = pyvmm_run("--kernel", str(images / "vmlinux"), "--memory", "256M", "--cpus", "2",
                  "--disk", f"path={rootfs}", "--cmdline", "console=ttyS0 root=/dev/vda rw init=/init",
                  "--exec", SCRIPT, "--trace", "virtio.notify,virtio.setup,virtio.used", "--trace-file", str(trace), timeout=MQ_TIMEOUT_S)
    assert g.status == 0, g.explain()
    assert "vda: " in g.stderr and ", 2 queues" in g.stderr, g.stderr
    assert "MQ-QUEUES: 0 1 " in g.console and "MQ-CPUS: 2" in g.console, g.explain()
    assert "MQ-DIRECT: read" in g.console, g.explain()
    assert re.search(r"virtio_blk virtio0: 2/0/0 default/read/poll queues", g.console), g.explain()
    expected = {name: hashlib.sha256(_content(f"mq-writer-{i}")).hexdigest() for i, name in enumerate(("mq0", "mq1"))}
    for name, digest in expected.items():
        assert f"MQ-SHA: {digest}  /{name}" in g.console, g.explain()
        assert hashlib.sha256(_debugfs_cat(rootfs, f"/{name}")).hexdigest() == digest
    fsck = subprocess.run(["e2fsck", "-fn", str(rootfs)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    traced = trace.read_text()
    assert "DRIVER_OK: 2 queue(s) live, packed virtqueue layout" in traced, traced[:2000]
    notified = set(re.findall(r"notify\s+queue (\d+):", traced))
    assert notified == {"0", "1"}, sorted(notified)
    assert "(wrap 0)" in traced  # a used wrap counter turned: the ring went round at least once
