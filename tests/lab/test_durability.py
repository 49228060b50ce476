"""Durability: what the guest was told is safe survives ``kill -9`` of pyvmm.

The FLUSH contract these tests hold (README "Disks"):

* ``cache=writeback`` (default): a write request completes once ``pwritev`` has put it in the host's page
  cache; a guest FLUSH (``sync``, ``fsync``) completes after ``fdatasync`` of the image.  pyvmm keeps no
  data of its own: when the pyvmm process dies, everything it completed is in the host kernel, and
  everything the guest flushed is on the host's disk.
* ``cache=none``: the image is opened ``O_DIRECT``; a write request completes once the host's device
  accepted it (no host page cache).  So data the guest wrote with ``O_DIRECT`` is in the image as soon as
  the guest's write returned, even without a FLUSH.  (A volatile write cache *in the host's disk* still
  needs the guest's FLUSH, which stays an ``fdatasync``.)

The test boots the default guest with both kinds of disk, has it write, waits for its marker on the
console, sends pyvmm SIGKILL while the guest is still running, then checks the images on the host: the ext4 journal is
replayed as the next mount would (``e2fsck -E journal_only``), ``e2fsck -fn`` finds nothing to fix, and
every file the guest synced has the checksum the guest printed; the O_DIRECT blocks are in the raw image.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.conftest import BOOT_S, VM_GRACE_S, bound_for, vm_timeout
from tests.lab.test_guest_userspace import _debugfs, _debugfs_cat

# The VM boots, writes 2.3 MB and syncs, writes 3 O_DIRECT blocks, then prints its marker: about 20 s more
# than a boot in the lab.  Its --timeout ends it if the marker never comes.
MARKER_TIMEOUT_S = vm_timeout(BOOT_S + 20)
# Around the VM: a 512 MiB ext4 made and loop-mounted for O_DIRECT (inside the lab), a root disk copy with
# debugfs, two e2fsck runs and reading the files back.
HOST_S = 90.0
ROOT_CMDLINE = "console=ttyS0 root=/dev/vda rw init=/init"
FILES = {"a": 4096, "b": 300_001, "c": 2 * 1024 * 1024 + 17}  # name -> size written and synced
DIRECT_CHUNKS = {0: "first", 37: "second", 200: "third"}  # 64 KiB block of /dev/vdb -> pattern word
CHUNK = 64 * 1024

SCRIPT = """\
mkdir -p /durable
{writes}
sync
sha256sum /durable/* | sed 's/^/DURABLE-SHA: /'
{direct}
echo "DURABLE: ready"
# The guest never powers off: pyvmm is killed while it runs.
while :; do sleep 1; done
"""


def _content(name: str, size: int) -> bytes:
    line = f"durable file {name}\n".encode()
    return (line * (size // len(line) + 1))[:size]


def _chunk(word: str) -> bytes:
    line = f"direct {word}\n".encode()
    return (line * (CHUNK // len(line) + 1))[:CHUNK]


def _script() -> str:
    writes = "\n".join(f"yes 'durable file {n}' | head -c {size} > /durable/{n}" for n, size in FILES.items())
    lines = [f"yes 'direct {w}' | head -c {CHUNK} | dd of=/dev/vdb bs={CHUNK} seek={blk} oflag=direct "
             f"iflag=fullblock conv=notrunc 2>/dev/null && echo 'DURABLE-DIRECT: {blk}'"
             for blk, w in DIRECT_CHUNKS.items()]
    return SCRIPT.format(writes=writes, direct="\n".join(lines))


def _o_direct_supported(directory: Path) -> bool:
    probe = directory / ".o_direct_probe"
    probe.write_bytes(b"\0" * 4096)
    try:
        os.close(os.open(probe, os.O_RDWR | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


@pytest.fixture
def image_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory whose filesystem supports O_DIRECT: tmp_path, or (the lab's /tmp is tmpfs + overlayfs,
    which do not) a loop-mounted ext4 made here, which needs root."""
    if _o_direct_supported(tmp_path):
        yield tmp_path
        return
    if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None:
        pytest.skip(f"{tmp_path} does not support O_DIRECT and a loop-mounted ext4 needs root and mkfs.ext4")
    backing, mnt = tmp_path / "ext4.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(backing, "wb") as f:
        f.truncate(512 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(backing)], check=True, timeout=120)
    mounted = subprocess.run(["mount", "-o", "loop", str(backing), str(mnt)], capture_output=True, text=True,
                             timeout=120)
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount an ext4 for O_DIRECT: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        # lazy: a teardown must not hang the lab tier, whatever still holds the mount
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=120)


def _fd_flags(pid: int, path: Path) -> list[int]:
    """The open flags of every descriptor of ``pid`` on ``path`` (from /proc/PID/fdinfo)."""
    flags = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != str(path):
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        m = re.search(r"^flags:\s+([0-7]+)", info, re.M)
        if m:
            flags.append(int(m[1], 8))
    return flags


def _boot_and_kill(images: Path, rootfs: Path, data: Path, console: Path) -> tuple[str, list[int]]:
    """Boot, wait for ``DURABLE: ready``, SIGKILL pyvmm.  Returns the console and the data disk's fd flags."""
    stderr_log = console.with_name("pyvmm-stderr.log")
    args = [sys.executable, "-m", "pyvmm", "run", "--kernel", str(images / "vmlinux"), "--memory", "256M",
            "--disk", f"path={rootfs},cache=writeback", "--disk", f"path={data},cache=none",
            "--console", f"file:{console}", "--timeout", f"{MARKER_TIMEOUT_S:g}",
            "--cmdline", f"{ROOT_CMDLINE} pyvmm.test=/etc/durable.sh"]
    with open(stderr_log, "wb") as err:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    t0 = time.monotonic()
    try:
        # pyvmm's own --timeout ends a VM that never gets there (with its report on stderr)
        deadline = t0 + MARKER_TIMEOUT_S + VM_GRACE_S
        text = ""
        while time.monotonic() < deadline and proc.poll() is None:
            text = console.read_text(errors="replace") if console.exists() else ""
            if "DURABLE: ready" in text:
                break
            time.sleep(0.2)

        def explain() -> str:
            return (f"pyvmm status {proc.poll()} after {time.monotonic() - t0:.1f} s (--timeout "
                    f"{MARKER_TIMEOUT_S:g} s)\n--- stderr ---\n{stderr_log.read_text(errors='replace')[-3000:]}"
                    f"\n--- console tail ---\n{text[-3000:]}")

        assert "DURABLE: ready" in text, explain()
        assert proc.poll() is None, "pyvmm ended before the kill\n" + explain()
        flags = _fd_flags(proc.pid, data)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        return text, flags
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _check_filesystem(rootfs: Path, console: str) -> None:
    replay = subprocess.run(["e2fsck", "-E", "journal_only", "-p", str(rootfs)], capture_output=True, text=True)
    assert replay.returncode in (0, 1), replay.stdout + replay.stderr  # 1: the journal was replayed
    fsck = subprocess.run(["e2fsck", "-fn", str(rootfs)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    for name, size in FILES.items():
        digest = hashlib.sha256(_content(name, size)).hexdigest()
        assert f"DURABLE-SHA: {digest}  /durable/{name}" in console, console[-3000:]
        assert _debugfs_cat(rootfs, f"/durable/{name}") == _content(name, size), name


def _prepare_root(images: Path, directory: Path) -> Path:
    rootfs = directory / "rootfs.ext4"
    shutil.copyfile(images / "rootfs.ext4", rootfs)
    script = directory / "durable.sh"
    script.write_text(_script())
    _debugfs(rootfs, "cd /etc", f"write {script} durable.sh", write=True)
    return rootfs


@pytest.mark.lab(bound_s=bound_for(MARKER_TIMEOUT_S, host_s=HOST_S))
def test_synced_and_o_direct_writes_survive_sigkill(images: Path, image_dir: Path, e2fsprogs: None) -> None:
    """One boot, both contracts: the root disk (``cache=writeback``) holds files the guest wrote and
    synced; the raw data disk (``cache=none``) holds O_DIRECT writes the guest never synced.  After kill -9
    both are in their images and the root filesystem passes fsck."""
    rootfs = _prepare_root(images, image_dir)
    data = image_dir / "data.img"
    with open(data, "wb") as f:
        f.truncate(16 << 20)
    console, flags = _boot_and_kill(images, rootfs, data, image_dir / "console.log")
    # RawDisk keeps a buffered descriptor (it holds the lock; requests O_DIRECT refuses) beside the direct one
    assert any(f & os.O_DIRECT for f in flags), f"data disk not opened O_DIRECT: {[oct(f) for f in flags]}"
    for blk in DIRECT_CHUNKS:
        assert f"DURABLE-DIRECT: {blk}" in console, console[-3000:]
    raw = data.read_bytes()
    for blk, word in DIRECT_CHUNKS.items():
        assert raw[blk * CHUNK:(blk + 1) * CHUNK] == _chunk(word), f"block {blk}"
    untouched = bytearray(raw)
    for blk in DIRECT_CHUNKS:
        untouched[blk * CHUNK:(blk + 1) * CHUNK] = bytes(CHUNK)
    assert not any(untouched), "bytes outside the written blocks changed"
    _check_filesystem(rootfs, console)
