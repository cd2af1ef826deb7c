//! The opening exchange, the same code for both ends: the sender says
//! `Hello` (protocol version, run id, its `zfs` and what it can do), the
//! receiver checks it and answers `HelloOk` with its own, or an error.
//! Both then use what both have ([`crate::caps::SendPath`]). Beside its
//! `zfs` capabilities the receiver lists [`CAP_ZSTD`]: it decompresses
//! `--compress` streams (a sender that does not know the name ignores it).

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Connection, Frame, Message, ProtocolError, PROTOCOL_VERSION};
use crate::caps::Caps;
use crate::compress::CAP_ZSTD;

/// Longest run id a receiver accepts.
const MAX_RUN_ID: usize = 128;
/// Longest `zfs` version line, and most capability names, accepted.
const MAX_ZFS_VERSION: usize = 256;
const MAX_CAPS: usize = 64;

/// What a sender said in its `Hello`, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The same for every connection of one sender run.
    pub run_id: String,
    pub software: String,
    /// The sender's `zfs` and what it can do.
    pub caps: Caps,
}

/// What a receiver said in its `HelloOk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcomed {
    /// The receiver's `zfs` and what it can do.
    pub caps: Caps,
    /// It decompresses zstd streams ([`CAP_ZSTD`]).
    pub zstd: bool,
}

/// This build's name, told to the peer.
pub fn software() -> String {
    format!("zfsync {}", env!("CARGO_PKG_VERSION"))
}

/// Sender side: says hello and reads the answer. Returns the receiver's
/// capabilities.
pub async fn client<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    run_id: &str,
    local: &Caps,
) -> Result<Welcomed, ProtocolError> {
    conn.send(Message::Hello {
        version: PROTOCOL_VERSION,
        run_id: run_id.to_string(),
        software: software(),
        zfs: local.version.clone(),
        caps: local.names(),
    })
    .await?;
    match conn.read_msg().await? {
        Message::HelloOk {
            version, zfs, caps, ..
        } if version == PROTOCOL_VERSION => Ok(Welcomed {
            zstd: caps.iter().any(|c| c == CAP_ZSTD),
            caps: Caps::from_names(&zfs, &caps),
        }),
        Message::HelloOk { version, .. } => Err(ProtocolError::Version {
            ours: PROTOCOL_VERSION,
            theirs: version,
        }),
        other => Err(ProtocolError::Unexpected {
            got: format!("message {}", other.name()),
            expected: "hello_ok".into(),
        }),
    }
}

/// Receiver side: checks the first frame of a connection. `Ok(None)`: the
/// peer closed before saying anything.
pub fn check_hello(first: Option<Frame>) -> Result<Option<Hello>, ProtocolError> {
    match first {
        None => Ok(None),
        Some(Frame::Msg(Message::Hello {
            version,
            run_id,
            software,
            zfs,
            caps,
        })) => {
            if version != PROTOCOL_VERSION {
                return Err(ProtocolError::Unexpected {
                    got: format!("protocol version {version}"),
                    expected: format!(
                        "version {PROTOCOL_VERSION}; install the same zfsync version on both hosts"
                    ),
                });
            }
            if run_id.len() > MAX_RUN_ID {
                return Err(ProtocolError::BadFrame("run id too long".into()));
            }
            if zfs.len() > MAX_ZFS_VERSION
                || caps.len() > MAX_CAPS
                || software.len() > MAX_ZFS_VERSION
            {
                return Err(ProtocolError::BadFrame("capabilities too long".into()));
            }
            Ok(Some(Hello {
                run_id,
                software,
                caps: Caps::from_names(&zfs, &caps),
            }))
        }
        Some(other) => Err(ProtocolError::Unexpected {
            got: other.describe(),
            expected: "hello".into(),
        }),
    }
}

/// Receiver side: accepts the hello, telling the sender what this end has
/// (and that it decompresses zstd streams).
pub async fn welcome<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    local: &Caps,
) -> Result<(), ProtocolError> {
    let mut caps = local.names();
    caps.push(CAP_ZSTD.to_string());
    conn.send(Message::HelloOk {
        version: PROTOCOL_VERSION,
        software: software(),
        zfs: local.version.clone(),
        caps,
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::caps::Cap;

    #[tokio::test]
    async fn both_ends_learn_the_others_caps() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let t = Duration::from_secs(5);
        let (mut client_conn, mut server_conn) =
            (Connection::new(a, t, t), Connection::new(b, t, t));
        let sender = Caps::new("zfs-fuse", [Cap::Holds]);
        let receiver = Caps::new("zfs-2.2", [Cap::Holds, Cap::SendRaw]);
        let server = async {
            let first = server_conn.read().await.unwrap();
            let hello = check_hello(first).unwrap().unwrap();
            welcome(&mut server_conn, &receiver).await.unwrap();
            hello
        };
        let (got, hello) = tokio::join!(client(&mut client_conn, "run", &sender), server);
        let got = got.unwrap();
        assert_eq!(got.caps, receiver);
        assert!(got.zstd, "a receiver announces that it decompresses");
        assert_eq!(hello.caps, sender);
        assert_eq!(hello.run_id, "run");
    }

    #[tokio::test]
    async fn a_receiver_without_zstd_is_told_apart() {
        // An older receiver of protocol 5: its caps lack the name.
        let (a, b) = tokio::io::duplex(1 << 16);
        let t = Duration::from_secs(5);
        let (mut client_conn, mut server_conn) =
            (Connection::new(a, t, t), Connection::new(b, t, t));
        let server = async {
            server_conn.read().await.unwrap();
            server_conn
                .send(Message::HelloOk {
                    version: PROTOCOL_VERSION,
                    software: "zfsync 0.0".into(),
                    zfs: "zfs-fuse".into(),
                    caps: vec!["hold".into()],
                })
                .await
                .unwrap();
        };
        let local = Caps::default();
        let (got, ()) = tokio::join!(client(&mut client_conn, "run", &local), server);
        let got = got.unwrap();
        assert!(!got.zstd);
        assert!(got.caps.has(Cap::Holds));
    }

    #[test]
    fn a_wrong_version_or_oversized_hello_is_refused() {
        let hello = |version, run_id: &str| {
            Some(Frame::Msg(Message::Hello {
                version,
                run_id: run_id.into(),
                software: String::new(),
                zfs: String::new(),
                caps: vec![],
            }))
        };
        assert!(check_hello(hello(PROTOCOL_VERSION - 1, "r")).is_err());
        assert!(check_hello(hello(PROTOCOL_VERSION, &"r".repeat(200))).is_err());
        assert!(check_hello(Some(Frame::Msg(Message::Finish))).is_err());
        assert!(check_hello(None).unwrap().is_none());
    }
}
