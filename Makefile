# zfsync: common tasks. Most need a Rust toolchain (cargo); `demo` and the
# end-to-end tests also need ZFS and root (scripts/zfs-setup.sh sets up
# zfs-fuse on hosts without the OpenZFS kernel module).
#
#   make build   release binaries: target/release/zfsync-send, zfsync-recv
#   make test    the whole test suite (unit and end-to-end): cargo test --workspace,
#                then one line of hardening figures
#   make demo    replicate a sample tree between two throw-away pools (root)
#   make certs   a CA and certificates in ./certs (RECEIVER=host names/IPs
#                the sender connects to, default localhost)
#   make fmt     format the code
#   make lint    rustfmt check and clippy with warnings as errors
#   make clean   remove build output

RECEIVER ?= localhost

.PHONY: build test demo certs fmt lint clean

build:
	cargo build --release

test:
	rm -rf target/zfsync-figures
	cargo test --workspace
	@bash scripts/hardening-figures.sh target/zfsync-figures

demo:
	bash scripts/demo.sh

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
