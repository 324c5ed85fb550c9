#!/bin/sh
# Stage 2 of the ublkml test-bed guest: PID 1 after switch_root.
#
# The root is now the host's file system (read-only 9p) under a tmpfs overlay,
# and /run/ublkml is the per-run control share, where the host has put:
#   job.sh   the user's command (cd, exported environment, exec /bin/sh -c ...)
#   share    optional: absolute path of a host directory to mount writable at
#            the same path in the guest (9p tag "share")
#   emulator.json  optional: the emulated drives and the QMP port's name
#            (ublk_driver.testbed.emulator reads it)
#   emulator.modules  optional: the modprobe command lines for their drivers
# and where this script leaves:
#   started  created just before job.sh runs (the host times the boot with it)
#   rc       the exit code of job.sh -- the host reads it from here, never
#            from the console
#   error    a one-line message if the test bed itself failed
#   kernel.log  the guest's dmesg after the command
#   emulator.error  a one-line message if the drives' drivers failed to load
#
# Runs under the host's /bin/sh (dash on Debian), with the host's tools.
# It prints nothing unless something fails.

CTL=/run/ublkml

power_off() {
    # No sync: the 9p shares are uncached (every write has already reached
    # the host) and a stuck block device could make sync hang forever.
    echo o > /proc/sysrq-trigger
    # Wait with shell builtins only: while powering off, the 9p devices go
    # away, and exec'ing /bin/sleep from the host root would fail with EIO.
    while :; do read -r _ < /dev/console; done 2> /dev/null
}

fail() {
    printf '%s\n' "$*" > "$CTL/error"
    echo "ublkml-testbed: $*" >&2
    power_off
}

mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
# Python's multiprocessing needs a writable /dev/shm.
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t bpf -o mode=0700 bpf /sys/fs/bpf || fail "cannot mount bpffs on /sys/fs/bpf"
[ -d /sys/kernel/tracing ] && mount -t tracefs tracefs /sys/kernel/tracing
[ -d /sys/kernel/debug ] && mount -t debugfs debugfs /sys/kernel/debug
[ -d /sys/kernel/config ] && mount -t configfs configfs /sys/kernel/config
[ -d /sys/fs/cgroup ] && mount -t cgroup2 cgroup2 /sys/fs/cgroup
# Tests may talk over localhost (e.g. nbd over TCP); nothing else is networked.
ip link set lo up 2>/dev/null || busybox ip link set lo up 2>/dev/null

# The guest kernel's modules (the host has none for it): same path as on a
# normal system, so modprobe finds them.  mkdir follows /lib -> usr/lib.
mkdir -p /lib/modules
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose modules /lib/modules \
    || fail "cannot mount the kernel modules (9p tag modules)"

if ! out=$(modprobe ublk_drv 2>&1); then
    fail "modprobe ublk_drv failed: $out"
fi
[ -c /dev/ublk-control ] || fail "modprobe ublk_drv succeeded but /dev/ublk-control is missing"

# The emulated drives' drivers: without udev nothing loads them on demand.
# The host lists one modprobe command line per line in emulator.modules (nvme;
# sd_mod, then ahci limited to the ports in use).  They load in the background:
# that takes ~2 s under TCG, mostly on the otherwise idle second vCPU while the
# command starts; ublk_driver.testbed.emulator waits for the drives, and finds
# a failure in emulator.error.
if [ -r "$CTL/emulator.modules" ]; then
    (
        while read -r line; do
            # $line unquoted on purpose: a module name and its parameters.
            if ! out=$(modprobe $line 2>&1); then
                printf '%s\n' "modprobe $line failed: $out" > "$CTL/emulator.error"
                break
            fi
        done < "$CTL/emulator.modules"
    ) &
fi

if [ -r "$CTL/share" ]; then
    IFS= read -r share < "$CTL/share"
    mkdir -p "$share" || fail "cannot create the share mount point $share"
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 share "$share" \
        || fail "cannot mount the share at $share"
fi

: > "$CTL/started"
/bin/sh "$CTL/job.sh" < /dev/null
rc=$?
dmesg > "$CTL/kernel.log" 2>&1
# Write then rename: the host never sees a half-written file.
echo "$rc" > "$CTL/rc.tmp" && mv "$CTL/rc.tmp" "$CTL/rc"
power_off
