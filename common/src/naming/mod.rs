//! Names: validated dataset and snapshot names, relative paths from the
//! network, and the hex names of the receiver's buffer datasets.
//!
//! Everything that arrives from a peer, a file or the command line becomes one
//! of these types at the edge; code past the edge holds names that cannot be
//! invalid. The rules are ZFS's own: components of ASCII letters, digits,
//! space and `_ - . :`, never `.` or `..`, and a whole name shorter than
//! ZFS's limit of 256 bytes. Names reach `zfs` as separate arguments, never
//! through a shell.

use std::fmt;

use thiserror::Error;

pub mod disk;

pub use disk::*;

/// ZFS's `ZFS_MAX_DATASET_NAME_LEN` is 256 including the NUL byte.
pub const MAX_NAME_LEN: usize = 255;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("empty name")]
    Empty,
    #[error("name {name:?} is {len} bytes long; ZFS allows at most {max}")]
    TooLong {
        name: String,
        len: usize,
        max: usize,
    },
    #[error("name {name:?} has an empty component (leading, trailing or double '/')")]
    EmptyComponent { name: String },
    #[error("name {name:?} has the component {component:?}, which ZFS does not allow")]
    DotComponent { name: String, component: String },
    #[error(
        "name {name:?} contains {ch:?}; ZFS names hold ASCII letters, digits, space and _ - . :"
    )]
    BadChar { name: String, ch: char },
    #[error("relative path {name:?} must be empty (the top dataset) or start with '/'")]
    NotRelative { name: String },
    #[error("{name:?} is not a snapshot name (expected dataset@snapshot)")]
    NotSnapshot { name: String },
    #[error("buffer name {name:?} is not upper-case hex of a relative path")]
    BadBufferName { name: String },
    #[error("relative path {name:?} is reserved for the receiver's buffer")]
    Reserved { name: String },
}

fn check_component(whole: &str, c: &str) -> Result<(), NameError> {
    if c.is_empty() {
        return Err(NameError::EmptyComponent {
            name: whole.to_string(),
        });
    }
    if c == "." || c == ".." {
        return Err(NameError::DotComponent {
            name: whole.to_string(),
            component: c.to_string(),
        });
    }
    if let Some(ch) = c
        .chars()
        .find(|ch| !(ch.is_ascii_alphanumeric() || matches!(ch, '_' | '-' | '.' | ':' | ' ')))
    {
        return Err(NameError::BadChar {
            name: whole.to_string(),
            ch,
        });
    }
    Ok(())
}

fn check_len(name: &str) -> Result<(), NameError> {
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            name: name.chars().take(40).collect::<String>() + "...",
            len: name.len(),
            max: MAX_NAME_LEN,
        });
    }
    Ok(())
}

/// A ZFS filesystem or volume name: `pool[/component]*`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DatasetName(String);

impl DatasetName {
    /// A name built from parts that were checked already (the buffer root:
    /// a valid name plus a short suffix).
    pub(crate) fn from_trusted(name: String) -> DatasetName {
        DatasetName(name)
    }

    pub fn new(name: &str) -> Result<Self, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        check_len(name)?;
        for c in name.split('/') {
            check_component(name, c)?;
        }
        Ok(DatasetName(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The pool root has no `/`.
    pub fn is_pool_root(&self) -> bool {
        !self.0.contains('/')
    }

    pub fn parent(&self) -> Option<DatasetName> {
        self.0
            .rsplit_once('/')
            .map(|(p, _)| DatasetName(p.to_string()))
    }

    /// Appends a relative path (`""` gives `self`).
    pub fn join(&self, rel: &RelPath) -> Result<DatasetName, NameError> {
        let joined = format!("{}{}", self.0, rel.as_str());
        check_len(&joined)?;
        Ok(DatasetName(joined))
    }

    /// The last component: `b` of `pool/a/b`.
    pub fn leaf(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// Appends one already validated component.
    pub fn child(&self, component: &str) -> Result<DatasetName, NameError> {
        DatasetName::new(&format!("{}/{}", self.0, component))
    }

    /// `self` relative to `root`: `pool/a/b` under `pool/a` is `/b`.
    pub fn relative_to(&self, root: &DatasetName) -> Option<RelPath> {
        if self == root {
            return Some(RelPath(String::new()));
        }
        let rest = self.0.strip_prefix(root.as_str())?;
        rest.starts_with('/').then(|| RelPath(rest.to_string()))
    }

    /// The snapshot `self@snap`.
    pub fn snapshot(&self, snap: &SnapName) -> Result<SnapshotName, NameError> {
        let s = format!("{}@{}", self.0, snap.as_str());
        check_len(&s)?;
        Ok(SnapshotName(s))
    }
}

impl fmt::Display for DatasetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The part after `@` of a snapshot name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapName(String);

impl SnapName {
    pub fn new(name: &str) -> Result<Self, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        check_len(name)?;
        check_component(name, name)?;
        Ok(SnapName(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SnapName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A full snapshot name `dataset@snap`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotName(String);

impl SnapshotName {
    pub fn new(name: &str) -> Result<Self, NameError> {
        let (ds, snap) = name.split_once('@').ok_or_else(|| NameError::NotSnapshot {
            name: name.to_string(),
        })?;
        let ds = DatasetName::new(ds)?;
        let snap = SnapName::new(snap)?;
        ds.snapshot(&snap)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn dataset(&self) -> DatasetName {
        DatasetName(
            self.0
                .split_once('@')
                .map(|(d, _)| d)
                .unwrap_or("")
                .to_string(),
        )
    }

    pub fn snap(&self) -> SnapName {
        SnapName(
            self.0
                .split_once('@')
                .map(|(_, s)| s)
                .unwrap_or("")
                .to_string(),
        )
    }
}

impl fmt::Display for SnapshotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A dataset's path relative to the replicated root: `""` for the root
/// itself, else `/a/b`. This is what travels on the wire, so `new` is the
/// gate every name from a peer goes through.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelPath(String);

impl RelPath {
    pub fn root() -> Self {
        RelPath(String::new())
    }

    pub fn new(path: &str) -> Result<Self, NameError> {
        if path.is_empty() {
            return Ok(RelPath::root());
        }
        let Some(rest) = path.strip_prefix('/') else {
            return Err(NameError::NotRelative {
                name: path.escape_debug().to_string(),
            });
        };
        check_len(path)?;
        for c in rest.split('/') {
            check_component(path, c)?;
        }
        Ok(RelPath(path.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The parent path; `None` for the root.
    pub fn parent(&self) -> Option<RelPath> {
        if self.is_root() {
            return None;
        }
        self.0.rsplit_once('/').map(|(p, _)| RelPath(p.to_string()))
    }

    /// How many components deep: the root is 0, `/a` is 1.
    pub fn depth(&self) -> usize {
        self.0.matches('/').count()
    }

    /// The first component, if any.
    pub fn first_component(&self) -> Option<&str> {
        self.0
            .strip_prefix('/')
            .map(|r| r.split('/').next().unwrap_or(r))
    }

    /// The buffer dataset's name for this path: upper-case hex of the path
    /// with its leading `/`, exactly as ZFSync names it (`/test1` ->
    /// `2F7465737431`). The root has no buffer name.
    pub fn buffer_hex(&self) -> Option<String> {
        (!self.is_root()).then(|| hex::encode_upper(self.0.as_bytes()))
    }

    /// Reverses [`RelPath::buffer_hex`], validating the result.
    pub fn from_buffer_hex(name: &str) -> Result<RelPath, NameError> {
        let bad = || NameError::BadBufferName {
            name: name.to_string(),
        };
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_lowercase()) {
            return Err(bad());
        }
        let bytes = hex::decode(name).map_err(|_| bad())?;
        let s = String::from_utf8(bytes).map_err(|_| bad())?;
        let rel = RelPath::new(&s).map_err(|_| bad())?;
        if rel.is_root() {
            return Err(bad());
        }
        Ok(rel)
    }

    /// Parent-first order: sorting by (depth, path) places every dataset
    /// after its parent.
    pub fn tree_order_key(&self) -> (usize, &str) {
        (self.depth(), &self.0)
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_root() {
            f.write_str("(top)")
        } else {
            f.write_str(&self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_hex_matches_zfsync() {
        let rel = RelPath::new("/test1").unwrap();
        assert_eq!(rel.buffer_hex().unwrap(), "2F7465737431");
        assert_eq!(RelPath::from_buffer_hex("2F7465737431").unwrap(), rel);
        assert_eq!(RelPath::root().buffer_hex(), None);
    }

    #[test]
    fn buffer_hex_round_trips() {
        for p in ["/a", "/a/b", "/x-y_z.w:v/q", "/A/B/C/D"] {
            let rel = RelPath::new(p).unwrap();
            let hex = rel.buffer_hex().unwrap();
            assert!(hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase()));
            assert_eq!(RelPath::from_buffer_hex(&hex).unwrap(), rel);
        }
    }

    #[test]
    fn bad_buffer_names_are_refused() {
        for n in [
            "",
            "2f61",
            "ZZ",
            "2F",
            "2F2E2E",
            "612F62",
            "2F61.full",
            "2F612F2F62",
        ] {
            assert!(RelPath::from_buffer_hex(n).is_err(), "{n:?} accepted");
        }
    }

    #[test]
    fn hostile_relative_paths_are_refused() {
        let long = format!("/{}", "a".repeat(300));
        let cases = [
            "/../x",
            "/a@b",
            "/a/../../etc",
            "a",
            "/",
            "//a",
            "/a/",
            "/a//b",
            "/a\0b",
            "/a\tb",
            "/a#b",
            "/a%b",
            "/.",
            "/a/..",
            "/\u{7f}",
            "/\n",
            "/ä",
            long.as_str(),
        ];
        for c in cases {
            assert!(RelPath::new(c).is_err(), "{c:?} accepted");
        }
    }

    #[test]
    fn good_relative_paths() {
        for c in ["", "/a", "/a-b/c_d/e.f/g:h", "/..a", "/a.."] {
            assert_eq!(RelPath::new(c).unwrap().as_str(), c);
        }
    }

    #[test]
    fn dataset_names() {
        assert!(DatasetName::new("pool").unwrap().is_pool_root());
        let d = DatasetName::new("pool/a/b").unwrap();
        assert_eq!(d.parent().unwrap().as_str(), "pool/a");
        assert_eq!(
            d.relative_to(&DatasetName::new("pool").unwrap())
                .unwrap()
                .as_str(),
            "/a/b"
        );
        assert_eq!(d.relative_to(&d).unwrap(), RelPath::root());
        assert!(d
            .relative_to(&DatasetName::new("pool/a/bc").unwrap())
            .is_none());
        assert!(DatasetName::new("pool/ab")
            .unwrap()
            .relative_to(&DatasetName::new("pool/a").unwrap())
            .is_none());
        for bad in [
            "",
            "/pool",
            "pool/",
            "pool//a",
            "pool/a@b",
            "pool/../x",
            "po\tol",
        ] {
            assert!(DatasetName::new(bad).is_err(), "{bad:?}");
        }
        let long = format!("pool/{}", "a".repeat(251));
        assert!(DatasetName::new(&long).is_err());
        let target = DatasetName::new(&format!("pool/{}", "b".repeat(200))).unwrap();
        assert!(target
            .join(&RelPath::new(&format!("/{}", "c".repeat(60))).unwrap())
            .is_err());
    }

    #[test]
    fn snapshot_names() {
        let s = SnapshotName::new("pool/a@snap-1_2.3:4").unwrap();
        assert_eq!(s.dataset().as_str(), "pool/a");
        assert_eq!(s.snap().as_str(), "snap-1_2.3:4");
        for bad in [
            "pool/a",
            "pool/a@",
            "@s",
            "pool/a@b@c",
            "pool/a@b/c",
            "pool/a@b#c",
        ] {
            assert!(SnapshotName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tree_order_puts_parents_first() {
        let mut v: Vec<RelPath> = ["/b/c", "/a", "", "/b", "/a/z/y", "/a/z"]
            .iter()
            .map(|p| RelPath::new(p).unwrap())
            .collect();
        v.sort_by(|a, b| a.tree_order_key().cmp(&b.tree_order_key()));
        let got: Vec<&str> = v.iter().map(|r| r.as_str()).collect();
        assert_eq!(got, ["", "/a", "/b", "/a/z", "/b/c", "/a/z/y"]);
    }
}
