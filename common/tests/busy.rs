//! "dataset is busy" is retried a bounded number of times, then reported
//! clearly; shown against a stand-in `zfs` that is always busy.

use zfsync_common::naming::DatasetName;
use zfsync_common::zfs::{Zfs, ZfsBackend, ZfsError, BUSY_TRIES};

mod support;

#[tokio::test]
async fn busy_is_retried_then_reported() {
    let stand_in = support::StandIn::new(
        "busy",
        "echo \"$*\" >> \"$DIR/calls\"\necho \"cannot $1 '$2': dataset is busy\" >&2\nexit 1\n",
    );
    let calls = stand_in.file("calls");
    let zfs = Zfs::new(&stand_in.script);
    let a = DatasetName::new("p/a").unwrap();
    let b = DatasetName::new("p/b").unwrap();
    let err = zfs.rename(&a, &b).await.unwrap_err();
    assert!(
        matches!(err, ZfsError::Busy { tries, .. } if tries == BUSY_TRIES),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("dataset is busy") && msg.contains("tried 10 times"),
        "{msg}"
    );
    let log = std::fs::read_to_string(&calls).unwrap();
    let renames = log.lines().filter(|l| l.starts_with("rename")).count();
    assert_eq!(renames as u32, BUSY_TRIES, "{log}");
    // Between tries it unmounts the dataset (a mounted one is busy on
    // zfs-fuse).
    assert!(log.lines().any(|l| l == "unmount p/a"), "{log}");
}
