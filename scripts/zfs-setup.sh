#!/usr/bin/env bash
# Makes ZFS usable on this host, as root. Idempotent: run it as often as you like.
#
#   scripts/zfs-setup.sh
#
# - Kernel OpenZFS that works (`zfs version` succeeds or /sys/module/zfs exists,
#   and `zpool list` answers): nothing to do.
# - Otherwise ZFS runs in user space with Debian's zfs-fuse: the package is
#   installed if missing, the daemon is started if not running (it runs
#   `zfs-fuse --no-daemon`, detached, logging to /tmp/zfs-fuse.log), and the
#   script waits until `zpool list` answers. Pools left FAULTED/UNAVAIL by
#   earlier runs whose backing files are gone are destroyed.
#
# Exits non-zero with a message when ZFS cannot be set up: CI must fail then,
# not skip the tests that need ZFS.
set -euo pipefail

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

LOG=/tmp/zfs-fuse.log
WAIT_SECONDS=30 # for `zpool list` to answer once a daemon was started

say() { echo "zfs-setup: $*"; }
die() {
    echo "zfs-setup: ERROR: $*" >&2
    exit 1
}

# `zpool list` answers (bounded: a wedged daemon must not hang CI). While a
# daemon is exiting, zpool may abort: the subshell keeps bash's "Aborted"
# report and any core file out of the way.
zpool_ok() {
    (
        ulimit -c 0
        timeout 10 zpool list
        exit $?
    ) >/dev/null 2>&1
}

# PIDs of live zfs-fuse processes, from /proc (pgrep is not on every minimal
# image). Zombies do not count: they hold no lock.
fuse_pids() {
    local d comm state
    for d in /proc/[0-9]*; do
        comm=$(cat "$d/comm" 2>/dev/null) || continue
        [ "$comm" = zfs-fuse ] || continue
        state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "$d/status" 2>/dev/null) || continue
        [ "$state" = Z ] && continue
        echo "${d#/proc/}"
    done
}

# --- 1. kernel OpenZFS ---------------------------------------------------------
if command -v zfs >/dev/null 2>&1 && command -v zpool >/dev/null 2>&1; then
    if { zfs version >/dev/null 2>&1 || [ -d /sys/module/zfs ]; } && zpool_ok; then
        say "kernel OpenZFS works ($(zfs version 2>/dev/null | sed -n 1p || echo 'module loaded')); nothing to do"
        exit 0
    fi
fi

[ "$(id -u)" -eq 0 ] || die "must run as root (try: sudo bash $0): ZFS needs root to install and start zfs-fuse"

# --- 2. the zfs-fuse package ---------------------------------------------------
if ! command -v zfs-fuse >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 ||
        die "zfs-fuse is not installed and there is no apt-get to install it (install zfs-fuse or OpenZFS by hand)"
    say "installing zfs-fuse with apt-get (about a minute)"
    apt-get update -qq || die "apt-get update failed"
    # Without systemd the package's attempt to start the service fails; that
    # is harmless (the daemon is started below), so the exit status is only
    # reported, and what counts is that the binary is there afterwards.
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq zfs-fuse >/tmp/zfs-setup-apt.log 2>&1; then
        say "apt-get install zfs-fuse reported an error (often just the service start without systemd); checking the binaries"
        tail -n 5 /tmp/zfs-setup-apt.log | sed 's/^/    /'
    fi
    command -v zfs-fuse >/dev/null 2>&1 ||
        die "zfs-fuse is still missing after apt-get install (see /tmp/zfs-setup-apt.log)"
fi
for tool in zfs zpool; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found although zfs-fuse is installed"
done

# --- 3. the daemon ---------------------------------------------------------------
start_daemon() {
    if [ ! -c /dev/fuse ]; then
        modprobe fuse >/dev/null 2>&1 || true
        [ -c /dev/fuse ] || say "warning: /dev/fuse is missing (containers need --device /dev/fuse --cap-add SYS_ADMIN); datasets cannot be mounted"
    fi
    say "starting zfs-fuse --no-daemon (log: $LOG)"
    (
        # What /etc/init.d/zfs-fuse sets before starting the daemon.
        ulimit -v unlimited 2>/dev/null || true
        ulimit -l unlimited 2>/dev/null || true
        ulimit -s unlimited 2>/dev/null || true
        unset LANG
        cd /
        exec setsid nohup zfs-fuse --no-daemon </dev/null >>"$LOG" 2>&1
    ) &
}

if zpool_ok && [ -n "$(fuse_pids)" ]; then
    say "zfs-fuse is running (pid $(fuse_pids | tr '\n' ' ' | sed 's/ $//')) and answers"
else
    # A daemon that is still exiting holds its lock, and a new one started
    # meanwhile exits silently: start one only when none is alive, and start
    # again if the one started exits without answering. A process that is
    # alive but not answering yet may be starting up: wait for it.
    if [ -n "$(fuse_pids)" ]; then
        say "zfs-fuse is running (pid $(fuse_pids | tr '\n' ' ' | sed 's/ $//')) but does not answer yet; waiting"
    fi
    deadline=$((SECONDS + 2 * WAIT_SECONDS))
    starts=0
    until zpool_ok; do
        if [ -z "$(fuse_pids)" ]; then
            [ "$starts" -lt 3 ] || {
                tail -n 20 "$LOG" 2>/dev/null | sed 's/^/    /' >&2
                die "zfs-fuse exited $starts times without answering (log above, from $LOG)"
            }
            starts=$((starts + 1))
            start_daemon
            deadline=$((SECONDS + WAIT_SECONDS))
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 20 "$LOG" 2>/dev/null | sed 's/^/    /' >&2
            die "zpool list does not answer after waiting (zfs-fuse pids: $(fuse_pids | tr '\n' ' ')log: $LOG)"
        fi
        sleep 0.5
    done
    say "zfs-fuse answers (pid $(fuse_pids | tr '\n' ' ' | sed 's/ $//'))"
fi

# --- 4. leftovers of earlier runs ----------------------------------------------
# After a restart, pools whose backing files were removed come back FAULTED
# (or UNAVAIL). Only those are destroyed: a pool whose file still exists is
# someone's and is left alone.
pools=$(timeout 20 zpool list -H -o name,health) || die "zpool list -H -o name,health failed"
while IFS=$'\t' read -r name health; do
    [ -n "$name" ] || continue
    case "$health" in
    FAULTED | UNAVAIL) ;;
    *) continue ;;
    esac
    # The vdev paths of the pool, from `zpool status` (absolute paths in its
    # config section, including OpenZFS's "was /path").
    files=$(timeout 20 zpool status "$name" 2>/dev/null | grep -oE '(^|[[:space:]])/[^[:space:]]+' | sed 's/^[[:space:]]*//' || true)
    gone=""
    for f in $files; do
        [ -e "$f" ] || gone="$gone $f"
    done
    if [ -z "$gone" ]; then
        say "pool $name is $health but its backing files exist or are unknown; leaving it alone"
        continue
    fi
    say "destroying leftover pool $name ($health; missing:$gone)"
    ok=""
    for _ in 1 2 3 4 5; do
        if timeout 30 zpool destroy -f "$name" >/dev/null 2>&1; then
            ok=1
            break
        fi
        sleep 1
    done
    if [ -z "$ok" ] && timeout 20 zpool list -H -o name 2>/dev/null | grep -xF "$name" >/dev/null; then
        die "cannot destroy the leftover pool $name (zpool destroy -f $name)"
    fi
done <<<"$pools"

say "ZFS is ready (zfs-fuse); pools: $(timeout 20 zpool list -H -o name 2>/dev/null | tr '\n' ' ' | sed 's/ $//' | sed 's/^$/none/')"
