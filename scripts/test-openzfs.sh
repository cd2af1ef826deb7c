#!/usr/bin/env bash
# The OpenZFS test tier (make test-openzfs): boots the OpenZFS VM of
# scripts/openzfs-vm.sh (built once, then cached), copies the zfsync
# binaries and the test binary of tests/openzfs.rs into it, and runs
#   - the vm_* tests inside the VM (sender and receiver on OpenZFS),
#   - the cross_* tests on the host against the VM (zfs-fuse <-> OpenZFS).
# Fails, never skips, when the VM cannot be built or booted.
#
# Environment: ZFS_SUITES (default "bookworm"; "bookworm bookworm-backports"
# tests OpenZFS 2.1 and 2.3), OPENZFS_TESTS (default "vm_ cross_": the test
# name prefixes to run), plus what scripts/openzfs-vm.sh reads.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
VM="$ROOT/scripts/openzfs-vm.sh"
SUITES=${ZFS_SUITES:-bookworm}
TESTS=${OPENZFS_TESTS:-vm_ cross_}

log() { printf '\n==== test-openzfs: %s\n' "$*"; }

log "building"
cargo build --workspace
test_bin=$(cargo test --test openzfs --no-run 2>&1 | sed -n 's/.*(\(.*target\/debug\/deps\/openzfs-[0-9a-f]*\)).*/\1/p' | tail -1)
[ -n "$test_bin" ] && [ -x "$ROOT/$test_bin" ] || {
    echo "test-openzfs: cannot find the openzfs test binary" >&2
    exit 1
}

for suite in $SUITES; do
    export ZFS_SUITE=$suite
    log "OpenZFS from Debian $suite"
    bash "$VM" start
    trap 'bash "$VM" stop' EXIT
    # The same absolute paths inside: the harness finds the binaries next
    # to the test binary and the scripts under the workspace root.
    tar -C / -cf - "${ROOT#/}/target/debug/zfsync-send" "${ROOT#/}/target/debug/zfsync-recv" \
        "${ROOT#/}/$test_bin" "${ROOT#/}/scripts" | bash "$VM" ssh 'tar -C / -xf -'
    # Pools live on a scratch disk (the root image is small).
    bash "$VM" ssh 'mkdir -p /scratch && (mountpoint -q /scratch || (mkfs.ext4 -q -F /dev/vdc && mount /dev/vdc /scratch))'
    if [[ " $TESTS " == *" vm_ "* ]]; then
        log "[$suite] vm_* tests inside the VM"
        bash "$VM" ssh "cd '$ROOT' && TMPDIR=/scratch RUST_BACKTRACE=1 '$ROOT/$test_bin' --ignored --test-threads 2 --nocapture vm_"
    fi
    if [[ " $TESTS " == *" cross_ "* ]]; then
        log "[$suite] cross_* tests between this host (zfs-fuse) and the VM"
        eval "$(bash "$VM" env)"
        export ZFSYNC_VM_SSH ZFSYNC_VM_PORT
        cargo test --test openzfs -- --ignored --test-threads 1 cross_
    fi
    bash "$VM" stop
    trap - EXIT
done
log "passed (${SUITES})"
