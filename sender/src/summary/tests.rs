//! Tests of the closing summary: every status, the result lines, a
//! stopped run.

use super::*;

fn o(name: &str, status: Status) -> Outcome {
    Outcome {
        dataset: DatasetName::new(name).unwrap(),
        status,
    }
}

#[test]
fn renders_every_kind() {
    let outcomes = vec![
        o(
            "p/a",
            Status::UpToDate {
                snapshot: "s3".into(),
            },
        ),
        o(
            "p/a/b",
            Status::Sent {
                kind: SendKind::Incremental,
                from: Some("s2".into()),
                to: "s3".into(),
                snapshots: 1,
                bytes: 2048,
                wire: 2048,
                buffered: false,
                placed: false,
                mirrored: 0,
            },
        ),
        o(
            "p/a/c",
            Status::Sent {
                kind: SendKind::Full,
                from: None,
                to: "s3".into(),
                snapshots: 3,
                bytes: 10,
                wire: 10,
                buffered: true,
                placed: true,
                mirrored: 0,
            },
        ),
        o("p/a/d", Status::NoSnapshots),
        o(
            "p/a/e",
            Status::Failed {
                reason: "no common snapshot; run with --full".into(),
            },
        ),
    ];
    let s = render(
        &DatasetName::new("p/a").unwrap(),
        "host:7878",
        &outcomes,
        Duration::from_millis(1500),
        50,
    );
    assert!(s.contains("up to date (@s3)"), "{s}");
    assert!(
        s.contains("incremental @s2..@s3, 1 snapshot, 2.0 KiB"),
        "{s}"
    );
    assert!(
        s.contains("full ..@s3, 3 snapshots, 10 B, buffered then placed"),
        "{s}"
    );
    assert!(s.contains("skipped: no snapshots"), "{s}");
    assert!(
        s.contains("FAILED: no common snapshot; run with --full"),
        "{s}"
    );
    assert!(
        s.contains(
            "datasets: 5 (1 up to date, 2 sent, 1 failed, 1 without snapshots); snapshots sent: 4"
        ),
        "{s}"
    );
    assert!(
        result_line(&outcomes, false, None, 0, false).contains("1 dataset(s) FAILED"),
        "{s}"
    );
    let short = render(
        &DatasetName::new("p/a").unwrap(),
        "h",
        &outcomes,
        Duration::ZERO,
        2,
    );
    assert!(short.contains("and 1 more datasets up to date"), "{short}");
    assert!(!short.contains("(@s3)"), "{short}");
}

/// With --compress, a dataset's line and the totals show the bytes on the
/// wire where they differ from the streams' bytes.
#[test]
fn compressed_streams_show_their_wire_bytes() {
    let sent = |bytes, wire| Status::Sent {
        kind: SendKind::Full,
        from: None,
        to: "s1".into(),
        snapshots: 1,
        bytes,
        wire,
        buffered: false,
        placed: false,
        mirrored: 0,
    };
    let outcomes = vec![
        o("p/a", sent(4 << 20, 1 << 20)),
        o("p/a/b", sent(2048, 2048)),
    ];
    let s = render(
        &DatasetName::new("p/a").unwrap(),
        "h",
        &outcomes,
        Duration::ZERO,
        50,
    );
    let want = "\
zfsync-send p/a -> h (0.0 s)
  p/a    full ..@s1, 1 snapshot, 4.0 MiB (1.0 MiB on the wire, ratio 4.00)
  p/a/b  full ..@s1, 1 snapshot, 2.0 KiB
datasets: 2 (0 up to date, 2 sent, 0 failed); snapshots sent: 2; bytes sent: 4.0 MiB (1.0 MiB on the wire, ratio 3.99)
";
    assert_eq!(s, want);
}

#[test]
fn result_lines() {
    let up = o(
        "p/a",
        Status::UpToDate {
            snapshot: "s1".into(),
        },
    );
    let failed = o("p/b", Status::Failed { reason: "x".into() });
    let planned = o(
        "p/c",
        Status::Planned {
            what: "would".into(),
        },
    );
    struct Case {
        outcomes: Vec<Outcome>,
        dry_run: bool,
        unreachable: Option<&'static str>,
        retention_errors: usize,
        stopped: bool,
        line: &'static str,
    }
    let base = |outcomes: Vec<Outcome>, line| Case {
        outcomes,
        dry_run: false,
        unreachable: None,
        retention_errors: 0,
        stopped: false,
        line,
    };
    let cases = vec![
        base(vec![up.clone()], "result: all datasets in sync"),
        base(
            vec![up.clone(), failed.clone()],
            "result: 1 dataset(s) FAILED (see above)",
        ),
        Case {
            retention_errors: 2,
            ..base(
                vec![up.clone()],
                "result: all datasets in sync; 2 retention error(s) (see above)",
            )
        },
        Case {
            dry_run: true,
            ..base(
                vec![planned],
                "result: dry run, nothing changed; 1 dataset(s) would change",
            )
        },
        Case {
            unreachable: Some("refused"),
            stopped: true,
            ..base(
                vec![],
                "result: receiver unreachable, nothing sent: refused",
            )
        },
        Case {
            stopped: true,
            ..base(
                vec![up.clone(), failed.clone(), failed],
                "result: STOPPED before the end; 2 dataset(s) not done (see above)",
            )
        },
        Case {
            stopped: true,
            ..base(
                vec![up],
                "result: STOPPED before the end; 0 dataset(s) not done (see above)",
            )
        },
    ];
    for c in cases {
        let got = result_line(
            &c.outcomes,
            c.dry_run,
            c.unreachable,
            c.retention_errors,
            c.stopped,
        );
        assert_eq!(got, format!("{}\n", c.line));
    }
}

/// A run stopped (SIGTERM) mid-transfer: what was done, the dataset cut
/// short, the one never started, pruning skipped, the STOPPED line.
#[test]
fn summary_of_a_stopped_run() {
    let report = Report {
        outcomes: vec![
            o(
                "p/src",
                Status::Sent {
                    kind: SendKind::Full,
                    from: None,
                    to: "s1".into(),
                    snapshots: 1,
                    bytes: 4096,
                    wire: 4096,
                    buffered: false,
                    placed: false,
                    mirrored: 0,
                },
            ),
            o(
                "p/src/big",
                Status::Failed {
                    reason: crate::DatasetError::Cancelled.to_string(),
                },
            ),
            o(
                "p/src/c",
                Status::Failed {
                    reason: crate::report::NOT_ATTEMPTED_STOPPED.into(),
                },
            ),
        ],
        elapsed: Duration::from_secs(2),
        retention: Retention {
            class: Some(zfsync_common::naming::SnapClass::D),
            keep: Some(3),
            pruning_skipped: true,
            confirmed: 1,
            ..Retention::default()
        },
        stopped: true,
        ..Report::default()
    };
    let s = report_text(&DatasetName::new("p/src").unwrap(), "h:1", &report);
    let want = "\
zfsync-send p/src -> h:1 (2.0 s)
  p/src      full ..@s1, 1 snapshot, 4.0 KiB
  p/src/big  FAILED: stopped: the run was stopped before this dataset was done (whole snapshots already received are kept; the next run goes on from there)
  p/src/c    FAILED: not attempted: the run was stopped
datasets: 3 (0 up to date, 1 sent, 2 failed); snapshots sent: 1; bytes sent: 4.0 KiB
retention (class D, keep 3): nothing pruned: the run was stopped
result: STOPPED before the end; 2 dataset(s) not done (see above)
";
    assert_eq!(s, want);
    assert_eq!(report.exit_code(), crate::exit::FAILED);
}

/// What retention kept for a receiver that never confirmed, for another
/// receiver, and a pruning a failed hold blocked (a retention error: exit 1).
#[test]
fn retention_lines_say_why_snapshots_were_kept() {
    let r = Retention {
        class: Some(zfsync_common::naming::SnapClass::S),
        keep: Some(1),
        held: vec!["p/a@x".into()],
        never_confirmed: vec!["p/a@s1".into(), "p/a@s2".into()],
        for_others: vec!["p/b@s1".into()],
        other_receivers: ["b_2".to_string(), "c_3".to_string()].into(),
        errors: vec!["pruning skipped for 1 dataset(s) whose confirmed base could not be held (zfs hold failed, see the warning; the next run prunes them unless its hold fails too): p/c".into()],
        warnings: vec!["cannot hold @s2 (tag zfsync_a_1): no".into()],
        ..Retention::default()
    };
    let s = render_after(&r, 0, &CleanReport::default(), false, Delete::NotAsked);
    let want = "\
retention (class S, keep 1): pruned 0 snapshot(s)
retention skipped held snapshots (zfs hold: another receiver's base, or a person's): p/a@x
retention kept 2 snapshot(s) of dataset(s) the receiver never confirmed, or whose confirmed snapshot is gone (a cut sync may have left any of them there; they go once a run confirms): p/a@s1, p/a@s2
retention kept 1 snapshot(s) another receiver may have unconfirmed (b_2, c_3: its confirmed base or newer; they go once it confirms newer ones): p/b@s1
retention warning: cannot hold @s2 (tag zfsync_a_1): no
retention error: pruning skipped for 1 dataset(s) whose confirmed base could not be held (zfs hold failed, see the warning; the next run prunes them unless its hold fails too): p/c
";
    assert_eq!(s, want);
    let report = Report {
        retention: r,
        ..Report::default()
    };
    assert_eq!(report.exit_code(), crate::exit::FAILED);
}

/// An orphan `--delete-missing` could not destroy is shown with the
/// receiver's reason, named on the result line, and fails the run.
#[test]
fn an_orphan_not_deleted_is_reported_and_fails_the_run() {
    let report = Report {
        outcomes: vec![o(
            "p/src",
            Status::UpToDate {
                snapshot: "s1".into(),
            },
        )],
        clean: zfsync_common::protocol::CleanReport {
            orphans: vec!["/gone".into()],
            failed: vec![zfsync_common::protocol::PlaceFailure {
                path: "/gone".into(),
                reason:
                    "cannot delete the orphaned replica q/t/gone: filesystem has dependent clones"
                        .into(),
            }],
            ..Default::default()
        },
        delete: Delete::Done,
        ..Report::default()
    };
    let s = crate::summary(&DatasetName::new("p/src").unwrap(), "backup:7878", &report);
    assert!(
        s.contains("NOT deleted on the receiver: /gone: cannot delete the orphaned replica q/t/gone: filesystem has dependent clones"),
        "{s}"
    );
    assert!(
        s.contains("result: all datasets in sync; 1 orphan(s) not deleted (see above)"),
        "{s}"
    );
    assert_eq!(report.exit_code(), crate::exit::FAILED);
}
