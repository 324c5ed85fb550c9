#!/bin/busybox sh
# /init of the ublkml test-bed initramfs (busybox sh, runs as PID 1).
#
# Stage 1 of the guest boot.  Its only job is to build the guest's root file
# system and hand over to stage 2:
#   - load the few modules needed for that (listed, in load order, in
#     /modules/order by the host when it built the initramfs),
#   - mount the host's whole file system read-only over virtio-9p (tag
#     "hostroot") and put a tmpfs overlay on top, so the guest may write
#     anywhere but nothing reaches the host,
#   - mount the per-run control share (tag "ctl", writable) at /run/ublkml,
#   - switch_root into the overlay and exec /run/ublkml/stage2.sh.
# Everything that may change from run to run lives in stage 2, which the host
# copies into the control share for each run: editing it needs no re-provision.
#
# This file is copied verbatim into the initramfs; the host keeps its sha256 in
# testbed.json and rebuilds the initramfs when the file changes.
#
# It prints nothing unless something fails, so that the guest console shows
# only the command's own output.

/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

# No ctl share yet, so a failure here can only be reported on the console.
# The host notices the missing exit-code file and shows the console tail.
fail() {
    echo "ublkml-testbed: stage 1: $*" >&2
    echo o > /proc/sysrq-trigger
    sleep 60
}

mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"

for m in $(cat /modules/order); do
    insmod "/modules/$m.ko" || fail "insmod $m failed"
done

opts=trans=virtio,version=9p2000.L,msize=512000
# cache=loose: the host root is read-only for the guest, so caching is safe
# and it makes Python imports over 9p several times faster.
mount -t 9p -o "$opts,ro,cache=loose" hostroot /mnt/root \
    || fail "cannot mount the host root (9p tag hostroot)"
mount -t tmpfs -o mode=0755,size=75% tmpfs /mnt/rw || fail "cannot mount tmpfs"
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay -o lowerdir=/mnt/root,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work \
    overlay /newroot || fail "cannot mount the overlay root"

# /run is private to the guest (the host's /run content is of no use here).
mount -t tmpfs -o mode=0755 tmpfs /newroot/run || fail "cannot mount /run"
mkdir -p /newroot/run/ublkml
# cache=none (the default): each write reaches the host at once, so the exit
# code file is on the host before the guest powers off.
mount -t 9p -o "$opts" ctl /newroot/run/ublkml || fail "cannot mount the control share"
[ -r /newroot/run/ublkml/stage2.sh ] || fail "stage2.sh missing from the control share"

for d in dev proc sys; do
    mount --move "/$d" "/newroot/$d" || fail "cannot move /$d"
done

exec switch_root /newroot /bin/sh /run/ublkml/stage2.sh
fail "switch_root failed"
