//! zfsync's shared library: the wire protocol and its client, the `zfs`
//! command-line layer, names, the planner and TLS set-up.

pub mod caps;
pub mod client;
pub mod compress;
pub mod logging;
pub mod model;
pub mod naming;
pub mod plan;
pub mod protocol;
pub mod stream;
pub mod throttle;
pub mod tls;
pub mod zfs;
