//! The receiver registry: which receivers a source tree has been sent to,
//! kept as the user property `zfsync:receivers=<id>,<id>` on the source
//! dataset itself. A run adds its receiver once it reached it, before the
//! first stream; every run reads it, so that retention keeps what any of
//! those receivers may hold unconfirmed (design.md SN6), however its own
//! runs went. Format and parse here, with a round-trip test.
//!
//! Why a registry: the other receivers' confirmations are user properties
//! with names this run does not know (`zfsync:synced_<id>`), and `zfs get`
//! lists user properties only by name or with `all` (every native property
//! of every dataset and snapshot: the expensive listing). The registry is
//! read from the source dataset alone (`zfs get -d 0`, only when `--keep`
//! asks for pruning); the tree is then listed once, with every registered
//! receiver's confirmation.

use zfsync_common::naming::{format_confirm_prop, parse_receivers, DatasetName};
pub use zfsync_common::naming::{format_receivers, RECEIVERS_PROP};
use zfsync_common::zfs::{Dataset, ZfsBackend, ZfsError};

/// The registry of `source` as a listing shows it (its local value).
fn listed(datasets: &[Dataset], source: &DatasetName) -> Vec<String> {
    datasets
        .iter()
        .find(|d| &d.name == source)
        .and_then(|d| d.props.get(RECEIVERS_PROP))
        .map(|v| parse_receivers(v))
        .unwrap_or_default()
}

/// What a run knows of the receivers of its tree.
#[derive(Debug, Default)]
pub(crate) struct Known {
    /// The registry, as the listing showed it.
    registered: Vec<String>,
    /// The other receivers of the registry: what they may hold
    /// unconfirmed is never pruned.
    pub others: Vec<String>,
    /// This receiver has been sent this tree: it is in the registry, or
    /// was reached in this run.
    pub this: bool,
    /// Recording this receiver in the registry failed (a retention error).
    pub error: Option<String>,
}

impl Known {
    /// Before the listing: with `pruning` (`--keep`), reads the registry
    /// of `source` alone (not its tree; nothing when the source does not
    /// exist, which the listing then says), so that the listing can ask for
    /// every other receiver's confirmation. Without pruning the others do
    /// not matter.
    pub async fn read(
        zfs: &dyn ZfsBackend,
        source: &DatasetName,
        this: &str,
        pruning: bool,
    ) -> Result<Known, ZfsError> {
        let mut known = Known::default();
        if pruning {
            let tree = zfs.list(&[source], Some(0), &[RECEIVERS_PROP]).await?;
            let datasets: Vec<Dataset> = tree.datasets.into_values().collect();
            known.others = listed(&datasets, source);
            known.others.retain(|id| id != this);
        }
        Ok(known)
    }

    /// The user properties the listing asks for: this receiver's
    /// confirmation, the registry, the other receivers' confirmations.
    pub fn listing_props(&self, this: &str) -> Vec<String> {
        let mut props = vec![format_confirm_prop(this), RECEIVERS_PROP.to_string()];
        props.extend(self.others.iter().map(|id| format_confirm_prop(id)));
        props
    }

    /// After the listing. A receiver registered in between (or a registry
    /// changed by hand) has had its confirmations left out: it keeps
    /// everything in this run.
    pub fn listed(&mut self, datasets: &[Dataset], source: &DatasetName, this: &str) {
        self.registered = listed(datasets, source);
        for id in &self.registered {
            if id != this && !self.others.contains(id) {
                self.others.push(id.clone());
            }
        }
        self.this = self.registered.iter().any(|id| id == this);
    }

    /// This receiver was reached, before the first stream: from now on it
    /// may hold snapshots it never confirms. Adds it to the registry (one
    /// `zfs set`, the first time; not in a dry run).
    pub async fn reached(
        &mut self,
        zfs: &dyn ZfsBackend,
        source: &DatasetName,
        this: &str,
        dry_run: bool,
    ) {
        let already = self.this;
        self.this = true;
        if already || dry_run {
            return;
        }
        let mut all = self.registered.clone();
        all.push(this.to_string());
        match zfs
            .set(source, RECEIVERS_PROP, &format_receivers(&all))
            .await
        {
            Ok(()) => {
                tracing::info!(receiver = %this, "recorded in {RECEIVERS_PROP} on {source}");
                self.registered = all;
            }
            Err(e) => {
                tracing::warn!(receiver = %this, "cannot record the receiver in {RECEIVERS_PROP}: {e}");
                self.error = Some(format!(
                    "cannot record this receiver in {RECEIVERS_PROP} on {source}: {e}"
                ));
            }
        }
    }
}
