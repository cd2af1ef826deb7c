//! Retention decisions: which tool snapshots the sender prunes and which
//! the receiver mirrors. Pure functions, table-tested.

use crate::model::Snapshot;
use crate::naming::{parse_tool_snapshot, SnapClass, SnapName};

/// What retention does to one dataset's tool snapshots of one class.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prune {
    /// Oldest first.
    pub destroy: Vec<SnapName>,
    /// Would have been destroyed, but it is the newest snapshot the
    /// receiver confirmed: the base of the next incremental.
    pub held_back: Option<SnapName>,
    /// Would have been destroyed, but someone holds it (`zfs hold`: another
    /// receiver's base, or a person).
    pub held: Vec<SnapName>,
    /// Would have been destroyed, but it is newer than the confirmed base
    /// (or, with no confirmation, the newest snapshot): the receiver may
    /// have it already, from a run whose confirmation got lost.
    pub unconfirmed: Vec<SnapName>,
}

/// Keeps the newest `keep` tool snapshots of `class` (a person's snapshots
/// and other classes are never touched), never the confirmed base and never
/// anything newer than it: a stream cut part-way keeps the snapshots that
/// arrived whole, so the receiver's newest may be newer than the confirmed
/// one, and it must stay on the sender as the next base. Without any
/// confirmation the dataset's newest snapshot stays.
pub fn prune(
    snapshots: &[Snapshot],
    class: SnapClass,
    keep: usize,
    confirmed: Option<&str>,
    held: &std::collections::BTreeSet<String>,
) -> Prune {
    let ours: Vec<&Snapshot> = snapshots
        .iter()
        .filter(|s| parse_tool_snapshot(s.name.as_str()) == Some(class))
        .collect();
    let surplus = ours.len().saturating_sub(keep);
    let base = confirmed.and_then(|c| snapshots.iter().find(|s| s.name.as_str() == c));
    let newest = snapshots.last().map(|s| s.guid);
    let mut out = Prune::default();
    for s in &ours[..surplus] {
        let too_new = match base {
            Some(b) => s.createtxg > b.createtxg,
            None => Some(s.guid) == newest,
        };
        if Some(s.name.as_str()) == confirmed {
            out.held_back = Some(s.name.clone());
        } else if too_new {
            out.unconfirmed.push(s.name.clone());
        } else if held.contains(s.name.as_str()) {
            out.held.push(s.name.clone());
        } else {
            out.destroy.push(s.name.clone());
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

    #[test]
    fn prune_table() {
        let snaps = vec![
            s("261101-000000_D", 1, 1),
            s("manual", 2, 2),
            s("261102-000000_D", 3, 3),
            s("261102-010000_H", 4, 4),
            s("261103-000000_D", 5, 5),
            s("261104-000000_D", 6, 6),
        ];
        let names = |v: &[SnapName]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let none = std::collections::BTreeSet::new();
        let held = ["261101-000000_D".to_string()].into_iter().collect();
        let p = prune(&snaps, SnapClass::D, 2, None, &held);
        assert_eq!(names(&p.destroy), ["261102-000000_D"]);
        assert_eq!(names(&p.held), ["261101-000000_D"]);
        let p = prune(&snaps, SnapClass::D, 2, None, &none);
        assert_eq!(names(&p.destroy), ["261101-000000_D", "261102-000000_D"]);
        assert_eq!(p.held_back, None);
        // The confirmed base survives even a keep of 1.
        // Nothing newer than the confirmed base goes, whatever the count:
        // the receiver may have it from a run that was cut.
        let p = prune(&snaps, SnapClass::D, 1, Some("261102-000000_D"), &none);
        assert_eq!(names(&p.destroy), ["261101-000000_D"]);
        assert_eq!(p.held_back.unwrap().as_str(), "261102-000000_D");
        assert_eq!(names(&p.unconfirmed), ["261103-000000_D"]);
        // Without a confirmation the newest stays.
        let p = prune(&snaps, SnapClass::D, 0, None, &none);
        assert_eq!(names(&p.unconfirmed), ["261104-000000_D"]);
        assert_eq!(p.destroy.len(), 3);
        // Other classes and a person's snapshots are never touched.
        let p = prune(&snaps, SnapClass::H, 0, None, &none);
        assert_eq!(names(&p.destroy), ["261102-010000_H"]);
        assert!(prune(&snaps, SnapClass::S, 0, None, &none)
            .destroy
            .is_empty());
        assert!(prune(&snaps, SnapClass::D, 10, None, &none)
            .destroy
            .is_empty());
    }

    #[test]
    fn mirror_table() {
        let target = vec![
            s("261101-000000_D", 1, 1),
            s("mine", 2, 2),
            s("261102-000000_D", 3, 3),
            s("261103-000000_D", 4, 4),
        ];
        let names = |v: Vec<SnapName>| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
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
