//! A `zfs` call that never returns (a wedged zfs, a suspended pool) is
//! killed after `--zfs-timeout` and reported, instead of holding a dataset
//! lock forever; shown against a stand-in `zfs` that hangs.

use std::time::{Duration, Instant};

use zfsync_common::naming::{DatasetName, SnapName};
use zfsync_common::zfs::{Zfs, ZfsBackend, ZfsError};

mod support;

#[tokio::test]
async fn a_hanging_zfs_is_killed_after_the_timeout() {
    let stand_in = support::StandIn::new("timeout", "echo $$ > \"$DIR/pid\"\nexec sleep 600\n");
    let pidfile = stand_in.file("pid");
    let zfs = Zfs::new(&stand_in.script).with_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let err = zfs
        .rollback(
            &DatasetName::new("p/a")
                .unwrap()
                .snapshot(&SnapName::new("s").unwrap())
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ZfsError::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(err.to_string().contains("--zfs-timeout"), "{err}");
    // The stand-in was killed, not left behind.
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    let mut gone = false;
    for _ in 0..50 {
        let alive = std::path::Path::new(&format!("/proc/{}", pid.trim())).exists()
            && !std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
                .unwrap_or_default()
                .contains(") Z ");
        if !alive {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        gone,
        "the hanging zfs (pid {}) is still running",
        pid.trim()
    );
}
