//! End-to-end test harness: real zfs-fuse (or kernel ZFS) pools, the real
//! `zfsync-recv` and `zfsync-send` binaries, certificates made by
//! `scripts/make-certs.sh`. Every test gets pools of its own, so tests run
//! in parallel; on failure the commands' output is printed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The workspace root (this package's manifest dir).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A built binary of the workspace, next to the test executable's `deps/`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is not built; run the tests with `cargo test --workspace` (make test), which builds it",
        p.display()
    );
    p
}

pub fn zfs_path() -> &'static str {
    static P: OnceLock<String> = OnceLock::new();
    P.get_or_init(|| {
        for c in ["/usr/sbin/zfs", "/sbin/zfs", "/usr/local/sbin/zfs"] {
            if Path::new(c).exists() {
                return c.to_string();
            }
        }
        "zfs".to_string()
    })
}

/// Fails the test (never skips) when ZFS is not usable.
pub fn ensure_zfs() {
    static OK: OnceLock<Result<(), String>> = OnceLock::new();
    let r = OK.get_or_init(|| match Command::new("zpool").arg("list").output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).into_owned()),
        Err(e) => Err(e.to_string()),
    });
    if let Err(e) = r {
        panic!("ZFS is not usable here ({e}); run `sudo bash scripts/zfs-setup.sh` first (.ci/run does)");
    }
}

/// Runs a command and returns its stdout; panics with stderr on failure.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "`{cmd} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// zfs-fuse can deadlock when two processes create or mount datasets at
/// the same moment (seen here: two `zfs create` on fresh pools, both stuck
/// in a FUSE getattr forever). The harness's own mounting calls take turns,
/// across threads and across test processes, with flock(2) on one file; the
/// binaries under test are not affected by this lock.
pub struct Turn(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

/// The file the harness's turns are taken on (see [`turn`]); a `--zfs`
/// wrapper that acts as a person may take its turn with `flock` on it.
pub fn turn_path() -> PathBuf {
    std::env::temp_dir().join("zfsync-tests-zfs-admin.lock")
}

pub fn turn() -> Turn {
    let path = turn_path();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .expect("open the harness lock file");
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive) {
        Ok(l) => Turn(l),
        Err((_, e)) => panic!("flock {}: {e}", path.display()),
    }
}

fn admin_lock(args: &[&str]) -> Option<Turn> {
    let mounting = matches!(
        args.first().copied(),
        Some("create" | "clone" | "mount" | "unmount" | "destroy" | "rename" | "rollback")
    );
    mounting.then(turn)
}

pub fn zfs(args: &[&str]) -> String {
    let _turn = admin_lock(args);
    run(zfs_path(), args)
}

/// `zfs` that may fail: (success, stdout+stderr).
pub fn zfs_try(args: &[&str]) -> (bool, String) {
    let _turn = admin_lock(args);
    let out = Command::new(zfs_path())
        .args(args)
        .output()
        .expect("run zfs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub fn exists(ds: &str) -> bool {
    zfs_try(&["list", "-H", "-o", "name", ds]).0
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A scratch directory removed at drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("zfsync-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A file-backed pool with a unique name, destroyed at drop.
pub struct Pool {
    pub name: String,
    file: PathBuf,
}

impl Pool {
    pub fn new(tag: &str) -> Pool {
        Pool::new_sized(tag, 256 << 20)
    }

    /// A pool on a file of `size` bytes (zfs-fuse needs at least 64 MiB).
    pub fn new_sized(tag: &str, size: u64) -> Pool {
        ensure_zfs();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("zt{tag}{}x{n}", std::process::id());
        let file = std::env::temp_dir().join(format!("{name}.img"));
        let f = std::fs::File::create(&file).expect("pool file");
        f.set_len(size).expect("size pool file");
        drop(f);
        let file_s = file.to_string_lossy().to_string();
        let _turn = turn();
        run("zpool", &["create", &name, &file_s]);
        Pool { name, file }
    }

    /// `pool/rel`.
    pub fn ds(&self, rel: &str) -> String {
        if rel.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.name, rel.trim_start_matches('/'))
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // zfs-fuse unmounts asynchronously: "pool is busy" for a moment.
        for _ in 0..20 {
            let _turn = turn();
            let ok = Command::new("zpool")
                .args(["destroy", "-f", &self.name])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Two pools of a test's own: the sending host's, with the source `src`
/// (`<a>/src`), and the receiving host's, with the target `dst`
/// (`<b>/<target>`, `<b>` itself for `""`). Neither dataset is made here.
pub struct Pools {
    pub a: Pool,
    pub b: Pool,
    pub src: String,
    pub dst: String,
}

impl Pools {
    pub fn new(tag: &str, target: &str) -> Pools {
        let a = Pool::new(tag);
        let b = Pool::new(tag);
        let src = a.ds("src");
        let dst = b.ds(target);
        Pools { a, b, src, dst }
    }

    /// The names of the source and of the target.
    pub fn names(&self) -> (String, String) {
        (self.src.clone(), self.dst.clone())
    }
}

/// Creates `top` and the datasets at `rels` below it (parents first; `""`
/// is `top` itself), each with a file `f` holding its own name.
pub fn create_tree(top: &str, rels: &[&str]) {
    for r in rels {
        let ds = format!("{top}{r}");
        zfs(&["create", &ds]);
        write_file(&ds, "f", ds.as_bytes());
    }
}

/// The default certificates (one CA per test process) and others on demand.
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    pub fn make(dir: &Path, sender_name: &str) -> Certs {
        Certs::make_valid_for(dir, sender_name, 825)
    }

    /// Certificates valid for `days` (negative: already expired).
    pub fn make_valid_for(dir: &Path, sender_name: &str, days: i32) -> Certs {
        let script = root().join("scripts/make-certs.sh");
        let out = Command::new("bash")
            .env("ZFSYNC_CERT_DAYS", days.to_string())
            .arg(&script)
            .args(["-s", sender_name])
            .arg(dir)
            .output()
            .expect("run make-certs.sh");
        assert!(
            out.status.success(),
            "make-certs.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Certs {
            dir: dir.to_path_buf(),
        }
    }

    /// Shared by the tests of one process.
    pub fn shared() -> &'static Certs {
        static C: OnceLock<Certs> = OnceLock::new();
        C.get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("zfsync-certs-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Certs::make(&dir, "zfsync-sender")
        })
    }

    /// Options for the protocol client with this sender certificate,
    /// talking to a receiver on 127.0.0.1:`port`.
    pub fn client_options(&self, port: u16, run_id: &str) -> zfsync_common::client::ClientOptions {
        let tls = zfsync_common::tls::client_config(&zfsync_common::tls::TlsFiles {
            ca: &self.dir.join("ca.pem"),
            cert: &self.dir.join("sender.pem"),
            key: &self.dir.join("sender.key"),
        })
        .expect("client config");
        zfsync_common::client::ClientOptions {
            host: "127.0.0.1".into(),
            port,
            server_name: "localhost".into(),
            tls,
            run_id: run_id.into(),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            caps: Default::default(),
            transit: Default::default(),
        }
    }

    pub fn file(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    pub fn receiver_args(&self) -> Vec<String> {
        vec![
            "--ca".into(),
            self.file("ca.pem"),
            "--cert".into(),
            self.file("receiver.pem"),
            "--key".into(),
            self.file("receiver.key"),
        ]
    }

    pub fn sender_args(&self) -> Vec<String> {
        vec![
            "--ca".into(),
            self.file("ca.pem"),
            "--cert".into(),
            self.file("sender.pem"),
            "--key".into(),
            self.file("sender.key"),
        ]
    }
}

/// A running `zfsync-recv`, killed at drop; its log is kept for failures.
pub struct Receiver {
    child: Child,
    pub port: u16,
    pub log: Arc<Mutex<String>>,
}

impl Receiver {
    pub fn start(target: &str, tls: &[String], extra: &[&str]) -> Receiver {
        Receiver::start_on(target, tls, extra, 0)
    }

    /// On a given port (0: any free one).
    pub fn start_on(target: &str, tls: &[String], extra: &[&str], port: u16) -> Receiver {
        let port = port.to_string();
        let mut child = Command::new(bin("zfsync-recv"))
            .args(["-p", &port, "-l", "127.0.0.1"])
            .args(tls)
            .args(extra)
            .arg(target)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start zfsync-recv");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on 127.0.0.1:").nth(1) {
                    let port: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                    if let (Some(tx), Ok(p)) = (tx.take(), port.parse::<u16>()) {
                        let _ = tx.send(p);
                    }
                }
                let mut l = log2.lock().unwrap_or_else(|p| p.into_inner());
                l.push_str(&line);
                l.push('\n');
            }
        });
        let port = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(p) => p,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "zfsync-recv did not start:\n{}",
                    log.lock().unwrap_or_else(|p| p.into_inner())
                );
            }
        };
        Receiver { child, port, log }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until the log has `n` lines containing `needle`.
    #[track_caller]
    pub fn wait_for_log(&self, needle: &str, n: usize, within: Duration) {
        let start = Instant::now();
        while self.log().matches(needle).count() < n {
            assert!(
                start.elapsed() < within,
                "zfsync-recv did not log {needle:?} {n} times within {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How many `zfs receive` the receiver has started (the `spawning
    /// argv=` lines of its log) whose line names any of `names` (any
    /// receive if `names` is empty).
    pub fn receives_started(&self, names: &[&str]) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("spawning argv=") && l.contains("receive"))
            .filter(|l| names.is_empty() || names.iter().any(|n| l.contains(n)))
            .count()
    }

    /// Waits (a minute at most) until the receiver has started `n` such
    /// receives.
    #[track_caller]
    pub fn wait_for_receives(&self, n: usize, names: &[&str]) {
        let start = Instant::now();
        while self.receives_started(names) < n {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "receive #{n} of {names:?} did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and waits for the exit.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal.
    pub fn signal(&self, sig: &str) {
        run("kill", &[&format!("-{sig}"), &self.pid().to_string()]);
    }

    /// Sends a signal and waits for the exit status.
    pub fn signal_and_wait(
        &mut self,
        sig: &str,
        within: Duration,
    ) -> Option<std::process::ExitStatus> {
        run("kill", &[&format!("-{sig}"), &self.pid().to_string()]);
        let start = Instant::now();
        while start.elapsed() < within {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- zfsync-recv log ----\n{}", self.log());
        }
    }
}

/// A finished `zfsync-send` run.
pub struct SendRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub argv: String,
}

impl SendRun {
    pub fn dump(&self) -> String {
        format!(
            "$ {}\nexit {}\n--- stdout\n{}--- stderr\n{}",
            self.argv, self.code, self.stdout, self.stderr
        )
    }

    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, code, "unexpected exit status:\n{}", self.dump());
        self
    }

    #[track_caller]
    pub fn assert_stdout_has(&self, s: &str) -> &Self {
        assert!(
            self.stdout.contains(s),
            "stdout lacks {s:?}:\n{}",
            self.dump()
        );
        self
    }

    #[track_caller]
    pub fn assert_stderr_has(&self, s: &str) -> &Self {
        assert!(
            self.stderr.contains(s),
            "stderr lacks {s:?}:\n{}",
            self.dump()
        );
        self
    }
}

/// Runs `zfsync-send` with the given TLS and other arguments.
pub fn send(tls: &[String], args: &[&str]) -> SendRun {
    let out: Output = Command::new(bin("zfsync-send"))
        .args(tls)
        .args(args)
        .output()
        .expect("run zfsync-send");
    let argv = format!("zfsync-send {} {}", tls.join(" "), args.join(" "));
    SendRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        argv,
    }
}

/// A `zfsync-send` started in the background, its output collected.
pub struct RunningSend {
    child: Child,
    stdout: std::thread::JoinHandle<String>,
    stderr: std::thread::JoinHandle<String>,
    argv: String,
}

fn collect(mut r: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// Starts `zfsync-send` with the given TLS and other arguments, in the
/// background.
pub fn spawn_send(tls: &[String], args: &[&str]) -> RunningSend {
    let mut child = Command::new(bin("zfsync-send"))
        .args(tls)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start zfsync-send");
    let stdout = collect(child.stdout.take().expect("stdout"));
    let stderr = collect(child.stderr.take().expect("stderr"));
    RunningSend {
        child,
        stdout,
        stderr,
        argv: format!("zfsync-send {} {}", tls.join(" "), args.join(" ")),
    }
}

impl RunningSend {
    /// Sends a signal.
    pub fn signal(&self, sig: &str) {
        run("kill", &[&format!("-{sig}"), &self.child.id().to_string()]);
    }

    /// SIGKILL, and waits for the exit.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL zfsync-send");
        let _ = self.child.wait();
    }

    /// Waits for the exit (at most `within`, else kills it and fails): the
    /// finished run, and how long the wait took.
    #[track_caller]
    pub fn finish_within(mut self, within: Duration) -> (SendRun, Duration) {
        let start = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                break Some(st);
            }
            if start.elapsed() > within {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let took = start.elapsed();
        let run = SendRun {
            code: status.and_then(|s| s.code()).unwrap_or(-1),
            stdout: self.stdout.join().unwrap_or_default(),
            stderr: self.stderr.join().unwrap_or_default(),
            argv: self.argv,
        };
        assert!(
            status.is_some(),
            "zfsync-send did not exit within {within:?}:\n{}",
            run.dump()
        );
        (run, took)
    }
}

/// The processes whose command line matches `pattern` (`pgrep -a -f`), one
/// a line with its pid; empty if none.
pub fn processes(pattern: &str) -> String {
    let out = Command::new("pgrep")
        .args(["-a", "-f", pattern])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until no process matches `pattern` (see [`processes`]); fails
/// after `within` (at once for zero), naming `what` and those left.
#[track_caller]
pub fn wait_until_no_process(pattern: &str, within: Duration, what: &str) {
    let start = Instant::now();
    loop {
        let left = processes(pattern);
        if left.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < within,
            "{what} still running after {within:?}:\n{left}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `zfs send ARGS` into memory.
pub fn send_bytes(args: &[&str]) -> Vec<u8> {
    let out = Command::new(zfs_path())
        .arg("send")
        .args(args)
        .output()
        .expect("zfs send");
    assert!(
        out.status.success(),
        "zfs send {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Announces a stream to `to` (from the base `from`, if any), sends `data`
/// as it is in frames whose sizes cycle through `sizes`, and ends it saying
/// `end_bytes` were sent: the receiver's answer, or the error as text.
pub async fn raw_stream(
    c: &mut zfsync_common::client::Client,
    from: Option<u64>,
    to: &zfsync_common::zfs::Snapshot,
    data: &[u8],
    sizes: &[usize],
    end_bytes: u64,
) -> Result<u64, String> {
    c.begin_stream(from, to).await.map_err(|e| e.to_string())?;
    let mut rest = data;
    for size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let n = (*size).min(rest.len());
        c.connection()
            .send_data(zfsync_common::protocol::Bytes::copy_from_slice(&rest[..n]))
            .await
            .map_err(|e| e.to_string())?;
        rest = &rest[n..];
    }
    c.end_stream(end_bytes).await.map_err(|e| e.to_string())
}

/// Pipes `zfs send [FLAG BASE] ds@to` (`from`: `("-I", "s1")`, say)
/// through `c` as the data of a stream the caller announced, and waits
/// for `zfs send`; returns the byte count.
pub async fn pump_zfs_send(
    c: &mut zfsync_common::client::Client,
    ds: &str,
    from: Option<(&str, &str)>,
    to: &str,
) -> u64 {
    let mut cmd = tokio::process::Command::new(zfs_path());
    cmd.arg("send");
    if let Some((flag, base)) = from {
        cmd.args([flag, &format!("{ds}@{base}")]);
    }
    cmd.arg(format!("{ds}@{to}"));
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("zfs send");
    let mut out = child.stdout.take().expect("stdout");
    let n = c.pump(&mut out, |_| {}).await.expect("pump");
    assert!(child.wait().await.expect("wait").success());
    n
}

/// A `--zfs` wrapper script `name` in `dir`: a call for which the bash
/// test `when` holds (the call's arguments are `"$@"`, `$1` its
/// subcommand) runs `then` instead (which exits, or execs); every other
/// call runs the real zfs. Returns the script's path.
pub fn zfs_wrapper(dir: &TempDir, name: &str, when: &str, then: &str) -> String {
    let script = dir.path().join(name);
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\nif {when}; then\n{then}\nfi\nexec {zfs} \"$@\"\n",
            zfs = zfs_path()
        ),
    )
    .unwrap_or_else(|e| panic!("write {}: {e}", script.display()));
    run("chmod", &["+x", &script.to_string_lossy()]);
    script.to_string_lossy().into_owned()
}

/// A `--zfs` whose `zfs CALL` with at least `min_args` arguments (the
/// subcommand counted) fails, saying `message` on stderr (it may name the
/// call's arguments: `$2`, `$3`, ...).
pub fn failing_zfs(dir: &TempDir, call: &str, min_args: usize, message: &str) -> String {
    zfs_wrapper(
        dir,
        &format!("{call}-fails"),
        &format!("[ \"$1\" = {call} ] && [ $# -ge {min_args} ]"),
        &format!("  echo \"{message}\" >&2\n  exit 1"),
    )
}

/// A `--zfs` whose `zfs CALL` hangs while the file `flag` exists: it
/// becomes a `sleep 600` named `marker` (for pgrep), until killed.
pub fn hanging_zfs(dir: &TempDir, call: &str, flag: &Path, marker: &str) -> String {
    zfs_wrapper(
        dir,
        &format!("{call}-hangs"),
        &format!("[ \"$1\" = {call} ] && [ -e '{}' ]", flag.display()),
        &format!("  exec -a {marker} sleep 600"),
    )
}

/// A `--zfs` wrapper that logs every call, one line each, then runs zfs.
pub struct ZfsSpy {
    _dir: TempDir,
    pub script: String,
    log: PathBuf,
}

impl ZfsSpy {
    pub fn new() -> ZfsSpy {
        let dir = TempDir::new("spy");
        let log = dir.path().join("calls.log");
        let script = dir.path().join("zfs");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$*\" >> '{}'\nexec {} \"$@\"\n",
                log.display(),
                zfs_path()
            ),
        )
        .expect("write spy");
        run("chmod", &["+x", &script.to_string_lossy()]);
        ZfsSpy {
            script: script.to_string_lossy().into_owned(),
            _dir: dir,
            log,
        }
    }

    /// The calls, without the capability probes each binary makes once
    /// at start-up (`zfs version`, `zfs send -c` without operands, ...).
    pub fn calls(&self) -> Vec<String> {
        let probes: Vec<String> = zfsync_common::caps::Cap::ALL
            .iter()
            .map(|c| c.probe_args().join(" "))
            .chain(["version".to_string()])
            .collect();
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| !probes.iter().any(|p| p == l))
            .map(str::to_string)
            .collect()
    }

    pub fn clear(&self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

impl Default for ZfsSpy {
    fn default() -> Self {
        ZfsSpy::new()
    }
}

/// Snapshot GUIDs under `root`, keyed by the name relative to it
/// (`@s1`, `/a@s1`).
pub fn snapshot_guids(root: &str) -> BTreeMap<String, String> {
    let out = zfs(&["get", "-H", "-p", "-r", "-o", "name,value", "guid", root]);
    out.lines()
        .filter_map(|l| {
            let (name, guid) = l.split_once('\t')?;
            let rel = name.strip_prefix(root)?;
            rel.contains('@')
                .then(|| (rel.to_string(), guid.to_string()))
        })
        .collect()
}

/// Dataset names (no snapshots) under `root`, relative to it.
pub fn datasets(root: &str) -> Vec<String> {
    zfs(&["list", "-H", "-o", "name", "-r", root])
        .lines()
        .filter_map(|l| l.strip_prefix(root).map(str::to_string))
        .collect()
}

/// Everything in a pool, with GUIDs: to prove that nothing changed.
pub fn pool_state(pool: &str) -> String {
    zfs(&["get", "-H", "-p", "-r", "-o", "name,value", "guid", pool])
}

pub fn mountpoint(ds: &str) -> PathBuf {
    PathBuf::from(zfs(&["get", "-H", "-o", "value", "mountpoint", ds]).trim())
}

/// Writes a file into a mounted dataset.
pub fn write_file(ds: &str, name: &str, data: &[u8]) {
    let p = mountpoint(ds).join(name);
    std::fs::write(&p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

/// Deterministic pseudo-random bytes (incompressible enough for streams).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The files of one dataset as of snapshot `snap` (`pool/ds@s`), read
/// through a temporary clone so that the replica itself is never mounted
/// or modified.
pub fn files_at(snap: &str) -> BTreeMap<String, Vec<u8>> {
    let (ds, _) = snap.split_once('@').expect("snapshot name");
    let pool = ds.split('/').next().expect("pool");
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let clone = format!("{pool}/verify{}x{n}", std::process::id());
    let dir = TempDir::new("clone");
    let mp = format!("mountpoint={}", dir.path().display());
    zfs(&["clone", "-o", &mp, snap, &clone]);
    // zfs-fuse mounts asynchronously.
    let mut files = BTreeMap::new();
    for _ in 0..50 {
        files = read_tree(dir.path());
        if !files.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..40 {
        if zfs_try(&["destroy", &clone]).0 {
            break;
        }
        let _ = zfs_try(&["unmount", &clone]);
        std::thread::sleep(Duration::from_millis(250));
    }
    files
}

fn read_tree(top: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![top.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.file_name().is_some_and(|n| n == ".zfs") {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(data) = std::fs::read(&p) {
                let rel = p
                    .strip_prefix(top)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel, data);
            }
        }
    }
    out
}

/// Asserts that every dataset under `src` has, at snapshot `snap`, the same
/// files (byte for byte) as its replica under `dst`.
#[track_caller]
pub fn assert_same_files(src: &str, dst: &str, snap: &str) {
    for rel in datasets(src) {
        let a = files_at(&format!("{src}{rel}@{snap}"));
        let b = files_at(&format!("{dst}{rel}@{snap}"));
        assert!(!a.is_empty(), "no files in {src}{rel}@{snap}");
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "file lists differ for {rel:?}"
        );
        for (name, data) in &a {
            assert!(b[name] == *data, "{rel}/{name} differs at @{snap}");
        }
    }
}

/// Adds figures for the closing hardening line (`make test` sums them with
/// scripts/hardening-figures.sh): one `key value` per line.
pub fn record_figures(test: &str, figures: &[(&str, u64)]) {
    // target/debug/deps/<test> -> target/zfsync-figures
    let exe = std::env::current_exe().expect("test executable path");
    let Some(target) = exe.ancestors().nth(3) else {
        return;
    };
    let dir = target.join("zfsync-figures");
    let _ = std::fs::create_dir_all(&dir);
    let body: String = figures.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
    let _ = std::fs::write(dir.join(format!("{test}.txt")), body);
}

/// Peak resident memory of a process, in KiB (`VmHWM`).
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A `--zfs` for a sender whose `zfs send` output trickles at about 1 MiB/s,
/// so that a test can strike while a stream flows.
pub fn slow_zfs(dir: &TempDir) -> String {
    zfs_wrapper(
        dir,
        "slow-zfs",
        "[ \"$1\" = send ]",
        &trickle(65536, None, false),
    )
}

/// [`slow_zfs`] with SIGPIPE ignored: when the sender is killed, `zfs send`
/// then fails on the broken pipe and releases its temporary holds.
/// zfs-fuse's `zfs send` killed by a signal leaves its
/// `.send-<pid>-<time>` holds behind for good; OpenZFS releases them when
/// the process ends. Those stray holds would keep the very snapshots a test
/// of retention is about.
pub fn slow_zfs_clean_cut(dir: &TempDir) -> String {
    zfs_wrapper(
        dir,
        "slow-zfs",
        "[ \"$1\" = send ]",
        &trickle(65536, None, true),
    )
}

/// A `--zfs` whose `zfs send` output passes in `chunk`-byte pieces every
/// 50 ms, counting the pieces in `progress` (so a test can strike at a
/// known point of a large stream).
pub fn throttled_zfs(dir: &TempDir, chunk: usize, progress: &Path) -> String {
    zfs_wrapper(
        dir,
        "throttled-zfs",
        "[ \"$1\" = send ] && [ \"$2\" != -n ]",
        &trickle(chunk, Some(progress), false),
    )
}

/// Bash that runs the real `zfs "$@"` (a send) and lets its output through
/// in `chunk`-byte pieces every 50 ms, counting them in `progress` if given
/// and ignoring SIGPIPE if `ignore_sigpipe`; it exits as the pipeline did.
fn trickle(chunk: usize, progress: Option<&Path>, ignore_sigpipe: bool) -> String {
    let trap = if ignore_sigpipe {
        "  trap '' PIPE\n"
    } else {
        ""
    };
    let (count, counted) = match progress {
        Some(p) => (
            "  n=0\n",
            format!("    n=$((n+1)); echo $n > '{}'\n", p.display()),
        ),
        None => ("", String::new()),
    };
    format!(
        "  set -o pipefail\n{trap}  tmp=$(mktemp)\n{count}  {zfs} \"$@\" | while :; do\n    dd bs={chunk} count=1 iflag=fullblock of=\"$tmp\" status=none || break\n    [ -s \"$tmp\" ] || break\n    cat \"$tmp\" || break\n{counted}    sleep 0.05\n  done\n  rc=$?\n  rm -f \"$tmp\"\n  exit $rc",
        zfs = zfs_path()
    )
}

/// A real OpenZFS (kernel module) is what runs here: the OpenZFS tier's
/// tests fail, never skip, without it.
pub fn ensure_openzfs() -> String {
    ensure_zfs();
    let (ok, out) = zfs_try(&["version"]);
    assert!(
        ok && out.contains("zfs-kmod"),
        "these tests need OpenZFS with its kernel module (`zfs version` says: {out}); run them with `make test-openzfs`, which boots a VM that has it"
    );
    out.lines().next().unwrap_or_default().to_string()
}

/// The OpenZFS VM of `scripts/openzfs-vm.sh`, seen from the host: `ssh`
/// into it, and the host ports forwarded to its ports 9001..9004.
pub struct Vm {
    ssh: Vec<String>,
    pub port_base: u16,
}

impl Vm {
    /// From `ZFSYNC_VM_SSH` and `ZFSYNC_VM_PORT` (`scripts/openzfs-vm.sh env`).
    pub fn from_env() -> Vm {
        let ssh = std::env::var("ZFSYNC_VM_SSH").unwrap_or_default();
        let port = std::env::var("ZFSYNC_VM_PORT").unwrap_or_default();
        assert!(
            !ssh.is_empty() && port.parse::<u16>().is_ok(),
            "ZFSYNC_VM_SSH and ZFSYNC_VM_PORT are not set: run these tests with `make test-openzfs`, which boots the OpenZFS VM"
        );
        Vm {
            ssh: ssh.split_whitespace().map(str::to_string).collect(),
            port_base: port.parse().unwrap_or(0),
        }
    }

    /// Runs a shell command in the VM: (success, stdout+stderr).
    pub fn sh_try(&self, cmd: &str) -> (bool, String) {
        let out = Command::new(&self.ssh[0])
            .args(&self.ssh[1..])
            .arg(cmd)
            .output()
            .expect("run ssh");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    #[track_caller]
    pub fn sh(&self, cmd: &str) -> String {
        let (ok, out) = self.sh_try(cmd);
        assert!(ok, "in the VM, `{cmd}` failed: {out}");
        out
    }

    /// Starts a command in the VM that runs until the returned child (the
    /// ssh session) is killed.
    pub fn spawn(&self, cmd: &str) -> Child {
        Command::new(&self.ssh[0])
            .args(&self.ssh[1..])
            .arg(cmd)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ssh")
    }

    /// Copies a local file into the VM.
    pub fn put(&self, local: &Path, remote: &str) {
        let data = std::fs::read(local).expect("read file to copy");
        let mut child = Command::new(&self.ssh[0])
            .args(&self.ssh[1..])
            .arg(format!(
                "mkdir -p \"$(dirname '{remote}')\" && cat > '{remote}' && chmod +x '{remote}'"
            ))
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn ssh");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&data)
            .expect("copy to the VM");
        assert!(child.wait().expect("ssh").success(), "copying to {remote}");
    }
}

/// The snapshots of one dataset, oldest first, as the sender sees them.
pub fn snapshots_of(ds: &str) -> Vec<zfsync_common::zfs::Snapshot> {
    let out = zfs(&[
        "get",
        "-H",
        "-p",
        "-d",
        "1",
        "-o",
        "name,property,value",
        "guid,createtxg,type",
        ds,
    ]);
    let tree = zfsync_common::zfs::parse_get(&out).expect("parse zfs get");
    tree.datasets
        .into_values()
        .find(|d| d.name.as_str() == ds)
        .expect("dataset listed")
        .snapshots
}

/// Snapshot names of one dataset (not its children), oldest first.
pub fn snapshot_names(ds: &str) -> Vec<String> {
    snapshots_of(ds)
        .iter()
        .map(|s| s.name.to_string())
        .collect()
}

/// Relative paths a receiver must refuse: traversal, ZFS's forbidden
/// characters, control bytes, shell metacharacters, bad shapes, over-long.
pub fn hostile_paths() -> Vec<String> {
    let long = format!("/{}", "a".repeat(300));
    let long_component = format!("/{}", "b".repeat(250));
    [
        "/../x",
        "/a@b",
        "/a/../../etc",
        "/a//b",
        "//",
        "/",
        "/a/",
        "/a\0b",
        "x",
        "../outside",
        "/./a",
        "/.",
        "/..",
        "/a/.",
        "/a/..",
        "/a#b",
        "/a%b",
        "/a\tb",
        "/\n",
        "/a\r",
        "/a\u{7f}",
        "/é",
        "/\u{202e}txt",
        "/a\\b",
        "/a*b",
        "/a?b",
        "/a\"b",
        "/a'b",
        "/a;rm -rf",
        "/$(id)",
        "/a|b",
        "/a>b",
        "a/b",
        " /a",
    ]
    .iter()
    .map(|p| p.to_string())
    .chain([long, long_component])
    .collect()
}
