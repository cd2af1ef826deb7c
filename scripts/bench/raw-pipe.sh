#!/usr/bin/env bash
# The benchmark's baseline (`make bench`): the plain `zfs send | zfs receive`
# pipe, one dataset after the other, parents first.
#
#   raw-pipe.sh [--via PORT] ZFS_SEND ZFS_RECV SOURCE DEST PREV SNAP
#   raw-pipe.sh --serve ZFS_RECV          (the receiving end for --via)
#
# Lists SOURCE's tree with one `zfs list -r` (ZFS_SEND), then for each dataset
# sends SNAP, incrementally from PREV with `-I` (PREV empty: a full stream),
# into `zfs receive -u` (ZFS_RECV) of the same relative name under DEST.
# ZFS_SEND and ZFS_RECV are the zfs binaries to run (the benchmark passes
# wrappers that count calls).
#
# --via PORT sends each stream over TCP to 127.0.0.1:PORT (socat), where a
# `socat TCP-LISTEN:...,fork EXEC:'raw-pipe.sh --serve ZFS_RECV'` reads the
# destination's name from the first line, receives the rest and answers
# "rc=STATUS". Exits non-zero at the first dataset that fails.
set -euo pipefail

if [ "${1:-}" = "--serve" ]; then
    zr=${2:?}
    IFS= read -r name || exit 1
    rc=0
    "$zr" receive -u "$name" >&2 || rc=$?
    echo "rc=$rc"
    exit 0
fi

via=""
if [ "${1:-}" = "--via" ]; then
    via=${2:?}
    shift 2
fi
[ $# -eq 6 ] || {
    echo "usage: raw-pipe.sh [--via PORT] ZFS_SEND ZFS_RECV SOURCE DEST PREV SNAP" >&2
    exit 2
}
zs=$1 zr=$2 src=$3 dst=$4 prev=$5 snap=$6

mapfile -t datasets < <("$zs" list -H -o name -r "$src")
[ "${#datasets[@]}" -gt 0 ] || exit 1
for ds in "${datasets[@]}"; do
    target="$dst${ds#"$src"}"
    if [ -n "$prev" ]; then
        args=(send -I "$ds@$prev" "$ds@$snap")
    else
        args=(send "$ds@$snap")
    fi
    if [ -z "$via" ]; then
        "$zs" "${args[@]}" | "$zr" receive -u "$target"
    else
        answer=$({
            printf '%s\n' "$target"
            "$zs" "${args[@]}"
        } | socat -t 60 - "TCP:127.0.0.1:$via")
        if [ "$answer" != "rc=0" ]; then
            echo "raw-pipe: $ds -> $target: receiver answered '${answer:-nothing}'" >&2
            exit 1
        fi
    fi
done
