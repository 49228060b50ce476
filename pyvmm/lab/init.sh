#!/bin/sh
# /init of the KVM lab (pyvmm/lab/qemu.py boots the lab kernel with `init=<this file>`; keep it executable).
#
# The lab's root is the host's / over 9p, read-only; this script runs on the host's own /bin/sh.
# Environment from the kernel command line (qemu.py):
#   PYVMM_LAB_SCRATCH   host path of the writable scratch share (9p tag "scratch"), mounted at the
#                       same path here; $PYVMM_LAB_SCRATCH/.pyvmm-lab/ holds run.sh (the command, its
#                       working directory and environment) and receives "status"
#   PYVMM_LAB_MOUNTS    more writable shares, "tag:path tag:path ..." (9p tags rw0, rw1, ...)
# The console lines "PYVMM-LAB: ..." are read by qemu.py: keep them as they are.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

ninep="trans=virtio,version=9p2000.L,msize=262144"

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm 2>/dev/null
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
# /tmp: the host's /tmp (read-only, from the 9p root) under a writable tmpfs layer, so paths under the
# host's /tmp still exist here; a plain tmpfs where overlayfs refuses.
mkdir -p /run/lab/tmp-upper /run/lab/tmp-work
mount -t overlay overlay -o lowerdir=/tmp,upperdir=/run/lab/tmp-upper,workdir=/run/lab/tmp-work /tmp 2>/dev/null \
    || mount -t tmpfs -o mode=1777 tmpfs /tmp
chmod 1777 /tmp

# Loopback up: tests talk to a VM over 127.0.0.1 (pyvmm run --gdb).  The host's ip, else busybox's.
ip link set lo up 2>/dev/null || busybox ip link set lo up 2>/dev/null || busybox ifconfig lo 127.0.0.1 up 2>/dev/null

fail() {
    echo "PYVMM-LAB: error: $*"
    echo "PYVMM-LAB: exit 125"
    echo b > /proc/sysrq-trigger
    while :; do sleep 1; done
}

share() { # tag path
    mkdir -p "$2" 2>/dev/null
    mount -t 9p -o "$ninep" "$1" "$2" || fail "cannot mount the 9p share $1 on $2"
}

# An x86 lab kernel without a TSC frequency has a KVM that never enters a guest (pyvmm/lab/tsc.py): say so
# at once instead of letting every VM in the lab hang.
if dmesg 2>/dev/null | grep -q "could not calculate TSC khz"; then
    fail "the lab kernel could not calibrate its TSC (host too loaded, and no tsc_early_khz= given): its KVM cannot run guests"
fi
[ -n "$PYVMM_LAB_SCRATCH" ] || fail "PYVMM_LAB_SCRATCH is not set (not started by pyvmm.lab?)"
share scratch "$PYVMM_LAB_SCRATCH"
for m in $PYVMM_LAB_MOUNTS; do
    share "${m%%:*}" "${m#*:}"
done
ctl="$PYVMM_LAB_SCRATCH/.pyvmm-lab"
[ -r "$ctl/run.sh" ] || fail "$ctl/run.sh is missing"
unset PYVMM_LAB_MOUNTS

# Quiet from here on: only the command's output reaches the console.
echo 1 > /proc/sys/kernel/printk 2>/dev/null
echo "PYVMM-LAB: start $(cut -d' ' -f1 /proc/uptime)"
# setsid -c: the command gets the console as its controlling terminal (Ctrl-C, job control).
if command -v setsid >/dev/null 2>&1; then
    setsid -c -w /bin/sh "$ctl/run.sh" </dev/console >/dev/console 2>&1
else
    /bin/sh "$ctl/run.sh" </dev/console >/dev/console 2>&1
fi
status=$?
echo "$status" > "$ctl/status"
sync
echo "PYVMM-LAB: exit $status $(cut -d' ' -f1 /proc/uptime)"
# microvm without ACPI cannot power off: reset (reboot=t: triple fault), and QEMU's -no-reboot exits.
echo b > /proc/sysrq-trigger
while :; do sleep 1; done
