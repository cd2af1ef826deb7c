//! The planner: pure functions that decide, from the sender's and the
//! receiver's snapshot lists, what has to travel. No I/O here.
//!
//! Snapshots are matched by GUID (never by name alone) and ordered by
//! createtxg. The receiver calls [`negotiate`]; the sender turns the answer
//! into `zfs send` steps with [`steps`].

use crate::model::Snapshot;

mod prune;

pub use prune::{mirror, prune, Prune};

/// What the receiver has at the place a dataset maps to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetState<'a> {
    /// No such dataset, neither in place nor in the buffer.
    Absent {
        /// Does the parent exist in place? If not, the stream is buffered.
        parent_present: bool,
    },
    /// The dataset exists (in place, or in the buffer) with these snapshots,
    /// oldest first.
    Present { snapshots: &'a [Snapshot] },
}

/// Why a dataset needs a full replacement. It travels in the receiver's
/// answer, so the sender can say why (with both snapshot lists).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FullReason {
    /// The target has snapshots, none of which the source has.
    NoCommon { target: Vec<String> },
    /// The target has snapshots newer than the newest common one.
    Diverged { common: String, newer: Vec<String> },
    /// The target dataset exists but has no snapshot at all.
    TargetHasNoSnapshots,
}

impl std::fmt::Display for FullReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FullReason::NoCommon { target } => write!(
                f,
                "no common snapshot (the receiver has {}; the sender has none of them)",
                list(target)
            ),
            FullReason::Diverged { common, newer } => write!(
                f,
                "the receiver has snapshots newer than the common snapshot @{common}: {}",
                list(newer)
            ),
            FullReason::TargetHasNoSnapshots => {
                write!(f, "the dataset exists on the receiver but has no snapshots")
            }
        }
    }
}

fn list(names: &[String]) -> String {
    const SHOW: usize = 8;
    let mut s: Vec<String> = names.iter().take(SHOW).map(|n| format!("@{n}")).collect();
    if names.len() > SHOW {
        s.push(format!("and {} more", names.len() - SHOW));
    }
    s.join(", ")
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The source has no snapshots: nothing can be sent.
    NoSnapshots,
    /// The target's newest snapshot is the source's newest.
    UpToDate { snapshot: String },
    /// Send everything after `base_guid` up to the source's newest.
    Incremental {
        base_guid: u64,
        /// How many snapshots will arrive.
        count: usize,
    },
    /// The target has no such dataset; `buffered` says it goes to the
    /// buffer because its parent is not there yet.
    New { buffered: bool },
    /// Only a full replacement can bring the target in line. `accepted`
    /// when the sender asked for `--full`.
    Full { reason: FullReason, accepted: bool },
}

/// Decides what to do for one dataset. `source` and the target's snapshots
/// are oldest first.
pub fn negotiate(source: &[Snapshot], target: &TargetState<'_>, allow_full: bool) -> Decision {
    negotiate_with_bookmarks(source, &[], target, allow_full)
}

/// [`negotiate`] where the sender also has bookmarks (OpenZFS): a bookmark
/// whose GUID is the target's newest snapshot is a base for an incremental
/// even when the snapshot itself was pruned on the sender.
pub fn negotiate_with_bookmarks(
    source: &[Snapshot],
    bookmarks: &[Snapshot],
    target: &TargetState<'_>,
    allow_full: bool,
) -> Decision {
    let Some(newest) = source.last() else {
        return Decision::NoSnapshots;
    };
    let snapshots = match target {
        TargetState::Absent { parent_present } => {
            return Decision::New {
                buffered: !parent_present,
            }
        }
        TargetState::Present { snapshots } => *snapshots,
    };
    if snapshots.is_empty() {
        return Decision::Full {
            reason: FullReason::TargetHasNoSnapshots,
            accepted: allow_full,
        };
    }
    // Newest target snapshot whose GUID the source also has (as a snapshot
    // or as a bookmark).
    let guids: std::collections::HashSet<u64> =
        source.iter().chain(bookmarks).map(|s| s.guid).collect();
    let common = snapshots
        .iter()
        .enumerate()
        .rev()
        .find(|(_, t)| guids.contains(&t.guid));
    let Some((idx, common)) = common else {
        return Decision::Full {
            reason: FullReason::NoCommon {
                target: snapshots.iter().map(|s| s.name.to_string()).collect(),
            },
            accepted: allow_full,
        };
    };
    let newer = &snapshots[idx + 1..];
    if !newer.is_empty() {
        return Decision::Full {
            reason: FullReason::Diverged {
                common: common.name.to_string(),
                newer: newer.iter().map(|s| s.name.to_string()).collect(),
            },
            accepted: allow_full,
        };
    }
    if common.guid == newest.guid {
        return Decision::UpToDate {
            snapshot: newest.name.to_string(),
        };
    }
    let count = match source.iter().position(|s| s.guid == common.guid) {
        Some(pos) => source.len() - pos - 1,
        None => {
            // Only a bookmark: what the sender created after it.
            let Some(bm) = bookmarks.iter().find(|b| b.guid == common.guid) else {
                return Decision::NoSnapshots;
            };
            let count = source.iter().filter(|s| s.createtxg > bm.createtxg).count();
            if count == 0 {
                // The bookmark is newer than every snapshot: nothing to
                // send from it.
                return Decision::Full {
                    reason: FullReason::NoCommon {
                        target: snapshots.iter().map(|s| s.name.to_string()).collect(),
                    },
                    accepted: allow_full,
                };
            }
            count
        }
    };
    Decision::Incremental {
        base_guid: common.guid,
        count,
    }
}

/// One `zfs send`: full when `from` is `None`, else `-I from to`, or
/// `-i ds#from to` when `from_bookmark`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step<'a> {
    pub from: Option<&'a Snapshot>,
    pub to: &'a Snapshot,
    pub from_bookmark: bool,
}

/// The sends that carry out a decision so that every source snapshot after
/// the base arrives: a full send of the oldest, then `-I` to the newest.
/// Empty when nothing is to be sent (or the base is unknown to the source,
/// which negotiate never answers).
pub fn steps<'a>(source: &'a [Snapshot], decision: &Decision) -> Vec<Step<'a>> {
    steps_with_bookmarks(source, &[], decision)
}

/// [`steps`] where the base may be one of the sender's bookmarks: `-i` from
/// the bookmark to the next snapshot (zfs has no `-I` from a bookmark),
/// then `-I` to the newest.
pub fn steps_with_bookmarks<'a>(
    source: &'a [Snapshot],
    bookmarks: &'a [Snapshot],
    decision: &Decision,
) -> Vec<Step<'a>> {
    let (Some(oldest), Some(newest)) = (source.first(), source.last()) else {
        return Vec::new();
    };
    let step = |from: Option<&'a Snapshot>, to: &'a Snapshot| Step {
        from,
        to,
        from_bookmark: false,
    };
    let from_scratch = || {
        let mut v = vec![step(None, oldest)];
        if oldest.guid != newest.guid {
            v.push(step(Some(oldest), newest));
        }
        v
    };
    match decision {
        Decision::New { .. } => from_scratch(),
        Decision::Full { accepted: true, .. } => from_scratch(),
        Decision::Incremental { base_guid, .. } => {
            if let Some(base) = source.iter().find(|s| s.guid == *base_guid) {
                return if base.guid != newest.guid {
                    vec![step(Some(base), newest)]
                } else {
                    Vec::new()
                };
            }
            let Some(bm) = bookmarks.iter().find(|b| b.guid == *base_guid) else {
                return Vec::new();
            };
            let Some(next) = source.iter().find(|s| s.createtxg > bm.createtxg) else {
                return Vec::new();
            };
            let mut v = vec![Step {
                from: Some(bm),
                to: next,
                from_bookmark: true,
            }];
            if next.guid != newest.guid {
                v.push(step(Some(next), newest));
            }
            v
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::naming::SnapName;

    pub(super) fn s(name: &str, guid: u64, txg: u64) -> Snapshot {
        Snapshot {
            name: SnapName::new(name).unwrap(),
            guid,
            createtxg: txg,
        }
    }

    fn src() -> Vec<Snapshot> {
        vec![s("a", 1, 10), s("b", 2, 20), s("c", 3, 30)]
    }

    #[test]
    fn negotiate_table() {
        let source = src();
        let renamed = vec![s("x", 2, 20)];
        let all = src();
        let first = vec![s("a", 1, 10)];
        let alien = vec![s("a", 99, 10)];
        let diverged = vec![s("a", 1, 10), s("mine", 50, 25)];
        let none: Vec<Snapshot> = Vec::new();
        let table: Vec<(&str, &[Snapshot], TargetState, bool, Decision)> = vec![
            (
                "absent, parent there",
                &source,
                TargetState::Absent {
                    parent_present: true,
                },
                false,
                Decision::New { buffered: false },
            ),
            (
                "absent, parent missing -> buffer",
                &source,
                TargetState::Absent {
                    parent_present: false,
                },
                false,
                Decision::New { buffered: true },
            ),
            (
                "up to date",
                &source,
                TargetState::Present { snapshots: &all },
                false,
                Decision::UpToDate {
                    snapshot: "c".into(),
                },
            ),
            (
                "incremental from the oldest",
                &source,
                TargetState::Present { snapshots: &first },
                false,
                Decision::Incremental {
                    base_guid: 1,
                    count: 2,
                },
            ),
            (
                "matched by guid, not by name",
                &source,
                TargetState::Present {
                    snapshots: &renamed,
                },
                false,
                Decision::Incremental {
                    base_guid: 2,
                    count: 1,
                },
            ),
            (
                "same name, other guid: no common",
                &source,
                TargetState::Present { snapshots: &alien },
                false,
                Decision::Full {
                    reason: FullReason::NoCommon {
                        target: vec!["a".into()],
                    },
                    accepted: false,
                },
            ),
            (
                "diverged",
                &source,
                TargetState::Present {
                    snapshots: &diverged,
                },
                true,
                Decision::Full {
                    reason: FullReason::Diverged {
                        common: "a".into(),
                        newer: vec!["mine".into()],
                    },
                    accepted: true,
                },
            ),
            (
                "target without snapshots",
                &source,
                TargetState::Present { snapshots: &none },
                false,
                Decision::Full {
                    reason: FullReason::TargetHasNoSnapshots,
                    accepted: false,
                },
            ),
            (
                "source without snapshots is never full",
                &none,
                TargetState::Present { snapshots: &alien },
                true,
                Decision::NoSnapshots,
            ),
        ];
        for (what, source, target, full, want) in table {
            assert_eq!(negotiate(source, &target, full), want, "{what}");
        }
    }

    /// A step as (from, to) snapshot names.
    type Named = (Option<String>, String);

    fn names(steps: &[Step]) -> Vec<Named> {
        steps
            .iter()
            .map(|st| (st.from.map(|f| f.name.to_string()), st.to.name.to_string()))
            .collect()
    }

    #[test]
    fn steps_table() {
        let source = src();
        let one = vec![s("a", 1, 10)];
        let full_accepted = Decision::Full {
            reason: FullReason::TargetHasNoSnapshots,
            accepted: true,
        };
        let full_refused = Decision::Full {
            reason: FullReason::TargetHasNoSnapshots,
            accepted: false,
        };
        let table: Vec<(&[Snapshot], Decision, Vec<Named>)> = vec![
            (
                &source,
                Decision::New { buffered: false },
                vec![(None, "a".into()), (Some("a".into()), "c".into())],
            ),
            (
                &one,
                Decision::New { buffered: true },
                vec![(None, "a".into())],
            ),
            (
                &source,
                full_accepted,
                vec![(None, "a".into()), (Some("a".into()), "c".into())],
            ),
            (&source, full_refused, vec![]),
            (
                &source,
                Decision::Incremental {
                    base_guid: 2,
                    count: 1,
                },
                vec![(Some("b".into()), "c".into())],
            ),
            (
                &source,
                Decision::Incremental {
                    base_guid: 77,
                    count: 1,
                },
                vec![],
            ),
            (
                &source,
                Decision::UpToDate {
                    snapshot: "c".into(),
                },
                vec![],
            ),
            (&source, Decision::NoSnapshots, vec![]),
        ];
        for (source, decision, want) in table {
            assert_eq!(names(&steps(source, &decision)), want, "{decision:?}");
        }
    }

    #[test]
    fn a_bookmark_is_a_base_when_its_snapshot_was_pruned() {
        // The sender pruned @a and @b but bookmarked @b (guid 2).
        let source = vec![s("c", 3, 30), s("d", 4, 40)];
        let bookmarks = vec![s("b", 2, 20)];
        let target = vec![s("a", 1, 10), s("b", 2, 20)];
        let present = TargetState::Present { snapshots: &target };
        let table: Vec<(&str, &[Snapshot], Decision, Vec<Named>)> = vec![
            (
                "bookmark of the target's newest",
                &bookmarks,
                Decision::Incremental {
                    base_guid: 2,
                    count: 2,
                },
                vec![
                    (Some("b".into()), "c".into()),
                    (Some("c".into()), "d".into()),
                ],
            ),
            (
                "no bookmark: nothing in common",
                &[],
                Decision::Full {
                    reason: FullReason::NoCommon {
                        target: vec!["a".into(), "b".into()],
                    },
                    accepted: false,
                },
                vec![],
            ),
        ];
        for (what, bms, want, want_steps) in table {
            let d = negotiate_with_bookmarks(&source, bms, &present, false);
            assert_eq!(d, want, "{what}");
            let st = steps_with_bookmarks(&source, bms, &d);
            assert_eq!(names(&st), want_steps, "{what}");
            assert_eq!(
                st.iter().map(|x| x.from_bookmark).collect::<Vec<_>>(),
                (0..st.len()).map(|i| i == 0).collect::<Vec<_>>(),
                "{what}: only the first step starts at the bookmark"
            );
        }
        // A bookmark of an older target snapshot than its newest: diverged.
        let old_bm = vec![s("a", 1, 10)];
        assert!(matches!(
            negotiate_with_bookmarks(&source, &old_bm, &present, false),
            Decision::Full {
                reason: FullReason::Diverged { .. },
                ..
            }
        ));
        // With the snapshot still there, the snapshot is the base (-I).
        let with_snap = vec![s("b", 2, 20), s("c", 3, 30)];
        let d = negotiate_with_bookmarks(&with_snap, &bookmarks, &present, false);
        let st = steps_with_bookmarks(&with_snap, &bookmarks, &d);
        assert_eq!(names(&st), vec![(Some("b".into()), "c".into())]);
        assert!(!st[0].from_bookmark);
    }

    #[test]
    fn full_reason_lists_snapshots() {
        let r = FullReason::NoCommon {
            target: (0..10).map(|i| format!("s{i}")).collect(),
        };
        let m = r.to_string();
        assert!(m.contains("@s0") && m.contains("and 2 more"), "{m}");
    }
}
