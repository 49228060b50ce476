#!/bin/sh
# /init of the arm64 KVM lab's initramfs (images/out/arm64/lab/initrd.cpio.gz, built by images/arm64.py;
# busybox sh).  The lab kernel is Debian's stock arm64 kernel, so what the lab needs from it that is a
# module comes in this initramfs: /lib/modules/*.ko, loaded in the order of /lib/modules/load-order
# (dependencies first; computed at build time from each module's .modinfo).
#
# Then: the lab root is the 9p share "host" (virtio-mmio, QEMU -fsdev ... -device virtio-9p-device,
# mount_tag=host), read-only, the lower layer of an overlayfs whose upper layer is a tmpfs, so the root is
# writable and the share is never written to; if overlayfs fails, the root is the read-only share itself.
# pyvmm/lab/init.sh (here /lab-init.sh) goes into the new root as /.pyvmm-lab-init.sh and runs as
# `/bin/sh /.pyvmm-lab-init.sh` after switch_root, with this process's environment: the kernel hands its
# unknown name=value arguments (PYVMM_LAB_SCRATCH, PYVMM_LAB_MOUNTS) to init as environment variables.
# On failure: "PYVMM-LAB: error: ..." and "PYVMM-LAB: exit 125" (read by the lab runner), then a reset
# (with QEMU's -no-reboot, QEMU exits).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

ninep="trans=virtio,version=9p2000.L,msize=262144,cache=loose"

fail() {
    echo "PYVMM-LAB: error: $*"
    echo "PYVMM-LAB: exit 125"
    sync
    echo b > /proc/sysrq-trigger
    while :; do sleep 1; done
}

mount -t proc proc /proc || fail "initramfs: cannot mount /proc"
mount -t sysfs sysfs /sys || fail "initramfs: cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "initramfs: cannot mount devtmpfs on /dev"
# The loopback interface, for what listens on 127.0.0.1 in the lab (pyvmm's gdb server in its tests): the
# lab root has no ip command, this busybox does (pyvmm/lab/init.sh tries again there, as on x86).
ip link set lo up || echo "PYVMM-LAB: warning: no loopback interface"

while read -r ko; do
    name=${ko%.ko}
    [ -d "/sys/module/$(echo "$name" | tr - _)" ] && continue
    insmod "/lib/modules/$ko" || fail "initramfs: insmod $ko failed"
done < /lib/modules/load-order

mount -t 9p -o "ro,$ninep" host /lower \
    || fail "initramfs: cannot mount the lab root (9p share \"host\") on /lower"
mount -t tmpfs -o mode=755 tmpfs /upper || fail "initramfs: cannot mount a tmpfs on /upper"
mkdir -p /upper/root /upper/work
if mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/root,workdir=/upper/work /newroot; then
    cp /lab-init.sh /newroot/.pyvmm-lab-init.sh || fail "initramfs: cannot copy the lab init script"
    chmod 755 /newroot/.pyvmm-lab-init.sh
else
    echo "pyvmm-lab initramfs: overlayfs failed: the lab root is the read-only 9p share itself"
    mount -o bind /lower /newroot || fail "initramfs: cannot bind-mount /lower on /newroot"
    # The root has an empty /.pyvmm-lab-init.sh for this (images/arm64.py).
    mount -o bind /lab-init.sh /newroot/.pyvmm-lab-init.sh \
        || fail "initramfs: cannot bind-mount the lab init script into the read-only root"
fi
[ -x /newroot/bin/sh ] || fail "initramfs: the lab root has no /bin/sh"

# The new root gets /dev as it is (pyvmm/lab/init.sh mounts devtmpfs only where /dev is no mount point);
# it mounts proc and sysfs itself.
mount --move /dev /newroot/dev || fail "initramfs: cannot move /dev into the new root"
umount /sys
umount /proc
exec switch_root /newroot /bin/sh /.pyvmm-lab-init.sh
