//! The persisted checkpoint: the last source revision whose updates were all
//! published. By default it is kept in the source's own etcd under
//! `/feedbridge/checkpoint/<service id>` ([`EtcdStore`]), so a restart
//! resumes with no setting at all; `checkpoint_file` keeps it in a file
//! instead, written atomically (temp file, fsync, rename), so a crash
//! leaves either the old or the new revision, never a torn file.

use std::collections::HashMap;
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
    /// The etcd key could not be read or written.
    #[error("checkpoint key {key} in etcd: {message}")]
    Etcd {
        /// The key.
        key: String,
        /// Why.
        message: String,
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

/// A file's text, or `None` when it does not exist (yet).
fn read_if_exists(path: &Path) -> Result<Option<String>, CheckpointError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CheckpointError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Reads the checkpoint; `None` when the file does not exist yet.
pub fn load(path: &Path) -> Result<Option<i64>, CheckpointError> {
    let Some(text) = read_if_exists(path)? else {
        return Ok(None);
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
    write_atomic(path, format!("{revision}\n").as_bytes())
}

/// Writes a file so that a crash leaves the old or the new content.
fn write_atomic(path: &Path, content: &[u8]) -> Result<(), CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(content).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

/// Where the checkpoint of a service lives in etcd when no file is set.
pub const ETCD_CHECKPOINT_PREFIX: &str = "/feedbridge/checkpoint/";

/// The checkpoint kept in the source's etcd.
pub struct EtcdStore {
    kv: etcd_client::KvClient,
    key: String,
    /// The revision of this store's own last write: a checkpoint at that
    /// revision says nothing new (only the write itself happened since),
    /// so it is not written again, and an idle bridge writes nothing.
    own_write: Option<i64>,
}

impl EtcdStore {
    /// The store of service `id` on `client`.
    pub fn new(client: &etcd_client::Client, id: &str) -> Self {
        EtcdStore {
            kv: crate::db::etcd::kv_client(client),
            key: format!("{ETCD_CHECKPOINT_PREFIX}{id}"),
            own_write: None,
        }
    }

    /// The key it is kept under.
    pub fn key(&self) -> &str {
        &self.key
    }

    fn error(&self, e: impl std::fmt::Display) -> CheckpointError {
        CheckpointError::Etcd {
            key: self.key.clone(),
            message: e.to_string(),
        }
    }

    /// The stored revision; `None` when there is none yet.
    pub async fn load(&mut self) -> Result<Option<i64>, CheckpointError> {
        let resp = self
            .kv
            .get(self.key.clone(), None)
            .await
            .map_err(|e| self.error(e))?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(kv.value());
        text.trim()
            .parse::<i64>()
            .ok()
            .filter(|r| *r >= 0)
            .map(Some)
            .ok_or_else(|| {
                self.error(format!(
                    "holds {text:?}, not a revision; delete the key to start from the current revision"
                ))
            })
    }

    /// Stores `revision`, unless it is the revision of this store's own
    /// last write.
    pub async fn save(&mut self, revision: i64) -> Result<(), CheckpointError> {
        if self.own_write == Some(revision) {
            return Ok(());
        }
        // A cluster client may first try a member that is down: a few
        // quick attempts before the error is the caller's.
        use backon::Retryable;
        let (kv, key, value) = (self.kv.clone(), self.key.clone(), revision.to_string());
        let put = || {
            let (mut kv, key, value) = (kv.clone(), key.clone(), value.clone());
            async move { kv.put(key, value, None).await }
        };
        let resp = put
            .retry(
                backon::ConstantBuilder::default()
                    .with_delay(std::time::Duration::from_millis(100))
                    .with_max_times(3),
            )
            .await
            .map_err(|e| self.error(e))?;
        self.own_write = resp.header().map(|h| h.revision());
        Ok(())
    }
}

const INDEX_HEADER: &str = "feedbridge-index-v1";

/// Saves a source's key index as of `revision` (etcd: key → mod revision;
/// Redis: key → value fingerprint): a header line, then one
/// `hex(key) value` line per key (hex, because keys are bytes).
pub fn save_index<V: std::fmt::Display, S>(
    path: &Path,
    revision: i64,
    index: &HashMap<Vec<u8>, V, S>,
) -> Result<(), CheckpointError> {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(32 + index.len() * 40);
    let _ = writeln!(out, "{INDEX_HEADER} {revision}");
    for (key, rev) in index {
        for b in key {
            let _ = write!(out, "{b:02x}");
        }
        let _ = writeln!(out, " {rev}");
    }
    write_atomic(path, out.as_bytes())
}

/// Loads an index saved at exactly `revision`; `None` when there is none,
/// or it was saved at another revision (then it describes another state).
pub fn load_index<V: std::str::FromStr, S: std::hash::BuildHasher + Default>(
    path: &Path,
    revision: i64,
) -> Result<Option<HashMap<Vec<u8>, V, S>>, CheckpointError> {
    let Some(text) = read_if_exists(path)? else {
        return Ok(None);
    };
    let corrupt = || CheckpointError::Corrupt {
        path: path.to_owned(),
        content: text.chars().take(40).collect(),
    };
    let mut lines = text.lines();
    let header = lines.next().ok_or_else(corrupt)?;
    if header != format!("{INDEX_HEADER} {revision}") {
        return Ok(None);
    }
    let mut index = HashMap::default();
    for line in lines {
        let (hex, rev) = line.split_once(' ').ok_or_else(corrupt)?;
        if hex.len() % 2 != 0 {
            return Err(corrupt());
        }
        let key = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| corrupt())?;
        index.insert(key, rev.parse().map_err(|_| corrupt())?);
    }
    Ok(Some(index))
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
        assert!(load(&p).is_err());
        let idx = dir.path().join("idx");
        let mut index = HashMap::new();
        index.insert(b"/a/\xff\n".to_vec(), 7);
        index.insert(b"/b/c".to_vec(), 9);
        save_index(&idx, 9, &index).unwrap();
        assert_eq!(load_index(&idx, 9).unwrap(), Some(index));
        assert_eq!(
            load_index::<i64, std::hash::RandomState>(&idx, 8).unwrap(),
            None,
            "another revision's index is not used"
        );
        assert_eq!(
            load_index::<i64, std::hash::RandomState>(&dir.path().join("none"), 9).unwrap(),
            None
        );
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("delete it"), "{e}");
    }
}
