//! Reading keys after their notifications: plain GETs in one pipeline
//! per node (per master on a cluster), and a type-aware script for what a
//! GET cannot read (hashes; other types are reported, not published).

use std::collections::BTreeMap;

use redis::Value;

use super::topology::Topology;
use crate::db::redis::{in_slots, slot, Conn};

/// Reads a key's type and value in one call, for keys a plain GET cannot
/// read (hashes, other types), so a key that changes type in between
/// cannot confuse us.
pub(super) const READ_SCRIPT: &str = "local t = redis.call('TYPE', KEYS[1])['ok'] \
if t == 'string' then return {t, redis.call('GET', KEYS[1])} end \
if t == 'hash' then return {t, redis.call('HGETALL', KEYS[1])} end \
return {t}";

/// A key as read after its notification.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Read {
    Gone,
    Value(Vec<u8>),
    /// A type the bridge does not publish (list, set, zset, stream).
    Unsupported(String),
}

pub(super) fn parse_read(v: Value) -> Read {
    let Value::Array(mut parts) = v else {
        return Read::Gone;
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        _ => String::new(),
    };
    let kind = parts.first().map(text).unwrap_or_default();
    match (kind.as_str(), parts.len()) {
        ("string", 2) => match parts.pop() {
            Some(Value::BulkString(b)) => Read::Value(b),
            _ => Read::Gone,
        },
        ("hash", 2) => match parts.pop() {
            Some(Value::Array(fields)) => hash_value(&fields),
            _ => Read::Gone,
        },
        ("none", _) | ("", _) => Read::Gone,
        (other, _) => Read::Unsupported(other.to_owned()),
    }
}

/// A hash as the JSON object of its fields. A field or value that is not
/// UTF-8 is never altered: the raw bytes are returned instead (not UTF-8
/// either), so the mapper treats the hash like any undecodable value.
pub(super) fn hash_value(fields: &[Value]) -> Read {
    let bytes = |v: &Value| match v {
        Value::BulkString(b) => b.clone(),
        Value::SimpleString(s) => s.clone().into_bytes(),
        _ => Vec::new(),
    };
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = fields
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| (bytes(&c[0]), bytes(&c[1])))
        .collect();
    if pairs.is_empty() {
        return Read::Gone;
    }
    let mut map = BTreeMap::new();
    for (field, value) in &pairs {
        match (std::str::from_utf8(field), std::str::from_utf8(value)) {
            (Ok(f), Ok(v)) => {
                map.insert(f, v);
            }
            _ => {
                return Read::Value(
                    pairs
                        .iter()
                        .flat_map(|(f, v)| [f, v])
                        .flatten()
                        .copied()
                        .collect(),
                )
            }
        }
    }
    Read::Value(serde_json::to_vec(&map).expect("strings serialize"))
}

/// Reads `keys` in one round trip per node (and the few of another type
/// again).
pub(super) async fn read_values(
    topo: &mut Topology,
    keys: &[Vec<u8>],
) -> redis::RedisResult<Vec<Read>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    // Fast path: plain GETs (string keys, the common case, cost Redis no
    // more than any keyspace consumer), pipelined per node. A key of
    // another type answers WRONGTYPE (`None` here); only those are read
    // again with the type-aware script.
    let values: Vec<Option<Value>> = match &topo.data {
        Conn::Single(c) => {
            let values = gets(&mut c.clone(), keys.iter()).await?;
            values.into_iter().map(string_or_nil).collect()
        }
        Conn::Cluster(_) => cluster_gets(topo, keys).await?,
    };
    let conn = &mut topo.data;
    let mut reads = Vec::with_capacity(keys.len());
    let mut typed = Vec::new();
    for (i, v) in values.into_iter().enumerate() {
        match v {
            Some(Value::BulkString(b)) => reads.push(Read::Value(b)),
            Some(_) => reads.push(Read::Gone),
            None => {
                reads.push(Read::Gone);
                typed.push(i);
            }
        }
    }
    for i in typed {
        let v: Value = redis::cmd("EVAL")
            .arg(READ_SCRIPT)
            .arg(1)
            .arg(&keys[i])
            .query_async(conn)
            .await?;
        reads[i] = parse_read(v);
    }
    Ok(reads)
}

/// One pipeline of GETs, errors kept in place (`Value::ServerError`).
async fn gets<'k>(
    conn: &mut impl redis::aio::ConnectionLike,
    keys: impl Iterator<Item = &'k Vec<u8>>,
) -> redis::RedisResult<Vec<Value>> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for k in keys {
        pipe.cmd("GET").arg(k);
    }
    pipe.query_async(conn).await
}

/// A GET's answer, or `None` for one a GET cannot read (WRONGTYPE).
fn string_or_nil(v: Value) -> Option<Value> {
    match v {
        Value::BulkString(_) | Value::Nil => Some(v),
        _ => None,
    }
}

/// The GETs of `keys` on a cluster: one pipeline per master on its direct
/// connection, all in flight at once. A pipeline through the cluster
/// connection may not cross slots, and one GET per key through it cost
/// 16.9 µs of the bridge's CPU per change against 12.3 on a standalone
/// server (issue 23). A key its master does not serve any more (its slot
/// migrated: MOVED, ASK; or moving: TRYAGAIN), a key of no followed master
/// and the keys of a pipeline that failed are read again, one GET each,
/// through the cluster connection, which follows redirects and reports a
/// real outage.
async fn cluster_gets(topo: &Topology, keys: &[Vec<u8>]) -> redis::RedisResult<Vec<Option<Value>>> {
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); topo.masters.len()];
    let mut again = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let s = slot(k);
        match topo.routes.iter().position(|slots| in_slots(s, slots)) {
            Some(m) => groups[m].push(i),
            None => again.push(i),
        }
    }
    let pipelines = groups
        .iter()
        .zip(&topo.masters)
        .filter(|(g, _)| !g.is_empty())
        .map(|(g, (_, _, conn))| {
            let mut conn = conn.clone();
            async move { (g, gets(&mut conn, g.iter().map(|&i| &keys[i])).await) }
        });
    let mut values = vec![None; keys.len()];
    for (g, answers) in futures_util::future::join_all(pipelines).await {
        let Ok(answers) = answers else {
            again.extend(g);
            continue;
        };
        for (&i, v) in g.iter().zip(answers) {
            match v {
                Value::BulkString(_) | Value::Nil => values[i] = Some(v),
                Value::ServerError(e) if e.code() == "WRONGTYPE" => {}
                _ => again.push(i),
            }
        }
    }
    if !again.is_empty() {
        tracing::debug!(
            keys = again.len(),
            "Reading keys again through the cluster connection (redirected: a slot migrated or is migrating; or their master's pipeline failed)."
        );
    }
    let redirected = again.iter().map(|&i| {
        let mut c = topo.data.clone();
        async move {
            let v = redis::cmd("GET")
                .arg(&keys[i])
                .query_async::<Value>(&mut c)
                .await;
            (i, v)
        }
    });
    for (i, v) in futures_util::future::join_all(redirected).await {
        match v {
            Ok(v) => values[i] = Some(v),
            Err(e) if e.code() == Some("WRONGTYPE") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reads() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        assert_eq!(
            parse_read(Value::Array(vec![bulk("string"), bulk("v")])),
            Read::Value(b"v".to_vec())
        );
        assert_eq!(
            parse_read(Value::Array(vec![bulk("string"), Value::Nil])),
            Read::Gone
        );
        assert_eq!(parse_read(Value::Array(vec![bulk("none")])), Read::Gone);
        assert_eq!(
            parse_read(Value::Array(vec![bulk("list")])),
            Read::Unsupported("list".into())
        );
        let hash = Value::Array(vec![
            bulk("hash"),
            Value::Array(vec![bulk("b"), bulk("2"), bulk("a"), bulk("1")]),
        ]);
        assert_eq!(
            parse_read(hash),
            Read::Value(br#"{"a":"1","b":"2"}"#.to_vec())
        );
        let raw = Value::Array(vec![
            bulk("hash"),
            Value::Array(vec![bulk("f"), Value::BulkString(b"\xff".to_vec())]),
        ]);
        let Read::Value(v) = parse_read(raw) else {
            panic!("a hash is a value")
        };
        assert!(
            std::str::from_utf8(&v).is_err(),
            "non-UTF-8 bytes are kept, never replaced"
        );
    }
}
