//! Why a bridge stops other than by shutdown.

use crate::checkpoint::CheckpointError;
use crate::pubsub::PublishError;
use crate::source::SourceError;

/// Why the bridge stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The publisher could not be set up.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The source could not start.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The checkpoint could not be read or written.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The multiproc channel could not be opened.
    #[error("multiproc channel: {0}")]
    Multiproc(String),
    /// The admin listener could not bind.
    #[error("admin listener: {0}")]
    Admin(String),
    /// Leader election failed at start-up (the process exits), or the
    /// election's store failed a term's first call (the member stands by
    /// and campaigns again).
    #[error("high availability: {0}")]
    Ha(String),
    /// The replay endpoint could not bind.
    #[error("replay endpoint: {0}")]
    Replay(String),
    /// The publisher table could not be written.
    #[error("publisher discovery: {0}")]
    Discovery(String),
    /// Stopped at the shutdown deadline with updates the backend did not
    /// take (it was down).
    #[error("stopped after bridge.shutdown_timeout with {unpublished} updates unpublished (the backend did not take them); {replay}")]
    Unpublished {
        /// Updates read but not published.
        unpublished: usize,
        /// What becomes of them.
        replay: &'static str,
    },
}
