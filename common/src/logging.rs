//! Logging set-up shared by both binaries: `-v` raises the level, `-o FILE`
//! appends to a file instead of stderr. `RUST_LOG` overrides the level.

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

/// `base` is the level with no `-v`; each `-v` goes one step further.
pub fn init(base: u8, verbose: u8, logfile: Option<&Path>) -> Result<(), String> {
    let level = match base.saturating_add(verbose) {
        0 => "error",
        1 => "warn",
        2 => "info",
        3 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "warn,zfsync_common={level},zfsync_send={level},zfsync_recv={level}"
        ))
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match logfile {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open the log file {}: {e}", path.display()))?;
            builder
                .with_ansi(false)
                .with_writer(Mutex::new(file))
                .init();
        }
        None => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init(),
    }
    Ok(())
}
