use super::*;
use crate::testing::{dataset, ds, snap, target_of, target_with};

#[test]
fn failure_texts_say_where_each_piece_is() {
    let e = ReplaceError::MoveOldAside {
        old: ds("p/t/a"),
        source: ZfsError::DoesNotExist {
            name: "p/t/a".into(),
        },
        stranded: Stranded(vec!["p/t/a/x is now at p/t.zfsyncbuffer/2F61.full/x".into()]),
    };
    let text = e.to_string();
    assert!(
        text.starts_with("cannot move the old copy p/t/a aside: "),
        "{text}"
    );
    assert!(
        text.ends_with("; could not move back: p/t/a/x is now at p/t.zfsyncbuffer/2F61.full/x"),
        "{text}"
    );
    let e = ReplaceError::MoveChild {
        child: ds("p/t/a/x"),
        source: ZfsError::DoesNotExist {
            name: "p/t/a/x".into(),
        },
        stranded: Stranded::default(),
    };
    assert!(!e.to_string().contains("could not move back"), "{e}");
}

#[tokio::test]
async fn prepare_refuses_a_pool_root_and_a_stale_full_with_children() {
    let mut p = dataset("p");
    p.snapshots = vec![snap("s1", 11, 1)];
    let t = target_of([p]);
    let rel = RelPath::new("/a").unwrap();
    let root = prepare(&t, &rel, &ds("p")).await.unwrap_err();
    assert!(matches!(root, ReplaceError::PoolRoot(_)), "{root}");

    let t = target_with(&[
        "p/t",
        "p/t/a",
        "p/t.zfsyncbuffer",
        "p/t.zfsyncbuffer/2F61.full",
        "p/t.zfsyncbuffer/2F61.full/x",
    ]);
    let stale = prepare(&t, &rel, &ds("p/t/a")).await.unwrap_err();
    assert_eq!(
        stale.to_string(),
        "p/t.zfsyncbuffer/2F61.full is left from an interrupted replacement and holds datasets of the old copy; move them back under p/t/a by hand (zfs list -r p/t.zfsyncbuffer/2F61.full), then destroy p/t.zfsyncbuffer/2F61.full"
    );
    assert!(t.exists(&ds("p/t.zfsyncbuffer/2F61.full/x")));
}

#[tokio::test]
async fn a_pool_root_without_snapshots_is_received_whole_into_the_buffer_first() {
    let t = Target::new(
        ds("p"),
        std::sync::Arc::new(zfsync_common::zfs::Zfs::default()),
        true,
    );
    t.cache_for_tests([dataset("p"), dataset("p/a"), dataset("p/zfsyncbuffer")]);
    let temp = prepare(&t, &RelPath::root(), &ds("p")).await.unwrap();
    assert_eq!(temp, ds("p/zfsyncbuffer/top.full"));
}

#[test]
fn commit_failure_texts_say_where_the_new_copy_is() {
    let e = |committed: Option<&str>| {
        ReplaceError::Commit {
            root: ds("p"),
            new: ds("p/zfsyncbuffer/top.full"),
            committed: committed.map(|s| SnapName::new(s).unwrap()),
            source: ZfsError::DoesNotExist { name: "p".into() },
        }
        .to_string()
    };
    assert_eq!(
        e(None),
        "cannot fill the pool's root p from the new copy: dataset p does not exist; p is unchanged; the whole new copy stays at p/zfsyncbuffer/top.full (the next --full run sends it again)"
    );
    assert_eq!(
        e(Some("s1")),
        "cannot fill the pool's root p from the new copy: dataset p does not exist; p has the new copy up to @s1 only; the whole new copy stays at p/zfsyncbuffer/top.full (the next run completes the root from the sender, then removes it)"
    );
}

#[tokio::test]
async fn lock_subtree_locks_what_lies_below() {
    let t = target_with(&["p/t", "p/t/a", "p/t/a/x", "p/t/a/x/y", "p/t/b"]);
    let locks = lock_subtree(&t, &ds("p/t/a")).await.unwrap();
    assert_eq!(locks.len(), 2);
    let rel = |s| RelPath::new(s).unwrap();
    assert!(t.try_lock(&rel("/a/x")).is_none() && t.try_lock(&rel("/a/x/y")).is_none());
    assert!(t.try_lock(&rel("/a")).is_some() && t.try_lock(&rel("/b")).is_some());
    drop(locks);
    assert!(t.try_lock(&rel("/a/x")).is_some());
}
