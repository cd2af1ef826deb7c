# zfsync: common tasks. Most need a Rust toolchain (cargo); `demo` and the
# end-to-end tests also need ZFS and root (scripts/zfs-setup.sh sets up
# zfs-fuse on hosts without the OpenZFS kernel module).
#
#   make build   release binaries: target/release/zfsync-send, zfsync-recv
#   make test    the whole test suite (unit, in-process and end-to-end):
#                cargo test --workspace, then one line of hardening figures
#   make test-fast  unit and in-process tests only (FakeZfs, no root, no zfs
#                on PATH; seconds): scripts/test-fast.sh
#   make test-openzfs  the OpenZFS tier: boots a Debian VM with the OpenZFS
#                kernel module under qemu (image built once, then cached in
#                /var/tmp/zfsync-ozvm) and runs tests/openzfs.rs in it and
#                against it (root; ZFS_SUITES="bookworm bookworm-backports"
#                tests OpenZFS 2.1 and 2.3)
#   make check-freebsd  cargo check for x86_64-unknown-freebsd
#   make demo    replicate a sample tree between two throw-away pools (root)
#   make bench   zfsync against the raw zfs send | zfs receive pipe and the
#                peers (syncoid, pyznap) on throw-away pools (root; about 25
#                minutes, BENCH_QUICK=1 a few): scripts/bench.sh prints
#                Markdown tables and writes them to target/bench/latest.md
#   make certs   a CA and certificates in ./certs (RECEIVER=host names/IPs
#                the sender connects to, default localhost)
#   make fmt     format the code
#   make lint    rustfmt check and clippy with warnings as errors
#   make clean   remove build output

RECEIVER ?= localhost

.PHONY: build test test-fast test-openzfs check-freebsd demo bench certs fmt lint clean

build:
	cargo build --release

test:
	rm -rf target/zfsync-figures
	cargo test --workspace
	@bash scripts/hardening-figures.sh target/zfsync-figures

test-fast:
	bash scripts/test-fast.sh

test-openzfs:
	bash scripts/test-openzfs.sh

check-freebsd:
	rustup target add x86_64-unknown-freebsd
	cargo check --workspace --all-targets --target x86_64-unknown-freebsd

demo:
	bash scripts/demo.sh

bench:
	bash scripts/bench.sh

# Output directory: ./certs (ca.pem, receiver.pem/.key, sender.pem/.key).
certs:
	bash scripts/make-certs.sh certs $(RECEIVER)

fmt:
	cargo fmt --all

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

clean:
	cargo clean
