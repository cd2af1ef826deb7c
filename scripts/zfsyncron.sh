#!/usr/bin/env bash
# zfsyncron.sh: the cron entry point. Takes this run's snapshot, sends, prunes.
#
#   zfsyncron.sh [-s N] [-m N] [-h N] [-d N] [-c CLASS] [-p PORT] [-t THREADS] [-o LOGFILE]
#                --ca FILE --cert FILE --key FILE [--server-name NAME]
#                SOURCE_DATASET RECEIVER_HOST
#
# -s -m -h -d  how many snapshots of each class to keep (defaults 1, 4, 3, 2)
# -c CLASS     force the class (S, M, H or D); otherwise the clock decides:
#              D at 00:00, H at minute 0 of any other hour, M at minutes 15,
#              30 and 45, S at every other minute. Run it from cron every minute
#              (or every 15 minutes, or hourly: the classes follow).
# -p -t -o     as for zfsync-send (port, worker connections, log file)
# TLS options  passed to zfsync-send as they are, and so are -v, --zfs,
#              --timeout, --full, --dry-run and --delete-missing
#
# One lock per source: two cron lines for two receivers of one source must not
# start at the same minute (the second would exit 75); run them one after the
# other on one line instead: `zfsyncron.sh ... A; zfsyncron.sh -c S ... B`.
#
# All the work is zfsync-send's: `--snapshot CLASS` takes one recursive snapshot
# SOURCE@<yymmdd-HHMMSS>_<CLASS>, the run sends it, and `--keep N` prunes that
# class beyond N, never the last snapshot the receiver confirmed. This script
# only picks the class and keeps two runs for one source from overlapping.
#
# Exit status: zfsync-send's (0 in sync, 1 some dataset failed, 2 usage,
# 3 receiver unreachable), or 75 when another run for SOURCE holds the lock.
# Environment: ZFSYNC_SEND (default: zfsync-send on PATH), ZFSYNC_LOCKDIR
# (default /run/lock, else /tmp).
set -euo pipefail

usage() {
    sed -n '3,6p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

die() {
    echo "zfsyncron: $*" >&2
    exit 2
}

keep_S=1 keep_M=4 keep_H=3 keep_D=2
class=""
pass=()
while [ $# -gt 0 ]; do
    case "$1" in
    -s | -m | -h | -d | -c | -p | -t | -o | --ca | --cert | --key | --server-name | --zfs | --timeout)
        if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value"; fi ;;
    esac
    case "$1" in
    -s) keep_S=$2; shift 2 ;;
    -m) keep_M=$2; shift 2 ;;
    -h) keep_H=$2; shift 2 ;;
    -d) keep_D=$2; shift 2 ;;
    -c) class=$2; shift 2 ;;
    -p | -t | -o | --ca | --cert | --key | --server-name | --zfs | --timeout)
        pass+=("$1" "$2"); shift 2 ;;
    -v | -vv | -vvv | --full | --dry-run | --delete-missing) pass+=("$1"); shift ;;
    --help) usage ;;
    -*) echo "zfsyncron: unknown option $1" >&2; usage ;;
    *) break ;;
    esac
done
[ $# -eq 2 ] || usage
source_ds=$1
receiver=$2

for n in "$keep_S" "$keep_M" "$keep_H" "$keep_D"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "keep counts are whole numbers of at least 1 (got $n)"
done
command -v flock >/dev/null 2>&1 || die "flock(1) is not installed (Debian: util-linux; FreeBSD: pkg install flock)"
if [ -z "$class" ]; then
    hm=$(date +%H%M)
    case "$hm" in
    0000) class=D ;;
    ??00) class=H ;;
    ??15 | ??30 | ??45) class=M ;;
    *) class=S ;;
    esac
fi
class=$(printf '%s' "$class" | tr '[:lower:]' '[:upper:]')
case "$class" in
S) keep=$keep_S ;; M) keep=$keep_M ;; H) keep=$keep_H ;; D) keep=$keep_D ;;
*) die "-c takes S, M, H or D (got $class)" ;;
esac

lockdir=${ZFSYNC_LOCKDIR:-/run/lock}
[ -d "$lockdir" ] && [ -w "$lockdir" ] || lockdir=/tmp
# Hex of the name: distinct sources never share a lock file.
lock="$lockdir/zfsyncron-$(printf '%s' "$source_ds" | od -An -tx1 | tr -d ' \n').lock"
exec 9>>"$lock" || die "cannot open the lock file $lock"
if ! flock -n 9; then
    echo "zfsyncron: another run for $source_ds is still active (lock $lock); this one exits" >&2
    exit 75
fi

# exec: zfsync-send inherits the lock and holds it until it exits, whatever
# happens to it; a killed run never leaves a stale lock behind.
exec "${ZFSYNC_SEND:-zfsync-send}" "${pass[@]}" --snapshot "$class" --keep "$keep" \
    "$source_ds" "$receiver"
