//! The persisted checkpoint: the last source revision whose updates were all
//! published. Written atomically (temp file, fsync, rename), so a crash
//! leaves either the old or the new revision, never a torn file.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A checkpoint file that exists but cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading or writing failed.
    #[error("checkpoint file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds something other than a revision.
    #[error("checkpoint file {path} holds {content:?}, not a revision; delete it to start from the current revision")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What it holds (first 40 bytes).
        content: String,
    },
}

/// Reads the checkpoint; `None` when the file does not exist yet.
pub fn load(path: &Path) -> Result<Option<i64>, CheckpointError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CheckpointError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    text.trim()
        .parse::<i64>()
        .ok()
        .filter(|r| *r >= 0)
        .map(Some)
        .ok_or_else(|| CheckpointError::Corrupt {
            path: path.to_owned(),
            content: text.chars().take(40).collect(),
        })
}

/// Writes the checkpoint atomically.
pub fn save(path: &Path, revision: i64) -> Result<(), CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    writeln!(file, "{revision}").map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_missing_and_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ckpt");
        assert_eq!(load(&p).unwrap(), None);
        save(&p, 42).unwrap();
        assert_eq!(load(&p).unwrap(), Some(42));
        save(&p, 43).unwrap();
        assert_eq!(load(&p).unwrap(), Some(43));
        std::fs::write(&p, "garbage").unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("delete it"), "{e}");
    }
}
