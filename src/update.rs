//! The unit of change: [`DbUpdate`], its [`Action`], ordering and display,
//! with Dragonflow's vocabulary (`SEND_ALL_TOPIC`, priority 5 by default).

use std::cmp::Ordering;
use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The topic every subscriber listens on; updates published on it reach all.
pub const SEND_ALL_TOPIC: &str = "D";

/// Dragonflow's default priority; a lower value is handled first.
pub const DEFAULT_PRIORITY: u8 = 5;

/// What happened to a row.
///
/// Strings that are none of the known actions are kept in [`Action::Other`]
/// so a subscriber never drops an update because a newer publisher invented
/// an action it does not know yet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    /// The row did not exist before.
    Create,
    /// The row existed and got a new value.
    Set,
    /// The row was removed.
    Delete,
    /// The subscriber may have missed updates and should re-read its state.
    Sync,
    /// Informational message, no state change.
    Log,
    /// An action string this version does not know, kept verbatim.
    Other(String),
}

impl Action {
    /// The wire spelling of the action.
    pub fn as_str(&self) -> &str {
        match self {
            Action::Create => "create",
            Action::Set => "set",
            Action::Delete => "delete",
            Action::Sync => "sync",
            Action::Log => "log",
            Action::Other(s) => s,
        }
    }
}

impl From<&str> for Action {
    fn from(s: &str) -> Self {
        match s {
            "create" => Action::Create,
            "set" => Action::Set,
            "delete" => Action::Delete,
            "sync" => Action::Sync,
            "log" => Action::Log,
            other => Action::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Action {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Action {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        Ok(Action::from(s.as_ref()))
    }
}

/// One row change, as Dragonflow's `DbUpdate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbUpdate {
    /// The table (Dragonflow model name), e.g. `lport`.
    pub table: String,
    /// The row's key inside its table.
    pub key: String,
    /// What happened.
    pub action: Action,
    /// The row's stored value as text; `None` on a delete whose previous
    /// value is unknown, and on `sync`.
    pub value: Option<String>,
    /// The topic the update is published on: a tenant, or [`SEND_ALL_TOPIC`].
    pub topic: String,
    /// Lower is more urgent; [`DEFAULT_PRIORITY`] unless set.
    pub priority: u8,
    /// When the update was made (not sent on the wire; used for ordering).
    pub timestamp: SystemTime,
    /// The source database's revision of the change, when it has one (etcd
    /// mod revision). Sent as an extra wire field; Dragonflow ignores it.
    pub revision: Option<i64>,
}

impl DbUpdate {
    /// A new update on [`SEND_ALL_TOPIC`] with the default priority, stamped now.
    pub fn new(
        table: impl Into<String>,
        key: impl Into<String>,
        action: Action,
        value: Option<String>,
    ) -> Self {
        DbUpdate {
            table: table.into(),
            key: key.into(),
            action,
            value,
            topic: SEND_ALL_TOPIC.to_owned(),
            priority: DEFAULT_PRIORITY,
            timestamp: SystemTime::now(),
            revision: None,
        }
    }

    /// The same update on another topic.
    pub fn with_topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = topic.into();
        self
    }

    /// The `sync` notice a subscriber delivers when it may have missed updates.
    pub fn sync(reason: impl Into<String>) -> Self {
        DbUpdate::new("", "", Action::Sync, Some(reason.into()))
    }
}

impl fmt::Display for DbUpdate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Action:{}, Table:{}, Key:{}, Value:{}, Topic:{}",
            self.action,
            self.table,
            self.key,
            self.value.as_deref().unwrap_or("None"),
            self.topic
        )
    }
}

impl Ord for DbUpdate {
    /// Lower priority value first, then earlier timestamp, then key; the
    /// remaining fields only break ties so that `Ord` agrees with `Eq`.
    fn cmp(&self, other: &Self) -> Ordering {
        self.priority
            .cmp(&other.priority)
            .then_with(|| self.timestamp.cmp(&other.timestamp))
            .then_with(|| self.key.cmp(&other.key))
            .then_with(|| self.table.cmp(&other.table))
            .then_with(|| self.action.cmp(&other.action))
            .then_with(|| self.value.cmp(&other.value))
            .then_with(|| self.topic.cmp(&other.topic))
            .then_with(|| self.revision.cmp(&other.revision))
    }
}

impl PartialOrd for DbUpdate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(key: &str, priority: u8, secs: u64) -> DbUpdate {
        let mut u = DbUpdate::new("t", key, Action::Set, None);
        u.priority = priority;
        u.timestamp = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        u
    }

    #[test]
    fn orders_by_priority_then_timestamp_then_key() {
        let mut v = [at("a", 5, 2), at("b", 1, 9), at("c", 5, 1), at("a", 5, 1)];
        v.sort();
        let keys: Vec<_> = v.iter().map(|u| (u.priority, u.key.as_str())).collect();
        assert_eq!(keys, vec![(1, "b"), (5, "a"), (5, "c"), (5, "a")]);
        assert_eq!(v[1].timestamp, v[2].timestamp);
    }

    #[test]
    fn unknown_action_is_kept() {
        assert_eq!(
            Action::from("resync-all"),
            Action::Other("resync-all".into())
        );
        assert_eq!(Action::from("resync-all").as_str(), "resync-all");
        for a in ["create", "set", "delete", "sync", "log"] {
            assert_eq!(Action::from(a).as_str(), a);
            assert!(!matches!(Action::from(a), Action::Other(_)));
        }
    }

    #[test]
    fn displays_like_dragonflow() {
        let u = DbUpdate::new("lport", "p1", Action::Create, Some("{}".into())).with_topic("t1");
        assert_eq!(
            u.to_string(),
            "Action:create, Table:lport, Key:p1, Value:{}, Topic:t1"
        );
        assert!(DbUpdate::new("lport", "p1", Action::Delete, None)
            .to_string()
            .contains("Value:None"));
    }
}
