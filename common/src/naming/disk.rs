//! Every name zfsync writes to disk, each with a `format_*`/`parse_*` pair
//! (or a constant and a check) and a round-trip test: tool snapshot names,
//! the receiver's buffer and temporary datasets, the sender's confirmation
//! property, hold tags and bookmark names, and the replica mark. All carry
//! the reserved prefix `zfsync` (or ZFSync's snapshot stamp), so zfsync
//! never mistakes a person's snapshot, hold or property for its own.

use super::{DatasetName, NameError, RelPath, SnapName};

/// The suffix that turns a target dataset name into its buffer dataset:
/// `pool/backup` buffers into `pool/backup.zfsyncbuffer`.
pub const BUFFER_SUFFIX: &str = ".zfsyncbuffer";

/// When the target is a pool root, the buffer is this child of the pool. A
/// sender can never replicate into it: the relative path `/zfsyncbuffer` is
/// refused for such a target.
pub const POOL_ROOT_BUFFER: &str = "zfsyncbuffer";

/// Suffix of the buffer dataset that holds a `--full` replacement until it is
/// whole and swapped into place.
pub const FULL_SUFFIX: &str = ".full";
/// Suffix under which the old copy waits during a `--full` swap.
pub const OLD_SUFFIX: &str = ".old";

/// The classes of tool snapshots, as in ZFSync: how often they are taken
/// decides how many of each are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SnapClass {
    /// Every run (for example each minute).
    S,
    /// Quarter hours: minutes 15, 30, 45.
    M,
    /// Full hours.
    H,
    /// Midnight.
    D,
}

impl SnapClass {
    pub fn letter(self) -> char {
        match self {
            SnapClass::S => 'S',
            SnapClass::M => 'M',
            SnapClass::H => 'H',
            SnapClass::D => 'D',
        }
    }

    pub fn from_letter(c: char) -> Option<SnapClass> {
        match c.to_ascii_uppercase() {
            'S' => Some(SnapClass::S),
            'M' => Some(SnapClass::M),
            'H' => Some(SnapClass::H),
            'D' => Some(SnapClass::D),
            _ => None,
        }
    }

    /// The class a run at this local time takes: D at 00:00, H at minute
    /// 0 of any other hour, M at minutes 15, 30 and 45, S otherwise.
    pub fn for_time(hour: u32, minute: u32) -> SnapClass {
        match (hour, minute) {
            (0, 0) => SnapClass::D,
            (_, 0) => SnapClass::H,
            (_, m) if m % 15 == 0 => SnapClass::M,
            _ => SnapClass::S,
        }
    }
}

/// A snapshot name zfsync makes: `yymmdd-HHMMSS_C` (ZFSync's naming), with
/// the local time of the run and the class letter.
pub fn format_tool_snapshot(stamp: &str, class: SnapClass) -> Result<SnapName, NameError> {
    SnapName::new(&format!("{stamp}_{}", class.letter()))
}

/// The class of a tool-made snapshot name; `None` for any other name (a
/// person's snapshots are never pruned).
pub fn parse_tool_snapshot(name: &str) -> Option<SnapClass> {
    let b = name.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    if b.len() != 15 || b[6] != b'-' || b[13] != b'_' || !digits(0..6) || !digits(7..13) {
        return None;
    }
    let c = char::from(b[14]);
    if c.is_ascii_uppercase() {
        SnapClass::from_letter(c)
    } else {
        None
    }
}

/// Where a receiver keeps datasets that arrived before their parent.
pub fn buffer_root(target: &DatasetName) -> DatasetName {
    if target.is_pool_root() {
        DatasetName::from_trusted(format!("{}/{}", target.as_str(), POOL_ROOT_BUFFER))
    } else {
        DatasetName::from_trusted(format!("{}{}", target.as_str(), BUFFER_SUFFIX))
    }
}

/// Is `rel` reserved for the buffer under this target?
pub fn is_reserved(target: &DatasetName, rel: &RelPath) -> bool {
    target.is_pool_root() && rel.first_component() == Some(POOL_ROOT_BUFFER)
}

/// The buffer dataset's leaf for a relative path: upper-case hex of the
/// path (`/a` -> `2F61`); `None` for the top dataset, which is never
/// buffered.
pub fn format_buffer_leaf(rel: &RelPath) -> Option<String> {
    rel.buffer_hex()
}

/// Reverses [`format_buffer_leaf`]; temporaries and foreign names are not
/// buffered datasets.
pub fn parse_buffer_leaf(leaf: &str) -> Option<RelPath> {
    RelPath::from_buffer_hex(leaf).ok()
}

/// The two temporary datasets of a `--full` replacement, in the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Temp {
    /// The new copy, received until whole: `HEX.full`.
    Full,
    /// The old copy, parked during the swap: `HEX.old`.
    Old,
}

/// The leaf of a temporary dataset: `HEX.full` / `HEX.old`, with `top` for
/// the top dataset.
pub fn format_temp_leaf(rel: &RelPath, kind: Temp) -> String {
    let base = rel.buffer_hex().unwrap_or_else(|| "top".to_string());
    match kind {
        Temp::Full => format!("{base}{FULL_SUFFIX}"),
        Temp::Old => format!("{base}{OLD_SUFFIX}"),
    }
}

/// Reverses [`format_temp_leaf`].
pub fn parse_temp_leaf(leaf: &str) -> Option<(RelPath, Temp)> {
    let (base, kind) = if let Some(b) = leaf.strip_suffix(FULL_SUFFIX) {
        (b, Temp::Full)
    } else {
        (leaf.strip_suffix(OLD_SUFFIX)?, Temp::Old)
    };
    let rel = if base == "top" {
        RelPath::root()
    } else {
        RelPath::from_buffer_hex(base).ok()?
    };
    Some((rel, kind))
}

/// A receiver as the sender names it in properties, tags and bookmarks:
/// `host_port`, lower-case letters, digits and `. _ -` only (so never `:`,
/// which separates a bookmark's receiver from its snapshot).
pub fn format_receiver_id(host: &str, port: u16) -> String {
    format!("{host}_{port}")
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

const CONFIRM_PREFIX: &str = "zfsync:synced_";
const HOLD_PREFIX: &str = "zfsync_";

/// The user property that records, on the sender, the newest snapshot this
/// receiver confirmed: `zfsync:synced_<receiver id>`.
pub fn format_confirm_prop(receiver_id: &str) -> String {
    format!("{CONFIRM_PREFIX}{receiver_id}")
}

/// The receiver id of a confirmation property.
pub fn parse_confirm_prop(prop: &str) -> Option<&str> {
    prop.strip_prefix(CONFIRM_PREFIX).filter(|r| !r.is_empty())
}

/// The receiver's own hold on the newest snapshot it received.
pub const RECV_HOLD: &str = "zfsync_recv";

/// A hold zfsync places.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldTag<'a> {
    /// The receiver's, on its newest received snapshot ([`RECV_HOLD`]).
    Receiver,
    /// The sender's, on the base this receiver confirmed:
    /// `zfsync_<receiver id>`.
    Sender(&'a str),
}

pub fn format_hold_tag(tag: HoldTag<'_>) -> String {
    match tag {
        HoldTag::Receiver => RECV_HOLD.to_string(),
        HoldTag::Sender(id) => format!("{HOLD_PREFIX}{id}"),
    }
}

/// A receiver id always ends in `_<port>`, so `recv` is never one.
pub fn parse_hold_tag(tag: &str) -> Option<HoldTag<'_>> {
    if tag == RECV_HOLD {
        return Some(HoldTag::Receiver);
    }
    tag.strip_prefix(HOLD_PREFIX)
        .filter(|id| !id.is_empty() && !id.contains(':'))
        .map(HoldTag::Sender)
}

/// The sender's bookmark of a confirmed base (OpenZFS):
/// `zfsync_<receiver id>:<snapshot>`, the part after `#`.
pub fn format_bookmark(receiver_id: &str, snap: &SnapName) -> String {
    format!("{HOLD_PREFIX}{receiver_id}:{snap}")
}

/// The receiver id and snapshot of one of zfsync's bookmarks.
pub fn parse_bookmark(name: &str) -> Option<(&str, &str)> {
    let (id, snap) = name.strip_prefix(HOLD_PREFIX)?.split_once(':')?;
    (!id.is_empty() && !snap.is_empty()).then_some((id, snap))
}

/// The user property that marks a dataset zfsync created on the receiver.
/// Only a value set on the dataset itself (source `local`) counts: a child
/// someone else made under a replica inherits the property, but not as
/// its own (the listing reads user properties only where they are local,
/// `zfs::parse_get`).
pub const REPLICA_PROP: &str = "zfsync:replica";

/// The value zfsync writes into [`REPLICA_PROP`]: a constant, so that the
/// mark can travel in the first `zfs receive -o` of a new replica and be
/// set on many datasets with one `zfs set`.
pub const REPLICA_MARK: &str = "yes";

/// A mark zfsync wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaMark {
    /// [`REPLICA_MARK`].
    Current,
    /// The dataset's own GUID, as zfsync wrote it before (still accepted).
    Guid(u64),
}

pub fn format_replica_mark() -> String {
    REPLICA_MARK.to_string()
}

pub fn parse_replica_mark(value: &str) -> Option<ReplicaMark> {
    if value == REPLICA_MARK {
        return Some(ReplicaMark::Current);
    }
    value.parse().ok().map(ReplicaMark::Guid)
}

/// The registry of receivers a source tree was sent to (on the sender).
/// The user property, set on the source dataset only (children inherit it,
/// and an inherited value is not read).
pub const RECEIVERS_PROP: &str = "zfsync:receivers";

/// Receivers read from one registry, at most: each adds a property to the
/// one listing.
pub const MAX_RECEIVERS: usize = 32;

/// A receiver id as [`format_receiver_id`] makes it:
/// lower-case letters, digits and `. _ -` (so never `,`), ending in
/// `_<port>`.
fn is_receiver_id(id: &str) -> bool {
    let port = id.rsplit_once('_').map(|(_, p)| p).unwrap_or_default();
    id.len() <= 200
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && id.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

/// The receiver ids of a registry value, in order, each once; entries that
/// are not receiver ids (a person's edit) are left out, and so is anything
/// after [`MAX_RECEIVERS`].
pub fn parse_receivers(value: &str) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    for id in value.split(',').map(str::trim) {
        if is_receiver_id(id) && !ids.iter().any(|i| i == id) && ids.len() < MAX_RECEIVERS {
            ids.push(id.to_string());
        }
    }
    ids
}

pub fn format_receivers(ids: &[String]) -> String {
    ids.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_roots() {
        let t = DatasetName::new("tank/backup").unwrap();
        assert_eq!(buffer_root(&t).as_str(), "tank/backup.zfsyncbuffer");
        let p = DatasetName::new("tank").unwrap();
        assert_eq!(buffer_root(&p).as_str(), "tank/zfsyncbuffer");
        assert!(is_reserved(&p, &RelPath::new("/zfsyncbuffer/x").unwrap()));
        assert!(!is_reserved(&t, &RelPath::new("/zfsyncbuffer").unwrap()));
        assert!(!is_reserved(&p, &RelPath::new("/zfsyncbuffers").unwrap()));
    }

    #[test]
    fn tool_snapshot_names_round_trip() {
        for c in [SnapClass::S, SnapClass::M, SnapClass::H, SnapClass::D] {
            let n = format_tool_snapshot("261122-101500", c).unwrap();
            assert_eq!(parse_tool_snapshot(n.as_str()), Some(c));
        }
        for other in [
            "",
            "s1",
            "261122-101500",
            "261122-101500_X",
            "261122-101500_SS",
            "26112a-101500_S",
            "261122_101500_S",
            "manual-before-upgrade",
            "261122-101500_s",
        ] {
            assert_eq!(parse_tool_snapshot(other), None, "{other:?}");
        }
    }

    #[test]
    fn class_follows_the_clock() {
        assert_eq!(SnapClass::for_time(0, 0), SnapClass::D);
        assert_eq!(SnapClass::for_time(13, 0), SnapClass::H);
        assert_eq!(SnapClass::for_time(13, 30), SnapClass::M);
        assert_eq!(SnapClass::for_time(0, 45), SnapClass::M);
        assert_eq!(SnapClass::for_time(13, 31), SnapClass::S);
        assert_eq!(SnapClass::for_time(0, 1), SnapClass::S);
    }

    #[test]
    fn buffer_and_temporary_names_round_trip() {
        for p in ["", "/a", "/a b/c-d.e:f"] {
            let rel = RelPath::new(p).unwrap();
            match format_buffer_leaf(&rel) {
                Some(leaf) => assert_eq!(parse_buffer_leaf(&leaf), Some(rel.clone())),
                None => assert!(rel.is_root()),
            }
            for kind in [Temp::Full, Temp::Old] {
                let leaf = format_temp_leaf(&rel, kind);
                assert_eq!(parse_temp_leaf(&leaf), Some((rel.clone(), kind)), "{leaf}");
                assert_eq!(parse_buffer_leaf(&leaf), None, "{leaf}");
            }
        }
        assert_eq!(
            format_temp_leaf(&RelPath::new("/a").unwrap(), Temp::Full),
            "2F61.full"
        );
        assert_eq!(format_temp_leaf(&RelPath::root(), Temp::Old), "top.old");
        for junk in ["junk", "2F61.tmp", ".full", "zz.old"] {
            assert_eq!(parse_temp_leaf(junk), None, "{junk}");
        }
    }

    #[test]
    fn sender_names_round_trip() {
        let id = format_receiver_id("Backup.example.org", 7878);
        assert_eq!(id, "backup.example.org_7878");
        assert_eq!(format_receiver_id("::1", 1), "__1_1");
        assert_eq!(format_confirm_prop("h_1"), "zfsync:synced_h_1");
        assert_eq!(
            parse_confirm_prop(&format_confirm_prop(&id)),
            Some(id.as_str())
        );
        assert_eq!(parse_confirm_prop("zfsync:replica"), None);
        let tag = format_hold_tag(HoldTag::Sender(&id));
        assert_eq!(tag, "zfsync_backup.example.org_7878");
        assert_eq!(parse_hold_tag(&tag), Some(HoldTag::Sender(id.as_str())));
        assert_eq!(format_hold_tag(HoldTag::Receiver), "zfsync_recv");
        assert_eq!(parse_hold_tag("zfsync_recv"), Some(HoldTag::Receiver));
        assert_eq!(parse_hold_tag("keep"), None);
        let snap = SnapName::new("261122-101500_S").unwrap();
        let bm = format_bookmark(&id, &snap);
        assert_eq!(bm, "zfsync_backup.example.org_7878:261122-101500_S");
        assert_eq!(parse_bookmark(&bm), Some((id.as_str(), snap.as_str())));
        assert_eq!(parse_bookmark("zfsync_x"), None);
        assert_eq!(parse_bookmark("manual:x"), None);
    }

    #[test]
    fn replica_marks_round_trip() {
        assert_eq!(
            parse_replica_mark(&format_replica_mark()),
            Some(ReplicaMark::Current)
        );
        // Marks written before the constant: the dataset's own GUID.
        for g in [0, 1, u64::MAX] {
            assert_eq!(
                parse_replica_mark(&g.to_string()),
                Some(ReplicaMark::Guid(g))
            );
        }
        for bad in ["-", "", "no", "Yes", "-1"] {
            assert_eq!(parse_replica_mark(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn registry_values_round_trip() {
        let ids = vec![
            format_receiver_id("backup.example.org", 7878),
            format_receiver_id("::1", 9000),
            "127.0.0.1_41001".to_string(),
        ];
        assert_eq!(parse_receivers(&format_receivers(&ids)), ids);
        assert_eq!(parse_receivers(""), Vec::<String>::new());
        assert_eq!(parse_receivers("-"), Vec::<String>::new());
        // A person's edits: spaces, duplicates, junk.
        assert_eq!(
            parse_receivers(" a_1 ,a_1,,B_2,c d_3,e:4,f_5,g_,_6"),
            ["a_1", "f_5", "_6"]
        );
        let many: Vec<String> = (0..40).map(|n| format!("h_{n}")).collect();
        assert_eq!(
            parse_receivers(&format_receivers(&many)).len(),
            MAX_RECEIVERS
        );
    }
}
