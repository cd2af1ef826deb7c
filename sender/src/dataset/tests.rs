//! Table tests of the pure parts of one dataset's sync: the receiver's
//! answer to a decision or a [`DatasetError`], dry-run texts, base names.

use zfsync_common::naming::SnapName;
use zfsync_common::plan::FullReason;

use super::*;

fn snap(name: &str, guid: u64) -> Snapshot {
    Snapshot {
        name: SnapName::new(name).unwrap(),
        guid,
        createtxg: guid,
    }
}

/// A resumed stream of `bytes`, compressed to 80 % on the wire.
fn resumed_only(bytes: u64) -> Pumped {
    Pumped {
        bytes,
        wire: bytes * 4 / 5,
    }
}

fn snaps() -> Vec<Snapshot> {
    vec![snap("s1", 11), snap("s2", 12), snap("s3", 13)]
}

fn diverged() -> FullReason {
    FullReason::Diverged {
        common: "s1".into(),
        newer: vec!["mine".into()],
    }
}

#[test]
fn replies_become_decisions() {
    let send = |decision, kind, count| {
        Ok(Next::Send {
            decision,
            kind,
            count,
        })
    };
    // (reply, bytes resumed just before, expected)
    let cases: Vec<(SyncReply, u64, Result<Next, &str>)> = vec![
        (
            SyncReply::UpToDate {
                snapshot: "s3".into(),
            },
            0,
            Ok(Next::Done(Status::UpToDate {
                snapshot: "s3".into(),
            })),
        ),
        (
            SyncReply::UpToDate {
                snapshot: "s3".into(),
            },
            500,
            Ok(Next::Done(Status::Sent {
                kind: SendKind::Incremental,
                from: None,
                to: "s3".into(),
                snapshots: 1,
                bytes: 500,
                wire: 400,
                buffered: false,
                placed: false,
                mirrored: 0,
            })),
        ),
        (
            SyncReply::Incremental {
                base_guid: 11,
                count: 2,
            },
            0,
            send(
                Decision::Incremental {
                    base_guid: 11,
                    count: 2,
                },
                SendKind::Incremental,
                2,
            ),
        ),
        (
            SyncReply::New { buffered: true },
            0,
            send(Decision::New { buffered: true }, SendKind::Full, 3),
        ),
        (
            SyncReply::Full {
                reason: diverged(),
                accepted: true,
            },
            0,
            send(
                Decision::Full {
                    reason: diverged(),
                    accepted: true,
                },
                SendKind::Replaced,
                3,
            ),
        ),
        (
            SyncReply::Full {
                reason: diverged(),
                accepted: false,
            },
            0,
            Err("the receiver has snapshots newer than the common snapshot @s1: @mine; run with --full to replace the receiver's copy (it is kept until the new copy is whole)"),
        ),
        (
            SyncReply::Refused {
                reason: "another run for /a is still active".into(),
                temporary: true,
            },
            0,
            Err("refused by the receiver: another run for /a is still active"),
        ),
        (
            SyncReply::refused("reserved"),
            0,
            Err("refused by the receiver: reserved"),
        ),
        (
            SyncReply::Resume { token: "t".into() },
            100,
            Err("the receiver offered a resume twice; run again"),
        ),
    ];
    for (reply, resumed, want) in cases {
        let what = format!("{reply:?}");
        match (decide(reply, 3, resumed_only(resumed)), want) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "{what}"),
            (Err(e), Err(text)) => assert_eq!(e.to_string(), text, "{what}"),
            (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn busy_is_the_temporary_refusal() {
    let busy = decide(
        SyncReply::Refused {
            reason: "busy".into(),
            temporary: true,
        },
        1,
        Pumped::default(),
    );
    assert!(matches!(busy, Err(DatasetError::Busy { .. })));
    let refused = decide(SyncReply::refused("no"), 1, Pumped::default());
    assert!(matches!(refused, Err(DatasetError::Refused { .. })));
}

#[test]
fn dry_run_descriptions() {
    let cases: Vec<(SyncReply, Option<&str>)> = vec![
        (
            SyncReply::Incremental {
                base_guid: 11,
                count: 2,
            },
            Some("would send incremental @s1..@s3, 2 snapshot(s)"),
        ),
        (
            SyncReply::New { buffered: false },
            Some("would send full ..@s3, 3 snapshot(s)"),
        ),
        (
            SyncReply::New { buffered: true },
            Some("would send full ..@s3, 3 snapshot(s), into the buffer"),
        ),
        (
            SyncReply::Full {
                reason: FullReason::TargetHasNoSnapshots,
                accepted: true,
            },
            Some("would replace the receiver's copy (the dataset exists on the receiver but has no snapshots)"),
        ),
        (
            SyncReply::Full {
                reason: FullReason::TargetHasNoSnapshots,
                accepted: false,
            },
            None,
        ),
        (
            SyncReply::UpToDate {
                snapshot: "s3".into(),
            },
            None,
        ),
        (SyncReply::refused("no"), None),
    ];
    for (reply, want) in cases {
        assert_eq!(
            dry_run_plan(&reply, &snaps(), &[]).as_deref(),
            want,
            "{reply:?}"
        );
    }
}

#[test]
fn base_names() {
    let marks = vec![snap("zfsync_h:a", 20)];
    let inc = |base_guid| Decision::Incremental {
        base_guid,
        count: 1,
    };
    let cases: Vec<(Decision, Option<&str>)> = vec![
        (inc(12), Some("s2")),
        (inc(20), Some("#zfsync_h:a")),
        (inc(99), None),
        (Decision::New { buffered: false }, None),
    ];
    for (decision, want) in cases {
        assert_eq!(
            base_name(&decision, &snaps(), &marks).as_deref(),
            want,
            "{decision:?}"
        );
    }
}
