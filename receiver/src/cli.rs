//! The command line of `zfsync-recv`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use zfsync_common::naming::DatasetName;
use zfsync_common::protocol::DEFAULT_PORT;
use zfsync_common::tls::{server_config, TlsFiles};
use zfsync_common::zfs::{RecvOption, Zfs};

use crate::{Limits, Options};

/// Receives ZFS dataset trees from zfsync-send over mutually authenticated
/// TLS and keeps them under TARGET_DATASET.
#[derive(Parser, Debug)]
#[command(name = "zfsync-recv", version)]
pub struct Args {
    /// More log output (the daemon logs at info; -v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// TCP port to listen on.
    #[arg(short, long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Address to listen on (default: all addresses).
    #[arg(short = 'l', long = "listen", default_value = "0.0.0.0")]
    pub listen: String,
    /// Append the log to this file instead of stderr.
    #[arg(short = 'o', long = "log-file", value_name = "LOGFILE")]
    pub log_file: Option<PathBuf>,
    /// CA certificate (PEM) that signs the senders' certificates.
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
    /// This receiver's certificate (PEM).
    #[arg(long, value_name = "FILE")]
    pub cert: PathBuf,
    /// This receiver's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// Accept only client certificates with this CN or DNS name (repeatable).
    #[arg(long = "allow-client", value_name = "NAME")]
    pub allow_client: Vec<String>,
    /// Keep every snapshot: do not mirror the sender's retention (by
    /// default tool-made snapshots the sender pruned are destroyed here too).
    #[arg(long)]
    pub keep_all_snapshots: bool,
    /// The zfs binary.
    #[arg(long, value_name = "PATH", default_value = "zfs")]
    pub zfs: PathBuf,
    /// Seconds a zfs call (other than the streams of send and receive) may
    /// run before it is killed and reported: a wedged zfs or a suspended
    /// pool must not hold a dataset forever.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub zfs_timeout: u64,
    /// A property option for every `zfs receive` (repeatable):
    /// '-o PROPERTY=VALUE' sets it on the replicas, '-x PROPERTY' keeps the
    /// sender's value out (for example --recv-option '-o readonly=on'
    /// --recv-option '-x mountpoint'). Needs OpenZFS.
    #[arg(long = "recv-option", value_name = "OPTION", allow_hyphen_values = true,
          value_parser = parse_recv_option)]
    pub recv_options: Vec<RecvOption>,
    /// Seconds a connected sender may stay silent.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub idle_timeout: u64,
    /// Seconds a TLS handshake may take.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub handshake_timeout: u64,
    /// Most connections at once.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_connections: usize,
    /// MiB of memory all connections' requests may hold at once (snapshot
    /// lists, and large messages while they are read); a request beyond it
    /// is refused as busy.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub memory_budget: usize,
    /// Seconds a SIGTERM/SIGINT waits for open connections to end.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub grace: u64,
    /// The dataset replicas are kept under (created if its parent exists).
    #[arg(value_name = "TARGET_DATASET")]
    pub target: String,
}

fn parse_recv_option(s: &str) -> Result<RecvOption, String> {
    RecvOption::parse(s)
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = zfsync_common::logging::init(2, args.verbose, args.log_file.as_deref()) {
        eprintln!("zfsync-recv: {e}");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("zfsync-recv: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("zfsync-recv: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let target = DatasetName::new(&args.target)
        .with_context(|| format!("invalid target dataset {:?}", args.target))?;
    let tls = server_config(&TlsFiles {
        ca: &args.ca,
        cert: &args.cert,
        key: &args.key,
    })?;
    let addr: SocketAddr = format!("{}:{}", args.listen, args.port)
        .parse()
        .or_else(|_| format!("[{}]:{}", args.listen, args.port).parse())
        .with_context(|| format!("invalid listen address {:?}", args.listen))?;
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen on {addr} (is another zfsync-recv running? choose another port with -p)"
        )
    })?;
    // SIGHUP reloads the certificate files; a bad file keeps the old ones.
    let (tls_tx, tls_rx) = tokio::sync::watch::channel(tls);
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let (ca, cert, key) = (args.ca.clone(), args.cert.clone(), args.key.clone());
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match server_config(&TlsFiles {
                ca: &ca,
                cert: &cert,
                key: &key,
            }) {
                Ok(cfg) => {
                    let _ = tls_tx.send(cfg);
                    tracing::info!("SIGHUP: certificates reloaded; running transfers go on");
                }
                Err(e) => tracing::error!("SIGHUP: keeping the old certificates: {e}"),
            }
        }
    });
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    };
    crate::run_with(
        listener,
        Options {
            target,
            zfs: Arc::new(
                Zfs::new(&args.zfs).with_timeout(Duration::from_secs(args.zfs_timeout.max(1))),
            ),
            tls: tls_rx,
            allow_clients: args.allow_client,
            mirror_retention: !args.keep_all_snapshots,
            recv_options: args.recv_options,
            handshake_timeout: Duration::from_secs(args.handshake_timeout.max(1)),
            idle_timeout: Duration::from_secs(args.idle_timeout.max(1)),
            max_connections: args.max_connections.max(1),
            grace: Duration::from_secs(args.grace),
        },
        Limits {
            memory_budget: args.memory_budget.max(1).saturating_mul(1 << 20),
        },
        shutdown,
    )
    .await?;
    Ok(())
}
