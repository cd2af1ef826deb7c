//! The --full swap, failing at each step; what waits for it, and what it
//! leaves parked.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use zfsync_common::client::{Client, Finished};
use zfsync_common::plan::{steps, Decision, FullReason};
use zfsync_common::protocol::{SyncReply, SyncRequest};
use zfsync_common::zfs::fake::FakeZfs;
use zfsync_common::zfs::ZfsBackend;
use zfsync_send::{Report, SendKind};

use crate::support::*;

/// A replica of `src/s` with /a, /a/x and /a/y, whose dataset at `path`
/// diverged on the receiver (a snapshot `local` taken there): only a
/// --full run brings it back, by swapping a new copy in.
struct Swap {
    src: FakeZfs,
    dst: FakeZfs,
    recv: Receiver,
    path: &'static str,
    /// Every dataset in place before the swap.
    before: BTreeMap<String, Contents>,
}

/// Where the old copy of /a is parked during its swap.
const PARKED: &str = "dst/t.zfsyncbuffer/2F61.old";

impl Swap {
    async fn new(path: &'static str) -> Swap {
        let (src, dst, recv) = hosts(&["", "/a", "/a/x", "/a/y"], &["s1", "s2"]).await;
        assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
        dst.snapshot(&dst_ds(path), "local");
        let before = copies(&dst, DST);
        Swap {
            src,
            dst,
            recv,
            path,
            before,
        }
    }

    /// A --full attempt at `path` whose swap fails, the first `zfs rename`
    /// of each of `targets` having failed; returns the swap and the error.
    async fn failing_renames(path: &'static str, targets: &[&str]) -> (Swap, String) {
        let s = Swap::new(path).await;
        for target in targets {
            strike(&s.dst, "rename", target);
        }
        let err = s.attempt_fails().await;
        (s, err)
    }

    fn dump(&self) -> String {
        both(&self.src, &self.dst)
    }

    /// A --full attempt through the protocol client: the new copy arrives
    /// whole; returns what Finish (the swap) said.
    async fn attempt(&self) -> Result<Finished, String> {
        let mut c = self.recv.client().await;
        let (reply, done) = sync_dataset(&mut c, &self.src, self.path, true).await;
        assert!(
            matches!(
                reply,
                SyncReply::Full {
                    reason: FullReason::Diverged { .. },
                    accepted: true
                }
            ),
            "{reply:?}"
        );
        c.bye().await;
        done
    }

    /// A --full attempt whose swap must fail; returns the error.
    async fn attempt_fails(&self) -> String {
        match self.attempt().await {
            Err(e) => e,
            Ok(f) => panic!("the swap succeeded: {f:?}\n{}", self.dump()),
        }
    }

    /// The old copy is in place with all its children, GUIDs and snapshots.
    #[track_caller]
    fn assert_old_in_place(&self) {
        assert_eq!(
            copies(&self.dst, DST),
            self.before,
            "the old copy is not in place as it was\n{}",
            self.dump()
        );
        assert!(
            !self.dst.names().iter().any(|n| n.ends_with(".old")),
            "nothing is left parked\n{}",
            self.dump()
        );
    }

    /// The old dataset once at `path` (relative to the target) is whole at
    /// `now`.
    #[track_caller]
    fn assert_old_at(&self, path: &str, now: &str) {
        assert_eq!(
            copy_at(&self.dst, now).as_ref(),
            self.before.get(path),
            "the old {} is not whole at {now}\n{}",
            dst_ds(path),
            self.dump()
        );
    }

    /// A later --full run converges: every dataset in place with the
    /// sender's snapshots.
    async fn converges(&self) -> Report {
        let report = self.recv.send(&self.src, 1, true).await;
        assert_ok(&report, &self.src, &self.dst);
        assert_replica(&self.src, &self.dst);
        assert_same_tree(&self.src, &self.dst);
        report
    }

    /// [`Swap::converges`] by replacing the dataset at `path`, whose old
    /// `children` move under the new copy.
    async fn converges_by_replacing(&self, children: &[&str]) {
        let report = self.converges().await;
        assert_sent(&report, self.path, SendKind::Replaced, "s2");
        self.assert_children_kept(children);
    }

    /// The children of the replaced dataset are the old ones (moved under
    /// the new copy, not received again).
    #[track_caller]
    fn assert_children_kept(&self, children: &[&str]) {
        for r in children {
            assert_eq!(
                copy_at(&self.dst, &dst_ds(r)).as_ref(),
                self.before.get(*r),
                "{r}\n{}",
                self.dump()
            );
        }
    }

    /// Nothing is left in the buffer.
    #[track_caller]
    fn assert_buffer_empty(&self) {
        assert!(names_under(&self.dst, BUF).is_empty(), "{}", self.dump());
    }

    /// No `zfs destroy` named anything whose name contains `parked`.
    #[track_caller]
    fn assert_not_destroyed(&self, parked: &str) {
        assert!(
            !self
                .dst
                .calls()
                .iter()
                .any(|c| c.starts_with("destroy") && c.contains(parked)),
            "{}",
            self.dump()
        );
    }
}

/// RE3 (state 3): a child that cannot move under the new copy fails the swap; the old copy stays in place, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_swap_failure_moving_a_child_under_the_new_copy_keeps_the_old_copy() {
    let (s, err) = Swap::failing_renames("/a", &["2F61.full/y"]).await;
    assert!(
        err.contains("cannot move dst/t/a/y under the new copy")
            && !err.contains("could not move back"),
        "{err}"
    );
    // The child moved first goes back.
    assert_called(
        "receiver",
        &s.dst,
        "rename dst/t.zfsyncbuffer/2F61.full/x dst/t/a/x",
    );
    s.assert_old_in_place();

    s.converges_by_replacing(&["/a/x", "/a/y"]).await;
    s.assert_buffer_empty();
}

/// RE3 (state 4): an old copy that cannot move aside to HEX.old stays in place, whole, with its children.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_swap_failure_moving_the_old_copy_aside_keeps_it() {
    let (s, err) = Swap::failing_renames("/a", &["2F61.old"]).await;
    assert!(
        err.contains("cannot move the old copy dst/t/a aside")
            && !err.contains("could not move back"),
        "{err}"
    );
    s.assert_old_in_place();

    s.converges_by_replacing(&["/a/x", "/a/y"]).await;
}

/// RE3 (state 4, top): an old top that cannot move aside to top.old stays in place with the whole tree below it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_swap_failure_moving_the_old_top_aside_keeps_it() {
    let (s, err) = Swap::failing_renames("", &["top.old"]).await;
    assert!(
        err.contains("cannot move the old copy dst/t aside"),
        "{err}"
    );
    assert_called(
        "receiver",
        &s.dst,
        "rename dst/t.zfsyncbuffer/top.full/a dst/t/a",
    );
    s.assert_old_in_place();

    s.converges_by_replacing(&["/a", "/a/x", "/a/y"]).await;
}

/// RE3, RE2: a child that cannot move back stays whole where the error says; the stale HEX.full holding it blocks the next swap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_swap_failure_moving_a_child_back_leaves_it_where_the_error_says_and_blocks_the_next_swap(
) {
    let (s, err) = Swap::failing_renames("/a", &["2F61.old", "2F61.full/y dst/t/a/y"]).await;
    let stranded = "dst/t.zfsyncbuffer/2F61.full/y";
    assert!(
        err.contains("cannot move the old copy dst/t/a aside")
            && err.contains(&format!(
                "could not move back: dst/t/a/y is now at {stranded}"
            )),
        "{err}"
    );
    s.assert_old_at("/a", "dst/t/a");
    s.assert_old_at("/a/x", "dst/t/a/x");
    s.assert_old_at("/a/y", stranded);

    let mut c = s.recv.client().await;
    let (reply, _) = sync_dataset(&mut c, &s.src, "/a", true).await;
    c.bye().await;
    let reason = refusal(reply, false);
    assert!(
        reason.contains("holds datasets of the old copy")
            && reason.contains("zfs list -r dst/t.zfsyncbuffer/2F61.full"),
        "expected the stale .full to stop the swap: {reason}\n{}",
        s.dump()
    );
    s.assert_old_at("/a/y", stranded);

    // What the message asks a person to do.
    s.dst
        .rename(&ds(stranded), &ds("dst/t/a/y"))
        .await
        .expect("move the child back by hand");
    s.converges_by_replacing(&["/a/x", "/a/y"]).await;
}

/// RE3 (state 5): when the new copy cannot move into place, the old copy comes back from HEX.old, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_swap_failure_moving_the_new_copy_in_puts_the_old_copy_back() {
    let (s, err) = Swap::failing_renames("/a", &["2F61.full dst/t/a"]).await;
    assert!(
        err.contains("cannot move the new copy into place at dst/t/a")
            && !err.contains("the old copy is at")
            && !err.contains("could not move back"),
        "{err}"
    );
    s.assert_old_in_place();

    s.converges_by_replacing(&["/a/x", "/a/y"]).await;
    s.assert_buffer_empty();
}

/// RE3 (state 5): when neither the new copy moves in nor the old one back, the old copy stays whole where the error says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_swap_failure_moving_the_new_copy_in_and_the_old_back_leaves_it_where_the_error_says()
{
    let (s, err) = Swap::failing_renames("/a", &["2F61.full dst/t/a", "2F61.old dst/t/a"]).await;
    let (x, y) = (
        "dst/t.zfsyncbuffer/2F61.full/x",
        "dst/t.zfsyncbuffer/2F61.full/y",
    );
    assert!(
        err.contains("cannot move the new copy into place at dst/t/a")
            && err.contains(&format!("the old copy is at {PARKED}"))
            && err.contains(&format!("dst/t/a/x is now at {x}"))
            && err.contains(&format!("dst/t/a/y is now at {y}")),
        "{err}"
    );
    let stays_where_the_error_says = || {
        s.assert_old_at("/a", PARKED);
        s.assert_old_at("/a/x", x);
        s.assert_old_at("/a/y", y);
    };
    stays_where_the_error_says();

    let report = s.converges().await;
    assert_sent(&report, "/a", SendKind::Full, "s2");
    stays_where_the_error_says();
}

/// RE4: a parked old copy that cannot be destroyed stays whole at HEX.old until the next swap of that dataset removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_swap_failure_destroying_the_parked_old_copy_keeps_it_until_the_next_swap() {
    let s = Swap::new("/a").await;
    strike(&s.dst, "destroy", "2F61.old");
    let done = s
        .attempt()
        .await
        .unwrap_or_else(|e| panic!("the swap itself succeeds: {e}\n{}", s.dump()));
    assert_eq!(done.location, "dst/t/a");
    assert_replica(&s.src, &s.dst);
    s.assert_children_kept(&["/a/x", "/a/y"]);
    let (guid, old) = s.before.get("/a").cloned().expect("listed");
    assert_eq!(
        copy_at(&s.dst, PARKED),
        Some((guid, old)),
        "the old copy stays whole, parked\n{}",
        s.dump()
    );

    let report = s.recv.send(&s.src, 1, true).await;
    assert_ok(&report, &s.src, &s.dst);
    assert!(s.dst.dataset(PARKED).is_some(), "{}", s.dump());

    // Diverged again: the next swap removes the parked copy first.
    s.dst.snapshot("dst/t/a", "local2");
    s.dst.clear_calls();
    s.converges().await;
    assert_called("receiver", &s.dst, &format!("destroy -r {PARKED}"));
    s.assert_buffer_empty();
}

impl Swap {
    /// Asks for a --full replacement of `path` on a new connection and
    /// sends the first `steps_sent` streams of the new copy; returns the
    /// connection, its dataset still open.
    async fn start_replacement(&self, steps_sent: usize) -> Client {
        let name = src_ds(self.path);
        let all = self.src.snapshots(&name);
        let mut c = self.recv.client().await;
        let req = SyncRequest::new(&rel(self.path), &all).allow_full(true);
        let reason = match c.sync(&req).await.expect("sync") {
            SyncReply::Full {
                reason,
                accepted: true,
            } => reason,
            other => panic!(
                "expected an accepted --full, got {other:?}\n{}",
                self.dump()
            ),
        };
        let decision = Decision::Full {
            reason,
            accepted: true,
        };
        for step in steps(&all, &decision).into_iter().take(steps_sent) {
            stream(&mut c, &self.src, &name, step.from, step.to)
                .await
                .unwrap_or_else(|e| panic!("a stream of the new copy: {e}\n{}", self.dump()));
        }
        c
    }

    /// Waits until `path` is no longer busy (see [`wait_unlocked`]).
    async fn wait_unlocked(&self, path: &str, what: &str) {
        wait_unlocked(&self.recv, &self.src, path, what).await;
    }

    /// A --full swap of /a that has to wait for /a/y, into which another
    /// connection is receiving. While it waits, /a/x (which it already
    /// locked) is busy for everyone else, the old copy is still in place,
    /// and `meanwhile` runs; then the transfer into /a/y ends and the swap
    /// goes on. Returns what Finish said.
    async fn swap_waiting_for_a_busy_child(
        &self,
        meanwhile: impl FnOnce(),
    ) -> Result<Finished, String> {
        assert_eq!(self.path, "/a");
        let y = src_ds("/a/y");
        self.src.snapshot(&y, "s3");
        let ys = self.src.snapshots(&y);
        let mut other = self.recv.client().await;
        let req = SyncRequest::new(&rel("/a/y"), &ys);
        assert_eq!(
            other.sync(&req).await.unwrap(),
            SyncReply::Incremental {
                base_guid: ys[1].guid,
                count: 1
            }
        );
        let mut watcher = self.recv.client().await;
        let x = SyncRequest::new(&rel("/a/x"), &self.src.snapshots(&src_ds("/a/x")));

        let mut c = self.start_replacement(2).await;
        let finishing = tokio::spawn(async move {
            let done = c.finish().await;
            c.bye().await;
            done
        });
        let start = Instant::now();
        loop {
            match watcher.sync(&x).await.expect("sync") {
                SyncReply::Refused {
                    reason,
                    temporary: true,
                } if reason.contains("busy") => break,
                SyncReply::UpToDate { .. } => {}
                other => panic!("/a/x: {other:?}\n{}", self.dump()),
            }
            assert!(
                start.elapsed() < PATIENCE,
                "the swap never locked /a/x\n{}",
                self.dump()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            !finishing.is_finished(),
            "the swap waits for /a/y\n{}",
            self.dump()
        );
        assert_eq!(
            copies(&self.dst, DST),
            self.before,
            "nothing moved yet\n{}",
            self.dump()
        );
        meanwhile();

        stream(&mut other, &self.src, &y, Some(&ys[1]), &ys[2])
            .await
            .expect("@s3 into /a/y");
        other.finish().await.expect("finish /a/y");
        other.bye().await;
        watcher.bye().await;
        tokio::time::timeout(PATIENCE, finishing)
            .await
            .expect("the swap ends")
            .expect("no panic")
            .map_err(|e| e.to_string())
    }

    /// [`Swap::swap_waiting_for_a_busy_child`], during which a person makes
    /// /a/late (with a snapshot @l1) below the old copy, and `meanwhile`
    /// runs; the swap itself succeeds and /a is the sender's. Returns the
    /// name of /a/late.
    async fn swap_with_a_late_child(&self, meanwhile: impl FnOnce()) -> String {
        let late = dst_ds("/a/late");
        let done = self
            .swap_waiting_for_a_busy_child(|| {
                self.dst.create(&late);
                self.dst.snapshot(&late, "l1");
                meanwhile();
            })
            .await
            .unwrap_or_else(|e| panic!("the swap itself succeeds: {e}\n{}", self.dump()));
        assert_eq!(done.location, dst_ds("/a"));
        assert_eq!(
            snaps(&self.dst, &dst_ds("/a")),
            snaps(&self.src, &src_ds("/a")),
            "{}",
            self.dump()
        );
        late
    }

    /// The old /a stays whole, parked, with the late child and its @l1
    /// below it; nothing of it is destroyed.
    #[track_caller]
    fn assert_parked_with_the_late_child(&self) {
        assert_eq!(
            copy_at(&self.dst, PARKED).as_ref(),
            self.before.get("/a"),
            "the old copy stays whole, parked\n{}",
            self.dump()
        );
        let kept = snap_names(&self.dst, &format!("{PARKED}/late"));
        assert_eq!(kept, ["l1"], "{}", self.dump());
        self.assert_not_destroyed("2F61.old");
    }
}

/// SE1: a new Sync, a Bye and a cut connection each abandon an unfinished replacement: HEX.full is destroyed and the lock freed; the old copy is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoning_an_unfinished_replacement_destroys_it_and_frees_the_lock() {
    let s = Swap::new("/a").await;
    let full = format!("{BUF}/2F61.full");
    for how in ["a new sync", "bye", "a cut connection"] {
        let mut c = s.start_replacement(1).await;
        assert_eq!(
            snaps(&s.dst, &full),
            snaps(&s.src, &src_ds("/a"))[..1].to_vec(),
            "{how}: the new copy is on its way\n{}",
            s.dump()
        );
        match how {
            "a new sync" => {
                let x = SyncRequest::new(&rel("/a/x"), &s.src.snapshots(&src_ds("/a/x")));
                assert_eq!(
                    c.sync(&x).await.unwrap(),
                    SyncReply::UpToDate {
                        snapshot: "s2".into()
                    }
                );
                assert!(s.dst.dataset(&full).is_none(), "{}", s.dump());
                c.bye().await;
            }
            "bye" => c.bye().await,
            _ => drop(c),
        }
        wait_until(&format!("{how} to remove {full}"), &s.dst, || {
            s.dst.dataset(&full).is_none()
        })
        .await;
        assert_eq!(
            copies(&s.dst, DST),
            s.before,
            "{how}: the old copy is untouched\n{}",
            s.dump()
        );
        s.wait_unlocked("/a", how).await;
    }
}

/// FI1, SE1: Finish before the new copy is whole is refused and removes the unfinished replacement; the old copy stays, the lock is freed and the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finish_before_the_replacement_is_whole_is_refused_and_removes_it() {
    let s = Swap::new("/a").await;
    let full = format!("{BUF}/2F61.full");
    let mut c = s.start_replacement(1).await;
    assert!(s.dst.dataset(&full).is_some(), "{}", s.dump());
    assert_finish_refused(
        &mut c,
        "/a did not receive every snapshot up to the sender's newest",
    )
    .await;
    assert!(s.dst.dataset(&full).is_none(), "{}", s.dump());
    assert_eq!(copies(&s.dst, DST), s.before, "{}", s.dump());

    // Not busy: the same connection replaces the dataset now.
    let (_, done) = sync_finished(&mut c, &s.src, &s.dst, "/a", true).await;
    assert_eq!(done.location, dst_ds("/a"));
    c.bye().await;
    assert_replica(&s.src, &s.dst);
    s.assert_children_kept(&["/a/x", "/a/y"]);
}

/// RE2: a stale HEX.old that holds a dataset is never destroyed: the swap is refused, naming the zfs list -r to look at; once a person moved the dataset away, the next swap destroys the bare HEX.old and goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_parked_copy_holding_a_dataset_is_kept_and_stops_the_swap() {
    let s = Swap::new("/a").await;
    let stray = format!("{PARKED}/z");
    if s.dst.dataset(BUF).is_none() {
        s.dst.create(BUF);
    }
    s.dst.create(PARKED);
    s.dst.create(&stray);
    s.dst.snapshot(&stray, "z1");
    let kept = copies(&s.dst, PARKED);

    let err = s.attempt_fails().await;
    assert!(
        err.contains(&format!(
            "{PARKED} is left from an interrupted replacement and holds datasets"
        )) && err.contains(&format!("zfs list -r {PARKED}")),
        "{err}"
    );
    assert_eq!(copies(&s.dst, PARKED), kept, "{}", s.dump());
    assert_eq!(copies(&s.dst, DST), s.before, "{}", s.dump());
    s.assert_not_destroyed(PARKED);

    s.dst
        .rename(&ds(&stray), &ds("dst/z"))
        .await
        .expect("move the stray dataset away by hand");
    s.converges_by_replacing(&["/a/x", "/a/y"]).await;
    assert!(s.dst.dataset(PARKED).is_none(), "{}", s.dump());
}

/// RE5, RE4: the swap waits for the lock of every in-place dataset below the old copy, keeping those it holds busy for others, and goes on once the last transfer ends; a child made below the old copy meanwhile moves under the new copy, and the bare parked copy is destroyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_swap_waits_for_transfers_below_the_old_copy_and_brings_a_late_child_along() {
    let s = Swap::new("/a").await;
    let late = s.swap_with_a_late_child(|| {}).await;
    s.assert_children_kept(&["/a/x"]);
    // /a/y is the old dataset, with the @s3 it received while the swap waited.
    let (y_guid, _) = s.before.get("/a/y").cloned().expect("listed");
    assert_eq!(
        copy_at(&s.dst, &dst_ds("/a/y")),
        Some((y_guid, snaps(&s.src, &src_ds("/a/y")))),
        "{}",
        s.dump()
    );
    assert_eq!(snap_names(&s.dst, &late), ["l1"], "{}", s.dump());
    assert!(
        !s.dst
            .names()
            .iter()
            .any(|n| n.ends_with(".old") || n.ends_with(".full")),
        "{}",
        s.dump()
    );
}

/// RE4: a child that appeared below the old copy during the swap and cannot move under the new copy keeps the parked copy: nothing of it is destroyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_left_below_the_parked_copy_keeps_it() {
    let s = Swap::new("/a").await;
    s.swap_with_a_late_child(|| strike(&s.dst, "rename", "2F61.old/late"))
        .await;
    s.assert_parked_with_the_late_child();
}

/// RE4: a parked copy that cannot be listed after the swap is kept, never destroyed unseen, with the child that went along with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_copy_that_cannot_be_listed_is_kept() {
    let s = Swap::new("/a").await;
    s.swap_with_a_late_child(|| strike(&s.dst, "list", "2F61.old"))
        .await;
    s.assert_parked_with_the_late_child();
}
