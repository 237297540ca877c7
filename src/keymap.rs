//! Key layouts: the mapping between a database key and (table, topic, key).
//!
//! A layout is a pattern with the placeholders `{table}`, `{key}` and an
//! optional `{topic}`; every other character, braces included, is literal.
//! So Dragonflow's Redis layout `{{table}.{topic}}{key}` matches
//! `{lport.tenant1}p1`, and its etcd layout `/{table}/{key}` matches
//! `/lport/p1`. A placeholder ends at the first occurrence of the literal
//! that follows it; the last placeholder takes the rest of the key, so keys
//! may contain the separator (`/lport/a/b` is key `a/b`).

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Table,
    Topic,
    Key,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Field(Field),
}

/// A parsed key layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLayout {
    pattern: String,
    parts: Vec<Part>,
}

/// A key split by a layout. `topic` is `None` when the layout has no
/// `{topic}` or the key's topic part is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowKey<'a> {
    /// The table part.
    pub table: &'a str,
    /// The topic part, when the layout has one and it is not empty.
    pub topic: Option<&'a str>,
    /// The row key part.
    pub key: &'a str,
}

/// A layout pattern that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key layout {pattern:?}: {reason}")]
pub struct LayoutError {
    pattern: String,
    reason: &'static str,
}

impl KeyLayout {
    /// Parses a pattern; it needs exactly one `{table}` and one `{key}`, at
    /// most one `{topic}`, and a literal between any two placeholders.
    pub fn parse(pattern: &str) -> Result<Self, LayoutError> {
        let err = |reason| LayoutError {
            pattern: pattern.to_owned(),
            reason,
        };
        let mut parts: Vec<Part> = Vec::new();
        let mut rest = pattern;
        while !rest.is_empty() {
            let field = [
                ("{table}", Field::Table),
                ("{topic}", Field::Topic),
                ("{key}", Field::Key),
            ]
            .into_iter()
            .find(|(p, _)| rest.starts_with(p));
            if let Some((p, f)) = field {
                if matches!(parts.last(), Some(Part::Field(_))) {
                    return Err(err("two placeholders need a literal between them"));
                }
                if parts.contains(&Part::Field(f)) {
                    return Err(err("a placeholder appears twice"));
                }
                parts.push(Part::Field(f));
                rest = &rest[p.len()..];
            } else {
                let c = rest.chars().next().expect("rest is not empty");
                match parts.last_mut() {
                    Some(Part::Lit(s)) => s.push(c),
                    _ => parts.push(Part::Lit(c.to_string())),
                }
                rest = &rest[c.len_utf8()..];
            }
        }
        for (f, name) in [(Field::Table, "{table}"), (Field::Key, "{key}")] {
            if !parts.contains(&Part::Field(f)) {
                return Err(err(if name == "{table}" {
                    "missing {table}"
                } else {
                    "missing {key}"
                }));
            }
        }
        Ok(KeyLayout {
            pattern: pattern.to_owned(),
            parts,
        })
    }

    /// The pattern as written in the config.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Whether the layout carries a topic.
    pub fn has_topic(&self) -> bool {
        self.parts.contains(&Part::Field(Field::Topic))
    }

    /// The literal text every matching key starts with (may be empty).
    pub fn prefix(&self) -> &str {
        match self.parts.first() {
            Some(Part::Lit(s)) => s,
            _ => "",
        }
    }

    /// Splits a key, or `None` when it does not fit the layout (or its
    /// table or key part would be empty).
    pub fn parse_key<'a>(&self, full: &'a str) -> Option<RowKey<'a>> {
        let (mut table, mut topic, mut key) = (None, None, None);
        let mut rest = full;
        let mut i = 0;
        while i < self.parts.len() {
            match &self.parts[i] {
                Part::Lit(l) => rest = rest.strip_prefix(l.as_str())?,
                Part::Field(f) => {
                    let value = match self.parts.get(i + 1) {
                        Some(Part::Lit(next)) => {
                            let end = rest.find(next.as_str())?;
                            let v = &rest[..end];
                            rest = &rest[end + next.len()..];
                            i += 1; // the literal is consumed
                            v
                        }
                        _ => std::mem::take(&mut rest),
                    };
                    match f {
                        Field::Table => table = Some(value),
                        Field::Topic => topic = Some(value),
                        Field::Key => key = Some(value),
                    }
                }
            }
            i += 1;
        }
        if !rest.is_empty() {
            return None;
        }
        let (table, key) = (table?, key?);
        if table.is_empty() || key.is_empty() {
            return None;
        }
        Some(RowKey {
            table,
            topic: topic.filter(|t| !t.is_empty()),
            key,
        })
    }

    /// Builds the database key of a row; `topic` is written empty when `None`.
    pub fn format(&self, table: &str, topic: Option<&str>, key: &str) -> String {
        let mut out = String::new();
        for part in &self.parts {
            out.push_str(match part {
                Part::Lit(l) => l,
                Part::Field(Field::Table) => table,
                Part::Field(Field::Topic) => topic.unwrap_or(""),
                Part::Field(Field::Key) => key,
            });
        }
        out
    }
}

impl fmt::Display for KeyLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pattern)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rk<'a>(table: &'a str, topic: Option<&'a str>, key: &'a str) -> Option<RowKey<'a>> {
        Some(RowKey { table, topic, key })
    }

    #[test]
    fn etcd_layout() {
        let l = KeyLayout::parse("/{table}/{key}").unwrap();
        assert_eq!(l.parse_key("/lport/p1"), rk("lport", None, "p1"));
        assert_eq!(l.parse_key("/lport/a/b"), rk("lport", None, "a/b"));
        assert_eq!(l.parse_key("/lport/"), None);
        assert_eq!(l.parse_key("/lport"), None);
        assert_eq!(l.parse_key("lport/p1"), None);
        assert_eq!(l.parse_key("//p1"), None);
        assert_eq!(l.prefix(), "/");
        assert!(!l.has_topic());
        assert_eq!(l.format("lport", None, "p1"), "/lport/p1");
    }

    #[test]
    fn dragonflow_redis_layout() {
        let l = KeyLayout::parse("{{table}.{topic}}{key}").unwrap();
        assert_eq!(
            l.parse_key("{lport.tenant1}p1"),
            rk("lport", Some("tenant1"), "p1")
        );
        assert_eq!(l.parse_key("{lport.}p1"), rk("lport", None, "p1"));
        assert_eq!(l.parse_key("{lport.t}a}b"), rk("lport", Some("t"), "a}b"));
        assert_eq!(l.parse_key("lport.t}p1"), None);
        assert_eq!(l.parse_key("{lport}p1"), None);
        assert_eq!(l.prefix(), "{");
        assert_eq!(
            l.format("lport", Some("tenant1"), "p1"),
            "{lport.tenant1}p1"
        );
        assert_eq!(l.format("lport", None, "p1"), "{lport.}p1");
    }

    #[test]
    fn trailing_literal_must_match() {
        let l = KeyLayout::parse("/x/{table}/{key}.json").unwrap();
        assert_eq!(l.parse_key("/x/t/k.json"), rk("t", None, "k"));
        assert_eq!(l.parse_key("/x/t/k.jso"), None);
    }

    #[test]
    fn bad_patterns() {
        for p in [
            "/{table}",
            "{key}",
            "/{table}{key}",
            "/{table}/{key}/{table}",
            "",
        ] {
            assert!(KeyLayout::parse(p).is_err(), "{p} should be rejected");
        }
        let e = KeyLayout::parse("/{table}").unwrap_err().to_string();
        assert!(e.contains("missing {key}"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_keys_never_panic(key in ".{0,40}") {
            for p in ["/{table}/{key}", "{{table}.{topic}}{key}", "{table}:{topic}:{key}"] {
                let l = KeyLayout::parse(p).unwrap();
                if let Some(r) = l.parse_key(&key) {
                    // whatever parses formats back to the same key
                    proptest::prop_assert_eq!(l.format(r.table, r.topic, r.key), key.clone());
                }
            }
        }
    }
}
