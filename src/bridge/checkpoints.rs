//! Where a term's checkpoint lives: under the HA leader key, in a file, or
//! (by default for an etcd source) in etcd itself; read once at the start
//! of a term, then saved by the pipeline.

use std::path::PathBuf;
use std::sync::Arc;

use super::error::BridgeError;
use crate::checkpoint::{self, CheckpointError, EtcdStore};
use crate::config::{redact_endpoints, Config, SourceConfig};
use crate::ha::Leadership;
use crate::source::SourceError;

/// The checkpoint's home for one term.
pub(super) enum Checkpoints {
    /// HA: in etcd or Redis under the leader key (a deposed leader cannot
    /// move it); a file, if set, is read when that key is empty.
    Leader(Arc<Leadership>, Option<PathBuf>),
    /// `source.checkpoint_file`.
    File(PathBuf),
    /// The etcd source's own etcd, `/feedbridge/checkpoint/<service id>`.
    Etcd(Box<EtcdStore>),
    /// Nothing to resume (a Redis source without a file, or the multiproc
    /// channel alone).
    None,
}

impl Checkpoints {
    /// Finds the checkpoint's home and reads the revision to resume after.
    pub(super) async fn open(
        config: &Config,
        lead: Option<&Arc<Leadership>>,
        service_id: &str,
    ) -> Result<(Checkpoints, Option<i64>), BridgeError> {
        let (file, etcd) = match &config.source {
            Some(SourceConfig::Etcd(c)) => (c.checkpoint_file.clone(), Some(c)),
            Some(SourceConfig::Redis(c)) => (c.checkpoint_file.clone(), None),
            None => (None, None),
        };
        if let Some(lead) = lead {
            let resume = match lead.load_checkpoint().await {
                Ok(Some(r)) => Some(r),
                Ok(None) => file.as_deref().map(checkpoint::load).transpose()?.flatten(),
                Err(e) => return Err(BridgeError::Ha(format!("cannot read the checkpoint: {e}"))),
            };
            return Ok((Checkpoints::Leader(lead.clone(), file), resume));
        }
        if let Some(path) = file {
            let resume = checkpoint::load(&path)?;
            return Ok((Checkpoints::File(path), resume));
        }
        let Some(c) = etcd else {
            return Ok((Checkpoints::None, None));
        };
        // Without a file an etcd source keeps its checkpoint in etcd: the
        // config as shipped resumes where it stopped.
        let unreachable = |e: String| {
            SourceError {
            source_name: "etcd",
            message: format!(
                "cannot read the checkpoint: {e} (endpoints {}; is etcd running? check source.endpoints and source.auth)",
                redact_endpoints(&c.endpoints)
            ),
        }
        };
        let client = crate::db::etcd::connect(&c.endpoints, c.connect_timeout, &c.auth)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let mut store = EtcdStore::new(&client, service_id);
        match store.load().await {
            Ok(resume) => {
                tracing::info!(key = store.key(), revision = ?resume, "Checkpoint kept in etcd.");
                Ok((Checkpoints::Etcd(Box::new(store)), resume))
            }
            Err(e) if e.to_string().contains("permission denied") => {
                tracing::warn!(error = %e, "This etcd user may not keep the checkpoint in etcd: a restart starts from the current revision and loses what changed meanwhile. Set source.checkpoint_file, or grant the user read-write on /feedbridge/checkpoint/.");
                Ok((Checkpoints::None, None))
            }
            Err(e) => Err(unreachable(e.to_string()).into()),
        }
    }

    /// Whether a checkpoint is kept at all.
    pub(super) fn is_kept(&self) -> bool {
        !matches!(self, Checkpoints::None)
    }

    /// Stores `revision`.
    pub(super) async fn save(&mut self, revision: i64) -> Result<(), CheckpointError> {
        match self {
            Checkpoints::None => Ok(()),
            Checkpoints::File(path) => checkpoint::save(path, revision),
            Checkpoints::Etcd(store) => store.save(revision).await,
            Checkpoints::Leader(lead, file) => {
                if let Some(path) = file {
                    checkpoint::save(path, revision)?;
                }
                if !lead.is_valid() {
                    return Ok(());
                }
                match lead.save_checkpoint(revision).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(revision, "Not leader any more: checkpoint not stored.")
                    }
                    Err(e) => {
                        tracing::warn!(revision, error = %e, "Cannot store the checkpoint in etcd; will retry.")
                    }
                }
                Ok(())
            }
        }
    }
}
