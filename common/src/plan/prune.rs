//! Retention decisions: which tool snapshots the sender prunes and which
//! the receiver mirrors. Pure functions, table-tested.

use crate::model::Snapshot;
use crate::naming::{parse_tool_snapshot, SnapClass, SnapName};

/// What retention does to one dataset's tool snapshots of one class.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prune {
    /// Oldest first.
    pub destroy: Vec<SnapName>,
    /// Would have been destroyed, but it is the newest snapshot this run's
    /// receiver confirmed: the base of the next incremental.
    pub held_back: Option<SnapName>,
    /// Would have been destroyed, but someone holds it (`zfs hold`: another
    /// receiver's base, or a person).
    pub held: Vec<SnapName>,
    /// Would have been destroyed, but it is newer than this receiver's
    /// confirmed base (or, for a receiver never sent anything, the newest
    /// snapshot): the receiver may have it already, from a run whose
    /// confirmation got lost.
    pub unconfirmed: Vec<SnapName>,
    /// Would have been destroyed, but this receiver has been sent this
    /// tree and never confirmed this dataset (or its confirmed snapshot is
    /// gone): a cut first sync may have left any snapshot there.
    pub never_confirmed: Vec<SnapName>,
    /// Would have been destroyed, but another receiver may hold it
    /// unconfirmed (its confirmed base or newer, or anything where it never
    /// confirmed the dataset): with those receivers' ids.
    pub for_others: Vec<(SnapName, Vec<String>)>,
}

/// From where on a receiver may hold a dataset's snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MayHold {
    /// Its confirmed base (this createtxg) and anything newer: a run cut
    /// after some streams leaves the snapshots that arrived whole.
    From(u64),
    /// Anything: it never confirmed the dataset (a first sync cut after
    /// its full stream leaves the oldest snapshot there), or the snapshot
    /// it confirmed is gone.
    Anything,
}

impl MayHold {
    fn of(snapshots: &[Snapshot], confirmed: Option<&str>) -> MayHold {
        match confirmed.and_then(|c| snapshots.iter().find(|s| s.name.as_str() == c)) {
            Some(base) => MayHold::From(base.createtxg),
            None => MayHold::Anything,
        }
    }

    fn covers(self, s: &Snapshot) -> bool {
        match self {
            MayHold::From(txg) => s.createtxg >= txg,
            MayHold::Anything => true,
        }
    }
}

/// Keeps the newest `keep` tool snapshots of `class` (a person's snapshots
/// and other classes are never touched), and never one a receiver may hold
/// unconfirmed.
///
/// `receivers` are the receivers that may have been sent this dataset (the
/// source's registry, and this run's receiver once it was reached or has
/// confirmed anything), each with the snapshot it confirmed
/// (`zfsync:synced_<id>`) or `None`. For each, its confirmed base and
/// everything newer stay (a stream cut part-way keeps the snapshots that
/// arrived whole, so a receiver's newest may be newer than the confirmed
/// one, and it must stay on the sender as the next base); where it never
/// confirmed the dataset, or its confirmed snapshot is gone, everything
/// stays. `this` is the run's receiver: when it is not among `receivers`
/// it was never sent anything, and only the dataset's newest snapshot
/// stays for it. Held snapshots (`held`) stay too.
pub fn prune(
    snapshots: &[Snapshot],
    class: SnapClass,
    keep: usize,
    this: &str,
    receivers: &[(&str, Option<&str>)],
    held: &std::collections::BTreeSet<String>,
) -> Prune {
    let ours: Vec<&Snapshot> = snapshots
        .iter()
        .filter(|s| parse_tool_snapshot(s.name.as_str()) == Some(class))
        .collect();
    let surplus = ours.len().saturating_sub(keep);
    let mine = receivers.iter().find(|(id, _)| *id == this);
    let confirmed = mine.and_then(|(_, c)| *c);
    let my_hold = mine.map(|(_, c)| MayHold::of(snapshots, *c));
    let others: Vec<(&str, MayHold)> = receivers
        .iter()
        .filter(|(id, _)| *id != this)
        .map(|(id, c)| (*id, MayHold::of(snapshots, *c)))
        .collect();
    let newest = snapshots.last().map(|s| s.guid);
    let mut out = Prune::default();
    for s in &ours[..surplus] {
        let name = s.name.clone();
        match my_hold {
            Some(MayHold::From(_)) if Some(s.name.as_str()) == confirmed => {
                out.held_back = Some(name)
            }
            Some(MayHold::From(txg)) if s.createtxg > txg => out.unconfirmed.push(name),
            Some(MayHold::Anything) => out.never_confirmed.push(name),
            None if Some(s.guid) == newest => out.unconfirmed.push(name),
            _ if held.contains(s.name.as_str()) => out.held.push(name),
            _ => {
                let keepers: Vec<String> = others
                    .iter()
                    .filter(|(_, may)| may.covers(s))
                    .map(|(id, _)| id.to_string())
                    .collect();
                if keepers.is_empty() {
                    out.destroy.push(name);
                } else {
                    out.for_others.push((name, keepers));
                }
            }
        }
    }
    out
}

/// Mirrored retention on the receiver: the tool snapshots the sender no
/// longer has, older than the receiver's newest. Nothing when the sender
/// announced nothing; never the newest (the next base), never a person's.
pub fn mirror(target: &[Snapshot], announced: &[Snapshot]) -> Vec<SnapName> {
    let (Some(newest), false) = (target.last(), announced.is_empty()) else {
        return Vec::new();
    };
    let on_sender: std::collections::HashSet<u64> = announced.iter().map(|s| s.guid).collect();
    target
        .iter()
        .filter(|s| s.guid != newest.guid)
        .filter(|s| s.createtxg < newest.createtxg)
        .filter(|s| !on_sender.contains(&s.guid))
        .filter(|s| parse_tool_snapshot(s.name.as_str()).is_some())
        .map(|s| s.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::s;

    fn names(v: &[SnapName]) -> Vec<String> {
        v.iter().map(|n| n.to_string()).collect()
    }

    fn snaps() -> Vec<Snapshot> {
        vec![
            s("261101-000000_D", 1, 1),
            s("manual", 2, 2),
            s("261102-000000_D", 3, 3),
            s("261102-010000_H", 4, 4),
            s("261103-000000_D", 5, 5),
            s("261104-000000_D", 6, 6),
        ]
    }

    #[test]
    fn prune_table() {
        let snaps = snaps();
        let none = std::collections::BTreeSet::new();
        let held = ["261101-000000_D".to_string()].into_iter().collect();
        // A receiver never sent anything ("r" is not among the receivers).
        let p = prune(&snaps, SnapClass::D, 2, "r", &[], &held);
        assert_eq!(names(&p.destroy), ["261102-000000_D"]);
        assert_eq!(names(&p.held), ["261101-000000_D"]);
        let p = prune(&snaps, SnapClass::D, 2, "r", &[], &none);
        assert_eq!(names(&p.destroy), ["261101-000000_D", "261102-000000_D"]);
        assert_eq!(p.held_back, None);
        // The confirmed base survives even a keep of 1.
        // Nothing newer than the confirmed base goes, whatever the count:
        // the receiver may have it from a run that was cut.
        let r = [("r", Some("261102-000000_D"))];
        let p = prune(&snaps, SnapClass::D, 1, "r", &r, &none);
        assert_eq!(names(&p.destroy), ["261101-000000_D"]);
        assert_eq!(p.held_back.unwrap().as_str(), "261102-000000_D");
        assert_eq!(names(&p.unconfirmed), ["261103-000000_D"]);
        // Never sent anything: the newest stays.
        let p = prune(&snaps, SnapClass::D, 0, "r", &[], &none);
        assert_eq!(names(&p.unconfirmed), ["261104-000000_D"]);
        assert_eq!(p.destroy.len(), 3);
        // Other classes and a person's snapshots are never touched.
        let p = prune(&snaps, SnapClass::H, 0, "r", &[], &none);
        assert_eq!(names(&p.destroy), ["261102-010000_H"]);
        assert!(prune(&snaps, SnapClass::S, 0, "r", &[], &none)
            .destroy
            .is_empty());
        assert!(prune(&snaps, SnapClass::D, 10, "r", &[], &none)
            .destroy
            .is_empty());
    }

    /// A receiver that was sent this tree but never confirmed the dataset
    /// (a first sync cut after its full stream), or whose confirmed
    /// snapshot is gone, may hold any snapshot: none goes.
    #[test]
    fn a_receiver_that_never_confirmed_keeps_everything() {
        let snaps = snaps();
        let none = std::collections::BTreeSet::new();
        for confirmed in [None, Some("gone")] {
            let p = prune(&snaps, SnapClass::D, 1, "r", &[("r", confirmed)], &none);
            assert!(p.destroy.is_empty(), "{confirmed:?}: {p:?}");
            assert_eq!(
                names(&p.never_confirmed),
                ["261101-000000_D", "261102-000000_D", "261103-000000_D"]
            );
            assert_eq!(p.held_back, None);
        }
        // The same for another receiver; this one confirmed the newest.
        let r = [("r", Some("261104-000000_D")), ("b", None)];
        let p = prune(&snaps, SnapClass::D, 1, "r", &r, &none);
        assert!(p.destroy.is_empty(), "{p:?}");
        assert_eq!(p.for_others.len(), 3);
        assert!(p.for_others.iter().all(|(_, ids)| ids == &["b"]));
    }

    /// Another receiver's confirmed base and everything newer stay, held
    /// or not; what is older than every receiver's base goes.
    #[test]
    fn other_receivers_keep_their_base_and_newer() {
        let snaps = snaps();
        let none = std::collections::BTreeSet::new();
        let kept = |p: &Prune| {
            p.for_others
                .iter()
                .map(|(n, ids)| format!("{n}:{}", ids.join("+")))
                .collect::<Vec<_>>()
        };
        // (this receiver's base, others, held, destroy, for_others, held)
        type Case<'a> = (
            &'a str,
            Vec<(&'a str, Option<&'a str>)>,
            Vec<&'a str>,
            Vec<&'a str>,
            Vec<&'a str>,
            Vec<&'a str>,
        );
        let cases: Vec<Case> = vec![
            (
                "b's base unheld (its hold failed), and newer",
                vec![("b", Some("261102-000000_D"))],
                vec![],
                vec!["261101-000000_D"],
                vec!["261102-000000_D:b", "261103-000000_D:b"],
                vec![],
            ),
            (
                "b's base held: reported as held",
                vec![("b", Some("261102-000000_D"))],
                vec!["261102-000000_D"],
                vec!["261101-000000_D"],
                vec!["261103-000000_D:b"],
                vec!["261102-000000_D"],
            ),
            (
                "two others: the older base decides",
                vec![
                    ("b", Some("261103-000000_D")),
                    ("c", Some("261102-000000_D")),
                ],
                vec![],
                vec!["261101-000000_D"],
                vec!["261102-000000_D:c", "261103-000000_D:b+c"],
                vec![],
            ),
            (
                "others up to date: the count decides",
                vec![("b", Some("261104-000000_D"))],
                vec![],
                vec!["261101-000000_D", "261102-000000_D", "261103-000000_D"],
                vec![],
                vec![],
            ),
            (
                "a person's snapshot of another class is no concern",
                vec![("b", Some("manual"))],
                vec![],
                vec!["261101-000000_D"],
                vec!["261102-000000_D:b", "261103-000000_D:b"],
                vec![],
            ),
        ];
        for (what, others, held, destroy, for_others, held_out) in cases {
            let mut receivers = vec![("r", Some("261104-000000_D"))];
            receivers.extend(others);
            let held = held.iter().map(|h| h.to_string()).collect();
            let p = prune(&snaps, SnapClass::D, 1, "r", &receivers, &held);
            assert_eq!(names(&p.destroy), destroy, "{what}");
            assert_eq!(kept(&p), for_others, "{what}");
            assert_eq!(names(&p.held), held_out, "{what}");
            assert_eq!(p.held_back, None, "{what}");
        }
        // This receiver's own base and newer come first, whoever else
        // keeps them.
        let r = [
            ("r", Some("261102-000000_D")),
            ("b", Some("261101-000000_D")),
        ];
        let p = prune(&snaps, SnapClass::D, 1, "r", &r, &none);
        assert_eq!(
            names(&p.held_back.clone().into_iter().collect::<Vec<_>>()),
            ["261102-000000_D"]
        );
        assert_eq!(names(&p.unconfirmed), ["261103-000000_D"]);
        assert_eq!(kept(&p), ["261101-000000_D:b"]);
        assert!(p.destroy.is_empty());
    }

    #[test]
    fn mirror_table() {
        let target = vec![
            s("261101-000000_D", 1, 1),
            s("mine", 2, 2),
            s("261102-000000_D", 3, 3),
            s("261103-000000_D", 4, 4),
        ];
        let names = |v: Vec<SnapName>| super::tests::names(&v);
        // The sender pruned its 261101 and 261102; it still has 261103.
        let announced = vec![s("261103-000000_D", 4, 40), s("261104-000000_D", 5, 50)];
        assert_eq!(
            names(mirror(&target, &announced)),
            ["261101-000000_D", "261102-000000_D"]
        );
        // An empty list never destroys anything.
        assert!(mirror(&target, &[]).is_empty());
        // The newest is never a candidate, even if the sender lost it.
        let only_old = vec![s("261101-000000_D", 1, 10)];
        assert_eq!(names(mirror(&target, &only_old)), ["261102-000000_D"]);
    }
}
