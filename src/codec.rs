//! Payload codecs: `msgpack` (what Dragonflow's Python subscribers unpack)
//! and `json` (for everyone else). Both carry the same map: the five keys
//! Dragonflow reads, plus optional extra fields that it ignores.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use crate::update::{Action, DbUpdate, SEND_ALL_TOPIC};

/// How a [`DbUpdate`] is turned into a message payload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// A msgpack map with *str* keys and values (never *bin*): Dragonflow's wire.
    #[default]
    Msgpack,
    /// The same map as UTF-8 JSON.
    Json,
}

/// A payload that is not an update.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode {codec} payload of {len} bytes: {reason}")]
pub struct DecodeError {
    codec: &'static str,
    len: usize,
    reason: String,
}

/// Fields sent beside the update that Dragonflow's decoder ignores: who
/// published it and its place in that publisher's sequence (gap detection).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    /// The publisher's stable id.
    pub publisher: Option<String>,
    /// Identifies one run of the publisher: it changes at every restart, so
    /// a subscriber can tell a restart (sequence starts again) from a gap.
    pub epoch: Option<u64>,
    /// Sequence number per publisher run and topic, starting at 1.
    pub seq: Option<u64>,
}

#[derive(Serialize)]
struct WireOut<'a> {
    table: &'a str,
    key: &'a str,
    action: &'a str,
    value: Option<&'a str>,
    topic: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    revision: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    publisher: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
}

#[derive(Deserialize)]
struct WireIn {
    table: String,
    key: String,
    action: Action,
    #[serde(default, deserialize_with = "text_or_nil")]
    value: Option<String>,
    #[serde(default = "send_all")]
    topic: String,
    #[serde(default)]
    revision: Option<i64>,
    #[serde(default)]
    publisher: Option<String>,
    #[serde(default)]
    epoch: Option<u64>,
    #[serde(default)]
    seq: Option<u64>,
}

fn send_all() -> String {
    SEND_ALL_TOPIC.to_owned()
}

/// Accepts a value as str, as UTF-8 bin (older packers), or nil.
fn text_or_nil<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string or nil")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_owned()))
        }
        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
            std::str::from_utf8(v)
                .map(|s| Some(s.to_owned()))
                .map_err(|_| E::custom("value is binary, not UTF-8 text"))
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(V)
        }
    }
    d.deserialize_any(V)
}

impl Codec {
    /// The name used in config files.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Msgpack => "msgpack",
            Codec::Json => "json",
        }
    }

    /// Encodes an update with its envelope.
    pub fn encode(self, update: &DbUpdate, envelope: &Envelope) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + update.value.as_ref().map_or(0, String::len));
        self.encode_into(
            update,
            envelope.publisher.as_deref(),
            envelope.epoch,
            envelope.seq,
            &mut out,
        );
        out
    }

    /// Appends the encoding of an update with the envelope's fields to
    /// `out`: the hot path reuses one buffer and borrows the publisher id.
    pub fn encode_into(
        self,
        update: &DbUpdate,
        publisher: Option<&str>,
        epoch: Option<u64>,
        seq: Option<u64>,
        out: &mut Vec<u8>,
    ) {
        let wire = WireOut {
            table: &update.table,
            key: &update.key,
            action: update.action.as_str(),
            value: update.value.as_deref(),
            topic: &update.topic,
            revision: update.revision,
            publisher,
            epoch,
            seq,
        };
        match self {
            // `write_named` writes a map with str keys (not a positional
            // array), which is what Dragonflow's `unpackb` expects.
            Codec::Msgpack => {
                rmp_serde::encode::write_named(out, &wire).expect("a map of strings always encodes")
            }
            Codec::Json => {
                serde_json::to_writer(out, &wire).expect("a map of strings always encodes")
            }
        }
    }

    /// Decodes a payload; unknown extra fields are ignored.
    pub fn decode(self, payload: &[u8]) -> Result<(DbUpdate, Envelope), DecodeError> {
        let wire: WireIn = match self {
            Codec::Msgpack => rmp_serde::from_slice(payload).map_err(|e| e.to_string()),
            Codec::Json => serde_json::from_slice(payload).map_err(|e| e.to_string()),
        }
        .map_err(|reason| DecodeError {
            codec: self.name(),
            len: payload.len(),
            reason,
        })?;
        let mut update = DbUpdate::new(wire.table, wire.key, wire.action, wire.value);
        update.topic = wire.topic;
        update.revision = wire.revision;
        Ok((
            update,
            Envelope {
                publisher: wire.publisher,
                epoch: wire.epoch,
                seq: wire.seq,
            },
        ))
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // Produced by Python: msgpack.packb({'table': 'lport', 'key': 'p1',
    // 'action': 'create', 'value': '{"id": "p1", "topic": "t1"}',
    // 'topic': 't1'}, use_bin_type=True) with msgpack 1.2.4.
    const PY_CREATE: &str = "85a57461626c65a56c706f7274a36b6579a27031a6616374696f6ea6637265617465a576616c7565bb7b226964223a20227031222c2022746f706963223a20227431227da5746f706963a27431";
    // The same for a delete with value None on topic 'D'.
    const PY_DELETE: &str = "85a57461626c65a56c706f7274a36b6579a27031a6616374696f6ea664656c657465a576616c7565c0a5746f706963a144";

    fn create() -> DbUpdate {
        DbUpdate::new(
            "lport",
            "p1",
            Action::Create,
            Some(r#"{"id": "p1", "topic": "t1"}"#.into()),
        )
        .with_topic("t1")
    }

    #[test]
    fn msgpack_bytes_equal_pythons() {
        let none = Envelope::default();
        assert_eq!(Codec::Msgpack.encode(&create(), &none), hex(PY_CREATE));
        let delete = DbUpdate::new("lport", "p1", Action::Delete, None);
        assert_eq!(Codec::Msgpack.encode(&delete, &none), hex(PY_DELETE));
    }

    #[test]
    fn decodes_pythons_bytes() {
        let (u, env) = Codec::Msgpack.decode(&hex(PY_CREATE)).unwrap();
        assert_eq!(
            u,
            DbUpdate {
                timestamp: u.timestamp,
                ..create()
            }
        );
        assert_eq!(env, Envelope::default());
        let (d, _) = Codec::Msgpack.decode(&hex(PY_DELETE)).unwrap();
        assert_eq!(
            (d.action, d.value, d.topic.as_str()),
            (Action::Delete, None, "D")
        );
    }

    #[test]
    fn json_equals_pythons_object() {
        // Python: json.dumps of the same dict; compare as parsed JSON since
        // Python puts spaces after separators.
        let py = r#"{"table": "lport", "key": "p1", "action": "create", "value": "{\"id\": \"p1\", \"topic\": \"t1\"}", "topic": "t1"}"#;
        let ours = Codec::Json.encode(&create(), &Envelope::default());
        let a: serde_json::Value = serde_json::from_slice(&ours).unwrap();
        let b: serde_json::Value = serde_json::from_str(py).unwrap();
        assert_eq!(a, b);
        let (u, _) = Codec::Json.decode(py.as_bytes()).unwrap();
        assert_eq!(u.value, create().value);
    }

    #[test]
    fn strings_are_str_never_bin() {
        let bytes = Codec::Msgpack.encode(&create(), &Envelope::default());
        let v = rmpv::decode::read_value(&mut bytes.as_slice()).unwrap();
        for (k, val) in v.as_map().unwrap() {
            assert!(k.is_str(), "key {k} is not str");
            assert!(val.is_str(), "value of {k} is not str: {val:?}");
        }
    }

    #[test]
    fn round_trips_with_extras_and_unknown_fields() {
        let mut u = create();
        u.action = Action::Other("future".into());
        u.revision = Some(42);
        let env = Envelope {
            publisher: Some("pub-1".into()),
            epoch: Some(1_700_000_000_000),
            seq: Some(7),
        };
        for codec in [Codec::Msgpack, Codec::Json] {
            let (back, benv) = codec.decode(&codec.encode(&u, &env)).unwrap();
            assert_eq!(
                back,
                DbUpdate {
                    timestamp: back.timestamp,
                    ..u.clone()
                }
            );
            assert_eq!(benv, env);
        }
        let extra = br#"{"table":"a","key":"b","action":"set","value":"v","topic":"D","shard":3}"#;
        assert_eq!(Codec::Json.decode(extra).unwrap().0.key, "b");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &b""[..],
            b"\xc1",
            b"\x85\xa5table",
            b"{}",
            b"[1,2]",
            b"\x93\x01\x02\x03",
        ] {
            assert!(Codec::Msgpack.decode(bad).is_err());
            assert!(Codec::Json.decode(bad).is_err());
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = Codec::Msgpack.decode(&bytes);
            let _ = Codec::Json.decode(&bytes);
        }
    }
}
