"""The aarch64 machine, end to end, in the arm64 KVM lab.

Runs on the x86 host (not marked ``lab``): ``pyvmm.lab`` starts ``qemu-system-aarch64 -M
virt,virtualization=on,gic-version=3 -cpu max`` with Debian's arm64 kernel, whose ``/dev/kvm`` is KVM on an
emulated EL2; inside, the arm64 root's Python runs ``python3 -m pyvmm run`` from this project tree, which
boots our cross-built arm64 guest (images/arm64.py) with its root on virtio-blk.  The guest writes a file,
reads it and a host-provided file back, and ends the VM through the guest exit device with the status of
its ``--exec`` command; the image must hold what the guest wrote.  Then the initramfs powers off through
PSCI, and a kernel without a root device panics: its pvpanic driver reports the panic (the device tree's
``qemu,pvpanic-mmio`` node) before ``panic=-1`` resets through PSCI.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pyvmm.devices.virtio import barrier
from pyvmm.lab import LabOptions, run, unavailable_reason
from pyvmm.lab.qemu import AARCH64_GIC_ENV
from tests.lab.conftest import LAB_TIER_SUMMARY, bound_for, vm_timeout
from tests.lab.test_guest_userspace import INIT_MARKERS, _debugfs, _debugfs_cat

ROOT = Path(__file__).resolve().parents[2]
ARM64 = ROOT / "images" / "out" / "arm64"
# Bounds (the whole test took about 1.5 minutes here): the arm64 lab's start (7-22 s measured), then two
# pyvmm runs one after the other inside it, each with its own --timeout: the root-disk boot with the test
# script and the exit device (~60 s expected, Python's start in the lab included), the initramfs boot
# straight to poweroff (~30 s) and the kernel that panics (~30 s).
ARM64_LAB_START_S = 60.0
DISK_RUN_TIMEOUT_S = vm_timeout(60.0)
INITRD_RUN_TIMEOUT_S = vm_timeout(30.0)
PANIC_RUN_TIMEOUT_S = vm_timeout(30.0)
LAB_TIMEOUT_S = ARM64_LAB_START_S + bound_for(DISK_RUN_TIMEOUT_S, INITRD_RUN_TIMEOUT_S, PANIC_RUN_TIMEOUT_S,
                                              host_s=0)
# The test's pytest-timeout: the lab run, and around it a root disk copy, debugfs and e2fsck on the host.
TEST_BOUND_S = LAB_TIMEOUT_S + 60.0

GUEST_FILE = ("pyvmm arm64 guest file\n" * 40000).encode()  # 920 kB
HOST_FILE = bytes((i * 13 + 5) & 0xFF for i in range(200_000))
SCRIPT = f"""\
mkdir -p /arm64-test
yes 'pyvmm arm64 guest file' | head -c {len(GUEST_FILE)} > /arm64-test/written
sync
echo 3 > /proc/sys/vm/drop_caches
echo "ARM64-WRITTEN: $(sha256sum /arm64-test/written)"
echo "ARM64-HOST: $(sha256sum /etc/pyvmm-host-file)"
echo "ARM64-CPUS: $(grep -c ^processor /proc/cpuinfo)"
echo "ARM64-IRQCHIP: $(grep -m1 -o 'GIC[v0-9-]*' /proc/interrupts)"
"""
# The irqchip name Linux shows in /proc/interrupts: the GICv3 driver's "GICv3", the GICv2 driver's "GIC-0".
# The lab's own GIC (PYVMM_LAB_AARCH64_GIC, default 3) decides which vGIC its KVM can offer pyvmm.
IRQCHIP = {"3": "GICv3", "2": "GIC-0"}


@pytest.fixture
def arm64_images() -> Path:
    missing = [n for n in ("Image", "rootfs.ext4") if not (ARM64 / n).is_file()]
    if missing:
        pytest.skip(f"arm64 guest images missing ({', '.join(missing)}): run `python3 images/arm64.py`")
    return ARM64


@pytest.mark.timeout(TEST_BOUND_S, method="signal")
def test_arm64_guest_boots_on_virtio_blk_in_the_arm64_lab(arm64_images: Path, tmp_path: Path,
                                                          e2fsprogs: None) -> None:
    reason = unavailable_reason(arch="aarch64")
    if reason:
        pytest.skip(reason)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    rootfs = scratch / "rootfs.ext4"
    shutil.copyfile(arm64_images / "rootfs.ext4", rootfs)
    (tmp_path / "test.sh").write_text(SCRIPT)
    (tmp_path / "host-file").write_bytes(HOST_FILE)
    _debugfs(rootfs, "cd /etc", f"write {tmp_path / 'test.sh'} arm64-test.sh",
             f"write {tmp_path / 'host-file'} pyvmm-host-file", write=True)
    console, console2 = scratch / "console.log", scratch / "console-initrd.log"
    console3 = scratch / "console-panic.log"
    common = ["python3", "-m", "pyvmm", "run", "--kernel", str(arm64_images / "Image")]
    # Run 1: the root on virtio-blk, the test script, then an --exec command whose status comes back
    # through the guest exit device (32 + 5).
    disk_run = [*common, "--timeout", f"{DISK_RUN_TIMEOUT_S:g}", "--memory", "256M", "--cpus", "2",
                "--disk", f"path={rootfs}", "--console", f"file:{console}",
                "--cmdline", "console=ttyS0 root=/dev/vda rw init=/init pyvmm.test=/etc/arm64-test.sh",
                "--exec", "echo ARM64-PVPANIC: $(ls /sys/bus/platform/drivers/pvpanic-mmio | grep -c pvpanic); exit 5"]
    # Run 2: the initramfs (found through /chosen linux,initrd-*; /sbin/poweroff exists only there) whose
    # first program is `poweroff -f` (PSCI SYSTEM_OFF).
    initrd_run = [*common, "--timeout", f"{INITRD_RUN_TIMEOUT_S:g}", "--memory", "128M",
                  "--initrd", str(arm64_images / "initrd.cpio.gz"), "--console", f"file:{console2}",
                  "--cmdline", "console=ttyS0 rdinit=/sbin/poweroff -- -f"]
    # Run 3: no root device and panic=-1: the panic, pvpanic's report of it (--no-panic-exit: a log line),
    # then the reset through PSCI SYSTEM_RESET.
    panic_run = [*common, "--timeout", f"{PANIC_RUN_TIMEOUT_S:g}", "--memory", "128M", "--no-panic-exit",
                 "--console", f"file:{console3}", "--cmdline", "console=ttyS0 root=/dev/vdz panic=-1"]
    # The virtqueue's barriers on an arm64 host: dmb machine code, called (barrier.py).
    barrier_check = ["python3", "-c", "from pyvmm.devices.virtio import barrier as b\n"
                     "for f in (b.rmb, b.wmb, b.mb) * 10000: f()\n"
                     "print('ARM64-BARRIER:', b.KIND, b.code_bytes().hex())"]
    script = (f"{shlex.join(barrier_check)}; "
              f"{shlex.join(disk_run)}; echo \"ARM64-RUN1: $?\"; "
              f"{shlex.join(initrd_run)}; echo \"ARM64-RUN2: $?\"; "
              f"{shlex.join(panic_run)}; echo \"ARM64-RUN3: $?\"")
    output = bytearray()
    result = run(LabOptions(command=["sh", "-c", script], cwd=ROOT, scratch=scratch, timeout=LAB_TIMEOUT_S,
                            arch="aarch64"), out=output.extend)
    out = output.decode(errors="replace")
    text = console.read_text(errors="replace") if console.exists() else ""
    text2 = console2.read_text(errors="replace") if console2.exists() else ""
    text3 = console3.read_text(errors="replace") if console3.exists() else ""
    explain = (f"lab status {result.status} {result.reason} (lab timeout {LAB_TIMEOUT_S:g} s)\n"
               f"--- pyvmm output ---\n{out}"
               f"\n--- guest console ---\n{text[-4000:]}\n--- initrd guest console ---\n{text2[-2000:]}"
               f"\n--- panicking guest console ---\n{text3[-2000:]}"
               f"\n--- lab console ---\n{result.boot_log[-3000:]}")
    assert result.status == 0, explain
    gic = os.environ.get(AARCH64_GIC_ENV) or "3"
    words = [barrier.DMB_ISHLD, barrier.RET, barrier.DMB_ISHST, barrier.RET, barrier.DMB_ISH, barrier.RET]
    assert f"ARM64-BARRIER: dmb {struct.pack('<6I', *words).hex()}" in out, explain
    assert "ARM64-RUN1: 37" in out and "guest exited with status 5 (guest exit device)" in out, explain
    assert "ARM64-PVPANIC: 1" in text and "PYVMM-EXEC: end 5" in text, explain  # the driver bound
    assert "ARM64-RUN2: 0" in out and "guest powered off" in out, explain
    assert "ARM64-RUN3: 0" in out and "guest rebooted" in out, explain
    assert "the guest reported a panic through pvpanic (panicked)" in out, explain
    assert f"vGICv{gic}" in out, explain
    positions = [text.find(m) for m in INIT_MARKERS]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), explain
    assert re.search(r"PYVMM-INIT: uname \S+ aarch64", text), explain
    assert "PYVMM-INIT: test status 0" in text, explain
    assert f"ARM64-WRITTEN: {hashlib.sha256(GUEST_FILE).hexdigest()}  /arm64-test/written" in text, explain
    assert f"ARM64-HOST: {hashlib.sha256(HOST_FILE).hexdigest()}  /etc/pyvmm-host-file" in text, explain
    assert "ARM64-CPUS: 2" in text, explain
    assert f"ARM64-IRQCHIP: {IRQCHIP[gic]}" in text, explain
    assert _debugfs_cat(rootfs, "/arm64-test/written") == GUEST_FILE
    fsck = subprocess.run(["e2fsck", "-fn", str(rootfs)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    timing = f"lab boot {result.boot_s:.1f} s, " if result.boot_s is not None else ""
    LAB_TIER_SUMMARY.append(f"arm64 lab (vGICv{gic}): pyvmm booted the arm64 guest to /init on virtio-blk and back; "
                            f"{timing}total {result.total_s:.1f} s")
