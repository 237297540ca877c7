//! `feedbridge status`: one screen about a running bridge, read from its
//! admin listener (`/readyz` and `/metrics`): role and readiness, what it
//! read and published (with rates between two readings), skips, syncs,
//! lag, checkpoint, reconnections.

use std::collections::BTreeMap;
use std::time::Duration;

/// One reading of a bridge's metrics: every sample summed by metric name,
/// plus the labelled breakdowns worth showing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// `/readyz`: whether it answered 200, and its body.
    pub ready: (bool, String),
    /// Metric name → sum of its samples.
    pub totals: BTreeMap<String, f64>,
    /// `skipped` by reason.
    pub skipped: BTreeMap<String, f64>,
    /// `reconnects` by connection.
    pub reconnects: BTreeMap<String, f64>,
    /// `connected` (1 up, 0 down) by connection.
    pub connected: BTreeMap<String, f64>,
}

impl Snapshot {
    /// Parses Prometheus text (`name{labels} value` lines).
    pub fn parse(metrics: &str, ready: (bool, String)) -> Snapshot {
        let mut s = Snapshot {
            ready,
            ..Default::default()
        };
        for line in metrics.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let name = name.trim_start_matches("feedbridge_");
            *s.totals.entry(name.to_owned()).or_default() += value;
            let label = |key: &str| {
                labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(&format!("{key}=\"")))
                    .map(|v| v.trim_end_matches(['"', '}']).to_owned())
            };
            match name {
                "skipped_total" => {
                    if let Some(reason) = label("reason") {
                        *s.skipped.entry(reason).or_default() += value;
                    }
                }
                "reconnects_total" => {
                    if let Some(c) = label("connection") {
                        *s.reconnects.entry(c).or_default() += value;
                    }
                }
                "connected" => {
                    if let Some(c) = label("connection") {
                        s.connected.insert(c, value);
                    }
                }
                _ => {}
            }
        }
        s
    }

    fn get(&self, name: &str) -> f64 {
        self.totals.get(name).copied().unwrap_or(0.0)
    }

    /// The screen; rates when an earlier reading `elapsed` ago is given.
    pub fn render(&self, url: &str, before: Option<(&Snapshot, Duration)>) -> String {
        let rate = |name: &str| match before {
            Some((b, dt)) if dt.as_secs_f64() > 0.0 => format!(
                "  ({:.1}/s)",
                (self.get(name) - b.get(name)) / dt.as_secs_f64()
            ),
            _ => String::new(),
        };
        let listed = |m: &BTreeMap<String, f64>| {
            let parts: Vec<String> = m
                .iter()
                .filter(|(_, v)| **v > 0.0)
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            if parts.is_empty() {
                String::new()
            } else {
                format!("  ({})", parts.join(", "))
            }
        };
        let (ready, why) = &self.ready;
        let state = if *ready {
            why.clone()
        } else {
            format!("NOT READY: {why}")
        };
        let role = if self.get("leader") >= 1.0 {
            "leader"
        } else {
            "standby"
        };
        let mut out = String::new();
        let mut line = |label: &str, text: String| {
            out.push_str(&format!("{label:<16}{text}\n"));
        };
        line("feedbridge", format!("{url}  {state}"));
        line("role", role.to_owned());
        let connections: Vec<String> = self
            .connected
            .iter()
            .map(|(c, up)| format!("{c} {}", if *up >= 1.0 { "up" } else { "DOWN" }))
            .collect();
        if !connections.is_empty() {
            line("connections", connections.join(", "));
        }
        line(
            "read",
            format!(
                "{} changes{}",
                self.get("updates_read_total"),
                rate("updates_read_total")
            ),
        );
        line(
            "published",
            format!(
                "{} updates{}",
                self.get("updates_published_total"),
                rate("updates_published_total")
            ),
        );
        line(
            "skipped",
            format!("{}{}", self.get("skipped_total"), listed(&self.skipped)),
        );
        line(
            "syncs",
            format!(
                "{} published, {} flushes detected",
                self.get("syncs_published_total"),
                self.get("flushes_detected_total")
            ),
        );
        line(
            "lag",
            if self.get("lag_revisions") < 0.0 {
                format!(
                    "unknown: the source has not heard from the database for {:.1} s (last at revision {}, checkpoint {})",
                    self.get("source_silent_seconds"),
                    self.get("source_revision"),
                    self.get("checkpoint_revision")
                )
            } else {
                format!(
                    "{} revisions, {:.1} s (source at {}, checkpoint {})",
                    self.get("lag_revisions"),
                    self.get("lag_seconds"),
                    self.get("source_revision"),
                    self.get("checkpoint_revision")
                )
            },
        );
        line(
            "memory",
            format!(
                "{:.1} MB resident",
                self.get("resident_memory_bytes") / 1_048_576.0
            ),
        );
        line("queue", format!("{} waiting", self.get("queue_depth")));
        line(
            "reconnects",
            format!(
                "{}{}",
                self.get("reconnects_total"),
                listed(&self.reconnects)
            ),
        );
        line(
            "publish errors",
            format!("{}", self.get("publish_errors_total")),
        );
        out
    }
}

/// Reads `/readyz` and `/metrics` of the admin listener at `url`
/// (`http://HOST:PORT`).
pub fn read(url: &str) -> Result<Snapshot, String> {
    let base = url.trim_end_matches('/');
    let (status, body) = crate::admin::get(&format!("{base}/readyz"))?;
    let (_, metrics) = crate::admin::get(&format!("{base}/metrics"))?;
    Ok(Snapshot::parse(
        &metrics,
        (status == 200, body.trim().to_owned()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_renders_metrics() {
        let text = "# HELP x\nfeedbridge_updates_read_total{source=\"etcd\",table=\"lport\",action=\"set\"} 7\nfeedbridge_updates_read_total{source=\"etcd\",table=\"lswitch\",action=\"set\"} 3\nfeedbridge_skipped_total{reason=\"oversize_value\"} 2\nfeedbridge_leader 1\nfeedbridge_lag_revisions 4\n";
        let s = Snapshot::parse(text, (true, "ready (leader)".into()));
        assert_eq!(s.get("updates_read_total"), 10.0);
        assert_eq!(s.skipped.get("oversize_value"), Some(&2.0));
        let mut later = s.clone();
        later.totals.insert("updates_read_total".into(), 30.0);
        let screen = later.render("http://h:1", Some((&s, Duration::from_secs(2))));
        assert!(screen.contains("30 changes  (10.0/s)"), "{screen}");
        assert!(screen.contains("leader") && screen.contains("oversize_value 2"));
        assert!(screen.contains("4 revisions, 0.0 s"), "{screen}");
    }

    #[test]
    fn a_source_that_cannot_hear_its_database_shows_the_lag_as_unknown() {
        let text = "feedbridge_lag_revisions -1\nfeedbridge_source_silent_seconds 12.5\nfeedbridge_source_revision 462\nfeedbridge_checkpoint_revision 462\n";
        let screen = Snapshot::parse(text, (false, "not ready: source not connected".into()))
            .render("http://h:1", None);
        assert!(
            screen.contains("unknown: the source has not heard from the database for 12.5 s"),
            "{screen}"
        );
        assert!(!screen.contains("0 revisions"), "{screen}");
    }
}
