//! Filling a pool's root dataset, which cannot be renamed, from a whole new
//! copy received into the buffer: see [`commit_into_root`].

use super::*;

/// A pool's root cannot be renamed, so the new copy, whole in `new`
/// (`BUF/top.full`), goes into it by a local `zfs send | zfs receive`: a
/// full stream of its oldest snapshot with `-F` (zfs swaps it in only
/// once complete; the root has no snapshots, else [`prepare`] refused),
/// then `-I` to its newest. The root's old data is thus replaced only
/// after the whole new copy arrived; should the local `-I` fail, the
/// whole new copy stays in `new` and the next run completes the root
/// from the sender. `new` is destroyed once the root has its newest
/// snapshot. The root's children are not touched.
pub(super) async fn commit_into_root(
    target: &Target,
    peer: &str,
    new: &DatasetName,
    root: &DatasetName,
) -> Result<(), ReplaceError> {
    let zfs = &target.zfs;
    target.relist().await?;
    let copy = target.get(new);
    let Some((copy, oldest, newest)) = copy.and_then(|c| {
        let (o, n) = (c.snapshots.first()?.clone(), c.snapshots.last()?.clone());
        Some((c, o, n))
    }) else {
        return Err(ReplaceError::NewCopyGone(new.clone()));
    };
    let failed = |committed: Option<&SnapName>, source| ReplaceError::Commit {
        root: root.clone(),
        new: new.clone(),
        committed: committed.cloned(),
        source,
    };
    let caps = zfs.caps();
    let flags = SendPath::choose(&caps, &caps).send_flags(copy.encrypted);
    let from = new.snapshot(&oldest.name)?;
    // As for any overwrite: a mounted root makes the swap at the end
    // fail now and then on zfs-fuse.
    if let Err(e) = zfs.unmount(root).await {
        tracing::debug!(%root, "unmount before filling it: {e}");
    }
    tracing::info!(peer = %peer, %root, "filling the pool's root from the whole new copy {new}");
    let full = SendWhat::Snapshot {
        from: None,
        to: from.clone(),
    };
    if let Err(e) = local_transfer(target, &full, &flags, root, true).await {
        let _ = target.refresh(root).await;
        return Err(failed(None, e));
    }
    if newest.guid != oldest.guid {
        let rest = SendWhat::Snapshot {
            from: Some(SendFrom::Snapshot(from)),
            to: new.snapshot(&newest.name)?,
        };
        if let Err(e) = local_transfer(target, &rest, &flags, root, false).await {
            let _ = target.refresh(root).await;
            return Err(failed(Some(&oldest.name), e));
        }
    }
    target.relist().await?;
    let now = target.newest(root);
    if now.as_ref().map(|s| s.guid) != Some(newest.guid) {
        let committed = now.map(|s| s.name);
        return Err(failed(
            committed.as_ref(),
            ZfsError::Failed {
                argv: format!("zfs receive -u {root}"),
                status: "exit status: 0".into(),
                stderr: format!("{root} did not end at @{}", newest.name),
            },
        ));
    }
    match remove_if_bare(target, new).await {
        Removal::Removed | Removal::Gone => {}
        Removal::Holds(below) => tracing::warn!(
            "the pool's root {root} is filled; {new} stays because it holds {}",
            below.join(", ")
        ),
        Removal::ListFailed(e) | Removal::DestroyFailed(e) => tracing::warn!(
            "the pool's root {root} is filled; {new} stays (cannot remove it: {e}); the next Finish of the root removes it"
        ),
    }
    tracing::info!(peer = %peer, dataset = %root, "filled the pool's root from a full copy");
    Ok(target.relist().await?)
}

/// `zfs send WHAT | zfs receive -u [-F] DEST` on this host. A send cut
/// short ends the receive's input early, so zfs discards the partial
/// stream; the receive's own error comes first.
async fn local_transfer(
    target: &Target,
    what: &SendWhat,
    flags: &[&str],
    dest: &DatasetName,
    force: bool,
) -> Result<(), ZfsError> {
    let zfs = &target.zfs;
    let mut send = zfs.spawn_send(what, flags)?;
    let spec = RecvSpec {
        force,
        resumable: false,
        options: target.recv_options.clone(),
    };
    let mut recv = match zfs.spawn_receive(dest, &spec) {
        Ok(r) => r,
        Err(e) => {
            send.abort().await;
            return Err(e);
        }
    };
    let copied = match (send.take_stdout(), recv.take_stdin()) {
        (Some(mut out), Some(mut input)) => tokio::io::copy(&mut out, &mut input)
            .await
            .map(drop)
            .map_err(|source| ZfsError::Io {
                argv: format!("{} | {}", send.argv(), recv.argv()),
                source,
            }),
        _ => Err(ZfsError::Io {
            argv: format!("{} | {}", send.argv(), recv.argv()),
            source: std::io::Error::other("no pipe to the child"),
        }),
    };
    if copied.is_err() {
        // The receive must not see a stream end that looks whole.
        send.abort().await;
    }
    let sent = send.close().await;
    let received = recv.close().await;
    received.and(sent).and(copied)
}
