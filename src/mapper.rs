//! The pure transform in the middle: a raw [`Change`] read from a database
//! becomes a [`DbUpdate`], or a [`Skip`] that says why it cannot.

use crate::keymap::KeyLayout;
use crate::update::{Action, DbUpdate, SEND_ALL_TOPIC};

/// What kind of change a source saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The key did not exist before.
    Create,
    /// The key existed and was overwritten.
    Set,
    /// The key was removed (deleted, expired, evicted).
    Delete,
}

/// One key change as read from a database, before any interpretation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The raw database key.
    pub key: Vec<u8>,
    /// The new value (create / set), or the previous value on a delete when
    /// the database told it.
    pub value: Option<Vec<u8>>,
    /// What happened.
    pub kind: ChangeKind,
    /// The database's revision of the change (etcd); `None` for Redis.
    pub revision: Option<i64>,
}

/// Why a change was not turned into an update. Each is logged and counted;
/// none stops the bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Skip {
    /// The key is not UTF-8 text.
    NonUtf8Key,
    /// The key does not fit the configured layout.
    OutsideLayout,
    /// The key is one the bridge itself writes (`/pubsub/`, `/publisher/`).
    OwnKey,
    /// The value is not UTF-8 text.
    NonUtf8Value,
    /// The value is larger than `max_value_bytes`.
    Oversize,
    /// A multiproc message that is not `[topic, payload]` with a decodable
    /// payload.
    BadMessage,
}

impl Skip {
    /// All kinds, for counters.
    pub const ALL: [Skip; 6] = [
        Skip::NonUtf8Key,
        Skip::OutsideLayout,
        Skip::OwnKey,
        Skip::NonUtf8Value,
        Skip::Oversize,
        Skip::BadMessage,
    ];

    /// A stable name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::NonUtf8Key => "non_utf8_key",
            Skip::OutsideLayout => "outside_layout",
            Skip::OwnKey => "own_key",
            Skip::NonUtf8Value => "non_utf8_value",
            Skip::Oversize => "oversize_value",
            Skip::BadMessage => "bad_message",
        }
    }
}

/// What one change becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapped {
    /// The update to publish.
    Update(DbUpdate),
    /// The row changed but its new value cannot be carried (oversize, not
    /// UTF-8): a `sync` for that row (table, key, topic set; the value says
    /// why), published instead, and the reason counted.
    Resync(DbUpdate, Skip),
    /// Not a row (key not UTF-8, outside the layout, the bridge's own key):
    /// counted and dropped.
    Skip(Skip),
}

/// Turns changes into updates for one layout.
#[derive(Debug, Clone)]
pub struct Mapper {
    layout: KeyLayout,
    topic_field: Option<String>,
    max_value_bytes: usize,
    excluded_prefixes: Vec<String>,
}

impl Mapper {
    /// A mapper for `layout`; the topic is read from the JSON value's
    /// `topic_field` when the layout has no topic; keys starting with any of
    /// `excluded_prefixes` are the bridge's own and skipped.
    pub fn new(
        layout: KeyLayout,
        topic_field: Option<String>,
        max_value_bytes: usize,
        excluded_prefixes: Vec<String>,
    ) -> Self {
        Mapper {
            layout,
            topic_field,
            max_value_bytes,
            excluded_prefixes,
        }
    }

    /// The key prefixes of the bridge's own keys, which are never rows.
    pub fn excluded_prefixes(&self) -> Vec<String> {
        self.excluded_prefixes.clone()
    }

    /// Maps one change. A key that is no row is skipped; a row whose value
    /// cannot be carried is never silently dropped: a delete goes out
    /// without its previous value, and a create / set becomes a `sync` for
    /// that row, so subscribers know to re-read it.
    /// The change's value is taken (moved into the update), not copied.
    pub fn map(&self, change: &mut Change) -> Mapped {
        let Ok(key) = std::str::from_utf8(&change.key) else {
            return Mapped::Skip(Skip::NonUtf8Key);
        };
        if self
            .excluded_prefixes
            .iter()
            .any(|p| key.starts_with(p.as_str()))
        {
            return Mapped::Skip(Skip::OwnKey);
        }
        let Some(row) = self.layout.parse_key(key) else {
            return Mapped::Skip(Skip::OutsideLayout);
        };
        let (value, uncarried) = match change.value.take() {
            None => (None, None),
            Some(v) => match self.check_value(&v) {
                Ok(()) => (
                    Some(String::from_utf8(v).expect("checked to be UTF-8")),
                    None,
                ),
                Err(skip) => {
                    change.value = Some(v); // kept for its topic, below
                    (None, Some(skip))
                }
            },
        };
        let topic = match row.topic {
            Some(t) => t.to_owned(),
            None => match (&value, uncarried) {
                (Some(v), _) => self.topic_from_value(v),
                // An oversize value is still read for its topic, so the
                // row's own subscribers get the notice.
                (None, Some(Skip::Oversize)) => change
                    .value
                    .as_deref()
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|v| self.topic_from_value(v)),
                (None, _) => None,
            }
            .unwrap_or_else(|| SEND_ALL_TOPIC.to_owned()),
        };
        let action = match (change.kind, uncarried) {
            (ChangeKind::Delete, _) => Action::Delete,
            (_, Some(_)) => Action::Sync,
            (ChangeKind::Create, None) => Action::Create,
            (ChangeKind::Set, None) => Action::Set,
        };
        let value = match (&action, uncarried) {
            (Action::Sync, Some(skip)) => Some(format!(
                "the value of {}/{} is not carried ({}): re-read the row",
                row.table,
                row.key,
                skip.as_str()
            )),
            _ => value,
        };
        let mut update = DbUpdate::new(row.table, row.key, action, value).with_topic(topic);
        update.revision = change.revision;
        match uncarried {
            Some(skip) if change.kind != ChangeKind::Delete => Mapped::Resync(update, skip),
            _ => Mapped::Update(update),
        }
    }

    /// The value as text, or why it cannot be carried.
    fn check_value(&self, value: &[u8]) -> Result<(), Skip> {
        if value.len() > self.max_value_bytes {
            return Err(Skip::Oversize);
        }
        std::str::from_utf8(value)
            .map(|_| ())
            .map_err(|_| Skip::NonUtf8Value)
    }

    /// The topic named by the value's topic field, when the value is a JSON
    /// object whose field is a non-empty string. Anything else means
    /// "publish to all": a value need not be JSON.
    fn topic_from_value(&self, value: &str) -> Option<String> {
        let field = self.topic_field.as_deref()?;
        // Cheap pre-check keeps non-JSON and topic-less values off the parser.
        if !value.trim_start().starts_with('{') || !value.contains(field) {
            return None;
        }
        let parsed: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(value).ok()?;
        match parsed.get(field)? {
            serde_json::Value::String(t) if !t.is_empty() => Some(t.clone()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapper(layout: &str) -> Mapper {
        Mapper::new(
            KeyLayout::parse(layout).unwrap(),
            Some("topic".into()),
            64,
            vec!["/pubsub/".into(), "/publisher/".into()],
        )
    }

    fn update(m: &Mapper, c: &mut Change) -> DbUpdate {
        match m.map(c) {
            Mapped::Update(u) => u,
            other => panic!("expected an update, got {other:?}"),
        }
    }

    fn change(key: &[u8], value: Option<&[u8]>, kind: ChangeKind) -> Change {
        Change {
            key: key.to_vec(),
            value: value.map(<[u8]>::to_vec),
            kind,
            revision: Some(9),
        }
    }

    #[test]
    fn maps_actions_tables_and_topics() {
        let m = mapper("/{table}/{key}");
        let u = update(
            &m,
            &mut change(
                b"/lport/p1",
                Some(br#"{"topic": "t1"}"#),
                ChangeKind::Create,
            ),
        );
        assert_eq!(
            (
                u.table.as_str(),
                u.key.as_str(),
                &u.action,
                u.topic.as_str(),
                u.revision
            ),
            ("lport", "p1", &Action::Create, "t1", Some(9))
        );
        let u = update(
            &m,
            &mut change(b"/lport/p1", Some(b"plain"), ChangeKind::Set),
        );
        assert_eq!((u.action, u.topic.as_str()), (Action::Set, "D"));
        let u = update(&m, &mut change(b"/lport/p1", None, ChangeKind::Delete));
        assert_eq!(
            (u.action, u.value, u.topic.as_str()),
            (Action::Delete, None, "D")
        );
        for v in [
            &br#"{"topic": 5}"#[..],
            br#"{"topic": ""}"#,
            br#"{"topic": "#,
            b"[1]",
        ] {
            assert_eq!(
                update(&m, &mut change(b"/a/b", Some(v), ChangeKind::Set)).topic,
                "D"
            );
        }
    }

    #[test]
    fn layout_topic_wins() {
        let m = mapper("{{table}.{topic}}{key}");
        let u = update(
            &m,
            &mut change(
                b"{lport.ten}p1",
                Some(br#"{"topic":"other"}"#),
                ChangeKind::Set,
            ),
        );
        assert_eq!(u.topic, "ten");
        let u = update(
            &m,
            &mut change(
                b"{lport.}p1",
                Some(br#"{"topic":"other"}"#),
                ChangeKind::Set,
            ),
        );
        assert_eq!(u.topic, "other");
    }

    #[test]
    fn skips_keys_that_are_no_row() {
        let m = mapper("/{table}/{key}");
        type Case<'a> = (&'a [u8], Skip);
        let cases: [Case; 3] = [
            (b"/a/\xff", Skip::NonUtf8Key),
            (b"nolayout", Skip::OutsideLayout),
            (b"/pubsub/D", Skip::OwnKey),
        ];
        for (k, skip) in cases {
            for kind in [ChangeKind::Set, ChangeKind::Delete] {
                assert_eq!(m.map(&mut change(k, Some(b"x"), kind)), Mapped::Skip(skip));
            }
        }
    }

    #[test]
    fn a_value_that_cannot_be_carried_becomes_a_sync_of_the_row() {
        let m = mapper("/{table}/{key}");
        let big = format!(r#"{{"topic":"t9","pad":"{}"}}"#, "x".repeat(64));
        for (value, skip, topic) in [
            (&b"\xc3\x28"[..], Skip::NonUtf8Value, "D"),
            (big.as_bytes(), Skip::Oversize, "t9"),
        ] {
            for kind in [ChangeKind::Create, ChangeKind::Set] {
                let Mapped::Resync(u, why) = m.map(&mut change(b"/a/b", Some(value), kind)) else {
                    panic!("expected a resync");
                };
                assert_eq!(why, skip);
                assert_eq!(
                    (u.action, u.table.as_str(), u.key.as_str(), u.topic.as_str()),
                    (Action::Sync, "a", "b", topic)
                );
                assert!(u.value.unwrap().contains(skip.as_str()));
            }
            // A delete is always delivered; the previous value is left out.
            let u = update(&m, &mut change(b"/a/b", Some(value), ChangeKind::Delete));
            assert_eq!(
                (u.action, u.value, u.topic.as_str()),
                (Action::Delete, None, topic)
            );
        }
        let u = update(&m, &mut change(b"/a/b", Some(&[b'x'; 64]), ChangeKind::Set));
        assert_eq!(u.value.as_deref(), Some(&"x".repeat(64)[..]));
    }
}
