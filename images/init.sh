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
# pyvmm's MMIO pages (pyvmm/arch/*/layout.py): the boot timer (x86 only) and the guest exit device,
# whose status register ends the VM with a status of the guest's choosing (pyvmm/devices/guestexit.py).
case "$(uname -m)" in
    x86_64) boot_timer=0xd0008000; exit_status_reg=0xd0009008 ;;
    aarch64) boot_timer=; exit_status_reg=0x09002008 ;;
    *) boot_timer=; exit_status_reg= ;;
esac
# Boot-timing mark for bench/boot.py (pyvmm/devices/boottimer.py): user space runs.
[ -n "$boot_timer" ] && { devmem "$boot_timer" 8 1 2>/dev/null || true; }

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

# pyvmm run --exec CMD (pyvmm/guestexec.py): pyvmm.exec="CMD", pyvmm.exec=WORD or pyvmm.exec64=BASE64 on
# the command line.  Run it, say where its output begins and ends, flush the disks, report its status.
cmdline=" $(cat /proc/cmdline)"
exec_cmd=
exec_given=
case "$cmdline" in
    *' pyvmm.exec64='*)
        exec_given=1
        v=${cmdline#* pyvmm.exec64=}
        exec_cmd=$(echo "${v%% *}" | base64 -d) ;;
    *' pyvmm.exec="'*)
        exec_given=1
        v=${cmdline#* pyvmm.exec=\"}
        exec_cmd=${v%%\"*} ;;
    *' pyvmm.exec='*)
        exec_given=1
        v=${cmdline#* pyvmm.exec=}
        exec_cmd=${v%% *} ;;
esac
if [ -n "$exec_given" ]; then
    echo "PYVMM-EXEC: begin"
    HOME=/root sh -c "$exec_cmd"
    status=$?
    printf '\nPYVMM-EXEC: end %s\n' "$status"
    sync
    [ -n "$exit_status_reg" ] && devmem "$exit_status_reg" 32 "$status"
    echo "PYVMM-INIT: the guest exit device did not end the VM; rebooting"
else
    # `make run` adds pyvmm.shell=1: a shell on the console; leaving it (exit, Ctrl-D) ends the guest.
    case "$cmdline " in
        *" pyvmm.shell=1 "*)
            echo "PYVMM-INIT: shell (exit or Ctrl-D ends the guest; Ctrl-A x stops the VM)"
            HOME=/root setsid cttyhack sh
            ;;
    esac
fi

sync
# The VMM ends the guest on the reset (cmdline has reboot=k: i8042 reset, else triple fault).
reboot -f
# Only reached if reboot(2) failed.
echo b > /proc/sysrq-trigger
while :; do sleep 1; done
