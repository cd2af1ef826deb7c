//! The in-process tier (`make test-fast`): the real receiver
//! (`zfsync_recv::run`) on 127.0.0.1 with mutual TLS, driven by the real
//! sender (`zfsync_send::run`) or step by step by the protocol `Client`.
//! Each end is its own "host": an in-memory `FakeZfs` with the pool `src`
//! on the sending side and the pool `dst` on the receiving side. No root,
//! no ZFS, a few seconds for the whole target.
//!
//! Each test is named after the invariant it shows and says which one in
//! its `///` line (the rule numbers of docs/design.md). On failure the
//! assertions print both hosts' datasets, snapshots and `zfs` calls.
//!
//! One module per part of the design: [`support`] holds the two hosts,
//! the receiver, the step-by-step sender and the assertions they share.

mod support;

/// 1. The planner's decisions through a real receiver.
mod planner;

/// 2. The buffer and cleanbuffer.
mod buffer;

/// 3. The --full swap, failing at each step.
mod swap;

/// 4. Mirrored retention.
mod retention;

/// 5. Busy datasets.
mod busy;

/// 6. Shutdown of either end.
mod shutdown;

/// 7. A whole tree.
mod tree;

/// 8. Resuming a cut transfer.
mod resume;

/// 9. The sender: confirmations and lost connections.
mod sender;

/// 10. How data travels: --compress and --bwlimit.
mod transit;
