"""Prepare the Debian stock-kernel guest of tests/lab/test_debian_acpi.py in images/out/debian-acpi/.

Debian's ``linux-image-cloud-amd64`` has ACPI but no ``virtio_mmio.device=`` support
(CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is off, virtio_mmio and virtio_blk are modules): it can only find
pyvmm's disks through the DSDT's LNRO0005 devices.  This script fetches the package with
``apt-get download`` (or takes a .deb given on the command line), copies its bzImage, and builds an
initramfs of busybox-static and the four virtio modules whose /init loads them, reports what it sees
(``PYVMM-DEB:`` lines) and powers off (ACPI S5).

    python images/debian_acpi.py [linux-image-*.deb]
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out" / "debian-acpi"
MODULES = ("kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko",
           "kernel/drivers/virtio/virtio_mmio.ko", "kernel/drivers/block/virtio_blk.ko",
           # pvpanic: the driver binds to the DSDT's QEMU0001 device (pyvmm's port 0x505)
           "kernel/drivers/misc/pvpanic/pvpanic.ko", "kernel/drivers/misc/pvpanic/pvpanic-mmio.ko")
INIT = """#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
# Load in dependency order whatever that order is in this kernel build (virtio_ring and virtio
# need each other's symbols differently across Debian's 6.1 updates): retry until all are in.
for pass in 1 2 3 4; do
  for m in virtio_ring virtio virtio_mmio virtio_blk; do
    [ -d /sys/module/$m ] || $B insmod /lib/modules/$m.ko 2>/dev/null
  done
done
for m in virtio_ring virtio virtio_mmio virtio_blk; do
  [ -d /sys/module/$m ] || echo "PYVMM-DEB: module $m did not load"
done
$B sleep 2
echo "PYVMM-DEB: platform devices: $($B ls /sys/bus/platform/devices | $B tr '\\n' ' ')"
echo "PYVMM-DEB: cpus online: $($B cat /sys/devices/system/cpu/online)"
$B insmod /lib/modules/pvpanic.ko 2>/dev/null; $B insmod /lib/modules/pvpanic-mmio.ko 2>/dev/null
echo "PYVMM-DEB: pvpanic devices: $($B ls /sys/bus/platform/drivers/pvpanic-mmio 2>/dev/null | $B grep -c QEMU0001)"
# pyvmm.deb.crash=1: crash the kernel (sysrq c), as a test of the panic verdict through pvpanic
case " $($B cat /proc/cmdline) " in
  *" pyvmm.deb.crash=1 "*) echo "PYVMM-DEB: crashing"; echo c > /proc/sysrq-trigger ;;
esac
if [ -e /sys/block/vda ]; then
  echo "PYVMM-DEB: vda found, $($B cat /sys/block/vda/size) sectors, at $($B readlink -f /sys/block/vda)"
else
  echo "PYVMM-DEB: no vda"
fi
echo "PYVMM-DEB: powering off"
$B poweroff -f
"""


def _download(tmp: Path) -> Path:
    subprocess.run(["apt-get", "download", "linux-image-cloud-amd64"], cwd=tmp, check=True)
    meta = next(tmp.glob("linux-image-cloud-amd64_*.deb"))
    depends = subprocess.run(["dpkg-deb", "-f", str(meta), "Depends"], capture_output=True, text=True,
                             check=True).stdout
    pkg = next(d.split()[0] for d in depends.split(",") if d.strip().startswith("linux-image-"))
    subprocess.run(["apt-get", "download", pkg], cwd=tmp, check=True)
    return next(tmp.glob(f"{pkg}_*.deb"))


def main(argv: list[str]) -> int:
    busybox = shutil.which("busybox")
    if busybox is None:
        print("busybox is missing: apt-get install busybox-static", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        deb = Path(argv[0]) if argv else _download(tmp)
        root = tmp / "root"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        vmlinuz = next((root / "boot").glob("vmlinuz-*"))
        moddir = next((root / "lib" / "modules").iterdir())
        init = tmp / "initramfs"
        for sub in ("bin", "dev", "proc", "sys", "lib/modules"):
            (init / sub).mkdir(parents=True)
        shutil.copy2(busybox, init / "bin" / "busybox")
        for m in MODULES:
            shutil.copyfile(moddir / m, init / "lib" / "modules" / Path(m).name)
        (init / "init").write_text(INIT)
        (init / "init").chmod(0o755)
        names = subprocess.run(["find", "."], cwd=init, capture_output=True, check=True).stdout
        archive = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=init, input=names,
                                 capture_output=True, check=True).stdout
        OUT.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(vmlinuz, OUT / "vmlinuz")
        (OUT / "initrd.cpio.gz").write_bytes(gzip.compress(archive, 1))
        (OUT / "kernel-version").write_text(moddir.name + "\n")
    print(f"{OUT}: vmlinuz, initrd.cpio.gz ({moddir.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
