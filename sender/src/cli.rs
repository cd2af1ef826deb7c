//! The command line of `zfsync-send`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::Timelike;
use clap::Parser;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use zfsync_common::client::{ClientOptions, Transit};
use zfsync_common::compress;
use zfsync_common::naming::{DatasetName, SnapClass};
use zfsync_common::protocol::DEFAULT_PORT;
use zfsync_common::throttle::Rate;
use zfsync_common::tls::{client_config, TlsFiles};
use zfsync_common::zfs::Zfs;

use crate::{exit, Options, SendError};

/// Replicates SOURCE_DATASET and all its children, snapshot by snapshot, to
/// the zfsync-recv daemon on RECEIVER_HOST over mutually authenticated TLS.
///
/// Exit status: 0 every dataset in sync; 1 one or more datasets failed;
/// 2 bad command line or configuration; 3 receiver unreachable or refused
/// this sender.
#[derive(Parser, Debug)]
#[command(name = "zfsync-send", version)]
pub struct Args {
    /// More log output (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// The receiver's TCP port.
    #[arg(short, long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Parallel worker connections.
    #[arg(short, long, value_name = "THREADS", default_value_t = 4)]
    pub threads: usize,
    /// Append the log to this file instead of stderr.
    #[arg(short = 'o', long = "log-file", value_name = "LOGFILE")]
    pub log_file: Option<PathBuf>,
    /// CA certificate (PEM) that signs the receiver's certificate.
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
    /// This sender's certificate (PEM).
    #[arg(long, value_name = "FILE")]
    pub cert: PathBuf,
    /// This sender's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// The name the receiver's certificate must carry (default: RECEIVER_HOST).
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
    /// Replace a receiver's copy that has no snapshot in common with the
    /// source (or has diverged). The old copy is kept until the new one is
    /// whole.
    #[arg(long)]
    pub full: bool,
    /// Before the run, take the recursive snapshot
    /// SOURCE@<yymmdd-HHMMSS>_<CLASS> (local time). CLASS is S, M, H or D,
    /// or `auto`: D at 00:00, H at minute 0, M at minutes 15/30/45, else S.
    #[arg(long, value_name = "CLASS")]
    pub snapshot: Option<String>,
    /// After the run, keep only the newest N tool snapshots of the
    /// --snapshot class (never a person's snapshot, never the last one the
    /// receiver confirmed).
    #[arg(long, value_name = "N", requires = "snapshot",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub keep: Option<u32>,
    /// Print what would be sent, placed, pruned and deleted; change nothing
    /// on either side.
    #[arg(long)]
    pub dry_run: bool,
    /// Destroy replicas on the receiver whose source dataset is gone (only
    /// datasets zfsync created; listed in the summary). Skipped when any
    /// dataset failed in the run.
    #[arg(long)]
    pub delete_missing: bool,
    /// Compress streams in transit with zstd (for slow links; costs CPU on
    /// both ends). A receiver that cannot decompress gets them plain.
    #[arg(long)]
    pub compress: bool,
    /// The zstd level for --compress: 1 (fastest) to 19 (smallest).
    #[arg(long, value_name = "N", default_value_t = compress::DEFAULT_LEVEL,
          value_parser = clap::value_parser!(i32).range(1..=compress::MAX_LEVEL as i64))]
    pub compress_level: i32,
    /// Limit the whole run (all connections together) to RATE bytes per
    /// second on the wire, after compression: a number with K, M or G
    /// (powers of 1024), e.g. 500K, 10M, 1.5G.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub bwlimit: Option<Rate>,
    /// The zfs binary.
    #[arg(long, value_name = "PATH", default_value = "zfs")]
    pub zfs: PathBuf,
    /// Seconds a zfs call (other than the streams of send and receive) may
    /// run before it is killed and reported: a wedged zfs or a suspended
    /// pool must not hold a dataset forever.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub zfs_timeout: u64,
    /// Seconds to wait for the receiver's next message.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub timeout: u64,
    /// The dataset tree to replicate.
    #[arg(value_name = "SOURCE_DATASET")]
    pub source: String,
    /// Host name or address of the zfsync-recv daemon.
    #[arg(value_name = "RECEIVER_HOST")]
    pub receiver: String,
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = zfsync_common::logging::init(1, args.verbose, args.log_file.as_deref()) {
        eprintln!("zfsync-send: {e}");
        return ExitCode::from(exit::USAGE);
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("zfsync-send: cannot start the runtime: {e}");
            return ExitCode::from(exit::FAILED);
        }
    };
    ExitCode::from(rt.block_on(run(args)))
}

/// `--bwlimit`'s value; the error names the fix.
fn parse_rate(s: &str) -> Result<Rate, String> {
    s.parse().map_err(|e: zfsync_common::throttle::RateError| {
        // clap prefixes "invalid value 'X' for '--bwlimit <RATE>': ".
        let e = e.to_string();
        e.split_once(": ")
            .map_or(e.clone(), |(_, why)| why.to_string())
    })
}

fn fail(code: u8, msg: impl std::fmt::Display) -> u8 {
    tracing::error!("{msg}");
    eprintln!("zfsync-send: {msg}");
    code
}

async fn run(args: Args) -> u8 {
    let source = match DatasetName::new(&args.source) {
        Ok(s) => s,
        Err(e) => return fail(exit::USAGE, format!("invalid source dataset: {e}")),
    };
    let tls = match client_config(&TlsFiles {
        ca: &args.ca,
        cert: &args.cert,
        key: &args.key,
    }) {
        Ok(t) => t,
        Err(e) => return fail(exit::USAGE, e),
    };
    let server_name = args.server_name.unwrap_or_else(|| args.receiver.clone());
    if rustls_pki_types::ServerName::try_from(server_name.clone()).is_err() {
        return fail(
            exit::USAGE,
            format!("invalid receiver name {server_name:?}: give a host name or an IP address (or --server-name)"),
        );
    }
    let snapshot = match args.snapshot.as_deref() {
        None => None,
        Some(c) => {
            let now = chrono::Local::now();
            let class = if c.eq_ignore_ascii_case("auto") {
                Some(SnapClass::for_time(now.hour(), now.minute()))
            } else {
                let mut chars = c.chars();
                match (chars.next(), chars.next()) {
                    (Some(l), None) => SnapClass::from_letter(l),
                    _ => None,
                }
            };
            let Some(class) = class else {
                return fail(
                    exit::USAGE,
                    format!("--snapshot {c:?}: give S, M, H, D or auto"),
                );
            };
            Some((class, crate::run::tool_stamp(&now)))
        }
    };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let receiver = format!("{}:{}", args.receiver, args.port);
    let opts = Options {
        source: source.clone(),
        zfs: Arc::new(
            Zfs::new(&args.zfs).with_timeout(Duration::from_secs(args.zfs_timeout.max(1))),
        ),
        client: ClientOptions {
            host: args.receiver.clone(),
            port: args.port,
            server_name,
            tls,
            run_id: format!("{}-{nanos}", std::process::id()),
            connect_timeout: Duration::from_secs(20),
            read_timeout: Duration::from_secs(args.timeout.max(1)),
            // Probed at the start of the run.
            caps: Default::default(),
            transit: Transit::new(args.compress.then_some(args.compress_level), args.bwlimit),
        },
        threads: args.threads.max(1),
        allow_full: args.full,
        snapshot,
        keep: args.keep.map(|k| k as usize),
        dry_run: args.dry_run,
        delete_missing: args.delete_missing,
        receiver_id: zfsync_common::naming::format_receiver_id(&args.receiver, args.port),
    };
    let shutdown = CancellationToken::new();
    let signals = match stop_on_signals(shutdown.clone()) {
        Ok(task) => task,
        Err(e) => return fail(exit::FAILED, format!("cannot watch for signals: {e}")),
    };
    let result = crate::run(opts, shutdown).await;
    signals.abort();
    match result {
        Ok(report) => {
            print!("{}", crate::summary(&source, &receiver, &report));
            if let Some(e) = &report.unreachable {
                eprintln!("zfsync-send: {e}");
            }
            report.exit_code()
        }
        Err(e @ SendError::Snapshot(..)) => fail(exit::FAILED, e),
        // No source, or `zfs` cannot list it: nothing was done.
        Err(e) => fail(exit::USAGE, e),
    }
}

/// SIGTERM or SIGINT stops the run (see [`crate::run()`]: the datasets in
/// flight end at the next message boundary, a stream in flight is aborted,
/// the summary so far is printed, exit status 1). A second signal exits at
/// once, with status 1.
fn stop_on_signals(shutdown: CancellationToken) -> std::io::Result<JoinHandle<()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::spawn(async move {
        let mut name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        loop {
            if shutdown.is_cancelled() {
                tracing::error!("{name} again: exiting at once");
                std::process::exit(i32::from(exit::FAILED));
            }
            tracing::warn!("{name}: stopping; datasets in flight end at the next message, a stream in flight is aborted (a second signal exits at once)");
            shutdown.cancel();
            name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
        }
    }))
}
