#!/bin/sh
# pyvmm default guest /init (busybox sh). Used as /init both in initrd.cpio.gz and in
# rootfs.ext4 (boot the latter with `root=/dev/vda init=/init`). The PYVMM-INIT: lines are
# matched by pyvmm's boot tests: keep them exactly as they are.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

echo "PYVMM-INIT: start"

mount -t proc proc /proc
mount -t sysfs sysfs /sys
# With root=/dev/vda the kernel has already mounted devtmpfs on /dev (DEVTMPFS_MOUNT);
# in the initramfs it has not.
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev

echo "PYVMM-INIT: uname $(uname -r -m)"
if [ -e /dev/vda ]; then
    echo "PYVMM-INIT: vda present"
fi
echo "PYVMM-INIT: done"

sync
# The VMM ends the guest on the reset (cmdline has reboot=k: i8042 reset, else triple fault).
reboot -f
# Only reached if reboot(2) failed.
echo b > /proc/sysrq-trigger
while :; do sleep 1; done
