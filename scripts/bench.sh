#!/usr/bin/env bash
# zfsync's benchmark (`make bench`, as root, from the project root): zfsync
# against the plain `zfs send | zfs receive` pipe and against peers, on
# throw-away file-backed pools. Prints Markdown tables and writes them to
# target/bench/latest.md. It is a measurement, never a pass/fail test (it
# exits non-zero only when it cannot run at all).
#
# Workload W: 43 datasets of 2 MiB in 3 levels (top, 6 children, 6 x 6
# grandchildren) plus one of 400 MiB, incompressible data from a fixed-seed
# generator (AES-CTR of zeros). Steps, with the benchmark taking every snapshot
# (`zfs snapshot -r`) once for all contestants:
#   a  full, into a fresh destination
#   b  +1 MiB appended in 10 datasets, new snapshot
#   c  new snapshot, nothing changed
#   d  nothing new (run again)
# Contestants, each with its own destination pool:
#   raw      zfs send [-I prev] | zfs receive -u, per dataset, parents first
#            (scripts/bench/raw-pipe.sh): the baseline, ratios are X / raw
#   zfsync   -t 1 and -t 4, zfsync-recv on 127.0.0.1 (sender run without
#            --snapshot); ZFSYNC_SEND_ARGS adds sender arguments
#   peers    syncoid and pyznap, local to local, if they install and run
# Also: zfs calls per dataset per side (through counting --zfs wrappers, or a
# `zfs` wrapper first on PATH for the peers), client CPU and peak RSS
# (GNU time), receiver daemon CPU and VmHWM (/proc), throughput of the
# 400 MiB dataset alone, the receiver's peak memory with -t 8, scale trees of
# small datasets, and a WAN mode through scripts/bench/latency-proxy.py.
#
# Knobs (environment):
#   BENCH_QUICK=1        W only, no peers, no scale trees, WAN on (a few minutes)
#   BENCH_PEERS          peers to run (default "syncoid pyznap"; "" none)
#   BENCH_SCALE          scale tree sizes (default "200 1000"; "" none)
#   BENCH_SCALE_PEERS=1  run the peers on the scale trees too (default off)
#   BENCH_WAN=0          skip the WAN mode
#   BENCH_DELAY_MS       one-way delay of the WAN proxy (default 25: 50 ms RTT)
#   BENCH_REPEAT=N       run each timed step N times, report the median
#                        (the destination is put back between runs, untimed)
#   BENCH_POOL_SIZE      size of each pool's (sparse) file (default 2G)
#   ZFSYNC_SEND_ARGS     extra zfsync-send arguments (e.g. "--compress")
set -euo pipefail

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export LC_ALL=C
cd "$(dirname "$0")/.."
ROOT=$(pwd)

QUICK=${BENCH_QUICK:-0}
if [ "$QUICK" = 1 ]; then
    PEERS=${BENCH_PEERS-}
    SCALE=${BENCH_SCALE-}
else
    PEERS=${BENCH_PEERS-syncoid pyznap}
    SCALE=${BENCH_SCALE-200 1000}
fi
SCALE_PEERS=${BENCH_SCALE_PEERS:-0}
WAN=${BENCH_WAN:-1}
DELAY_MS=${BENCH_DELAY_MS:-25}
REPEAT=${BENCH_REPEAT:-1}
POOL_SIZE=${BENCH_POOL_SIZE:-2G}
read -r -a SEND_EXTRA <<<"${ZFSYNC_SEND_ARGS:-}"

START=$(date +%s.%N)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log() { printf 'bench [%5.0fs] %s\n' "$(awk -v s="$START" -v n="$(date +%s.%N)" 'BEGIN{print n-s}')" "$*" >&2; }
die() {
    echo "bench: ERROR: $*" >&2
    exit 1
}
calc() { awk "BEGIN{printf \"%.${2:-2}f\", $1}"; }

[ "$(id -u)" -eq 0 ] || die "the benchmark needs root (ZFS pools): run 'sudo make bench'"

# --- prerequisites ---------------------------------------------------------------
apt_updated=0
apt_install() { # package
    command -v apt-get >/dev/null 2>&1 || return 1
    if [ "$apt_updated" = 0 ]; then
        apt-get update -qq >/dev/null 2>&1 || true
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null 2>&1
}
need() { # command package
    command -v "$1" >/dev/null 2>&1 && return 0
    log "installing $2"
    apt_install "$2" || die "cannot install $2 (apt-get install $2)"
}
bash scripts/zfs-setup.sh >&2 || die "ZFS could not be set up (see above)"
ZFS=$(command -v zfs) || die "zfs not found"
ZPOOL=$(command -v zpool)
[ -x /usr/bin/time ] || { log "installing time"; apt_install time || die "cannot install time (GNU time)"; }
need openssl openssl
need python3 python3
need flock util-linux
[ "$WAN" = 0 ] || need socat socat
if ! command -v cargo >/dev/null 2>&1; then
    for d in "$HOME/.cargo/bin" ${SUDO_USER:+"$(getent passwd "$SUDO_USER" | cut -d: -f6)/.cargo/bin"}; do
        [ -x "$d/cargo" ] && PATH="$d:$PATH" && break
    done
fi
command -v cargo >/dev/null 2>&1 || die "cargo is not installed"
log "building release binaries (cargo build --release)"
cargo build --release --quiet
BIN="${CARGO_TARGET_DIR:-target}/release"
SEND="$ROOT/$BIN/zfsync-send"
RECV="$ROOT/$BIN/zfsync-recv"
[[ "$BIN" = /* ]] && SEND="$BIN/zfsync-send" RECV="$BIN/zfsync-recv"
[ -x "$SEND" ] && [ -x "$RECV" ] || die "zfsync binaries not found in $BIN"
PROXY="$ROOT/scripts/bench/latency-proxy.py"
RAWPIPE="$ROOT/scripts/bench/raw-pipe.sh"
OUTDIR="$ROOT/${CARGO_TARGET_DIR:-target}/bench"
[[ "${CARGO_TARGET_DIR:-}" = /* ]] && OUTDIR="$CARGO_TARGET_DIR/bench"

# --- scratch space, pools, cleanup -------------------------------------------------
tmp=$(mktemp -d /var/tmp/zfsync-bench.XXXXXX)
REPORT="$tmp/report.md"
: >"$REPORT"
TAG="zb$$"
SRCPOOL="${TAG}src"
# The harness's lock (tests/support/lib.rs, turn()): zfs-fuse may deadlock when
# two processes create or mount at the same moment; the tests take turns on it.
LOCK="${TMPDIR:-/tmp}/zfsync-tests-zfs-admin.lock"
POOLS=()
BGPIDS=()
CLK=$(getconf CLK_TCK)

pool_state() {
    local names
    names=$("$ZPOOL" list -H -o name 2>/dev/null) || {
        echo unknown
        return
    }
    if grep -qxF "$1" <<<"$names"; then echo present; else echo absent; fi
}
pool_destroy() {
    local p=$1
    for _ in $(seq 1 30); do
        case $(pool_state "$p") in
        absent) break ;;
        present) flock "$LOCK" "$ZPOOL" destroy -f "$p" >/dev/null 2>&1 && break ;;
        esac
        sleep 1
    done
    [ "$(pool_state "$p")" = absent ] || {
        echo "bench: WARNING: could not destroy pool $p (zpool destroy -f $p)" >&2
        return 1
    }
    rm -f "/var/tmp/$p.img"
}
stop_pid() {
    local pid=$1
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$? p
    set +e
    trap - EXIT INT TERM
    for p in "${BGPIDS[@]}"; do stop_pid "$p"; done
    for p in "${POOLS[@]}"; do pool_destroy "$p" || rc=1; done
    for _ in $(seq 1 50); do
        grep -qF " $tmp/" /proc/mounts || break
        sleep 0.2
    done
    if grep -qF " $tmp/" /proc/mounts; then
        echo "bench: WARNING: file systems still mounted under $tmp; leaving it" >&2
    else
        rm -rf --one-file-system "$tmp"
    fi
    [ "$rc" -eq 0 ] || echo "bench: FAILED (exit status $rc); cleaned up" >&2
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

admin() { flock "$LOCK" "$ZFS" "$@"; }
pool_create() { # name [mountpoint]
    local img="/var/tmp/$1.img"
    truncate -s "$POOL_SIZE" "$img"
    POOLS+=("$1")
    flock "$LOCK" "$ZPOOL" create -m "${2:-none}" "$1" "$img" 2>&1 | grep -v 'Defaulting to 4K' >&2 || true
    [ "$(pool_state "$1")" = present ] || die "zpool create $1 failed"
}

# --- contestants -----------------------------------------------------------------
declare -A LABEL=([raw]="raw pipe" [z1]="zfsync -t 1" [z4]="zfsync -t 4" [z8]="zfsync -t 8"
    [syncoid]="syncoid" [pyznap]="pyznap")
declare -A THREADS=([z1]=1 [z4]=4 [z8]=8)
declare -A DPOOL=([raw]="${TAG}raw" [z1]="${TAG}z1" [z4]="${TAG}z4" [z8]="${TAG}z8"
    [syncoid]="${TAG}sy" [pyznap]="${TAG}pz")
declare -A NA=()   # contestant -> reason it does not run
declare -A RES=()  # "wl|c|step" -> seconds, or FAIL/n/a text
declare -A CALLS=() # "wl|c|step" -> "send recv"
declare -A RSRC=()  # "wl|c|step" -> "wall cpu rss rcpu rcpu_all rhwm"
declare -A BAD=()   # "wl|c|step" -> 1 when the replica check failed
declare -A RPID=() RPORT=() PYZNAP_CONF=()
SCALE_N=()
PYZNAP_CMD=(pyznap)

# zfs wrappers: one line per call, "SIDE VERB", then the real zfs.
mkdir -p "$tmp/wrap"
wrapper_fixed() { # contestant side
    local f="$tmp/wrap/$1-$2"
    printf '#!/bin/sh\necho "%s $1" >>"%s"\nexec %s "$@"\n' "$2" "$tmp/wrap/$1.log" "$ZFS" >"$f"
    chmod +x "$f"
}
wrapper_path() { # contestant: a directory with a `zfs` that tells the side by the pool named
    mkdir -p "$tmp/wrap/$1.path"
    cat >"$tmp/wrap/$1.path/zfs" <<EOF
#!/bin/sh
case "\$*" in
*$SRCPOOL*) side=send ;;
*${DPOOL[$1]}*) side=recv ;;
*) side=other ;;
esac
echo "\$side \$1" >>"$tmp/wrap/$1.log"
exec $ZFS "\$@"
EOF
    chmod +x "$tmp/wrap/$1.path/zfs"
}
calls() { # contestant side
    local n
    n=$(grep -c "^$2 " "$tmp/wrap/$1.log" 2>/dev/null) || true
    echo "${n:-0}"
}

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

CERTS="$tmp/certs"
recv_start() { # key contestant target
    local key=$1 c=$2 target=$3 port pid rlog="$tmp/recv-$1.log" try
    for try in 1 2 3 4 5; do
        port=$(free_port)
        : >"$rlog"
        "$RECV" -l 127.0.0.1 -p "$port" --ca "$CERTS/ca.pem" --cert "$CERTS/receiver.pem" \
            --key "$CERTS/receiver.key" --allow-client zfsync-sender --zfs "$tmp/wrap/$c-recv" \
            "$target" 2>>"$rlog" &
        pid=$!
        BGPIDS+=("$pid")
        for _ in $(seq 1 100); do
            grep -q "listening on" "$rlog" && break
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if grep -q "listening on" "$rlog"; then
            RPID[$key]=$pid RPORT[$key]=$port
            return 0
        fi
        stop_pid "$pid"
        grep -q "cannot listen" "$rlog" || break
    done
    tail -n 20 "$rlog" >&2
    die "zfsync-recv did not start for $target"
}
recv_stop() { # key
    [ -n "${RPID[$1]:-}" ] || return 0
    stop_pid "${RPID[$1]}"
    unset "RPID[$1]"
}
# "self children" CPU seconds of a process (children: those it has reaped).
proc_cpu() {
    awk -v clk="$CLK" '{ sub(/^.*\) /, ""); printf "%.3f %.3f\n", ($12+$13)/clk, ($12+$13+$14+$15)/clk }' "/proc/$1/stat"
}
proc_hwm() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
hwm_reset() { echo 5 >"/proc/$1/clear_refs"; }
fuse_cpu() {
    local pid
    pid=$(pgrep -o -x zfs-fuse 2>/dev/null) || {
        echo 0
        return
    }
    proc_cpu "$pid" | awk '{print $1}'
}

# "rel<TAB>guid" of the newest snapshot (by createtxg) of every dataset under root.
newest_guids() { # root
    "$ZFS" get -H -p -r -o name,property,value guid,createtxg "$1" 2>/dev/null | awk -F '\t' -v root="$1" '
        index($1, "@") {
            split($1, a, "@"); ds = a[1]
            if (ds != root && index(ds, root "/") != 1) next
            if ($2 == "createtxg") txg[$1] = $3; else guid[$1] = $3
            rel[$1] = substr(ds, length(root) + 1)
        }
        END {
            for (s in rel) {
                r = rel[s]
                if (!(r in best) || txg[s] + 0 > bt[r]) { best[r] = guid[s]; bt[r] = txg[s] + 0 }
            }
            for (r in best) print (r == "" ? "/" : r) "\t" best[r]
        }' | sort
}
check_replica() { # src dst -> 0 when every dataset's newest snapshot GUID matches
    local d
    d=$(diff <(newest_guids "$1") <(newest_guids "$2") | grep -c '^[<>]') || true
    if [ "${d:-0}" -ne 0 ]; then
        log "REPLICA CHECK FAILED: $2 differs from $1 in $d line(s) of newest snapshot GUIDs"
        return 1
    fi
}

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{ if (NR%2) printf "%.3f", a[(NR+1)/2]; else printf "%.3f", (a[NR/2]+a[NR/2+1])/2 }'; }

# Puts a destination back to before a step, for BENCH_REPEAT (untimed).
undo_step() { # step dst prev snap
    local step=$1 dst=$2 prev=$3 snap=$4 ds
    case $step in
    a)
        admin destroy -r "$dst" >/dev/null 2>&1 || true
        admin destroy -r "$dst.zfsyncbuffer" >/dev/null 2>&1 || true
        ;;
    b | c)
        admin destroy -r "$dst@$snap" >/dev/null 2>&1 || true
        for ds in $("$ZFS" list -H -o name -r "$dst"); do
            admin rollback "$ds@$prev" >/dev/null 2>&1 || true
        done
        ;;
    esac
}

# One contestant, one step: runs it (BENCH_REPEAT times), records time, zfs
# calls, resources and the replica check.
#   run_step WL C STEP SRC DST PREV SNAP [RECV_KEY] [PORT]
# PORT (zfsync) overrides the receiver's port (the WAN proxy); for raw,
# PORT is the raw listener's proxy port.
run_step() {
    local wl=$1 c=$2 step=$3 src=$4 dst=$5 prev=$6 snap=$7 rkey=${8:-} port=${9:-}
    local k="$wl|$c|$step" r out tf rc t0 t1 s0 r0 s1 r1 rcpu0="" rcpu1 rpid="" times=() cmd=()
    [ -n "${NA[$c]:-}" ] && { RES[$k]="n/a"; return 0; }
    case $c in
    raw)
        cmd=(bash "$RAWPIPE")
        [ -n "$port" ] && cmd+=(--via "$port")
        cmd+=("$tmp/wrap/raw-send" "$tmp/wrap/raw-recv" "$src" "$dst" "$prev" "$snap")
        ;;
    z*)
        rpid=${RPID[$rkey]}
        cmd=("$SEND" -t "${THREADS[$c]}" -p "${port:-${RPORT[$rkey]}}" --ca "$CERTS/ca.pem"
            --cert "$CERTS/sender.pem" --key "$CERTS/sender.key" --zfs "$tmp/wrap/$c-send"
            "${SEND_EXTRA[@]}" "$src" 127.0.0.1)
        ;;
    syncoid)
        cmd=(env "PATH=$tmp/wrap/syncoid.path:$PATH" syncoid --no-privilege-elevation --recursive
            --no-sync-snap --recvoptions=u "$src" "$dst")
        ;;
    pyznap)
        if [ -z "${PYZNAP_CONF[$wl]:-}" ]; then
            PYZNAP_CONF[$wl]="$tmp/pyznap-$wl.conf"
            printf '[%s]\ndest = %s\ndest_auto_create = yes\n' "$src" "$dst" >"${PYZNAP_CONF[$wl]}"
        fi
        cmd=(env "PATH=$tmp/wrap/pyznap.path:$PATH" "${PYZNAP_CMD[@]}" --config "${PYZNAP_CONF[$wl]}" send)
        ;;
    esac
    for r in $(seq 1 "$REPEAT"); do
        [ "$r" -gt 1 ] && undo_step "$step" "$dst" "$prev" "$snap"
        s0=$(calls "$c" send) r0=$(calls "$c" recv)
        if [ -n "$rpid" ]; then
            hwm_reset "$rpid"
            rcpu0=$(proc_cpu "$rpid")
        fi
        out="$tmp/out-$c-$wl-$step-$r.log" tf="$tmp/time-$c-$wl-$step-$r"
        rc=0
        t0=$(date +%s.%N)
        /usr/bin/time -f '%e %U %S %M' -o "$tf" "${cmd[@]}" >"$out" 2>&1 || rc=$?
        t1=$(date +%s.%N)
        s1=$(calls "$c" send) r1=$(calls "$c" recv)
        times+=("$(calc "$t1 - $t0" 3)")
        if [ "$rc" -ne 0 ]; then
            log "$wl step $step: ${LABEL[$c]} exited with status $rc; last lines:"
            tail -n 8 "$out" | sed 's/^/    /' >&2
            [ -n "$rkey" ] && tail -n 5 "$tmp/recv-$rkey.log" | sed 's/^/    recv: /' >&2
            RES[$k]="FAIL (exit $rc)"
            case $c in syncoid | pyznap) NA[$c]="failed at $wl step $step: $(grep -v '^\s*$' "$out" | tail -n 1 | cut -c1-120)" ;; esac
            return 0
        fi
    done
    RES[$k]=$(median "${times[@]}")
    CALLS[$k]="$((s1 - s0)) $((r1 - r0))"
    local tm
    tm=$(tail -n 1 "$tf")
    if [ -n "$rpid" ]; then
        rcpu1=$(proc_cpu "$rpid")
        RSRC[$k]="$(awk -v a="$tm" -v b="$rcpu0" -v c="$rcpu1" -v h="$(proc_hwm "$rpid")" 'BEGIN{
            split(a, t, " "); split(b, x, " "); split(c, y, " ")
            printf "%.2f %.2f %.1f %.2f %.2f %.1f", t[1], t[2]+t[3], t[4]/1024, y[1]-x[1], y[2]-x[2], h/1024 }')"
    else
        RSRC[$k]="$(awk -v a="$tm" 'BEGIN{ split(a, t, " "); printf "%.2f %.2f %.1f - - -", t[1], t[2]+t[3], t[4]/1024 }')"
    fi
    if ! check_replica "$src" "$dst"; then
        BAD[$k]=1
    fi
    log "$wl step $step: ${LABEL[$c]} ${RES[$k]} s${BAD[$k]:+ (REPLICA CHECK FAILED)}"
}

# --- data --------------------------------------------------------------------------
gen() { # seed bytes: deterministic, incompressible (AES-128-CTR of zeros, fixed key)
    head -c "$2" /dev/zero | openssl enc -aes-128-ctr -nosalt -K "$(printf '%032x' "$1")" \
        -iv 0000000000000000000000000000a5a5
}
mnt_of() { echo "$tmp/mnt/src/${1#"$SRCPOOL"/}"; }

# --- the report ------------------------------------------------------------------------
out() { printf '%s\n' "$*" >>"$REPORT"; }
cell() { # wl c step -> "secs (ratio)"
    local k="$1|$2|$3" base="${RES[$1|raw|$3]:-}" v="${RES[$1|$2|$3]:-}"
    if [ -z "$v" ]; then
        printf '—'
    elif ! [[ "$v" =~ ^[0-9.]+$ ]]; then
        printf '%s' "$v"
    elif [ "$2" != raw ] && [[ "$base" =~ ^[0-9.]+$ ]]; then
        printf '%.2f s (%.2f×)' "$v" "$(calc "$v / $base" 3)"
    else
        printf '%.2f s' "$v"
    fi
    [ -z "${BAD[$k]:-}" ] || printf ' ✗ replica differs'
}

# --- set-up ----------------------------------------------------------------------
log "certificates, pools ($POOL_SIZE sparse files in /var/tmp, names ${TAG}*)"
bash scripts/make-certs.sh "$CERTS" >/dev/null
mkdir -p "$tmp/mnt/src"
pool_create "$SRCPOOL" "$tmp/mnt/src"

CONTESTANTS=(raw z1 z4)
for p in $PEERS; do
    case $p in
    syncoid)
        if ! command -v syncoid >/dev/null 2>&1; then
            log "installing sanoid (syncoid)"
            apt_install sanoid || true
        fi
        command -v syncoid >/dev/null 2>&1 || NA[syncoid]="could not be installed (apt-get install sanoid)"
        ;;
    pyznap)
        PYZNAP_CMD=(pyznap)
        if ! python3 -c 'import pyznap' >/dev/null 2>&1; then
            log "installing pyznap (pip)"
            python3 -m pip install -q pyznap >/dev/null 2>&1 || true
        fi
        if ! command -v pyznap >/dev/null 2>&1; then
            PYZNAP_CMD=(python3 -c 'import sys; from pyznap.main import main; sys.exit(main())')
        fi
        python3 -c 'import pyznap' >/dev/null 2>&1 || NA[pyznap]="could not be installed (pip install pyznap)"
        ;;
    *) die "unknown peer '$p' in BENCH_PEERS (syncoid, pyznap)" ;;
    esac
    CONTESTANTS+=("$p")
done
for c in "${CONTESTANTS[@]}" z8; do
    wrapper_fixed "$c" send
    wrapper_fixed "$c" recv
    case $c in syncoid | pyznap) wrapper_path "$c" ;; esac
    : >"$tmp/wrap/$c.log"
    pool_create "${DPOOL[$c]}"
done
# Contestants' order rotates from step to step (ARC warmth, caches).
rotated() { # n -> CONTESTANTS rotated left by n
    local n=$(($1 % ${#CONTESTANTS[@]}))
    echo "${CONTESTANTS[@]:$n}" "${CONTESTANTS[@]:0:$n}"
}
step_snap() { # wl step -> snapshot name
    case $2 in a) echo "${1}1" ;; b) echo "${1}2" ;; c) echo "${1}3" ;; d) echo "${1}3" ;; esac
}
step_prev() {
    case $2 in a) echo "" ;; b) echo "${1}1" ;; c) echo "${1}2" ;; d) echo "${1}3" ;; esac
}

# --- workload W ----------------------------------------------------------------------
W="$SRCPOOL/w"
log "workload W: creating 44 datasets and writing 486 MiB"
W_SMALL=("")
for i in 1 2 3 4 5 6; do
    W_SMALL+=("/c$i")
    for j in 1 2 3 4 5 6; do W_SMALL+=("/c$i/g$j"); done
done
seed=1
for rel in "${W_SMALL[@]}"; do
    admin create "$W$rel"
    gen "$seed" 2M >"$(mnt_of "$W$rel")/data.bin"
    seed=$((seed + 1))
done
admin create "$W/big"
gen 999 400M >"$(mnt_of "$W/big")/data.bin"
grep -qF " $(mnt_of "$W/big") " /proc/mounts || die "$W/big is not mounted at $(mnt_of "$W/big")"
W_N=$((${#W_SMALL[@]} + 1))
W_CHANGED=(/c1 /c2 /c3 /c4 /c1/g1 /c2/g1 /c3/g1 /c4/g1 /c5/g1 /c6/g1)

start_receivers() { # wl suffix: one receiver per zfsync contestant, target POOL/wl
    local c
    for c in "${CONTESTANTS[@]}"; do
        case $c in z*) recv_start "$c-$1$2" "$c" "${DPOOL[$c]}/$1" ;; esac
    done
}
stop_receivers() {
    local c
    for c in "${CONTESTANTS[@]}"; do
        case $c in z*) recv_stop "$c-$1$2" ;; esac
    done
}
dst_of() { # c wl
    echo "${DPOOL[$1]}/$2"
}

start_receivers w ""
si=0
for step in a b c d; do
    snap=$(step_snap w $step) prev=$(step_prev w $step)
    case $step in
    a) "$ZFS" snapshot -r "$W@$snap" ;;
    b)
        for rel in "${W_CHANGED[@]}"; do
            gen $((seed + 1000)) 1M >>"$(mnt_of "$W$rel")/data.bin"
            seed=$((seed + 1))
        done
        "$ZFS" snapshot -r "$W@$snap"
        ;;
    c) "$ZFS" snapshot -r "$W@$snap" ;;
    esac
    log "W step $step (@$snap)"
    for c in $(rotated $si); do
        [ "$step" = d ] && [ "$c" = raw ] && continue
        run_step w "$c" "$step" "$W" "$(dst_of "$c" w)" "$prev" "$snap" "$c-w"
    done
    si=$((si + 1))

    if [ "$step" = a ]; then
        # Throughput: the 400 MiB dataset alone, raw pipe vs zfsync -t 1.
        log "throughput: $W/big alone"
        TP_BYTES=$("$ZFS" get -H -p -o value referenced "$W/big@w1")
        f0=$(fuse_cpu)
        t0=$(date +%s.%N)
        /usr/bin/time -f '%e %U %S %M' -o "$tmp/tp-send" "$ZFS" send "$W/big@w1" |
            /usr/bin/time -f '%e %U %S %M' -o "$tmp/tp-recv" "$ZFS" receive -u "${DPOOL[raw]}/big"
        t1=$(date +%s.%N)
        f1=$(fuse_cpu)
        TP_RAW_S=$(calc "$t1 - $t0" 3)
        TP_RAW_SEND_CPU=$(awk '{print $2+$3}' "$tmp/tp-send")
        TP_RAW_RECV_CPU=$(awk '{print $2+$3}' "$tmp/tp-recv")
        TP_RAW_FUSE=$(calc "$f1 - $f0" 2)
        recv_start tp z1 "${DPOOL[z1]}/big"
        rc0=$(proc_cpu "${RPID[tp]}")
        f0=$(fuse_cpu)
        t0=$(date +%s.%N)
        rc=0
        /usr/bin/time -f '%e %U %S %M' -o "$tmp/tp-zsend" "$SEND" -t 1 -p "${RPORT[tp]}" --ca "$CERTS/ca.pem" \
            --cert "$CERTS/sender.pem" --key "$CERTS/sender.key" "${SEND_EXTRA[@]}" "$W/big" 127.0.0.1 \
            >"$tmp/tp-zsend.out" 2>&1 || rc=$?
        t1=$(date +%s.%N)
        f1=$(fuse_cpu)
        rc1=$(proc_cpu "${RPID[tp]}")
        TP_Z_S=$(calc "$t1 - $t0" 3)
        [ "$rc" -eq 0 ] || TP_Z_S="FAIL (exit $rc)"
        TP_Z_SEND_CPU=$(awk '{print $2+$3}' "$tmp/tp-zsend")
        TP_Z_RECV_CPU=$(awk -v a="$rc0" -v b="$rc1" 'BEGIN{split(a,x," "); split(b,y," "); printf "%.2f", y[2]-x[2]}')
        TP_Z_FUSE=$(calc "$f1 - $f0" 2)
        TP_OK="ok"
        check_replica "$W/big" "${DPOOL[raw]}/big" || TP_OK="raw replica differs"
        check_replica "$W/big" "${DPOOL[z1]}/big" || TP_OK="zfsync replica differs"
        recv_stop tp
        admin destroy -r "${DPOOL[raw]}/big" >/dev/null 2>&1 || true
        admin destroy -r "${DPOOL[z1]}/big" >/dev/null 2>&1 || true

        # Receiver memory with 8 streams: zfsync -t 8, step a of W.
        log "receiver memory: zfsync -t 8, W step a"
        recv_start z8-w z8 "${DPOOL[z8]}/w"
        run_step w z8 a "$W" "${DPOOL[z8]}/w" "" w1 z8-w
        recv_stop z8-w
        pool_destroy "${DPOOL[z8]}" || true
    fi
done
stop_receivers w ""

# --- scale trees ---------------------------------------------------------------------
SCALE_DONE=()
for n in $SCALE; do
    S="$SRCPOOL/s$n"
    kids=10
    [ "$n" -gt 200 ] && kids=20
    per=$((n / kids - 1))
    [ "$per" -ge 0 ] || per=0
    log "scale tree s$n: receiving $((1 + kids * (per + 1))) datasets of 4 KiB (unmounted)"
    # zfs-fuse mounts at most 1000 file systems (beyond that a mount fails and
    # leaves the dataset busy until the daemon restarts): the tree's datasets
    # are received unmounted (-u, mountpoint=none) from one template stream of
    # 4 KiB, whose snapshot is then dropped.
    if [ ! -s "$tmp/tpl.stream" ]; then
        admin create "$SRCPOOL/tpl"
        gen 4242 4K >"$(mnt_of "$SRCPOOL/tpl")/data.bin"
        "$ZFS" snapshot "$SRCPOOL/tpl@x"
        "$ZFS" send "$SRCPOOL/tpl@x" >"$tmp/tpl.stream"
    fi
    "$ZFS" receive -u "$S" <"$tmp/tpl.stream"
    "$ZFS" set mountpoint=none "$S"
    for i in $(seq 1 "$kids"); do
        "$ZFS" receive -u "$S/k$i" <"$tmp/tpl.stream"
        for j in $(seq 1 "$per"); do
            "$ZFS" receive -u "$S/k$i/d$j" <"$tmp/tpl.stream"
        done
    done
    admin destroy -r "$S@x"
    SCALE_N[$n]=$((1 + kids * (per + 1)))
    SCALE_DONE+=("$n")
    sc=(raw z1 z4)
    if [ "$SCALE_PEERS" = 1 ]; then
        for c in "${CONTESTANTS[@]}"; do case $c in syncoid | pyznap) sc+=("$c") ;; esac; done
    fi
    for c in "${sc[@]}"; do case $c in z*) recv_start "$c-s$n" "$c" "${DPOOL[$c]}/s$n" ;; esac; done
    for step in a c d; do
        case $step in a) snap=s1 prev="" ;; c) snap=s3 prev=s1 ;; d) snap=s3 prev=s3 ;; esac
        [ "$step" = d ] || "$ZFS" snapshot -r "$S@$snap"
        log "s$n step $step (@$snap)"
        for c in "${sc[@]}"; do
            [ "$step" = d ] && [ "$c" = raw ] && continue
            run_step "s$n" "$c" "$step" "$S" "${DPOOL[$c]}/s$n" "$prev" "$snap" "$c-s$n"
        done
    done
    for c in "${sc[@]}"; do case $c in z*) recv_stop "$c-s$n" ;; esac; done
done

# --- WAN mode ----------------------------------------------------------------------
WAN_RTT="" WAN_DIRECT=""
proxy_start() { # target_port -> sets PROXY_PORT
    local pf="$tmp/proxy.$1.port" pid
    rm -f "$pf"
    python3 "$PROXY" proxy --target "127.0.0.1:$1" --delay-ms "$DELAY_MS" --port-file "$pf" 2>>"$tmp/proxy.log" &
    pid=$!
    BGPIDS+=("$pid")
    for _ in $(seq 1 50); do
        [ -s "$pf" ] && break
        sleep 0.1
    done
    [ -s "$pf" ] || die "the latency proxy did not start"
    PROXY_PORT=$(cat "$pf") PROXY_PID=$pid
}
if [ "$WAN" != 0 ]; then
    log "WAN mode: ${DELAY_MS} ms each way"
    pf="$tmp/echo.port"
    python3 "$PROXY" echo --port-file "$pf" &
    echo_pid=$!
    BGPIDS+=("$echo_pid")
    for _ in $(seq 1 50); do [ -s "$pf" ] && break; sleep 0.1; done
    proxy_start "$(cat "$pf")"
    WAN_DIRECT=$(python3 "$PROXY" ping "127.0.0.1:$(cat "$pf")" --count 10)
    WAN_RTT=$(python3 "$PROXY" ping "127.0.0.1:$PROXY_PORT" --count 20)
    log "through the proxy: $WAN_RTT (direct: $WAN_DIRECT)"
    stop_pid "$PROXY_PID"
    stop_pid "$echo_pid"

    # A first run to a receiver through the proxy is its first under that
    # name (host and port): the sender confirms, and on zfs-fuse holds,
    # every dataset for it once. That is done untimed first (nothing new
    # yet), so the timed runs show the steady state.
    for c in z1 z4; do
        recv_start "$c-wanw" "$c" "${DPOOL[$c]}/w"
        proxy_start "${RPORT[$c-wanw]}"
        log "WAN W warm-up (untimed): ${LABEL[$c]}"
        run_step wan-warm "$c" d "$W" "${DPOOL[$c]}/w" w3 w3 "$c-wanw" "$PROXY_PORT"
        stop_pid "$PROXY_PID"
        recv_stop "$c-wanw"
    done
    # W, a new snapshot (step c) then nothing new (d).
    "$ZFS" snapshot -r "$W@w4"
    lport=$(free_port)
    socat "TCP-LISTEN:$lport,bind=127.0.0.1,reuseaddr,fork" \
        "EXEC:bash $RAWPIPE --serve $tmp/wrap/raw-recv" 2>>"$tmp/socat.log" &
    BGPIDS+=("$!")
    sleep 0.3
    proxy_start "$lport"
    log "WAN W step c: raw pipe through socat and the proxy"
    run_step wan-w raw c "$W" "$(dst_of raw w)" w3 w4 "" "$PROXY_PORT"
    stop_pid "$PROXY_PID"
    for c in z1 z4; do
        recv_start "$c-wanw" "$c" "${DPOOL[$c]}/w"
        proxy_start "${RPORT[$c-wanw]}"
        for step in c d; do
            log "WAN W step $step: ${LABEL[$c]}"
            run_step wan-w "$c" "$step" "$W" "${DPOOL[$c]}/w" w3 w4 "$c-wanw" "$PROXY_PORT"
        done
        stop_pid "$PROXY_PID"
        recv_stop "$c-wanw"
    done
    big=""
    for n in "${SCALE_DONE[@]}"; do big=$n; done
    if [ -n "$big" ]; then
        for c in z1 z4; do
            recv_start "$c-wans" "$c" "${DPOOL[$c]}/s$big"
            proxy_start "${RPORT[$c-wans]}"
            log "WAN s$big warm-up (untimed): ${LABEL[$c]}"
            run_step wan-warm "$c" d "$SRCPOOL/s$big" "${DPOOL[$c]}/s$big" s3 s3 "$c-wans" "$PROXY_PORT"
            log "WAN s$big step d: ${LABEL[$c]}"
            run_step "wan-s$big" "$c" d "$SRCPOOL/s$big" "${DPOOL[$c]}/s$big" s3 s3 "$c-wans" "$PROXY_PORT"
            stop_pid "$PROXY_PID"
            recv_stop "$c-wans"
        done
    fi
fi

# --- report --------------------------------------------------------------------------
END=$(date +%s.%N)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || commit="$commit (with uncommitted changes)"
fusever=$(dpkg-query -W -f '${Version}' zfs-fuse 2>/dev/null || true)
[ -n "$fusever" ] && fusever="zfs-fuse $fusever" || fusever=$("$ZFS" version 2>/dev/null | head -n 1 || echo "zfs: unknown")

out "# zfsync benchmark"
out ""
out "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $commit; $(nproc) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1), kernel $(uname -r), $fusever."
out "Load average at the start: $LOAD_START, at the end: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews the figures). Run time $(calc "$END - $START" 0) s."
out "Times: wall seconds (date +%s.%N around each run)$([ "$REPEAT" -gt 1 ] && echo ", median of $REPEAT runs"); (N×) = contestant / raw pipe. Every zfs call of every contestant goes through a small /bin/sh wrapper that counts it."
[ "${#SEND_EXTRA[@]}" -eq 0 ] || out "zfsync-send extra arguments: \`${SEND_EXTRA[*]}\`."
out ""
out "## Workload W: $W_N datasets ($((W_N - 1)) × 2 MiB in 3 levels, 1 × 400 MiB), 486 MiB"
out ""
out "| contestant | a: full | b: +1 MiB in 10 datasets | c: new empty snapshot | d: nothing new |"
out "|---|---|---|---|---|"
for c in "${CONTESTANTS[@]}"; do
    if [ -n "${NA[$c]:-}" ] && [ "${RES[w|$c|a]:-n/a}" = "n/a" ]; then
        out "| ${LABEL[$c]} | n/a: ${NA[$c]} | | | |"
    else
        out "| ${LABEL[$c]} | $(cell w "$c" a) | $(cell w "$c" b) | $(cell w "$c" c) | $(cell w "$c" d) |"
    fi
done
for c in "${CONTESTANTS[@]}"; do
    if [ -n "${NA[$c]:-}" ] && [ "${RES[w|$c|a]:-n/a}" != "n/a" ]; then
        out ""
        out "${LABEL[$c]}: n/a from then on: ${NA[$c]}"
    fi
done
out ""
out "### zfs calls per dataset (send side / receive side), W"
out ""
out "| contestant | b: send | b: receive | c: send | c: receive | d: send | d: receive |"
out "|---|---|---|---|---|---|---|"
percall() { # wl c step side(1|2) n
    local v=${CALLS[$1|$2|$3]:-}
    [ -n "$v" ] || { printf '—'; return; }
    v=$(echo "$v" | cut -d' ' -f"$4")
    printf '%.2f (%d)' "$(calc "$v / $5" 3)" "$v"
}
for c in "${CONTESTANTS[@]}"; do
    out "| ${LABEL[$c]} | $(percall w "$c" b 1 "$W_N") | $(percall w "$c" b 2 "$W_N") | $(percall w "$c" c 1 "$W_N") | $(percall w "$c" c 2 "$W_N") | $(percall w "$c" d 1 "$W_N") | $(percall w "$c" d 2 "$W_N") |"
done
out ""
out "(total calls in parentheses; the peers' calls are told apart by the pool they name, calls naming neither are not counted.)"
out ""
out "### Resources, W"
out ""
out "Client: the command run (zfsync-send, the raw pipe's script, the peer) and every process it waited for, from GNU time: CPU = user + system seconds, RSS = the largest process's peak. Receiver: the zfsync-recv daemon, from /proc: CPU of the daemon itself and with the zfs processes it reaped, VmHWM reset before each step. The zfs-fuse daemon's own CPU is not included."
out ""
out "| contestant | step | wall s | client CPU s | client peak RSS MiB | receiver CPU s | receiver CPU s incl. zfs | receiver VmHWM MiB |"
out "|---|---|---|---|---|---|---|---|"
for c in "${CONTESTANTS[@]}" z8; do
    for step in a b c d; do
        v=${RSRC[w|$c|$step]:-}
        [ -n "$v" ] || continue
        read -r a1 a2 a3 a4 a5 a6 <<<"$v"
        out "| ${LABEL[$c]} | $step | $a1 | $a2 | $a3 | $a4 | $a5 | $a6 |"
    done
done
out ""
if [ -n "${RSRC[w|z8|a]:-}" ]; then
    hwm=$(echo "${RSRC[w|z8|a]}" | cut -d' ' -f6)
    goal="met"
    awk -v h="$hwm" 'BEGIN{exit !(h < 64)}' || goal="NOT met"
    out "**Receiver memory with 8 streams** (zfsync -t 8, W step a, $(cell w z8 a)): VmHWM $hwm MiB (goal < 64 MiB: $goal)."
    out ""
fi
if [ -n "${TP_RAW_S:-}" ]; then
    gib=$(calc "$TP_BYTES / 1073741824" 4)
    mb=$(calc "$TP_BYTES / 1000000" 1)
    raw_rate=$(calc "$TP_BYTES / 1000000 / $TP_RAW_S" 1)
    if [[ "$TP_Z_S" =~ ^[0-9.]+$ ]]; then
        z_rate=$(calc "$TP_BYTES / 1000000 / $TP_Z_S" 1)
        out "**Throughput** ($W/big alone, full, $mb MB referenced; replicas: $TP_OK): raw pipe $raw_rate MB/s ($TP_RAW_S s), zfsync -t 1 $z_rate MB/s ($TP_Z_S s), ratio $(calc "$z_rate / $raw_rate" 2). CPU s per GiB, send / receive side: raw pipe $(calc "$TP_RAW_SEND_CPU / $gib") / $(calc "$TP_RAW_RECV_CPU / $gib") (the zfs commands), zfsync $(calc "$TP_Z_SEND_CPU / $gib") / $(calc "$TP_Z_RECV_CPU / $gib") (sender incl. zfs send / receiver incl. zfs receive); zfs-fuse daemon CPU s per GiB (shared, noisy): raw $(calc "$TP_RAW_FUSE / $gib"), zfsync $(calc "$TP_Z_FUSE / $gib")."
    else
        out "**Throughput** ($W/big alone): raw pipe $raw_rate MB/s ($TP_RAW_S s), zfsync -t 1 $TP_Z_S."
    fi
    out ""
fi
for n in "${SCALE_DONE[@]}"; do
    N=${SCALE_N[$n]}
    out "## Scale tree s$n: $N datasets of 4 KiB"
    out ""
    out "| contestant | a: full | c: new empty snapshot | c: ms per dataset beyond the raw pipe | d: nothing new |"
    out "|---|---|---|---|---|"
    for c in raw z1 z4 syncoid pyznap; do
        [ -n "${RES[s$n|$c|a]:-}" ] || continue
        beyond="—"
        if [ "$c" != raw ] && [[ "${RES[s$n|$c|c]:-}" =~ ^[0-9.]+$ ]] && [[ "${RES[s$n|raw|c]:-}" =~ ^[0-9.]+$ ]]; then
            beyond=$(calc "(${RES[s$n|$c|c]} - ${RES[s$n|raw|c]}) * 1000 / $N" 1)
        fi
        out "| ${LABEL[$c]} | $(cell "s$n" "$c" a) | $(cell "s$n" "$c" c) | $beyond | $(cell "s$n" "$c" d) |"
    done
    out ""
    out "zfs calls per dataset in step c, send / receive side: $(for c in raw z1 z4 syncoid pyznap; do [ -n "${CALLS[s$n|$c|c]:-}" ] && printf '%s %s / %s; ' "${LABEL[$c]}" "$(percall "s$n" "$c" c 1 "$N")" "$(percall "s$n" "$c" c 2 "$N")"; done)"
    out ""
done
if [ "$WAN" != 0 ]; then
    out "## WAN: ${DELAY_MS} ms each way through scripts/bench/latency-proxy.py"
    out ""
    out "Round trip through the proxy: $WAN_RTT (direct: $WAN_DIRECT). Each new connection waits one round trip (a TCP handshake). Raw pipe: one socat connection per dataset through the proxy (\`zfs send | socat\` to \`socat TCP-LISTEN,fork | zfs receive -u\`). Step c: the new snapshot @w4 (nothing changed); d: nothing new. Before the timed runs, one untimed run with nothing new per receiver through the proxy (the first run to a receiver under a new name confirms every dataset for it once). Ratios: to the raw pipe through the proxy."
    out ""
    hdr="| contestant | W c: new empty snapshot | W d: nothing new | W c on 127.0.0.1 (above) |"
    sep="|---|---|---|---|"
    if [ -n "${big:-}" ]; then
        hdr="$hdr s$big d: nothing new | s$big d on 127.0.0.1 |"
        sep="$sep---|---|"
    fi
    out "$hdr"
    out "$sep"
    for c in raw z1 z4; do
        row="| ${LABEL[$c]} | $(cell wan-w "$c" c) | $(cell wan-w "$c" d) | $(cell w "$c" c) |"
        [ -z "${big:-}" ] || row="$row $(cell "wan-s$big" "$c" d) | $(cell "s$big" "$c" d) |"
        out "$row"
    done
    out ""
fi
nfail=0
for k in "${!BAD[@]}"; do nfail=$((nfail + 1)); done
if [ "$nfail" -gt 0 ]; then
    out "**Replica check failed** (newest snapshot GUIDs differ from the source's) for: $(printf '%s ' "${!BAD[@]}")"
else
    out "Replica check: after every step, every destination dataset's newest snapshot GUID equals the source's."
fi

mkdir -p "$OUTDIR"
cp "$REPORT" "$OUTDIR/latest.md"
echo
cat "$REPORT"
echo
log "written to $OUTDIR/latest.md"
