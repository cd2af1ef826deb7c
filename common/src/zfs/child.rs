//! [`ZfsChild`]: a running `zfs send` or `zfs receive`, after ripgrep's
//! `CommandReader`: its stream is taken as an async reader or writer, its
//! stderr is drained on a task of its own into a bounded buffer (a `zfs`
//! that fills its stderr pipe can never block), and its end is one of two
//! idempotent calls: [`ZfsChild::close`] (wait, and turn a non-zero exit
//! into a [`ZfsError`] carrying argv, status and stderr) or
//! [`ZfsChild::abort`] (kill and reap). Dropping it kills the process too
//! (`kill_on_drop`): no child is ever left unreaped.

use std::future::Future;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::process::Child;
use tokio::task::JoinHandle;

use super::error::ZfsError;

/// How long an aborted child may take to see its closed pipes and exit
/// before it is killed.
pub const ABORT_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// At most this much of a child's stderr is kept for the error message.
const STDERR_LIMIT: usize = 64 * 1024;

/// The stream a `zfs send` writes.
pub type ChildReader = Box<dyn AsyncRead + Send + Unpin>;
/// The stream a `zfs receive` reads.
pub type ChildWriter = Box<dyn AsyncWrite + Send + Unpin>;

/// The pipe of a stream (`zfs send`'s output, `zfs receive`'s input)
/// holds [`PIPE_BYTES`] rather than the default 64 KiB (Linux): zfs goes
/// on while zfsync is busy with the network, and each side makes fewer,
/// larger reads and writes. Best effort: a host limit
/// (`/proc/sys/fs/pipe-max-size`) leaves the default.
#[cfg(target_os = "linux")]
fn widen_pipe(fd: &impl std::os::fd::AsRawFd) {
    use nix::fcntl::{fcntl, FcntlArg};
    let _ = fcntl(fd.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_BYTES));
}

#[cfg(not(target_os = "linux"))]
fn widen_pipe<T>(_: &T) {}

/// See [`widen_pipe`]: four of the sender's data frames.
#[cfg(target_os = "linux")]
const PIPE_BYTES: i32 = 1 << 20;

/// What runs behind a [`ZfsChild`].
enum Inner {
    /// A real process and the task draining its stderr.
    Process {
        child: Child,
        stderr: JoinHandle<String>,
    },
    /// A stand-in (the in-memory backend): a task whose result is the
    /// exit.
    Task(JoinHandle<Result<(), ZfsError>>),
    /// Closed or aborted already; `Some(reason)` if it had failed.
    Ended(Option<String>),
}

/// A running `zfs send` or `zfs receive`.
pub struct ZfsChild {
    argv: String,
    stdout: Option<ChildReader>,
    stdin: Option<ChildWriter>,
    inner: Inner,
}

impl ZfsChild {
    /// Wraps a spawned process; its stderr must be piped.
    pub(crate) fn process(argv: String, mut child: Child) -> ZfsChild {
        if let Some(s) = &child.stdout {
            widen_pipe(s);
        }
        if let Some(s) = &child.stdin {
            widen_pipe(s);
        }
        let stdout = child.stdout.take().map(|s| Box::new(s) as ChildReader);
        let stdin = child.stdin.take().map(|s| Box::new(s) as ChildWriter);
        let stderr = match child.stderr.take() {
            Some(e) => tokio::spawn(collect_stderr(e)),
            None => tokio::spawn(async { String::new() }),
        };
        ZfsChild {
            argv,
            stdout,
            stdin,
            inner: Inner::Process { child, stderr },
        }
    }

    /// A stand-in whose exit is the result of `task` (see
    /// [`super::fake`]).
    pub fn task(
        argv: String,
        stdout: Option<ChildReader>,
        stdin: Option<ChildWriter>,
        task: impl Future<Output = Result<(), ZfsError>> + Send + 'static,
    ) -> ZfsChild {
        ZfsChild {
            argv,
            stdout,
            stdin,
            inner: Inner::Task(tokio::spawn(task)),
        }
    }

    pub fn argv(&self) -> &str {
        &self.argv
    }

    /// The stream of a `zfs send` (once).
    pub fn take_stdout(&mut self) -> Option<ChildReader> {
        self.stdout.take()
    }

    /// The input of a `zfs receive` (once). Dropping it is how the stream
    /// ends: `zfs receive` sees EOF.
    pub fn take_stdin(&mut self) -> Option<ChildWriter> {
        self.stdin.take()
    }

    /// Closes its input (if still held) and waits for the exit; a non-zero
    /// exit becomes an error with stderr. Idempotent: a second call answers
    /// as the first did, without waiting.
    pub async fn close(&mut self) -> Result<(), ZfsError> {
        self.stdin = None;
        // Waited for in place: should this future be dropped mid-wait (a
        // timeout, a cancelled task), the child is still there for
        // `abort` and for Drop.
        let result = match &mut self.inner {
            Inner::Process { child, stderr } => match child.wait().await {
                Err(source) => Err(ZfsError::Io {
                    argv: self.argv.clone(),
                    source,
                }),
                Ok(status) => {
                    let stderr = stderr.await.unwrap_or_default();
                    if status.success() {
                        Ok(())
                    } else {
                        Err(ZfsError::from_failure(
                            &self.argv,
                            &status.to_string(),
                            stderr,
                        ))
                    }
                }
            },
            Inner::Task(task) => match task.await {
                Ok(r) => r,
                Err(e) => Err(ZfsError::Failed {
                    argv: self.argv.clone(),
                    status: "stand-in task ended".into(),
                    stderr: e.to_string(),
                }),
            },
            Inner::Ended(None) => return Ok(()),
            Inner::Ended(Some(reason)) => {
                return Err(ZfsError::Failed {
                    argv: self.argv.clone(),
                    status: "already reported".into(),
                    stderr: reason.clone(),
                })
            }
        };
        self.inner = Inner::Ended(result.as_ref().err().map(|e| e.to_string()));
        result
    }

    /// Ends the child and reaps it: used when a stream must not be
    /// committed (cut connection, error trailer, shutdown). Its pipes are
    /// closed first, so that `zfs` sees the end of its stream (EPIPE or
    /// EOF) and cleans up after itself; what has not exited after
    /// [`ABORT_GRACE`] is killed. Idempotent; a no-op once it ended.
    pub async fn abort(&mut self) {
        self.stdin = None;
        self.stdout = None;
        match std::mem::replace(&mut self.inner, Inner::Ended(Some("aborted".into()))) {
            Inner::Process { mut child, stderr } => {
                if tokio::time::timeout(ABORT_GRACE, child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
                stderr.abort();
            }
            Inner::Task(task) => {
                task.abort();
                let _ = task.await;
            }
            ended @ Inner::Ended(_) => self.inner = ended,
        }
    }

    /// [`ZfsChild::close`], but a child that does not exit within `limit`
    /// is killed. For a `zfs receive` whose stream was cut: it sees a short
    /// stream, fails and cleans up; waiting for it means the cleanup is
    /// done when this returns.
    pub async fn close_within(&mut self, limit: std::time::Duration) -> Result<(), ZfsError> {
        match tokio::time::timeout(limit, self.close()).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(argv = %self.argv, "did not exit within {limit:?}; killed");
                self.abort().await;
                Err(ZfsError::Timeout {
                    argv: self.argv.clone(),
                    after: limit,
                })
            }
        }
    }
}

impl Drop for ZfsChild {
    fn drop(&mut self) {
        // A process is spawned with kill_on_drop; a stand-in task is
        // stopped here.
        if let Inner::Task(t) = &self.inner {
            t.abort();
        }
    }
}

/// Keeps at most [`STDERR_LIMIT`] bytes, the first ones: zfs says what went
/// wrong first.
async fn collect_stderr(mut r: impl AsyncRead + Unpin) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = STDERR_LIMIT.saturating_sub(buf.len());
                buf.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn never() -> ZfsChild {
        ZfsChild::task("zfs receive p/x".into(), None, None, async {
            std::future::pending::<()>().await;
            Ok(())
        })
    }

    #[tokio::test]
    async fn close_is_idempotent_and_keeps_the_first_answer() {
        let mut ok = ZfsChild::task("zfs send p/x@s".into(), None, None, async { Ok(()) });
        assert!(ok.close().await.is_ok());
        assert!(ok.close().await.is_ok());
        let mut bad = ZfsChild::task("zfs receive p/x".into(), None, None, async {
            Err(ZfsError::from_failure(
                "zfs receive p/x",
                "exit status: 1",
                "cannot receive: invalid backup stream".into(),
            ))
        });
        assert!(bad.close().await.is_err());
        let again = bad.close().await.unwrap_err().to_string();
        assert!(again.contains("invalid backup stream"), "{again}");
    }

    #[tokio::test]
    async fn a_close_cut_short_leaves_the_child_to_abort() {
        let mut c = never();
        assert!(tokio::time::timeout(Duration::from_millis(20), c.close())
            .await
            .is_err());
        // Still running: abort ends it, and every later call says so.
        c.abort().await;
        assert!(c.close().await.is_err());
        c.abort().await;
        let mut d = never();
        assert!(d.close_within(Duration::from_millis(20)).await.is_err());
        assert!(d.close().await.is_err());
    }
}
