//! The Redis source: keyspace notifications plus SCAN reconciliation.

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{SourceError, SourceEvent};
use crate::config::RedisSourceConfig;

/// The Redis source.
pub struct RedisSource {
    #[allow(dead_code)]
    config: RedisSourceConfig,
}

impl RedisSource {
    /// A source for one Redis database.
    pub fn new(config: RedisSourceConfig) -> Self {
        RedisSource { config }
    }

    /// Runs until `shutdown`.
    pub async fn run(
        self,
        _tx: mpsc::Sender<SourceEvent>,
        _shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        Err(SourceError {
            source_name: "redis",
            message: "not implemented yet".into(),
        })
    }
}
