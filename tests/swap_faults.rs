//! Faults struck at each step of the receiver's `--full` swap (docs/design.md
//! 4.5), during the fill of a dataset without snapshots (a target made by
//! hand, a pool's root), in the window after a new replica's first receive,
//! and under `--delete-missing`. The receiver runs with a `--zfs` wrapper
//! ([`FaultyZfs`]) that passes every call to the real zfs but fails, or
//! crashes the receiver at, the calls a test names. After each fault the old
//! copy (data, snapshots, GUIDs and children) is still there, nothing outside
//! the target changed, and the next run converges.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use zfsync_common::client::{CleanReport, Client};
use zfsync_e2e::*;

/// What a matching call does instead of (or before) running.
enum Act {
    /// Fails with "injected fault" (a receive reads its stream first, as a
    /// real one that fails at the end).
    Fail,
    /// SIGKILLs the receiver (the wrapper's parent): a crash at this call.
    KillReceiver,
    /// Runs these zfs argvs first (each under the harness's turn lock, as a
    /// person's commands), then the call itself.
    Before(Vec<Vec<String>>),
}

/// A `--zfs` for the receiver: logs every call, then runs the real zfs,
/// unless a rule matches. A rule is an extended regular expression matched
/// against the call's arguments joined by spaces (`rename p/t/a p/t/b`);
/// the first rule that matches and has calls left decides: it lets `skip`
/// matching calls pass, then acts on the next `times`.
struct FaultyZfs {
    dir: TempDir,
    script: String,
    rules: AtomicU32,
}

impl FaultyZfs {
    fn new() -> FaultyZfs {
        let dir = TempDir::new("faultyzfs");
        let p = |n: &str| dir.path().join(n).display().to_string();
        std::fs::create_dir_all(p("rules")).expect("rules dir");
        let script = p("zfs");
        let body = format!(
            r#"#!/bin/bash
# swap_faults: the real zfs, but chosen calls fail (see FaultyZfs).
args="$*"
echo "$args" >> '{log}'
act=""
exec 9>>'{lock}'
flock 9
for r in '{rules}'/*; do
  [ -f "$r" ] || continue
  {{ IFS= read -r re; IFS= read -r action; IFS= read -r skip; IFS= read -r left; }} < "$r"
  [[ $args =~ $re ]] || continue
  if [ "$skip" -gt 0 ]; then
    printf '%s\n%s\n%s\n%s\n' "$re" "$action" $((skip-1)) "$left" > "$r"; break
  fi
  if [ "$left" -gt 0 ]; then
    printf '%s\n%s\n%s\n%s\n' "$re" "$action" "$skip" $((left-1)) > "$r"; act="$action"; break
  fi
done
flock -u 9
case "$act" in
  fail)
    echo "$args" >> '{hits}'
    [ "$1" = receive ] && cat >/dev/null
    echo "cannot $1 '${{@: -1}}': injected fault" >&2
    exit 1;;
  kill)
    echo "$args" >> '{hits}'
    kill -9 $PPID
    [ "$1" = receive ] && cat >/dev/null
    exit 1;;
  before:*)
    echo "$args" >> '{hits}'
    while IFS= read -r line; do
      eval "set -- $line"
      flock '{turn}' '{zfs}' "$@" || echo "swap_faults: $line failed" >&2
    done < "${{act#before:}}"
    exec '{zfs}' $args;;
esac
exec '{zfs}' "$@"
"#,
            log = p("calls.log"),
            hits = p("hits.log"),
            lock = p("rules.lock"),
            rules = p("rules"),
            turn = turn_path().display(),
            zfs = zfs_path(),
        );
        std::fs::write(&script, body).expect("write the wrapper");
        run("chmod", &["+x", &script]);
        FaultyZfs {
            dir,
            script,
            rules: AtomicU32::new(0),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn rule(&self, re: &str, skip: u32, times: u32, act: Act) {
        let n = self.rules.fetch_add(1, Ordering::SeqCst);
        let action = match act {
            Act::Fail => "fail".to_string(),
            Act::KillReceiver => "kill".to_string(),
            Act::Before(cmds) => {
                let file = self.path(&format!("before{n}"));
                let text: String = cmds
                    .iter()
                    .map(|argv| {
                        let quoted: Vec<String> = argv.iter().map(|a| format!("'{a}'")).collect();
                        format!("{}\n", quoted.join(" "))
                    })
                    .collect();
                std::fs::write(&file, text).expect("write the commands");
                format!("before:{}", file.display())
            }
        };
        std::fs::write(
            self.path(&format!("rules/{n:03}")),
            format!("{re}\n{action}\n{skip}\n{times}\n"),
        )
        .expect("write a rule");
    }

    fn fail(&self, re: &str) {
        self.rule(re, 0, 1, Act::Fail);
    }

    fn clear_rules(&self) {
        for e in std::fs::read_dir(self.path("rules"))
            .expect("rules")
            .flatten()
        {
            let _ = std::fs::remove_file(e.path());
        }
    }

    /// How many calls a rule acted on so far.
    fn hits(&self) -> usize {
        std::fs::read_to_string(self.path("hits.log"))
            .unwrap_or_default()
            .lines()
            .count()
    }

    /// Every call since the last [`FaultyZfs::clear_calls`].
    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn clear_calls(&self) {
        let _ = std::fs::remove_file(self.path("calls.log"));
    }
}

/// A regular expression matching `zfs rename FROM TO`.
fn rename_re(from: &str, to: &str) -> String {
    format!("^rename {} {}$", lit(from), lit(to))
}

/// A regular expression matching `s` literally.
fn lit(s: &str) -> String {
    s.chars()
        .map(|c| {
            if ".[]()*+?{}|^$\\".contains(c) {
                format!("\\{c}")
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Dataset and snapshot GUIDs of `root` and below, with the bytes each
/// refers to (`GUID referenced`: the same dataset or snapshot, and the same
/// data), keyed by the name relative to it (`""`, `@s1`, `/x`, `/x@s1`);
/// empty if it is gone.
fn guids(root: &str) -> BTreeMap<String, String> {
    let (ok, out) = zfs_try(&[
        "get",
        "-H",
        "-p",
        "-r",
        "-o",
        "name,property,value",
        "guid,referenced",
        root,
    ]);
    if !ok {
        return BTreeMap::new();
    }
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for l in out.lines() {
        let mut f = l.split('\t');
        let (Some(name), Some(prop), Some(value)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let Some(rel) = name.strip_prefix(root) else {
            continue;
        };
        if !(rel.is_empty() || rel.starts_with('/') || rel.starts_with('@')) {
            continue;
        }
        let e = map.entry(rel.to_string()).or_default();
        match prop {
            "guid" => *e = format!("{value}{e}"),
            _ => e.push_str(&format!(" {value}")),
        }
    }
    map
}

/// Snapshot GUIDs (only) of `root` and below (not of its buffer), keyed
/// as in [`guids`]: to compare with another pool's.
fn snaps(root: &str) -> BTreeMap<String, String> {
    guids(root)
        .into_iter()
        .filter(|(k, _)| k.contains('@'))
        .map(|(k, v)| {
            let guid = v.split(' ').next().unwrap_or_default().to_string();
            (k, guid)
        })
        .collect()
}

/// Lines in one list and not in the other.
fn changed(a: &[String], b: &[String]) -> usize {
    a.iter().filter(|l| !b.contains(l)).count() + b.iter().filter(|l| !a.contains(l)).count()
}

/// The entries of [`guids`] of a dataset itself, not of its children.
fn own(guids: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    guids
        .iter()
        .filter(|(k, _)| !k.starts_with('/'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// How many of `before` are not in `after` with the same GUID.
fn missing(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> usize {
    before
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(*v))
        .count()
}

/// Everything in `pool` outside `target` and its buffer, with GUIDs.
fn outside(pool: &str, target: &str) -> Vec<String> {
    let buffer = format!("{target}.zfsyncbuffer");
    let under = |n: &str, root: &str| {
        n == root || n.starts_with(&format!("{root}/")) || n.starts_with(&format!("{root}@"))
    };
    pool_state(pool)
        .lines()
        .filter(|l| {
            let name = l.split('\t').next().unwrap_or_default();
            !under(name, target) && !under(name, &buffer)
        })
        .map(str::to_string)
        .collect()
}

/// A property set on `ds` itself (not inherited); `-` if none is.
fn property(ds: &str, prop: &str) -> String {
    let out = zfs(&["get", "-H", "-p", "-o", "value,source", prop, ds]);
    match out.trim().split_once('\t') {
        Some((value, "local")) => value.to_string(),
        _ => "-".to_string(),
    }
}

fn own_guid(ds: &str) -> String {
    zfs(&["get", "-H", "-p", "-o", "value", "guid", ds])
        .trim()
        .to_string()
}

fn read(ds: &str, file: &str) -> Option<Vec<u8>> {
    std::fs::read(mountpoint(ds).join(file)).ok()
}

/// A receiver into `dst` with `--zfs` the wrapper of `zfs`, on `port` (0:
/// any free one).
fn start_receiver(dst: &str, zfs: &FaultyZfs, port: u16) -> Receiver {
    Receiver::start_on(
        dst,
        &Certs::shared().receiver_args(),
        &["--zfs", &zfs.script],
        port,
    )
}

/// A source tree, its replica under a target, and a receiver running with
/// a [`FaultyZfs`].
struct Setup {
    _a: Pool,
    b: Pool,
    src: String,
    dst: String,
    zfs: FaultyZfs,
    recv: Receiver,
}

impl Setup {
    /// `rels` under `src`, each with a file, snapshotted `@s1` and `@s2`
    /// (so that a new dataset takes a full stream and an incremental); a
    /// receiver into `target` (a dataset of pool b, `""` for its root).
    fn new(tag: &str, rels: &[&str], target: &str) -> Setup {
        let Pools { a, b, src, dst } = Pools::new(tag, target);
        create_tree(&src, rels);
        zfs(&["snapshot", "-r", &format!("{src}@s1")]);
        for r in rels {
            let ds = format!("{src}{r}");
            write_file(&ds, "g", &noise(4096, ds.len() as u64));
        }
        zfs(&["snapshot", "-r", &format!("{src}@s2")]);
        if !target.is_empty() {
            // Something outside the target that must never change.
            zfs(&["create", "-o", "canmount=noauto", &b.ds("outside")]);
            zfs(&["snapshot", &format!("{}@keep", b.ds("outside"))]);
        }
        let zfs = FaultyZfs::new();
        let recv = start_receiver(&dst, &zfs, 0);
        Setup {
            _a: a,
            b,
            src,
            dst,
            zfs,
            recv,
        }
    }

    /// One `zfsync-send` run, one connection (so that the order of the
    /// receiver's calls is known).
    fn send(&self, extra: &[&str]) -> SendRun {
        let port = self.recv.port.to_string();
        let mut args = vec!["-p", &port, "-t", "1"];
        args.extend(extra);
        args.extend([self.src.as_str(), "127.0.0.1"]);
        send(&Certs::shared().sender_args(), &args)
    }

    fn at(&self, rel: &str) -> String {
        format!("{}{rel}", self.dst)
    }

    /// The target's buffer (`zfsyncbuffer` below a pool's root).
    fn buffer_root(&self) -> String {
        if self.dst == self.b.name {
            format!("{}/zfsyncbuffer", self.dst)
        } else {
            format!("{}.zfsyncbuffer", self.dst)
        }
    }

    fn buffer(&self, leaf: &str) -> String {
        format!("{}/{leaf}", self.buffer_root())
    }

    fn outside(&self) -> Vec<String> {
        outside(&self.b.name, &self.dst)
    }

    /// The replica has every snapshot of the source, with its GUID, and
    /// nothing else; the buffer is gone.
    #[track_caller]
    fn assert_converged(&self, why: &str) {
        assert_eq!(
            snaps(&self.dst),
            snaps(&self.src),
            "{why}: the replica is not the source's\n{}",
            self.recv.log()
        );
        let buffer = self.buffer_root();
        assert!(!exists(&buffer), "{why}: {buffer} is left");
    }

    /// Nothing outside the target changed since `outside_before` (from
    /// [`Setup::outside`]); then the test's figures are recorded.
    #[track_caller]
    fn finish(
        &self,
        test: &str,
        outside_before: &[String],
        faults: u64,
        completed: u64,
        lost: usize,
    ) {
        let outside_writes = changed(outside_before, &self.outside());
        assert_eq!(outside_writes, 0, "{:?}", self.outside());
        figures(test, faults, completed, lost, outside_writes);
    }

    /// A `--full` run during which the top's incremental fails wherever
    /// it is received (in place, or into top.full after its full stream);
    /// it exits 1.
    fn full_run_failing_the_top_incremental(&self) -> SendRun {
        self.zfs.fail(&format!("^receive -u {}$", lit(&self.dst)));
        self.zfs.rule(
            &format!("^receive -u {}$", lit(&self.buffer("top.full"))),
            1,
            1,
            Act::Fail,
        );
        let r = self.send(&["--full"]);
        assert_eq!(self.zfs.hits(), 1, "{}", r.dump());
        r.assert_code(1);
        r
    }

    /// How much of the old top (its own GUID `top`) and of its child /a
    /// (`child`, from [`guids`]) is gone.
    fn lost(&self, top: &str, child: &BTreeMap<String, String>) -> usize {
        usize::from(own_guid(&self.dst) != top) + missing(child, &guids(&self.at("/a")))
    }

    /// The top, a target without snapshots, still holds its old data: no
    /// snapshots, its own GUID `top`, the file `old`.
    #[track_caller]
    fn assert_old_data(&self, top: String, r: &SendRun, what: &str) {
        assert_eq!(
            (
                snapshot_names(&self.dst),
                own_guid(&self.dst),
                read(&self.dst, "old")
            ),
            (Vec::new(), top, Some(b"the old data".to_vec())),
            "{what} was swapped out before the new copy was whole\n{}\n{}",
            r.dump(),
            self.recv.log()
        );
    }
}

/// Records a test's figures for the closing hardening line.
fn figures(test: &str, faults: u64, completed: u64, lost: usize, outside_writes: usize) {
    record_figures(
        test,
        &[
            ("faults", faults),
            ("completed", completed),
            ("lost", lost as u64),
            ("outside_writes", outside_writes as u64),
        ],
    );
}

/// `--delete-missing` as a sender's run `run` whose datasets are `paths`
/// asks for it: a CleanBuffer (not a dry run) over a connection of its own
/// to the receiver on `port`.
fn delete_missing(port: u16, run: &str, paths: Vec<String>) -> CleanReport {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut c = Client::connect(&Certs::shared().client_options(port, run))
            .await
            .expect("connect");
        let r = c
            .clean_buffer(paths, true, false)
            .await
            .expect("cleanbuffer");
        c.bye().await;
        r
    })
}

/// `(path, reason)` of each dataset a CleanBuffer could not handle.
fn failures(report: &CleanReport) -> Vec<(&str, &str)> {
    report
        .failed
        .iter()
        .map(|f| (f.path.as_str(), f.reason.as_str()))
        .collect()
}

/// A fault at one step of the swap of /a (docs/design.md 4.5).
struct Step {
    name: &'static str,
    /// The call that fails once (a regex), after `skip` matching calls
    /// passed.
    fail: String,
    skip: u32,
    /// The failure the sender reports for /a; `None`: the swap itself
    /// succeeds.
    says: Option<&'static str>,
}

/// RE1, RE3, RE4: the swap of /a (children /a/x and /a/y) fails at each
/// step in turn; each time the old copy stays in place, whole, with its
/// children, and the next `--full` run converges, keeping the children.
#[test]
fn each_step_of_the_swap_fails_and_the_old_copy_survives() {
    let s = Setup::new("swapstep", &["", "/a", "/a/x", "/a/y", "/c"], "t");
    s.send(&[]).assert_code(0);
    s.assert_converged("first run");
    let outside_before = s.outside();
    let (t, buf) = (s.dst.clone(), s.buffer_root());
    let steps = [
        Step {
            name: "1 relist",
            // The run's listing passes; the swap's own fails.
            fail: format!("^get .* {} {}$", lit(&t), lit(&buf)),
            skip: 1,
            says: Some("injected fault"),
        },
        Step {
            name: "3 move a child under the new copy",
            fail: rename_re(&s.at("/a/y"), &s.buffer("2F61.full/y")),
            skip: 0,
            says: Some("under the new copy"),
        },
        Step {
            name: "4 move the old copy aside",
            fail: rename_re(&s.at("/a"), &s.buffer("2F61.old")),
            skip: 0,
            says: Some("aside"),
        },
        Step {
            name: "5 move the new copy in",
            fail: rename_re(&s.buffer("2F61.full"), &s.at("/a")),
            skip: 0,
            says: Some("cannot move the new copy into place"),
        },
        Step {
            name: "6 destroy the parked copy",
            fail: format!("^destroy -r {}$", lit(&s.buffer("2F61.old"))),
            skip: 0,
            says: None,
        },
    ];
    let (mut faults, mut completed, mut lost) = (0, 0, 0);
    for (i, step) in steps.iter().enumerate() {
        // The receiver's /a diverges: only --full replaces it.
        zfs(&["snapshot", &format!("{}@local{i}", s.at("/a"))]);
        let before = guids(&s.at("/a"));
        let children: Vec<(String, String)> = ["/a/x", "/a/y"]
            .iter()
            .map(|r| (r.to_string(), own_guid(&s.at(r))))
            .collect();
        s.zfs.clear_rules();
        let hits = s.zfs.hits();
        s.zfs.rule(&step.fail, step.skip, 1, Act::Fail);
        let r = s.send(&["--full"]);
        assert_eq!(
            s.zfs.hits(),
            hits + 1,
            "{}: the fault was not struck\n{}",
            step.name,
            r.dump()
        );
        faults += 1;
        match step.says {
            Some(says) => {
                r.assert_code(1).assert_stdout_has(says);
                let after = guids(&s.at("/a"));
                lost += missing(&before, &after);
                assert_eq!(
                    after,
                    before,
                    "{}: the old copy is not in place, whole\n{}\n{}",
                    step.name,
                    r.dump(),
                    s.recv.log()
                );
            }
            None => {
                r.assert_code(0);
                // The old copy stays parked, whole.
                let parked = guids(&s.buffer("2F61.old"));
                let old_top = own(&before);
                lost += missing(&old_top, &parked);
                assert_eq!(parked, old_top, "{}: the parked copy", step.name);
            }
        }
        s.zfs.clear_rules();
        // The next run converges.
        let r = s.send(&["--full"]);
        r.assert_code(0);
        completed += 1;
        assert_eq!(
            snaps(&s.dst),
            snaps(&s.src),
            "{}: not converged\n{}",
            step.name,
            r.dump()
        );
        for (r, guid) in &children {
            assert_eq!(
                &own_guid(&s.at(r)),
                guid,
                "{}: {r} was not kept (moved under the new copy)",
                step.name
            );
        }
    }
    // The parked copy the last step left goes with the next swap of /a.
    zfs(&["snapshot", &format!("{}@local-last", s.at("/a"))]);
    s.send(&["--full"]).assert_code(0);
    completed += 1;
    s.assert_converged("after the last swap");
    assert_eq!(lost, 0);
    s.finish(
        "swap_faults-steps",
        &outside_before,
        faults,
        completed,
        lost,
    );
}

/// Hardening II, 4 (RE4): a child created below the old copy while it
/// moves aside goes along to HEX.old; when the listing of HEX.old then
/// fails, the parked copy is kept (never destroyed with -r unlisted), and
/// the receiver says where it is.
#[test]
fn a_failed_listing_of_the_parked_copy_keeps_it_and_the_child_that_moved_with_it() {
    let s = Setup::new("parklist", &["", "/a", "/a/x"], "t");
    s.send(&[]).assert_code(0);
    zfs(&["snapshot", &format!("{}@local", s.at("/a"))]);
    let old = guids(&s.at("/a"));
    let outside_before = s.outside();
    let parked = s.buffer("2F61.old");
    let late = s.at("/a/late");
    // Just before the old copy moves aside, someone creates a dataset
    // below it (as a transfer into a new child would).
    s.zfs.rule(
        &rename_re(&s.at("/a"), &parked),
        0,
        1,
        Act::Before(vec![
            vec![
                "create".into(),
                "-o".into(),
                "canmount=noauto".into(),
                late.clone(),
            ],
            vec!["snapshot".into(), format!("{late}@mine")],
        ]),
    );
    // Then the listing of the parked copy fails.
    s.zfs.fail(&format!("^get .* {}$", lit(&parked)));
    let r = s.send(&["--full"]);
    assert_eq!(s.zfs.hits(), 2, "{}", r.dump());
    r.assert_code(0);
    let late_guids = guids(&format!("{parked}/late"));
    assert_eq!(
        late_guids.keys().collect::<Vec<_>>(),
        ["", "@mine"],
        "the child that moved with the old copy is gone\n{}\n{}",
        r.dump(),
        s.recv.log()
    );
    // The old copy itself is kept whole with it.
    let parked_now = guids(&parked);
    let lost = missing(&own(&old), &parked_now);
    assert_eq!(lost, 0, "{parked_now:?}");
    assert!(
        s.recv
            .log()
            .contains(&format!("the old copy stays at {parked}")),
        "the receiver does not say where the old copy is\n{}",
        s.recv.log()
    );
    // The new copy is in place, with its child; the next run is fine.
    s.send(&[]).assert_code(0);
    assert_eq!(snaps(&s.at("/a")), snaps(&format!("{}/a", s.src)));
    s.finish("swap_faults-parked-listing", &outside_before, 1, 1, lost);
}

/// Hardening II, 5: `--full` into a target made by hand (no snapshots)
/// whose incremental fails: the old target stays as it was, data and
/// children, until the whole new copy is in place; the next run converges.
#[test]
fn a_failed_fill_of_a_target_made_by_hand_keeps_its_old_data() {
    let s = Setup::new("fillhand", &["", "/a"], "t");
    // The target exists, made by hand, without snapshots, with a file.
    zfs(&["create", &s.dst]);
    write_file(&s.dst, "old", b"the old data");
    s.send(&[])
        .assert_code(1)
        .assert_stdout_has("has no snapshots");
    let child = guids(&s.at("/a"));
    assert!(child.contains_key("@s2"), "{child:?}");
    let top = own_guid(&s.dst);
    let outside_before = s.outside();

    // The top's incremental fails, wherever it is received.
    let r = s.full_run_failing_the_top_incremental();
    let lost = s.lost(&top, &child);
    s.assert_old_data(top, &r, "the old target");
    assert_eq!(guids(&s.at("/a")), child);

    s.zfs.clear_rules();
    s.send(&["--full"]).assert_code(0);
    s.assert_converged("after the fault");
    assert_eq!(guids(&s.at("/a")), child, "the child was kept");
    s.send(&[]).assert_code(0);
    s.finish("swap_faults-fill-by-hand", &outside_before, 1, 1, lost);
}

/// Hardening II, 5: `--full` into a pool's root (no snapshots): its
/// incremental fails, and the root keeps its old data; then the local
/// commit of the whole new copy fails half way, and the whole new copy
/// is kept; the next run converges.
#[test]
fn a_failed_fill_of_a_pool_root_keeps_its_old_data_then_the_whole_new_copy() {
    let s = Setup::new("fillroot", &["", "/a"], "");
    let root = s.dst.clone();
    write_file(&root, "old", b"the old data");
    s.send(&[])
        .assert_code(1)
        .assert_stdout_has("has no snapshots");
    let child = guids(&s.at("/a"));
    let top = own_guid(&root);

    // 1. The top's incremental from the sender fails, wherever it goes.
    let r = s.full_run_failing_the_top_incremental();
    let mut lost = s.lost(&top, &child);
    s.assert_old_data(top, &r, "the pool's root");

    // 2. The local commit into the root: its full stream passes, its
    // incremental fails. The whole new copy stays in the buffer.
    s.zfs.clear_rules();
    s.zfs.fail(&format!("^receive -u {}$", lit(&root)));
    let r = s.send(&["--full"]);
    assert_eq!(s.zfs.hits(), 2, "{}", r.dump());
    r.assert_code(1).assert_stdout_has(&format!(
        "the whole new copy stays at {}",
        s.buffer("top.full")
    ));
    let whole = snaps(&s.buffer("top.full"));
    let want: BTreeMap<String, String> = snaps(&s.src)
        .into_iter()
        .filter(|(k, _)| k.starts_with('@'))
        .collect();
    lost += missing(&want, &whole);
    assert_eq!(
        whole.keys().filter(|k| k.starts_with('@')).count(),
        2,
        "{whole:?}"
    );

    // The next run (no --full needed now) converges and removes it.
    s.zfs.clear_rules();
    s.send(&[]).assert_code(0);
    s.assert_converged("after the faults");
    assert_eq!(guids(&s.at("/a")), child, "the child was kept");
    s.send(&[]).assert_code(0);
    figures("swap_faults-fill-pool-root", 2, 1, lost, 0);
}

/// Hardening II, 8 (ING6): the receiver dies after a new replica's first
/// receive, in the batched `zfs set canmount=noauto` of the connection's
/// new replicas (zfs-fuse has no `receive -o`), before they are marked;
/// the next Finish of each sets both, and `--delete-missing` then knows
/// it as a replica. In the steady state no `zfs set` runs.
#[test]
fn marks_missed_by_a_crash_are_set_at_the_next_finish() {
    let mut s = Setup::new("marks", &["", "/a"], "t");
    let outside_before = s.outside();
    let a = s.at("/a");
    s.zfs.rule(
        &format!("^set canmount=noauto .*{}$", lit(&a)),
        0,
        1,
        Act::KillReceiver,
    );
    // The marks are set in a batch once the datasets are finished (when
    // the connection ends, or before cleanbuffer places anything): the
    // crash comes after every snapshot arrived, and whether the sender
    // still notices it (exit 1) depends on where it is by then.
    let run = s.send(&[]);
    assert!(matches!(run.code, 0 | 1), "{}", run.dump());
    assert_eq!(s.zfs.hits(), 1);
    assert_eq!(
        snapshot_names(&a),
        ["s1", "s2"],
        "crashed after the streams"
    );
    assert_eq!(property(&a, "zfsync:replica"), "-");
    let port = s.recv.port;
    s.recv.kill();
    s.recv = start_receiver(&s.dst, &s.zfs, port);

    // The next run that finishes the datasets (a new snapshot) marks them.
    zfs(&["snapshot", "-r", &format!("{}@s2b", s.src)]);
    s.send(&[]).assert_code(0);
    s.assert_converged("after the crash");
    assert_eq!(
        (property(&a, "canmount"), property(&a, "zfsync:replica")),
        ("noauto".to_string(), "yes".to_string()),
        "the marks of {a} were not set again\n{}",
        s.recv.log()
    );

    // Steady state: an incremental sets nothing.
    zfs(&["snapshot", "-r", &format!("{}@s3", s.src)]);
    s.zfs.clear_calls();
    s.send(&[]).assert_code(0);
    let sets: Vec<String> = s
        .zfs
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("set "))
        .collect();
    assert!(sets.is_empty(), "{sets:?}");

    // --delete-missing knows it now.
    let report = delete_missing(port, "marks-delete", vec![String::new()]);
    assert_eq!(report.deleted, ["/a"], "{report:?}\n{}", s.recv.log());
    assert!(!exists(&a));
    s.finish("swap_faults-marks", &outside_before, 1, 1, 0);
}

/// `--delete-missing` that cannot delete an orphan (its listing fails; a
/// clone depends on it) reports it in `failed`, and the orphan stays.
#[test]
fn an_orphan_that_cannot_be_deleted_is_reported() {
    let s = Setup::new("orphanfail", &["", "/a", "/gone"], "t");
    s.send(&[]).assert_code(0);
    let gone = s.at("/gone");
    let before = guids(&gone);
    // A person's clone of the orphan, outside the target.
    let clone = s.b.ds("clone");
    zfs(&[
        "clone",
        "-o",
        "canmount=noauto",
        &format!("{gone}@s1"),
        &clone,
    ]);
    let outside_before = s.outside();
    let paths = vec![String::new(), "/a".to_string()];
    let clean = |run: &str| delete_missing(s.recv.port, run, paths.clone());

    // 1. The fresh listing before the destroy fails.
    s.zfs.fail(&format!("^get .* {}$", lit(&gone)));
    let report = clean("orphan-1");
    assert_eq!(s.zfs.hits(), 1);
    assert_eq!(report.orphans, ["/gone"]);
    assert!(report.deleted.is_empty());
    let failed = failures(&report);
    assert!(
        matches!(failed.as_slice(), [("/gone", reason)] if reason.starts_with("cannot delete the orphaned replica")),
        "{failed:?}"
    );
    assert_eq!(guids(&gone), before);

    // 2. zfs refuses: a clone depends on it.
    let report = clean("orphan-2");
    assert!(report.deleted.is_empty(), "{report:?}");
    let failed = failures(&report);
    assert!(
        matches!(failed.as_slice(), [("/gone", reason)]
            if reason.starts_with("cannot delete the orphaned replica") && reason.contains("dependent clones")),
        "{failed:?}\n{}",
        s.recv.log()
    );
    assert_eq!(guids(&gone), before);
    assert!(exists(&clone));

    // 3. The real sender, after the source dataset is gone: the failure
    // reaches its summary and its exit status.
    // (The sender holds its confirmed base: release it first, as README
    // says.)
    let tag = format!("zfsync_127.0.0.1_{}", s.recv.port);
    zfs(&["release", &tag, &format!("{}/gone@s2", s.src)]);
    let src_gone = format!("{}/gone", s.src);
    let _ = zfs_try(&["unmount", &src_gone]);
    let mut destroyed = false;
    for _ in 0..50 {
        if zfs_try(&["destroy", "-r", &src_gone]).0 {
            destroyed = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(destroyed, "cannot destroy {src_gone}");
    let run = s.send(&["--delete-missing"]);
    run.assert_code(1)
        .assert_stdout_has("NOT deleted on the receiver: /gone: cannot delete the orphaned replica")
        .assert_stdout_has("1 orphan(s) not deleted (see above)");
    assert_eq!(guids(&gone), before);
    let lost = missing(&before, &guids(&gone));
    s.finish("swap_faults-orphans", &outside_before, 3, 0, lost);
}
