//! Sequence numbers, gap tracking and heartbeats: how a subscriber of any
//! backend learns that it missed messages instead of silently diverging.

use crate::update::DbUpdate;

/// Stamps outgoing messages with the publisher's id, the epoch of this run
/// and a sequence number per topic. Per topic, because a subscriber only
/// sees the topics it registered: a single counter would look like gaps.
pub struct Sequencer {
    id: String,
    epoch: u64,
    next: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    heartbeat_gate: Option<Gate>,
}

/// A condition checked before each heartbeat (see
/// [`PubSub::with_heartbeat_gate`](crate::backend::PubSub::with_heartbeat_gate)).
pub type Gate = std::sync::Arc<dyn Fn() -> bool + Send + Sync>;

impl std::fmt::Debug for Sequencer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequencer")
            .field("id", &self.id)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl Sequencer {
    /// A sequencer for publisher `id`, with a new epoch (the start time in
    /// microseconds, so it differs at every restart).
    pub fn new(id: impl Into<String>) -> Self {
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Sequencer {
            id: id.into(),
            epoch,
            next: Default::default(),
            heartbeat_gate: None,
        }
    }

    /// Heartbeats only while `gate` holds.
    pub fn with_heartbeat_gate(mut self, gate: Gate) -> Self {
        self.heartbeat_gate = Some(gate);
        self
    }

    /// The publisher id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The envelope of the next message on `topic`. Callers stamp and send
    /// under one lock (or on one thread) so numbers go out in order.
    pub fn stamp(&self, topic: &str) -> crate::codec::Envelope {
        crate::codec::Envelope {
            publisher: Some(self.id.clone()),
            epoch: Some(self.epoch),
            seq: Some(self.next_seq(topic)),
        }
    }

    /// The next sequence number on `topic` (no allocation once the topic
    /// is known).
    pub fn next_seq(&self, topic: &str) -> u64 {
        let mut next = self.next.lock().expect("sequencer lock");
        let seq = match next.get_mut(topic) {
            Some(seq) => seq,
            None => next.entry(topic.to_owned()).or_insert(0),
        };
        *seq += 1;
        *seq
    }

    /// This run's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// The topic of heartbeats: a publisher announces the last sequence number
/// of each topic on it about once a second, so a subscriber that lost the
/// end of a burst learns of it even when nothing else is published. No
/// Dragonflow subscription matches it (they subscribe to `D` and tenant
/// ids; ZeroMQ matches by prefix), and it is a valid `log` update for any
/// consumer that subscribes to everything.
pub const HEARTBEAT_TOPIC: &str = "__feedbridge_heartbeat__";

/// How often publishers send a heartbeat.
pub const HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

impl Sequencer {
    /// The heartbeat: a `log` update on [`HEARTBEAT_TOPIC`] whose value is
    /// the JSON object `{topic: last sequence number}` (empty before
    /// anything was published: it still says the publisher is alive), and
    /// its envelope (publisher and epoch, no sequence number of its own).
    /// `None` while the gate is closed.
    pub fn heartbeat(&self) -> Option<(DbUpdate, crate::codec::Envelope)> {
        if self.heartbeat_gate.as_ref().is_some_and(|open| !open()) {
            return None;
        }
        let next = self.next.lock().expect("sequencer lock");
        let seqs: std::collections::BTreeMap<&str, u64> =
            next.iter().map(|(t, s)| (t.as_str(), *s)).collect();
        let value = serde_json::to_string(&seqs).expect("plain map");
        let update = DbUpdate::new("feedbridge", "heartbeat", crate::Action::Log, Some(value))
            .with_topic(HEARTBEAT_TOPIC);
        let envelope = crate::codec::Envelope {
            publisher: Some(self.id.clone()),
            epoch: Some(self.epoch),
            seq: None,
        };
        Some((update, envelope))
    }

    /// Takes back the last number stamped on `topic`, after a send that
    /// failed: the retry reuses it, so subscribers see no false gap.
    pub fn rollback(&self, topic: &str) {
        if let Some(seq) = self.next.lock().expect("sequencer lock").get_mut(topic) {
            *seq = seq.saturating_sub(1);
        }
    }
}

/// Subscriber side of [`Sequencer`]: notices missed messages and publisher
/// restarts, so the subscriber can deliver a `sync` instead of silently
/// missing data.
#[derive(Debug, Default)]
pub struct GapTracker {
    last: std::collections::HashMap<(String, String), (u64, u64)>,
    gaps: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl GapTracker {
    /// A tracker counting into `gaps`.
    pub fn new(gaps: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Self {
        GapTracker {
            last: Default::default(),
            gaps,
        }
    }

    /// Checks a heartbeat against what was received on the topics `wants`
    /// selects; returns why the subscriber should re-sync, if it should.
    pub fn heartbeat(
        &mut self,
        heartbeat: &DbUpdate,
        envelope: &crate::codec::Envelope,
        wants: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let (Some(publisher), Some(epoch)) = (&envelope.publisher, envelope.epoch) else {
            return None;
        };
        let seqs: std::collections::BTreeMap<String, u64> =
            serde_json::from_str(heartbeat.value.as_deref()?).ok()?;
        let mut reasons = Vec::new();
        for (topic, seq) in seqs.into_iter().filter(|(t, _)| wants(t)) {
            let key = (publisher.clone(), topic);
            match self.last.get(&key).copied() {
                None => {
                    // First news of this topic: nothing to compare yet.
                    self.last.insert(key, (epoch, seq));
                }
                Some((last_epoch, _)) if last_epoch != epoch => {
                    reasons.push(format!("publisher {publisher} restarted"));
                    self.last.insert(key, (epoch, seq));
                }
                Some((_, last)) if seq > last => {
                    self.gaps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    reasons.push(format!(
                        "missed {} messages from publisher {publisher} on topic {:?} (announced by its heartbeat)",
                        seq - last,
                        key.1
                    ));
                    self.last.insert(key, (epoch, seq));
                }
                Some(_) => {}
            }
        }
        reasons.dedup();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    /// Forgets what was received from `publisher` (after the subscriber
    /// delivered a `sync` for it: its next message starts afresh).
    pub fn forget(&mut self, publisher: &str) {
        self.last.retain(|(p, _), _| p != publisher);
    }

    /// Checks one received message; returns why the subscriber should
    /// re-sync, if it should. Messages without an envelope (e.g. from
    /// Dragonflow's own publishers) are not tracked.
    pub fn check(&mut self, topic: &str, envelope: &crate::codec::Envelope) -> Option<String> {
        let (Some(publisher), Some(epoch), Some(seq)) =
            (&envelope.publisher, envelope.epoch, envelope.seq)
        else {
            return None;
        };
        let previous = self
            .last
            .insert((publisher.clone(), topic.to_owned()), (epoch, seq));
        match previous {
            None => None, // first message seen from this publisher on this topic
            Some((last_epoch, _)) if last_epoch != epoch => {
                Some(format!("publisher {publisher} restarted"))
            }
            Some((_, last)) if seq == last + 1 => None,
            Some((_, last)) if seq <= last => None, // a duplicate: nothing missed
            Some((_, last)) => {
                let missed = seq - last - 1;
                self.gaps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Some(format!(
                    "missed {missed} messages from publisher {publisher} on topic {topic:?}"
                ))
            }
        }
    }
}

/// The subscriber's side of heartbeats: when each publisher was last heard
/// from. Only publishers that were heard sending a heartbeat are held to
/// it: a publisher that sends none (Dragonflow's own) is never taken for
/// dead for being quiet; transport liveness covers its connection.
#[derive(Debug)]
pub struct Silence {
    timeout: std::time::Duration,
    heard: std::collections::HashMap<String, std::time::Instant>,
}

impl Silence {
    /// A tracker that reports a publisher silent for longer than `timeout`.
    pub fn new(timeout: std::time::Duration) -> Self {
        Silence {
            timeout,
            heard: Default::default(),
        }
    }

    /// Something arrived from `publisher` (a heartbeat when `heartbeat`).
    pub fn heard(&mut self, publisher: Option<&str>, heartbeat: bool) {
        let Some(publisher) = publisher else { return };
        let now = std::time::Instant::now();
        if let Some(at) = self.heard.get_mut(publisher) {
            *at = now;
        } else if heartbeat {
            self.heard.insert(publisher.to_owned(), now);
        }
    }

    /// The publishers silent for longer than the timeout, with how long;
    /// they are forgotten (reported once: one that never comes back, a
    /// publisher shut down for good, does not make the subscriber flap).
    pub fn silent(&mut self) -> Vec<(String, std::time::Duration)> {
        let mut gone = Vec::new();
        self.heard.retain(|publisher, at| {
            let quiet = at.elapsed();
            if quiet > self.timeout {
                gone.push((publisher.clone(), quiet));
                false
            } else {
                true
            }
        });
        gone
    }

    /// Forgets every publisher (their connections were replaced; the next
    /// heartbeat of each is awaited afresh).
    pub fn reset(&mut self) {
        self.heard.clear();
    }

    /// The timeout this tracker holds publishers to.
    pub fn timeout(&self) -> std::time::Duration {
        self.timeout
    }
}

/// The reason given with the `sync` delivered after silent publishers.
pub fn silence_reason(silent: &[(String, std::time::Duration)]) -> String {
    let who: Vec<String> = silent
        .iter()
        .map(|(p, d)| format!("publisher {p} silent for {:.1} s", d.as_secs_f64()))
        .collect();
    format!(
        "{}: reconnected (updates may have been missed)",
        who.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    use std::sync::Arc;

    #[test]
    fn sequences_per_topic_and_detects_gaps_and_restarts() {
        let publisher = Sequencer::new("p");
        let gaps = Arc::new(AtomicU64::new(0));
        let mut tracker = GapTracker::new(gaps.clone());
        let a1 = publisher.stamp("a");
        let b1 = publisher.stamp("b");
        let a2 = publisher.stamp("a");
        assert_eq!((a1.seq, b1.seq, a2.seq), (Some(1), Some(1), Some(2)));
        assert_eq!(tracker.check("a", &a1), None);
        assert_eq!(
            tracker.check("a", &a2),
            None,
            "b's messages are not a gap on a"
        );
        let _a3 = publisher.stamp("a");
        let a4 = publisher.stamp("a");
        assert!(tracker.check("a", &a4).unwrap().contains("missed 1"));
        assert_eq!(gaps.load(Relaxed), 1);
        let mut restarted = Sequencer::new("p");
        restarted.epoch += 1; // as a restart a microsecond later would
        let r1 = restarted.stamp("a");
        assert!(tracker.check("a", &r1).unwrap().contains("restarted"));
        assert_eq!(tracker.check("a", &crate::codec::Envelope::default()), None);
    }

    #[test]
    fn heartbeats_reveal_a_lost_tail() {
        let publisher = Sequencer::new("p");
        let mut tracker = GapTracker::new(Arc::new(AtomicU64::new(0)));
        let (hb, env) = publisher.heartbeat().expect("alive before publishing");
        assert_eq!(hb.value.as_deref(), Some("{}"));
        assert_eq!(tracker.heartbeat(&hb, &env, |_| true), None);
        let a1 = publisher.stamp("a");
        let _b1 = publisher.stamp("b");
        assert_eq!(tracker.check("a", &a1), None);
        let (hb, env) = publisher.heartbeat().unwrap();
        assert_eq!(hb.topic, HEARTBEAT_TOPIC);
        assert_eq!(hb.action, crate::Action::Log);
        let only_a = |t: &str| t == "a";
        assert_eq!(
            tracker.heartbeat(&hb, &env, only_a),
            None,
            "b is not wanted"
        );
        let _a2 = publisher.stamp("a"); // lost on the way
        let (hb, env) = publisher.heartbeat().unwrap();
        assert!(tracker
            .heartbeat(&hb, &env, only_a)
            .unwrap()
            .contains("missed 1"));
        assert_eq!(tracker.heartbeat(&hb, &env, only_a), None, "reported once");
        let a3 = publisher.stamp("a");
        assert_eq!(tracker.check("a", &a3), None, "in order after the report");
    }

    #[test]
    fn only_publishers_that_heartbeat_are_held_to_silence() {
        let mut silence = Silence::new(std::time::Duration::from_millis(50));
        silence.heard(Some("dragonflow"), false); // sends no heartbeats
        silence.heard(Some("bridge"), true);
        silence.heard(None, true);
        assert!(silence.silent().is_empty());
        std::thread::sleep(std::time::Duration::from_millis(80));
        let gone = silence.silent();
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].0, "bridge");
        assert!(silence_reason(&gone).contains("publisher bridge silent"));
        assert!(silence.silent().is_empty(), "reported once");
    }
}
