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

    /// Maps one change.
    pub fn map(&self, change: &Change) -> Result<DbUpdate, Skip> {
        let key = std::str::from_utf8(&change.key).map_err(|_| Skip::NonUtf8Key)?;
        if self
            .excluded_prefixes
            .iter()
            .any(|p| key.starts_with(p.as_str()))
        {
            return Err(Skip::OwnKey);
        }
        let row = self.layout.parse_key(key).ok_or(Skip::OutsideLayout)?;
        let value = match &change.value {
            Some(v) if v.len() > self.max_value_bytes => return Err(Skip::Oversize),
            Some(v) => Some(String::from_utf8(v.clone()).map_err(|_| Skip::NonUtf8Value)?),
            None => None,
        };
        let topic = match row.topic {
            Some(t) => t.to_owned(),
            None => value
                .as_deref()
                .and_then(|v| self.topic_from_value(v))
                .unwrap_or_else(|| SEND_ALL_TOPIC.to_owned()),
        };
        let action = match change.kind {
            ChangeKind::Create => Action::Create,
            ChangeKind::Set => Action::Set,
            ChangeKind::Delete => Action::Delete,
        };
        let mut update = DbUpdate::new(row.table, row.key, action, value).with_topic(topic);
        update.revision = change.revision;
        Ok(update)
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
        let u = m
            .map(&change(
                b"/lport/p1",
                Some(br#"{"topic": "t1"}"#),
                ChangeKind::Create,
            ))
            .unwrap();
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
        let u = m
            .map(&change(b"/lport/p1", Some(b"plain"), ChangeKind::Set))
            .unwrap();
        assert_eq!((u.action, u.topic.as_str()), (Action::Set, "D"));
        let u = m
            .map(&change(b"/lport/p1", None, ChangeKind::Delete))
            .unwrap();
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
                m.map(&change(b"/a/b", Some(v), ChangeKind::Set))
                    .unwrap()
                    .topic,
                "D"
            );
        }
    }

    #[test]
    fn layout_topic_wins() {
        let m = mapper("{{table}.{topic}}{key}");
        let u = m
            .map(&change(
                b"{lport.ten}p1",
                Some(br#"{"topic":"other"}"#),
                ChangeKind::Set,
            ))
            .unwrap();
        assert_eq!(u.topic, "ten");
        let u = m
            .map(&change(
                b"{lport.}p1",
                Some(br#"{"topic":"other"}"#),
                ChangeKind::Set,
            ))
            .unwrap();
        assert_eq!(u.topic, "other");
    }

    #[test]
    fn skips_bad_input() {
        let m = mapper("/{table}/{key}");
        type Case<'a> = (&'a [u8], Option<&'a [u8]>, Skip);
        let cases: [Case; 5] = [
            (b"/a/\xff", None, Skip::NonUtf8Key),
            (b"nolayout", None, Skip::OutsideLayout),
            (b"/pubsub/D", Some(b"x"), Skip::OwnKey),
            (b"/a/b", Some(b"\xc3\x28"), Skip::NonUtf8Value),
            (b"/a/b", Some(&[b'x'; 65]), Skip::Oversize),
        ];
        for (k, v, skip) in cases {
            assert_eq!(m.map(&change(k, v, ChangeKind::Set)), Err(skip));
        }
        assert!(m
            .map(&change(b"/a/b", Some(&[b'x'; 64]), ChangeKind::Set))
            .is_ok());
    }
}
