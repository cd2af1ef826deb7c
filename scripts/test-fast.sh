#!/usr/bin/env bash
# make test-fast: the unit tests of every crate and the in-process tier
# (tests/inprocess/: the real receiver and sender over TLS on 127.0.0.1,
# against the in-memory FakeZfs backend). No root, no ZFS: `zfs` and `zpool`
# are taken off PATH first, so a test that reached for them would fail.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

clean=()
IFS=: read -r -a dirs <<<"$PATH"
for d in "${dirs[@]}"; do
    [ -n "$d" ] || continue
    if [ -x "$d/zfs" ] || [ -x "$d/zpool" ]; then
        continue
    fi
    clean+=("$d")
done
PATH="$(IFS=:; echo "${clean[*]}")"
export PATH
if command -v zfs >/dev/null 2>&1; then
    echo "test-fast: zfs is still on PATH ($(command -v zfs))" >&2
    exit 1
fi

cargo test -p zfsync-common -p zfsync-send -p zfsync-recv --features zfsync-common/testing
cargo test -p zfsync-e2e --test inprocess
