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
grep -q " /dev " /proc/mounts || mount -t devtmpfs devtmpfs /dev
# Boot-timing mark for bench/boot.py (pyvmm/devices/boottimer.py at layout.BOOT_TIMER_ADDR): user space runs.
devmem 0xd0008000 8 1 2>/dev/null || true

echo "PYVMM-INIT: uname $(uname -r -m)"
if [ -e /dev/vda ]; then
    echo "PYVMM-INIT: vda present"
fi
# Test hook (tests/lab/): with pyvmm.test=PATH on the kernel command line, run the script PATH, which
# the test put into its copy of the root disk (the image stays the same for every other boot).
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        pyvmm.test=*)
            echo "PYVMM-INIT: test ${arg#pyvmm.test=}"
            sh "${arg#pyvmm.test=}"
            echo "PYVMM-INIT: test status $?"
            ;;
    esac
done
echo "PYVMM-INIT: done"
# `make run` adds pyvmm.shell=1: a shell on the console; leaving it (exit, Ctrl-D) ends the guest.
case " $(cat /proc/cmdline) " in
    *" pyvmm.shell=1 "*)
        echo "PYVMM-INIT: shell (exit or Ctrl-D ends the guest; Ctrl-A x stops the VM)"
        HOME=/root setsid cttyhack sh
        ;;
esac

sync
# The VMM ends the guest on the reset (cmdline has reboot=k: i8042 reset, else triple fault).
reboot -f
# Only reached if reboot(2) failed.
echo b > /proc/sysrq-trigger
while :; do sleep 1; done
