#!/usr/bin/env bash
# A real OpenZFS kernel module for the tests: a small Debian bookworm VM under
# qemu (software emulation; this machine kind cannot load kernel modules).
#
#   scripts/openzfs-vm.sh image   build the VM image, or reuse the cached one
#   scripts/openzfs-vm.sh start   boot it in the background; returns when ssh answers
#   scripts/openzfs-vm.sh ssh CMD run CMD in the VM as root
#   scripts/openzfs-vm.sh stop    power it off
#   scripts/openzfs-vm.sh env     print the variables the OpenZFS tests read
#
# Environment:
#   ZFS_SUITE   bookworm (OpenZFS 2.1.x, default) or bookworm-backports (2.3.x)
#   ZFSYNC_OZVM cache and working folder (default /var/tmp/zfsync-ozvm); the
#               image lives in $ZFSYNC_OZVM/$ZFS_SUITE/out and is rebuilt when
#               missing or when the recipe under scripts/openzfs-vm/ changed.
#   VM_PORT     ssh port on 127.0.0.1 (default 22210, or 22310 for backports);
#               VM_PORT+1..+4 are forwarded to the guest's ports 9001..9004.
#
# The build (about 6 minutes: debootstrap, kernel, zfs-dkms) needs root,
# network access to the Debian mirror, and about 3 GiB of disk.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RECIPE="$HERE/openzfs-vm"
export ZFS_SUITE=${ZFS_SUITE:-bookworm}
case "$ZFS_SUITE" in
bookworm) default_port=22210 ;;
bookworm-backports) default_port=22310 ;;
*)
    echo "openzfs-vm: ZFS_SUITE must be bookworm or bookworm-backports, not '$ZFS_SUITE'" >&2
    exit 2
    ;;
esac
VM_PORT=${VM_PORT:-$default_port}
BASE=${ZFSYNC_OZVM:-/var/tmp/zfsync-ozvm}
export OZVM="$BASE/$ZFS_SUITE"
export OUT="$OZVM/out" ROOT="$OZVM/root" SLIM="$OZVM/root-slim"
RUN="$OZVM/run"
KEY="$OUT/id_ed25519"
SSH=(ssh -q -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR
    -o ConnectTimeout=10 -o ServerAliveInterval=15 -i "$KEY" -p "$VM_PORT" root@127.0.0.1)

log() { printf 'openzfs-vm[%s]: %s\n' "$ZFS_SUITE" "$*" >&2; }

# A digest of the recipe: a changed recipe rebuilds the image.
recipe_digest() {
    (cd "$RECIPE" && cat 01-debootstrap.sh 02-kernel-zfs.sh 03-image.sh guest/ozinit) | sha256sum | cut -c1-16
}

host_deps() {
    if command -v qemu-system-x86_64 >/dev/null && command -v debootstrap >/dev/null &&
        command -v zstd >/dev/null && command -v mkfs.ext4 >/dev/null && command -v ssh >/dev/null; then
        return 0
    fi
    log "installing qemu-system-x86, debootstrap, zstd, openssh-client"
    bash "$RECIPE/00-host-deps.sh"
}

image() {
    host_deps
    local want have=""
    want=$(recipe_digest)
    [ -f "$OUT/recipe" ] && have=$(cat "$OUT/recipe")
    if [ "$have" = "$want" ] && [ -f "$OUT/rootfs.img" ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initrd.img" ]; then
        log "image cached in $OUT (recipe $want)"
        return 0
    fi
    if [ -f "$OUT/ozvm-cache.tar.zst" ] && [ -f "$OUT/recipe" ] && [ "$have" = "$want" ]; then
        log "unpacking cached image $OUT/ozvm-cache.tar.zst"
        zstd -dc "$OUT/ozvm-cache.tar.zst" | tar -C "$OUT" -xf -
        return 0
    fi
    log "building the image (recipe $want; about 6 minutes)"
    local t0=$SECONDS
    mkdir -p "$OZVM"
    rm -rf "$ROOT" "$SLIM" "$OUT"
    mkdir -p "$OUT"
    bash "$RECIPE/01-debootstrap.sh"
    bash "$RECIPE/02-kernel-zfs.sh"
    bash "$RECIPE/03-image.sh"
    rm -rf "$ROOT" "$SLIM" # 2-3 GiB; the image and the tarball are what is kept
    echo "$want" >"$OUT/recipe"
    log "image built in $((SECONDS - t0)) s"
}

vm_ssh() { "${SSH[@]}" "$@"; }

start() {
    image
    if [ -f "$RUN/qemu.pid" ] && kill -0 "$(cat "$RUN/qemu.pid")" 2>/dev/null; then
        log "already running (pid $(cat "$RUN/qemu.pid"))"
        return 0
    fi
    rm -rf "$RUN"
    mkdir -p "$RUN/empty"
    mkfs.ext4 -q -F -d "$RUN/empty" "$RUN/payload.img" 16M
    local drives=(-drive "file=$OUT/rootfs.img,if=virtio,format=raw,snapshot=on"
        -drive "file=$RUN/payload.img,if=virtio,format=raw")
    for d in c d; do
        truncate -s "${SCRATCH_GB:-2}G" "$RUN/scratch-$d.img"
        drives+=(-drive "file=$RUN/scratch-$d.img,if=virtio,format=raw,cache=unsafe")
    done
    local fwd="hostfwd=tcp:127.0.0.1:${VM_PORT}-:22"
    for i in 1 2 3 4; do fwd+=",hostfwd=tcp:127.0.0.1:$((VM_PORT + i))-:900$i"; done
    log "booting (ssh on 127.0.0.1:$VM_PORT, console log $RUN/console.log)"
    setsid qemu-system-x86_64 -accel tcg,thread=multi,tb-size=256 -cpu max \
        -m "${VM_MEM:-2048}" -smp "${VM_SMP:-2}" -nographic -no-reboot \
        -kernel "$OUT/vmlinuz" -initrd "$OUT/initrd.img" \
        -append "console=ttyS0 root=/dev/vda rw init=/sbin/ozinit net.ifnames=0 quiet loglevel=3 panic=-1 mitigations=off ozvm.nopoweroff" \
        "${drives[@]}" \
        -netdev "user,id=n0,$fwd" -device virtio-net-pci,netdev=n0 -device virtio-rng-pci \
        </dev/null >"$RUN/console.log" 2>&1 &
    echo $! >"$RUN/qemu.pid"
    local t0=$SECONDS
    until grep -q 'OZVM: READY' "$RUN/console.log" 2>/dev/null; do
        if ! kill -0 "$(cat "$RUN/qemu.pid")" 2>/dev/null; then
            log "qemu exited during boot; console:"
            tail -30 "$RUN/console.log" >&2
            return 1
        fi
        if [ $((SECONDS - t0)) -gt 600 ]; then
            log "no 'OZVM: READY' after 600 s; console:"
            tail -30 "$RUN/console.log" >&2
            stop
            return 1
        fi
        sleep 1
    done
    if ! grep -q 'OZVM: zfs loaded' "$RUN/console.log"; then
        log "the zfs module did not load; console:"
        tail -30 "$RUN/console.log" >&2
        stop
        return 1
    fi
    until vm_ssh true 2>/dev/null; do
        if [ $((SECONDS - t0)) -gt 660 ]; then
            log "ssh does not answer"
            stop
            return 1
        fi
        sleep 1
    done
    log "up in $((SECONDS - t0)) s: $(vm_ssh 'zfs version | head -1; uname -r' | tr '\n' ' ')"
}

stop() {
    if [ -f "$RUN/qemu.pid" ]; then
        local pid
        pid=$(cat "$RUN/qemu.pid")
        if kill -0 "$pid" 2>/dev/null; then
            vm_ssh 'sync; echo o > /proc/sysrq-trigger' >/dev/null 2>&1 || true
            for _ in $(seq 1 20); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.5
            done
            kill "$pid" 2>/dev/null || true
        fi
        rm -f "$RUN/qemu.pid"
    fi
    rm -f "$RUN"/scratch-*.img "$RUN/payload.img"
}

print_env() {
    echo "ZFSYNC_VM_SSH='${SSH[*]}'"
    echo "ZFSYNC_VM_PORT=$VM_PORT"
}

case "${1:-}" in
image) image ;;
start) start ;;
stop) stop ;;
ssh)
    shift
    vm_ssh "$@"
    ;;
env) print_env ;;
*)
    sed -n '2,20p' "$0" >&2
    exit 2
    ;;
esac
