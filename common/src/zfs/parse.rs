//! Parsers of `zfs` output: pure functions, no I/O.

use std::collections::BTreeMap;

use crate::model::{Dataset, Snapshot, Tree};
use crate::naming::{DatasetName, NameError, SnapName, SnapshotName};

use super::error::ZfsError;

#[derive(Default)]
struct Props {
    guid: Option<u64>,
    createtxg: Option<u64>,
    kind: Option<String>,
    user: BTreeMap<String, String>,
    held: bool,
    resume_token: Option<String>,
    encrypted: bool,
    written: Option<u64>,
}

/// Parses `zfs get -H -p -o name,property,value guid,createtxg,type` output.
pub fn parse_get(output: &str) -> Result<Tree, ZfsError> {
    let mut props: BTreeMap<&str, Props> = BTreeMap::new();
    for line in output.lines().filter(|l| !l.is_empty()) {
        let bad = |reason: &str| ZfsError::Parse {
            line: line.to_string(),
            reason: reason.to_string(),
        };
        let mut f = line.split('\t');
        let (Some(name), Some(prop), Some(value), source, None) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            return Err(bad("expected three or four tab-separated fields"));
        };
        let p = props.entry(name).or_default();
        match prop {
            "guid" => p.guid = Some(value.parse().map_err(|_| bad("guid is not a number"))?),
            "createtxg" => {
                p.createtxg = Some(
                    value
                        .parse()
                        .map_err(|_| bad("createtxg is not a number"))?,
                )
            }
            "type" => p.kind = Some(value.to_string()),
            "userrefs" => p.held = value.parse::<u64>().is_ok_and(|n| n > 0),
            "receive_resume_token" => {
                if value != "-" && !value.is_empty() {
                    p.resume_token = Some(value.to_string());
                }
            }
            "encryption" => p.encrypted = !matches!(value, "off" | "-" | ""),
            // Bytes written since the newest snapshot (OpenZFS).
            "written" => p.written = value.parse().ok(),
            // A user property; "-" means not set. Only a value set on the
            // dataset itself counts: user properties are inherited, and a
            // child must not take its parent's confirmation for its own.
            user if user.contains(':') => {
                if value != "-" && source.is_none_or(|s| s == "local") {
                    p.user.insert(user.to_string(), value.to_string());
                }
            }
            _ => return Err(bad("unexpected property")),
        }
    }
    let mut tree = Tree::default();
    let mut snaps: Vec<(DatasetName, Snapshot, bool)> = Vec::new();
    let mut bookmarks: Vec<(DatasetName, Snapshot)> = Vec::new();
    for (name, p) in props {
        let (Some(guid), Some(createtxg), Some(kind)) = (p.guid, p.createtxg, p.kind) else {
            return Err(ZfsError::Parse {
                line: name.to_string(),
                reason: "missing guid, createtxg or type".into(),
            });
        };
        let checked: Result<(), NameError> = (|| {
            if kind == "bookmark" {
                let (ds, bm) = name.split_once('#').ok_or(NameError::Empty)?;
                bookmarks.push((
                    DatasetName::new(ds)?,
                    Snapshot {
                        name: SnapName::new(bm)?,
                        guid,
                        createtxg,
                    },
                ));
            } else if kind == "snapshot" {
                let s = SnapshotName::new(name)?;
                snaps.push((
                    s.dataset(),
                    Snapshot {
                        name: s.snap(),
                        guid,
                        createtxg,
                    },
                    p.held,
                ));
            } else {
                let ds = DatasetName::new(name)?;
                tree.datasets.insert(
                    ds.clone(),
                    Dataset {
                        name: ds,
                        guid,
                        kind: kind.clone(),
                        snapshots: Vec::new(),
                        props: p.user.clone(),
                        held: Default::default(),
                        bookmarks: Vec::new(),
                        resume_token: p.resume_token.clone(),
                        encrypted: p.encrypted,
                        written: p.written,
                    },
                );
            }
            Ok(())
        })();
        if let Err(e) = checked {
            tree.skipped.push((name.to_string(), e.to_string()));
        }
    }
    for (ds, snap, held) in snaps {
        if let Some(d) = tree.datasets.get_mut(&ds) {
            if held {
                d.held.insert(snap.name.to_string());
            }
            d.snapshots.push(snap);
        }
    }
    for (ds, bm) in bookmarks {
        if let Some(d) = tree.datasets.get_mut(&ds) {
            d.bookmarks.push(bm);
        }
    }
    for d in tree.datasets.values_mut() {
        d.snapshots.sort_by_key(|s| s.createtxg);
        d.bookmarks.sort_by_key(|s| s.createtxg);
    }
    Ok(tree)
}

/// What a resume token continues (from `zfs send -nvP -t`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumeInfo {
    /// 0 for a full stream.
    pub from_guid: u64,
    pub to_guid: u64,
    /// `pool/ds@snap` on the sending side.
    pub to_name: String,
    /// Bytes already received, when the token says.
    pub bytes_done: Option<u64>,
    /// Bytes still to send (`-P` estimate), when printed.
    pub bytes_left: Option<u64>,
    /// The token is for a raw stream (`rawok`).
    pub raw: bool,
}

/// Parses `zfs send -nvP -t TOKEN` output: the token's nvlist
/// (`\ttoguid = 0x...`, `\ttoname = p/ds@s`) and the `size` line.
pub fn parse_resume_info(text: &str) -> Option<ResumeInfo> {
    let num = |v: &str| {
        let v = v.trim();
        match v.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).ok(),
            None => v.parse().ok(),
        }
    };
    let (mut from, mut to, mut name, mut done, mut left) = (None, None, None, None, None);
    let mut raw = false;
    let mut seen = std::collections::HashSet::new();
    for line in text.lines() {
        let t = line.trim();
        if let Some((k, v)) = t.split_once(" = ") {
            // A key twice: not what zfs prints; do not guess which counts.
            if !seen.insert(k.trim().to_string()) {
                return None;
            }
            match k.trim() {
                "rawok" => raw = true,
                "fromguid" => from = num(v),
                "toguid" => to = num(v),
                "toname" => name = Some(v.trim().to_string()),
                "bytes" => done = num(v),
                _ => {}
            }
        } else if let Some(v) = t.strip_prefix("size") {
            left = num(v);
        }
    }
    Some(ResumeInfo {
        from_guid: from.unwrap_or(0),
        to_guid: to?,
        to_name: name?,
        bytes_done: done,
        bytes_left: left,
        raw,
    })
}

/// The snapshots in `zfs holds -H` output that carry the hold `tag`.
pub fn parse_holds(output: &str, tag: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let (name, t) = (f.next()?, f.next()?);
            (t == tag).then(|| name.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds(s: &str) -> DatasetName {
        DatasetName::new(s).unwrap()
    }

    /// Captured from zfs-fuse 0.7 on Debian 12.
    const GET_OUTPUT: &str = "ptest1\tguid\t6186781169226890311
ptest1\tcreatetxg\t1
ptest1\ttype\tfilesystem
ptest1@s1\tguid\t6783105174159580119
ptest1@s1\tcreatetxg\t18
ptest1@s1\ttype\tsnapshot
ptest1/a\tguid\t13830589434478674581
ptest1/a\tcreatetxg\t6
ptest1/a\ttype\tfilesystem
ptest1/a@s2\tguid\t10630045319145745963
ptest1/a@s2\tcreatetxg\t31
ptest1/a@s2\ttype\tsnapshot
ptest1/a@s1\tguid\t13827386497387903594
ptest1/a@s1\tcreatetxg\t18
ptest1/a@s1\ttype\tsnapshot
ptest1/a\x01b\tguid\t1
ptest1/a\x01b\tcreatetxg\t7
ptest1/a\x01b\ttype\tfilesystem
";

    #[test]
    fn parses_get_output() {
        let t = parse_get(GET_OUTPUT).unwrap();
        assert_eq!(t.datasets.len(), 2);
        let a = &t.datasets[&ds("ptest1/a")];
        assert_eq!(a.guid, 13830589434478674581);
        let names: Vec<&str> = a.snapshots.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["s1", "s2"], "sorted by createtxg");
        assert_eq!(a.snapshots[1].guid, 10630045319145745963);
        assert_eq!(t.datasets[&ds("ptest1")].snapshots.len(), 1);
        assert_eq!(t.skipped.len(), 1);
        assert_eq!(t.skipped[0].0, "ptest1/a\x01b");
    }

    #[test]
    fn resume_token_contents_are_parsed() {
        let out = "resume token contents:
nvlist version: 0
\tfromguid = 0x5b7c5ef4b1d8a2f3
\tobject = 0x3
\toffset = 0x2e40000
\tbytes = 0x2e6d8e0
\ttoguid = 0x1c9f0b6a4d2e8f11
\ttoname = src/data@s3
\tcompressok = 1
incremental\tsrc/data@s2\tsrc/data@s3\t161480704
size\t161480704
";
        let r = parse_resume_info(out).unwrap();
        assert_eq!(r.from_guid, 0x5b7c5ef4b1d8a2f3);
        assert_eq!(r.to_guid, 0x1c9f0b6a4d2e8f11);
        assert_eq!(r.to_name, "src/data@s3");
        assert_eq!(r.bytes_done, Some(0x2e6d8e0));
        assert_eq!(r.bytes_left, Some(161480704));
        assert!(!r.raw);
        assert_eq!(parse_resume_info("cannot resume send: bad token\n"), None);
        let twice = format!("{out}\ttoname = other/ds@x\n");
        assert_eq!(parse_resume_info(&twice), None, "a repeated key");
        let raw = out.replace("compressok = 1", "rawok = 1");
        assert!(parse_resume_info(&raw).unwrap().raw);
    }

    #[test]
    fn bookmarks_resume_tokens_and_encryption_are_parsed() {
        let out = "p/a\tguid\t1\t-
p/a\tcreatetxg\t1\t-
p/a\ttype\tfilesystem\t-
p/a\treceive_resume_token\t1-e604ea4bf-e0-789c\t-
p/a\tencryption\taes-256-gcm\t-
p/a@s1\tguid\t3\t-
p/a@s1\tcreatetxg\t3\t-
p/a@s1\ttype\tsnapshot\t-
p/a@s1\treceive_resume_token\t-\t-
p/a@s1\tencryption\taes-256-gcm\t-
p/a#s0\tguid\t2\t-
p/a#s0\tcreatetxg\t2\t-
p/a#s0\ttype\tbookmark\t-
p/b\tguid\t5\t-
p/b\tcreatetxg\t5\t-
p/b\ttype\tfilesystem\t-
p/b\treceive_resume_token\t-\t-
p/b\tencryption\toff\tdefault
";
        let t = parse_get(out).unwrap();
        let a = &t.datasets[&ds("p/a")];
        assert_eq!(a.resume_token.as_deref(), Some("1-e604ea4bf-e0-789c"));
        assert!(a.encrypted);
        assert_eq!(a.bookmarks.len(), 1);
        assert_eq!(
            (a.bookmarks[0].name.as_str(), a.bookmarks[0].guid),
            ("s0", 2)
        );
        assert_eq!(a.snapshots.len(), 1);
        let b = &t.datasets[&ds("p/b")];
        assert!(!b.encrypted && b.resume_token.is_none());
        assert!(t.skipped.is_empty());
    }

    #[test]
    fn inherited_user_properties_do_not_count() {
        let out = "p/a\tguid\t1\t-
p/a\tcreatetxg\t1\t-
p/a\ttype\tfilesystem\t-
p/a\tzfsync:synced_h\ts1\tlocal
p/a\tzfsync:replica\tyes\tlocal
p/a\twritten\t0\t-
p/a/b\tguid\t2\t-
p/a/b\tcreatetxg\t2\t-
p/a/b\ttype\tfilesystem\t-
p/a/b\tzfsync:synced_h\ts1\tinherited from p/a
p/a/b\tzfsync:replica\tyes\tinherited from p/a
p/a/b\twritten\t8192\t-
p/a/b@s1\tguid\t3\t-
p/a/b@s1\tcreatetxg\t3\t-
p/a/b@s1\ttype\tsnapshot\t-
p/a/b@s1\tuserrefs\t1\t-
";
        let t = parse_get(out).unwrap();
        assert_eq!(t.datasets[&ds("p/a")].props["zfsync:synced_h"], "s1");
        // The replica mark too: a child made under a replica inherits it,
        // and is not taken for one.
        assert_eq!(t.datasets[&ds("p/a")].props["zfsync:replica"], "yes");
        assert!(t.datasets[&ds("p/a/b")].props.is_empty());
        // `written` (OpenZFS): changed since the newest snapshot or not.
        assert_eq!(t.datasets[&ds("p/a")].written, Some(0));
        assert_eq!(t.datasets[&ds("p/a/b")].written, Some(8192));
        assert!(t.datasets[&ds("p/a/b")].held.contains("s1"));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "p\tguid\tx\n",
            "p\tguid\n",
            "p\tguid\t1\t-\textra\n",
            "p\tfoo\t1\n",
            "p\tguid\t1\n",
        ] {
            assert!(parse_get(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_get("").unwrap(), Tree::default());
    }
}
