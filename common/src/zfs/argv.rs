//! argv for every `zfs` verb zfsync runs: pure builders, table-tested.
//! Running them is [`super::cli::Zfs`]'s job.

use std::ffi::OsString;

use crate::caps::{Cap, Caps};
use crate::naming::{DatasetName, SnapshotName};

pub(crate) fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// What a listing asks for beyond guid, createtxg and type; what the local
/// `zfs` cannot answer is left out (see [`ListExtras::for_caps`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListExtras {
    /// Bookmarks too (`-t filesystem,volume,snapshot,bookmark`).
    pub bookmarks: bool,
    /// `receive_resume_token`.
    pub resume_token: bool,
    /// `encryption`.
    pub encryption: bool,
    /// `userrefs` (which snapshots are held), where `zfs holds` exists.
    pub userrefs: bool,
    /// `written` (changed since the newest snapshot?), where zfs has it.
    pub written: bool,
}

impl ListExtras {
    pub fn for_caps(caps: &Caps) -> ListExtras {
        ListExtras {
            bookmarks: caps.has(Cap::Bookmarks),
            resume_token: caps.has(Cap::RecvResumable),
            encryption: caps.has(Cap::SendRaw),
            userrefs: caps.has(Cap::HoldsList),
            written: caps.has(Cap::Written),
        }
    }
}

/// `zfs get` of guid, createtxg, type and the given user properties for
/// whole trees, in one call.
pub fn list_argv(
    roots: &[&DatasetName],
    depth: Option<u32>,
    user_props: &[&str],
    extras: ListExtras,
) -> Vec<OsString> {
    let mut v = os(&["get", "-H", "-p"]);
    match depth {
        Some(d) => v.extend(os(&["-d", &d.to_string()])),
        None => v.push("-r".into()),
    }
    if extras.bookmarks {
        v.extend(os(&["-t", "filesystem,volume,snapshot,bookmark"]));
    }
    let mut props = "guid,createtxg,type".to_string();
    if extras.resume_token {
        props.push_str(",receive_resume_token");
    }
    if extras.encryption {
        props.push_str(",encryption");
    }
    if extras.userrefs && !user_props.contains(&"userrefs") {
        props.push_str(",userrefs");
    }
    if extras.written {
        props.push_str(",written");
    }
    for p in user_props {
        props.push(',');
        props.push_str(p);
    }
    v.extend(os(&["-o", "name,property,value,source", &props]));
    v.extend(roots.iter().map(|r| OsString::from(r.as_str())));
    v
}

/// Where an incremental stream starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendFrom {
    /// `-I snap`: every snapshot in between travels too.
    Snapshot(SnapshotName),
    /// `-i ds#bookmark`: from a bookmark, to one snapshot (zfs has no `-I`
    /// from a bookmark).
    Bookmark(String),
}

/// What to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendWhat {
    /// `zfs send [FLAGS] [-I from | -i #bookmark] to`.
    Snapshot {
        from: Option<SendFrom>,
        to: SnapshotName,
    },
    /// `zfs send [FLAGS] -t TOKEN`: continue a cut transfer.
    Resume { token: String },
}

/// `zfs send` with the stream flags both ends support (`-L -e -c`, or
/// `-w` for an encrypted dataset; see [`crate::caps::SendPath`]).
pub fn send_argv(what: &SendWhat, flags: &[&str]) -> Vec<OsString> {
    let mut v = os(&["send"]);
    v.extend(os(flags));
    match what {
        SendWhat::Snapshot { from, to } => {
            match from {
                Some(SendFrom::Snapshot(s)) => v.extend(os(&["-I", s.as_str()])),
                Some(SendFrom::Bookmark(b)) => v.extend(os(&["-i", b])),
                None => {}
            }
            v.push(to.as_str().into());
        }
        SendWhat::Resume { token } => v.extend(os(&["-t", token])),
    }
    v
}

/// A receive-side property option (`--recv-option`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecvOption {
    /// `-o PROP=VALUE`
    Set(String, String),
    /// `-x PROP`
    Exclude(String),
}

impl RecvOption {
    /// Parses `-o PROP=VALUE`, `-x PROP`, `o:PROP=VALUE` or `x:PROP`.
    pub fn parse(s: &str) -> Result<RecvOption, String> {
        let s = s.trim();
        let (kind, rest) = if let Some(r) = s.strip_prefix("-o").or_else(|| s.strip_prefix("o:")) {
            ('o', r.trim())
        } else if let Some(r) = s.strip_prefix("-x").or_else(|| s.strip_prefix("x:")) {
            ('x', r.trim())
        } else {
            return Err(format!(
                "'{s}': a receive option is '-o PROPERTY=VALUE' or '-x PROPERTY' (for example --recv-option '-o readonly=on' --recv-option '-x mountpoint')"
            ));
        };
        let valid_prop = |p: &str| {
            !p.is_empty()
                && p.len() <= 256
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_:.-".contains(c))
                && !p.starts_with('-')
        };
        match kind {
            'o' => {
                let (p, v) = rest.split_once('=').ok_or_else(|| {
                    format!("'{s}': -o needs PROPERTY=VALUE, for example '-o readonly=on'")
                })?;
                if !valid_prop(p) {
                    return Err(format!("'{s}': '{p}' is not a property name"));
                }
                if v.is_empty() || v.len() > 1024 || v.chars().any(|c| c.is_control()) {
                    return Err(format!(
                        "'{s}': the value must be 1 to 1024 printable characters"
                    ));
                }
                Ok(RecvOption::Set(p.to_string(), v.to_string()))
            }
            _ => {
                if !valid_prop(rest) {
                    return Err(format!("'{s}': '{rest}' is not a property name"));
                }
                Ok(RecvOption::Exclude(rest.to_string()))
            }
        }
    }

    pub fn args(&self) -> [String; 2] {
        match self {
            RecvOption::Set(p, v) => ["-o".into(), format!("{p}={v}")],
            RecvOption::Exclude(p) => ["-x".into(), p.clone()],
        }
    }
}

/// How a stream is received.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecvSpec {
    /// `-F`: only for a full stream into an existing dataset that has no
    /// snapshots (`--full`).
    pub force: bool,
    /// `-s`: a cut receive keeps a resume token.
    pub resumable: bool,
    /// `-o`/`-x` (`--recv-option`).
    pub options: Vec<RecvOption>,
}

/// `zfs receive -u [-s] [-F] [-o ..] [-x ..] dest`. `-u`: a replica is never
/// mounted by the receive. `-F` only for a full stream into an existing
/// dataset that has no snapshots (`--full`); incrementals are received
/// without it after a `zfs rollback` to the newest snapshot, which cannot
/// destroy snapshots.
pub fn receive_argv(dest: &DatasetName, spec: &RecvSpec) -> Vec<OsString> {
    let mut v = os(&["receive", "-u"]);
    if spec.resumable {
        v.push("-s".into());
    }
    if spec.force {
        v.push("-F".into());
    }
    for o in &spec.options {
        v.extend(o.args().iter().map(OsString::from));
    }
    v.push(dest.as_str().into());
    v
}

pub fn rename_argv(from: &DatasetName, to: &DatasetName) -> Vec<OsString> {
    os(&["rename", from.as_str(), to.as_str()])
}

pub fn create_unmounted_argv(ds: &DatasetName) -> Vec<OsString> {
    os(&["create", "-o", "mountpoint=none", ds.as_str()])
}

pub fn destroy_argv(ds: &DatasetName, recursive: bool) -> Vec<OsString> {
    if recursive {
        os(&["destroy", "-r", ds.as_str()])
    } else {
        os(&["destroy", ds.as_str()])
    }
}

/// `zfs rollback snap`, never `-r`: it refuses when newer snapshots exist.
pub fn rollback_argv(snap: &SnapshotName) -> Vec<OsString> {
    os(&["rollback", snap.as_str()])
}

pub fn unmount_argv(ds: &DatasetName) -> Vec<OsString> {
    os(&["unmount", ds.as_str()])
}

/// One property on many datasets in one call.
pub fn set_many_argv(datasets: &[DatasetName], prop: &str, value: &str) -> Vec<OsString> {
    let mut v = os(&["set", &format!("{prop}={value}")]);
    v.extend(datasets.iter().map(|d| OsString::from(d.as_str())));
    v
}

/// `zfs snapshot -r root@name`: one atomic snapshot of the whole tree.
pub fn snapshot_recursive_argv(snap: &SnapshotName) -> Vec<OsString> {
    os(&["snapshot", "-r", snap.as_str()])
}

/// `zfs destroy [-r] ds@snap`: a snapshot only (the name carries `@`).
pub fn destroy_snapshot_argv(snap: &SnapshotName, recursive: bool) -> Vec<OsString> {
    let mut v = os(&["destroy"]);
    if recursive {
        v.push("-r".into());
    }
    v.push(snap.as_str().into());
    v
}

/// `zfs hold TAG snap...`
pub fn hold_argv(tag: &str, snaps: &[SnapshotName]) -> Vec<OsString> {
    let mut v = os(&["hold", tag]);
    v.extend(snaps.iter().map(|s| OsString::from(s.as_str())));
    v
}

/// `zfs release TAG snap...`
pub fn release_argv(tag: &str, snaps: &[&str]) -> Vec<OsString> {
    let mut v = os(&["release", tag]);
    v.extend(snaps.iter().map(OsString::from));
    v
}

/// `zfs holds -H snap...` (OpenZFS; zfs-fuse cannot list holds).
pub fn holds_argv(snaps: &[&str]) -> Vec<OsString> {
    let mut v = os(&["holds", "-H"]);
    v.extend(snaps.iter().map(OsString::from));
    v
}

/// The names of every snapshot under `root`.
pub fn list_snapshots_argv(root: &DatasetName) -> Vec<OsString> {
    os(&[
        "list",
        "-H",
        "-r",
        "-t",
        "snapshot",
        "-o",
        "name",
        root.as_str(),
    ])
}

/// `zfs bookmark ds@snap ds#name`.
pub fn bookmark_argv(snap: &SnapshotName, name: &str) -> Vec<OsString> {
    let bm = format!("{}#{name}", snap.dataset());
    os(&["bookmark", snap.as_str(), &bm])
}

/// `zfs destroy ds#name` (a bookmark only: the name carries `#`).
pub fn destroy_bookmark_argv(ds: &DatasetName, name: &str) -> Vec<OsString> {
    os(&["destroy", &format!("{ds}#{name}")])
}

/// `zfs send -n -v -P -t TOKEN`: what a token continues; sends nothing.
pub fn resume_info_argv(token: &str) -> Vec<OsString> {
    os(&["send", "-n", "-v", "-P", "-t", token])
}

/// `zfs receive -A dest`: discards a cut resumable receive's state.
pub fn abort_resumable_argv(dest: &DatasetName) -> Vec<OsString> {
    os(&["receive", "-A", dest.as_str()])
}

/// `zfs version` (OpenZFS 0.8 and later; zfs-fuse has none).
pub fn version_argv() -> Vec<OsString> {
    os(&["version"])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds(s: &str) -> DatasetName {
        DatasetName::new(s).unwrap()
    }

    fn strs(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    #[test]
    fn receive_options_are_checked() {
        assert_eq!(
            RecvOption::parse("-o readonly=on"),
            Ok(RecvOption::Set("readonly".into(), "on".into()))
        );
        assert_eq!(
            RecvOption::parse("x:mountpoint"),
            Ok(RecvOption::Exclude("mountpoint".into()))
        );
        assert_eq!(
            RecvOption::parse("-o com.example:owner=ops team"),
            Ok(RecvOption::Set(
                "com.example:owner".into(),
                "ops team".into()
            ))
        );
        for bad in [
            "readonly=on",
            "-o readonly",
            "-o =on",
            "-x",
            "-x -F",
            "-o a=b\nc",
            "-o a b=c",
        ] {
            let bad = bad.replace("\\n", "\n");
            let e = RecvOption::parse(&bad).unwrap_err();
            assert!(e.contains('\''), "{bad:?}: {e}");
        }
    }

    fn snap(s: &str) -> SnapshotName {
        SnapshotName::new(s).unwrap()
    }

    /// `builder(..) => [expected argv]` rows, each named by its call.
    macro_rules! rows {
        ($($call:expr => $want:expr),* $(,)?) => {
            vec![$((stringify!($call), $call, &$want[..])),*]
        };
    }

    #[test]
    fn argv_builders() {
        let send = |to: &str, from: Option<SendFrom>| SendWhat::Snapshot { from, to: snap(to) };
        let resume = SendWhat::Resume {
            token: "1-abc".into(),
        };
        let all = ListExtras {
            bookmarks: true,
            resume_token: true,
            encryption: true,
            userrefs: true,
            written: true,
        };
        let none = ListExtras::default();
        let recv_all = RecvSpec {
            force: true,
            resumable: true,
            options: vec![
                RecvOption::parse("-o readonly=on").unwrap(),
                RecvOption::parse("-x mountpoint").unwrap(),
            ],
        };
        let table: Vec<(&str, Vec<OsString>, &[&str])> = rows![
            list_argv(&[&ds("p")], None, &[], all) => [
                "get", "-H", "-p", "-r",
                "-t", "filesystem,volume,snapshot,bookmark",
                "-o", "name,property,value,source",
                "guid,createtxg,type,receive_resume_token,encryption,userrefs,written",
                "p",
            ],
            // Asked for by the caller already: not twice.
            list_argv(&[&ds("p")], None, &["userrefs"], all) => [
                "get", "-H", "-p", "-r",
                "-t", "filesystem,volume,snapshot,bookmark",
                "-o", "name,property,value,source",
                "guid,createtxg,type,receive_resume_token,encryption,written,userrefs",
                "p",
            ],
            list_argv(&[&ds("p"), &ds("q")], None, &[], none) => [
                "get", "-H", "-p", "-r",
                "-o", "name,property,value,source", "guid,createtxg,type",
                "p", "q",
            ],
            list_argv(&[&ds("p/a")], Some(1), &["zfsync:last_sent"], none) => [
                "get", "-H", "-p", "-d", "1",
                "-o", "name,property,value,source", "guid,createtxg,type,zfsync:last_sent",
                "p/a",
            ],
            send_argv(&send("p/a@s2", None), &[]) => ["send", "p/a@s2"],
            send_argv(&send("p/a@s2", Some(SendFrom::Snapshot(snap("p/a@s1")))), &[]) => [
                "send", "-I", "p/a@s1", "p/a@s2",
            ],
            send_argv(
                &send("p/a@s2", Some(SendFrom::Bookmark("p/a#s1".into()))),
                &["-L", "-e", "-c"]
            ) => ["send", "-L", "-e", "-c", "-i", "p/a#s1", "p/a@s2"],
            send_argv(&resume, &["-w"]) => ["send", "-w", "-t", "1-abc"],
            receive_argv(&ds("q/a"), &RecvSpec::default()) => ["receive", "-u", "q/a"],
            // A new filesystem's marks in the receive itself (OpenZFS).
            receive_argv(&ds("q/a"), &RecvSpec {
                options: vec![
                    RecvOption::Set("canmount".into(), "noauto".into()),
                    RecvOption::Set("zfsync:replica".into(), "yes".into()),
                ],
                ..RecvSpec::default()
            }) => [
                "receive", "-u", "-o", "canmount=noauto", "-o", "zfsync:replica=yes", "q/a",
            ],
            receive_argv(&ds("q/a"), &recv_all) => [
                "receive", "-u", "-s", "-F",
                "-o", "readonly=on", "-x", "mountpoint",
                "q/a",
            ],
            rename_argv(&ds("p/b"), &ds("p/c")) => ["rename", "p/b", "p/c"],
            create_unmounted_argv(&ds("p/b")) => ["create", "-o", "mountpoint=none", "p/b"],
            destroy_argv(&ds("p/b"), true) => ["destroy", "-r", "p/b"],
            destroy_argv(&ds("p/b"), false) => ["destroy", "p/b"],
            rollback_argv(&snap("p/b@s")) => ["rollback", "p/b@s"],
            set_many_argv(&[ds("p/b")], "canmount", "noauto") => ["set", "canmount=noauto", "p/b"],
            unmount_argv(&ds("p/b")) => ["unmount", "p/b"],
            set_many_argv(&[ds("p/b"), ds("p/c")], "readonly", "on") => [
                "set", "readonly=on", "p/b", "p/c",
            ],
            snapshot_recursive_argv(&snap("p@s")) => ["snapshot", "-r", "p@s"],
            destroy_snapshot_argv(&snap("p/b@s"), false) => ["destroy", "p/b@s"],
            destroy_snapshot_argv(&snap("p/b@s"), true) => ["destroy", "-r", "p/b@s"],
            hold_argv("zfsync", &[snap("p/a@s1"), snap("p/b@s1")]) => [
                "hold", "zfsync", "p/a@s1", "p/b@s1",
            ],
            release_argv("zfsync", &["p/a@s1", "p/b@s1"]) => [
                "release", "zfsync", "p/a@s1", "p/b@s1",
            ],
            holds_argv(&["p/a@s1", "p/b@s1"]) => ["holds", "-H", "p/a@s1", "p/b@s1"],
            list_snapshots_argv(&ds("p/a")) => [
                "list", "-H", "-r", "-t", "snapshot", "-o", "name", "p/a",
            ],
            bookmark_argv(&snap("p/a@s1"), "s1") => ["bookmark", "p/a@s1", "p/a#s1"],
            destroy_bookmark_argv(&ds("p/a"), "s1") => ["destroy", "p/a#s1"],
            resume_info_argv("1-abc") => ["send", "-n", "-v", "-P", "-t", "1-abc"],
            abort_resumable_argv(&ds("q/a")) => ["receive", "-A", "q/a"],
            version_argv() => ["version"],
        ];
        for (call, got, want) in table {
            assert_eq!(strs(got), want, "{call}");
        }
    }
}
