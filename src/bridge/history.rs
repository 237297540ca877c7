//! etcd's history as the replay endpoint reads it: the source's changes
//! after a revision, mapped to updates exactly as the pipeline maps them.

use std::time::Duration;

use crate::backend::replay::History;
use crate::mapper::{Mapped, Mapper};
use crate::source::etcd_history::{Anchor, HistoryReader};
use crate::update::DbUpdate;

/// [`History`] over an etcd source's prefix.
pub(super) struct EtcdHistory {
    pub(super) reader: HistoryReader,
    pub(super) mapper: Mapper,
    /// The bridge's runtime; the replay worker is a thread of its own.
    pub(super) runtime: tokio::runtime::Handle,
}

impl History for EtcdHistory {
    fn updates(
        &self,
        after: i64,
        until: i64,
        inclusive: bool,
        limit: usize,
        deadline: Duration,
    ) -> Result<Vec<DbUpdate>, String> {
        let until = Anchor {
            revision: until,
            inclusive,
        };
        let changes = self
            .runtime
            .block_on(self.reader.changes(
                after,
                until,
                (limit, crate::backend::replay::MAX_BUFFER_BYTES),
                deadline,
            ))
            .map_err(|e| e.to_string())?;
        Ok(changes
            .into_iter()
            .filter_map(|mut change| match self.mapper.map(&mut change) {
                Mapped::Update(update) | Mapped::Resync(update, _) => Some(update),
                Mapped::Skip(_) => None,
            })
            .collect())
    }
}
