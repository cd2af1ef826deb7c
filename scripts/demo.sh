#!/usr/bin/env bash
# `make demo`: replicates a small dataset tree from one throw-away pool to
# another through zfsync-send and zfsync-recv on 127.0.0.1, twice (a full and
# an incremental run), and checks that every snapshot arrived with the same
# GUID. Needs root (ZFS); on a fresh Debian machine it installs and starts
# zfs-fuse through scripts/zfs-setup.sh. Everything it creates (two file-backed
# pools, certificates, logs) lives under a temporary directory and is removed
# at the end, also on failure or Ctrl-C.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

say() { printf '\n== %s\n' "$*"; }
die() {
    echo "demo: ERROR: $*" >&2
    exit 1
}

[ "$(id -u)" -eq 0 ] || die "the demo needs root, to create and destroy ZFS pools: run 'sudo make demo'"

# --- prerequisites ---------------------------------------------------------------
say "setting up ZFS"
bash scripts/zfs-setup.sh || die "ZFS could not be set up (see above)"

if ! command -v openssl >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "openssl is not installed"
    echo "installing openssl"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null; }; then
        die "cannot install openssl (apt-get install openssl)"
    fi
fi
if ! command -v cargo >/dev/null 2>&1; then
    for d in "$HOME/.cargo/bin" ${SUDO_USER:+"$(getent passwd "$SUDO_USER" | cut -d: -f6)/.cargo/bin"}; do
        if [ -x "$d/cargo" ]; then
            PATH="$d:$PATH"
            break
        fi
    done
fi
command -v cargo >/dev/null 2>&1 ||
    die "cargo is not installed (install Rust from https://rustup.rs, or put cargo on PATH)"

say "building release binaries (cargo build --release)"
cargo build --release --quiet
bin="${CARGO_TARGET_DIR:-target}/release"
send="$bin/zfsync-send"
recv="$bin/zfsync-recv"
if [ ! -x "$send" ] || [ ! -x "$recv" ]; then
    die "zfsync-send/zfsync-recv not found in $bin after the build"
fi

# --- scratch space and cleanup ---------------------------------------------------
tmp=$(mktemp -d /tmp/zfsync-demo.XXXXXX)
src_pool="zdemosrc$$"
dst_pool="zdemodst$$"
recv_pid=""

# present / absent / unknown (the daemon does not answer: not the same as absent).
pool_state() {
    local names
    names=$(zpool list -H -o name 2>/dev/null) || {
        echo unknown
        return
    }
    if grep -qxF "$1" <<<"$names"; then echo present; else echo absent; fi
}
pool_exists() { [ "$(pool_state "$1")" = present ]; }

cleanup() {
    local rc=$? p
    set +e
    trap - EXIT INT TERM
    if [ -n "$recv_pid" ] && kill -0 "$recv_pid" 2>/dev/null; then
        kill -TERM "$recv_pid" 2>/dev/null
        for _ in $(seq 1 50); do
            kill -0 "$recv_pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$recv_pid" 2>/dev/null
        wait "$recv_pid" 2>/dev/null
    fi
    for p in "$src_pool" "$dst_pool"; do
        # zfs-fuse unmounts asynchronously: the first attempts may say "busy".
        for _ in $(seq 1 20); do
            case $(pool_state "$p") in
            absent) break ;;
            present) zpool destroy -f "$p" >/dev/null 2>&1 && break ;;
            esac
            sleep 1
        done
        if [ "$(pool_state "$p")" != absent ]; then
            echo "demo: WARNING: could not destroy pool $p (try: zpool destroy -f $p)" >&2
            [ "$rc" -ne 0 ] || rc=1
        fi
    done
    # Mounts of the pools live under $tmp/mnt; wait until they are gone so
    # that rm never walks into a file system that is still mounted.
    for _ in $(seq 1 25); do
        grep -qF " $tmp/" /proc/mounts || break
        sleep 0.2
    done
    if grep -qF " $tmp/" /proc/mounts; then
        echo "demo: WARNING: file systems still mounted under $tmp; leaving it" >&2
    else
        rm -rf --one-file-system "$tmp"
    fi
    if [ "$rc" -eq 0 ]; then
        echo "demo: cleaned up (pools $src_pool and $dst_pool destroyed)"
    else
        echo "demo: FAILED (exit status $rc); cleaned up" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

show_log() { # file
    echo "---- last lines of $1:" >&2
    tail -n 30 "$1" >&2 || true
    echo "----" >&2
}

# --- pools, certificates, the source tree ------------------------------------------
say "creating pools $src_pool and $dst_pool (256M files in $tmp)"
mkdir -p "$tmp/mnt"
truncate -s 256M "$tmp/src.img" "$tmp/dst.img"
# "Defaulting to 4K blocksize" on stderr is zfs-fuse chatter, not an error.
zpool create -m "$tmp/mnt/$src_pool" "$src_pool" "$tmp/src.img" 2>&1 | grep -v 'Defaulting to 4K blocksize' || true
zpool create -m "$tmp/mnt/$dst_pool" "$dst_pool" "$tmp/dst.img" 2>&1 | grep -v 'Defaulting to 4K blocksize' || true
if ! pool_exists "$src_pool" || ! pool_exists "$dst_pool"; then
    die "zpool create failed"
fi

say "making certificates"
bash scripts/make-certs.sh "$tmp/certs" >/dev/null
certs="$tmp/certs"

src="$src_pool/data"
dst="$dst_pool/replica"
say "creating the source tree $src"
for ds in "" home home/alice home/bob projects projects/web-site projects/db_2024 var var/log.old; do
    zfs create -p "$src${ds:+/$ds}"
done
mnt() { zfs get -H -o value mountpoint "$1"; }
put() { # dataset file text
    local dir
    dir=$(mnt "$1")
    [ -d "$dir" ] || die "$1 is not mounted at $dir"
    printf '%s\n' "$3" >"$dir/$2"
}
put "$src/home/alice" notes.txt "alice's notes, version 1"
put "$src/home/bob" todo.txt "replicate the backups"
put "$src/projects/web-site" index.html "<h1>hello from zfsync</h1>"
put "$src/projects/db_2024" schema.sql "CREATE TABLE t (id int);"
put "$src/var/log.old" messages "$(seq 1 2000 | sed 's/^/log line /')"
head -c 1M /dev/urandom >"$(mnt "$src/projects/db_2024")/data.bin"
zfs snapshot -r "$src@demo-1"
zfs list -t all -o name,used,refer -r "$src"

# --- the receiver ------------------------------------------------------------------
say "starting zfsync-recv on 127.0.0.1, receiving into $dst"
recv_log="$tmp/recv.log"
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port=""
for candidate in $(seq 17878 17897); do
    port_in_use "$candidate" && continue
    : >"$recv_log"
    "$recv" -l 127.0.0.1 -p "$candidate" --ca "$certs/ca.pem" --cert "$certs/receiver.pem" \
        --key "$certs/receiver.key" --allow-client zfsync-sender "$dst" 2>>"$recv_log" &
    recv_pid=$!
    for _ in $(seq 1 100); do
        grep -q "listening on" "$recv_log" && break
        kill -0 "$recv_pid" 2>/dev/null || break
        sleep 0.1
    done
    if grep -q "listening on" "$recv_log"; then
        port=$candidate
        break
    fi
    if kill -0 "$recv_pid" 2>/dev/null; then
        show_log "$recv_log"
        die "zfsync-recv did not report 'listening on' within 10 s"
    fi
    wait "$recv_pid" 2>/dev/null || true
    recv_pid=""
    grep -q "cannot listen" "$recv_log" || {
        show_log "$recv_log"
        die "zfsync-recv exited at start-up"
    }
done
[ -n "$port" ] || die "no free port in 17878-17897 for zfsync-recv"
grep -m1 "listening on" "$recv_log"

send_run() { # label
    local out="$tmp/send-$1.out" rc=0
    "$send" -t 4 -p "$port" --ca "$certs/ca.pem" --cert "$certs/sender.pem" \
        --key "$certs/sender.key" -o "$tmp/send-$1.log" "$src" 127.0.0.1 >"$out" 2>&1 || rc=$?
    cat "$out"
    if [ "$rc" -ne 0 ]; then
        show_log "$tmp/send-$1.log"
        show_log "$recv_log"
        die "zfsync-send exited with status $rc ($1 run)"
    fi
}

# --- first run: everything is new ------------------------------------------------------
say "zfsync-send (first run: full streams), -t 4"
send_run full
say "source tree"
zfs list -t all -o name -r "$src"
say "replica"
zfs list -t all -o name -r "$dst"

# --- second run: one change, incremental ----------------------------------------------
say "changing $src/home/alice and taking @demo-2"
put "$src/home/alice" notes.txt "alice's notes, version 2"
zfs snapshot -r "$src@demo-2"
say "zfsync-send (second run: incremental), -t 4"
send_run incremental

# --- the check ----------------------------------------------------------------------
say "comparing snapshot GUIDs"
# "name<TAB>guid" for every snapshot, names relative to the replicated root.
guids() { # root
    zfs get -H -p -r -o name,value guid "$1" |
        awk -F '\t' -v root="$1" '
            index($1, "@") && (index($1, root "@") == 1 || index($1, root "/") == 1) {
                print substr($1, length(root) + 1) "\t" $2
            }' | LC_ALL=C sort
}
guids "$src" >"$tmp/src.guids"
guids "$dst" >"$tmp/dst.guids"
n=$(wc -l <"$tmp/src.guids")
[ "$n" -gt 0 ] || die "no snapshots found under $src"
if ! diff -u --label "source $src" --label "replica $dst" "$tmp/src.guids" "$tmp/dst.guids"; then
    die "the replica's snapshots differ from the source's (diff above)"
fi
expected=$((9 * 2))
[ "$n" -eq "$expected" ] || die "expected $expected snapshots, found $n"
echo "demo OK: $n snapshots identical"
