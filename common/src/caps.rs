//! What the local `zfs` can do, probed once at start-up, and what two ends
//! can do together.
//!
//! zfs-fuse (pool version 23, about 2011) and OpenZFS 2.x differ in many
//! options. Usage texts are not reliable (zfs-fuse accepts `receive -u` but
//! does not list it), so each option is probed by running `zfs CMD -FLAG`
//! without operands: the command refuses for a missing argument, or for an
//! unknown option. Nothing is ever changed by a probe. The running of the
//! probes is in [`crate::zfs::Zfs::probe`]; this module classifies their
//! output and holds the result.

use std::collections::BTreeSet;
use std::fmt;

/// One capability: a name (as it travels in the handshake) and the probe
/// that shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cap {
    /// `zfs list -p`: exact numbers (zfs-fuse has it only for `get`).
    ListParsable,
    /// `zfs receive -u`: receive without mounting.
    RecvUnmounted,
    /// `zfs receive -s`: a cut receive keeps a resume token.
    RecvResumable,
    /// `zfs receive -A`: discard a partially received state.
    RecvAbortResumable,
    /// `zfs receive -o PROP=VALUE`.
    RecvSetProp,
    /// `zfs receive -x PROP`.
    RecvExcludeProp,
    /// `zfs send -t TOKEN`: resume a cut send.
    SendResume,
    /// `zfs send -L`: blocks larger than 128 KiB stay large.
    SendLargeBlocks,
    /// `zfs send -e`: embedded (tiny) blocks stay embedded.
    SendEmbedded,
    /// `zfs send -c`: compressed blocks travel compressed.
    SendCompressed,
    /// `zfs send -w`: raw sends; encrypted data travels encrypted.
    SendRaw,
    /// `zfs bookmark`, and `zfs send -i #bookmark`.
    Bookmarks,
    /// `zfs hold` / `zfs release`.
    Holds,
    /// `zfs holds` (listing holds).
    HoldsList,
    /// The `written` property: bytes written to a dataset since its newest
    /// snapshot (OpenZFS; zfs-fuse has none).
    Written,
}

impl Cap {
    pub const ALL: [Cap; 15] = [
        Cap::ListParsable,
        Cap::RecvUnmounted,
        Cap::RecvResumable,
        Cap::RecvAbortResumable,
        Cap::RecvSetProp,
        Cap::RecvExcludeProp,
        Cap::SendResume,
        Cap::SendLargeBlocks,
        Cap::SendEmbedded,
        Cap::SendCompressed,
        Cap::SendRaw,
        Cap::Bookmarks,
        Cap::Holds,
        Cap::HoldsList,
        Cap::Written,
    ];

    /// The name used in logs and in the handshake.
    pub fn name(self) -> &'static str {
        match self {
            Cap::ListParsable => "list_p",
            Cap::RecvUnmounted => "receive_u",
            Cap::RecvResumable => "receive_s",
            Cap::RecvAbortResumable => "receive_A",
            Cap::RecvSetProp => "receive_o",
            Cap::RecvExcludeProp => "receive_x",
            Cap::SendResume => "send_t",
            Cap::SendLargeBlocks => "send_L",
            Cap::SendEmbedded => "send_e",
            Cap::SendCompressed => "send_c",
            Cap::SendRaw => "send_w",
            Cap::Bookmarks => "bookmark",
            Cap::Holds => "hold",
            Cap::HoldsList => "holds",
            Cap::Written => "written",
        }
    }

    pub fn from_name(s: &str) -> Option<Cap> {
        Cap::ALL.into_iter().find(|c| c.name() == s)
    }

    /// The probe: `zfs` arguments that fail for a missing operand when the
    /// option exists and for an unknown option when it does not.
    pub fn probe_args(self) -> &'static [&'static str] {
        match self {
            Cap::ListParsable => &["list", "-p", "-o", "name", "-d", "0", "@"],
            Cap::RecvUnmounted => &["receive", "-u"],
            Cap::RecvResumable => &["receive", "-s"],
            Cap::RecvAbortResumable => &["receive", "-A"],
            Cap::RecvSetProp => &["receive", "-o"],
            Cap::RecvExcludeProp => &["receive", "-x"],
            Cap::SendResume => &["send", "-t"],
            Cap::SendLargeBlocks => &["send", "-L"],
            Cap::SendEmbedded => &["send", "-e"],
            Cap::SendCompressed => &["send", "-c"],
            Cap::SendRaw => &["send", "-w"],
            Cap::Bookmarks => &["bookmark"],
            Cap::Holds => &["hold"],
            Cap::HoldsList => &["holds", "-H"],
            // The property list is checked before the operand.
            Cap::Written => &["get", "-H", "written", "@"],
        }
    }
}

/// Whether a probe's output shows the option or command exists.
pub fn probe_shows(output: &str) -> bool {
    let o = output.to_ascii_lowercase();
    !(o.contains("invalid option")
        || o.contains("unrecognized command")
        || o.contains("internal error")
        || o.contains("not found")
        || o.contains("invalid property")
        || o.contains("not supported"))
}

/// The capabilities of one `zfs`, or what two ends share.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Caps {
    /// `zfs version`'s first line, or "zfs-fuse or older" without it.
    pub version: String,
    set: BTreeSet<Cap>,
}

impl Caps {
    pub fn new(version: impl Into<String>, caps: impl IntoIterator<Item = Cap>) -> Caps {
        Caps {
            version: version.into(),
            set: caps.into_iter().collect(),
        }
    }

    /// Everything (the in-memory fake, tests).
    pub fn all(version: &str) -> Caps {
        Caps::new(version, Cap::ALL)
    }

    pub fn has(&self, c: Cap) -> bool {
        self.set.contains(&c)
    }

    /// The names, as they travel in the handshake.
    pub fn names(&self) -> Vec<String> {
        self.set.iter().map(|c| c.name().to_string()).collect()
    }

    /// The peer's capabilities from the handshake; unknown names (a newer
    /// peer) are ignored.
    pub fn from_names(version: &str, names: &[String]) -> Caps {
        Caps::new(version, names.iter().filter_map(|n| Cap::from_name(n)))
    }

    /// A resumable receive needs `receive -s` and `receive -A` here.
    pub fn can_receive_resumable(&self) -> bool {
        self.has(Cap::RecvResumable) && self.has(Cap::RecvAbortResumable)
    }
}

impl fmt::Display for Caps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.version)?;
        if self.set.is_empty() {
            return write!(f, " (none of the probed options)");
        }
        for c in &self.set {
            write!(f, " {}", c.name())?;
        }
        Ok(())
    }
}

/// How a sender with `local` capabilities sends to a receiver with `peer`
/// capabilities: the best path both support.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendPath {
    pub large_blocks: bool,
    pub embedded: bool,
    pub compressed: bool,
    /// Encrypted datasets can travel raw.
    pub raw: bool,
    /// Cut transfers resume (`receive -s` there, `send -t` here).
    pub resume: bool,
    /// Bookmarks can be incremental bases here.
    pub bookmarks: bool,
}

impl SendPath {
    pub fn choose(local: &Caps, peer: &Caps) -> SendPath {
        // A receiver whose zfs can send a stream feature also receives it
        // (the two came with the same OpenZFS release).
        let both = |c| local.has(c) && peer.has(c);
        SendPath {
            large_blocks: both(Cap::SendLargeBlocks),
            embedded: both(Cap::SendEmbedded),
            compressed: both(Cap::SendCompressed),
            raw: both(Cap::SendRaw),
            resume: local.has(Cap::SendResume) && peer.can_receive_resumable(),
            bookmarks: local.has(Cap::Bookmarks),
        }
    }

    /// The `zfs send` flags for a dataset (`-w` only for an encrypted one,
    /// which implies the others).
    pub fn send_flags(&self, encrypted: bool) -> Vec<&'static str> {
        if encrypted && self.raw {
            return vec!["-w"];
        }
        let mut v = Vec::new();
        if self.large_blocks {
            v.push("-L");
        }
        if self.embedded {
            v.push("-e");
        }
        if self.compressed {
            v.push("-c");
        }
        v
    }
}

impl fmt::Display for SendPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        let flags = self.send_flags(false);
        if flags.is_empty() {
            parts.push("plain streams".to_string());
        } else {
            parts.push(format!("send {}", flags.join(" ")));
        }
        parts.push(if self.raw {
            "raw sends of encrypted datasets".into()
        } else {
            "no raw sends (encrypted datasets are refused)".into()
        });
        parts.push(if self.resume {
            "resumable".into()
        } else {
            "not resumable".into()
        });
        if self.bookmarks {
            parts.push("bookmarks".into());
        }
        write!(f, "{}", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_outputs_are_classified() {
        // zfs-fuse
        assert!(!probe_shows("invalid option 'c'\nusage:\n"));
        assert!(!probe_shows(
            "unrecognized command 'bookmark'\nusage: zfs command args ...\n"
        ));
        assert!(!probe_shows(
            "internal error: /usr/lib/zfs/pyzfs.py not found\n"
        ));
        assert!(probe_shows("missing snapshot argument\nusage:\n"));
        // `zfs get -H written @`
        assert!(!probe_shows(
            "bad property list: invalid property 'written'\nusage:\n\tget [-rHp] ...\n"
        ));
        // OpenZFS
        assert!(probe_shows("missing argument for 't' option\nusage:\n"));
        assert!(probe_shows("missing receive resume token argument\n"));
        assert!(probe_shows(
            "cannot open '@': invalid character '@' in name\n"
        ));
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_ignored() {
        for c in Cap::ALL {
            assert_eq!(Cap::from_name(c.name()), Some(c));
        }
        let caps = Caps::from_names("x", &["send_c".into(), "teleport".into()]);
        assert!(caps.has(Cap::SendCompressed));
        assert_eq!(caps.names(), vec!["send_c".to_string()]);
    }

    #[test]
    fn the_send_path_is_what_both_ends_support() {
        let fuse = Caps::new("zfs-fuse", [Cap::RecvUnmounted, Cap::Holds]);
        let openzfs = Caps::all("zfs-2.1.11-1");
        // zfs-fuse -> OpenZFS and back: plain streams, nothing resumable.
        for (a, b) in [(&fuse, &openzfs), (&openzfs, &fuse)] {
            let p = SendPath::choose(a, b);
            assert!(p.send_flags(false).is_empty());
            assert!(!p.raw && !p.resume);
        }
        let p = SendPath::choose(&openzfs, &openzfs);
        assert_eq!(p.send_flags(false), ["-L", "-e", "-c"]);
        assert_eq!(p.send_flags(true), ["-w"]);
        assert!(p.resume && p.bookmarks);
        // Resuming needs -s and -A on the receiver, -t on the sender.
        let no_abort = Caps::new("x", [Cap::RecvResumable]);
        assert!(!SendPath::choose(&openzfs, &no_abort).resume);
        let no_t = Caps::new("x", [Cap::Bookmarks]);
        assert!(!SendPath::choose(&no_t, &openzfs).resume);
    }
}
