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
    positions: Option<std::sync::Arc<Positions>>,
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
            positions: None,
        }
    }

    /// Heartbeats only while `gate` holds.
    pub fn with_heartbeat_gate(mut self, gate: Gate) -> Self {
        self.heartbeat_gate = Some(gate);
        self
    }

    /// Heartbeats also announce where the publisher stands in its
    /// source's order (see [`Positions`]).
    pub fn with_positions(mut self, positions: std::sync::Arc<Positions>) -> Self {
        self.positions = Some(positions);
        self
    }

    /// Whether the gate (HA leadership) lets this publisher send now.
    pub fn gate_open(&self) -> bool {
        self.heartbeat_gate.as_ref().is_none_or(|open| open())
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
    /// a [`Heartbeat`] as JSON (the last sequence number of each topic,
    /// empty before anything was published: it still says the publisher is
    /// alive; and where it stands, when it knows), and its envelope
    /// (publisher and epoch, no sequence number of its own). `None` while
    /// the gate is closed.
    pub fn heartbeat(&self) -> Option<(DbUpdate, crate::codec::Envelope)> {
        if self.heartbeat_gate.as_ref().is_some_and(|open| !open()) {
            return None;
        }
        if self.positions.as_ref().is_some_and(|p| !p.ready()) {
            return None;
        }
        let next = self.next.lock().expect("sequencer lock");
        let mut beat = Heartbeat {
            seqs: next.iter().map(|(t, s)| (t.clone(), *s)).collect(),
            ..Default::default()
        };
        drop(next);
        if let Some(positions) = &self.positions {
            positions.announce(&mut beat);
        }
        let value = serde_json::to_string(&beat).expect("plain map");
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

/// What a heartbeat says, as the JSON value of its update.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Heartbeat {
    /// The last sequence number sent on each topic in this run.
    pub seqs: std::collections::BTreeMap<String, u64>,
    /// The service the publisher belongs to: its positions are comparable
    /// across its runs and its HA members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// This run publishes every change after this position (the source's
    /// revision it resumed from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<i64>,
    /// Everything up to this position has been sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pos: Option<i64>,
    /// Where the publisher answers "what came after revision R?" (see
    /// [`replay`](super::replay)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<String>,
}

impl Heartbeat {
    /// Reads a heartbeat's value; also the bare `{topic: seq}` map that
    /// publishers sent before positions.
    pub fn parse(value: &str) -> Option<Heartbeat> {
        serde_json::from_str::<Heartbeat>(value).ok().or_else(|| {
            serde_json::from_str(value).ok().map(|seqs| Heartbeat {
                seqs,
                ..Default::default()
            })
        })
    }
}

/// Where a publisher stands in its source's own order (the etcd revision),
/// the same across its runs and the HA members of one service. The bridge
/// sets where a term starts and what it has published; heartbeats announce
/// both, so a subscriber that stays up through a restart or a failover
/// knows it missed nothing (the new run starts at or before what it had
/// verified) instead of re-reading everything.
///
/// A run that dies without a word (`kill -9`) leaves no last heartbeat, so
/// the checkpoint a later run starts from is kept at or before a position
/// announced at least a heartbeat interval earlier ([`Positions::safe`]):
/// a subscriber that was there has verified it by then.
#[derive(Debug)]
pub struct Positions {
    service: String,
    /// -1: unknown.
    start: std::sync::atomic::AtomicI64,
    /// -1: nothing published yet.
    published: std::sync::atomic::AtomicI64,
    /// Recent announcements: when, and the position.
    announced: std::sync::Mutex<std::collections::VecDeque<(std::time::Instant, i64)>>,
    /// The term knows where it starts: until then no heartbeat goes out
    /// (one without its start would read as a restart that lost data).
    ready: std::sync::atomic::AtomicBool,
    /// The replay endpoint announced.
    replay: std::sync::Mutex<Option<String>>,
}

impl Positions {
    /// Positions of `service` (the bridge's service id), nothing known yet.
    pub fn new(service: impl Into<String>) -> Self {
        Positions {
            service: service.into(),
            start: (-1).into(),
            published: (-1).into(),
            announced: Default::default(),
            ready: false.into(),
            replay: Default::default(),
        }
    }

    /// Heartbeats announce where gaps are answered.
    pub fn set_replay(&self, endpoint: &str) {
        *self.replay.lock().expect("positions lock") = Some(endpoint.to_owned());
    }

    /// What has been published, as far as known.
    pub fn published_position(&self) -> Option<i64> {
        Self::known(&self.published)
    }

    /// This term has no checkpoint to start from (a first start, or a
    /// source without positions): heartbeats may go out without a start.
    pub fn begin(&self) {
        self.ready.store(true, std::sync::atomic::Ordering::Release);
    }

    fn ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
    }

    /// This term publishes every change after `revision`.
    pub fn start_after(&self, revision: i64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.start.store(revision, Relaxed);
        self.published.fetch_max(revision, Relaxed);
        self.begin();
    }

    /// Everything up to `revision` has been handed to the backend.
    pub fn published(&self, revision: i64) {
        self.published
            .fetch_max(revision, std::sync::atomic::Ordering::Relaxed);
    }

    fn known(v: &std::sync::atomic::AtomicI64) -> Option<i64> {
        Some(v.load(std::sync::atomic::Ordering::Relaxed)).filter(|v| *v >= 0)
    }

    /// Fills in a heartbeat, and remembers the announcement.
    fn announce(&self, beat: &mut Heartbeat) {
        beat.service = Some(self.service.clone());
        beat.start = Self::known(&self.start);
        beat.pos = Self::known(&self.published);
        beat.replay = self.replay.lock().expect("positions lock").clone();
        if let Some(pos) = beat.pos {
            let mut announced = self.announced.lock().expect("positions lock");
            announced.push_back((std::time::Instant::now(), pos));
            // Only the newest one old enough matters.
            while announced.len() > 2 && announced[1].0.elapsed() >= SAFE_AFTER {
                announced.pop_front();
            }
        }
    }

    /// The latest position announced at least [`SAFE_AFTER`] ago (any age
    /// when `settled`, at a graceful stop); `None` before any.
    pub fn safe(&self, settled: bool) -> Option<i64> {
        let announced = self.announced.lock().expect("positions lock");
        announced
            .iter()
            .rev()
            .find(|(at, _)| settled || at.elapsed() >= SAFE_AFTER)
            .map(|(_, pos)| *pos)
    }

    /// Waits (at most `within`) until a heartbeat has announced
    /// `revision`: at a graceful stop, so subscribers hear the final
    /// position before the checkpoint moves to it.
    pub async fn announced(&self, revision: i64, within: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let last = self
                .announced
                .lock()
                .expect("positions lock")
                .back()
                .map(|(_, pos)| *pos);
            if last.is_some_and(|pos| pos >= revision) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Whether heartbeats announce positions (ZeroMQ and Redis backends;
    /// an etcd backend's subscribers read etcd's history instead).
    pub fn announcing(&self) -> bool {
        !self.announced.lock().expect("positions lock").is_empty()
    }
}

/// How old an announcement must be before a checkpoint may reach it: a
/// subscriber has had a whole heartbeat interval to receive it.
const SAFE_AFTER: std::time::Duration = HEARTBEAT_INTERVAL;

/// Subscriber side of [`Sequencer`]: notices missed messages, and tells a
/// publisher's restart (or an HA hand-over) that lost nothing from one that
/// did, so the subscriber delivers a `sync` only when it must.
///
/// A new run of a publisher is taken on trust until its first heartbeat
/// (at most half a second): if that says the run started at or before the
/// position this subscriber had verified for the service, nothing was
/// missed; the updates it repeats are dropped by [`Dedup`]. Otherwise (or
/// when the publisher announces no position) the restart is a gap.
#[derive(Debug, Default)]
pub struct GapTracker {
    last: std::collections::HashMap<(String, String), (u64, u64)>,
    gaps: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The run (epoch) of each publisher id last seen.
    runs: std::collections::HashMap<String, u64>,
    /// Runs not verified yet, by publisher id: whether that id had been
    /// seen before (a restart) or not (a first contact, or an HA member).
    unverified: std::collections::HashMap<String, bool>,
    /// By service: the position up to which this subscriber has received
    /// everything on its topics.
    verified: std::collections::HashMap<String, i64>,
    /// The transport keeps every message (etcd): a restart loses nothing.
    lossless: bool,
    /// By publisher id: its service and where it answers gaps, as its
    /// heartbeats say.
    services: std::collections::HashMap<String, (String, Option<String>)>,
    /// A copy of `verified` for the subscriber's handle.
    shown: Option<SharedPositions>,
}

/// By service: the revision up to which a subscriber has received every
/// update on its topics, as its handle shows it (see
/// [`crate::pubsub::Subscriber::positions`]).
pub type SharedPositions =
    std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, i64>>>;

impl GapTracker {
    /// A tracker counting into `gaps`.
    pub fn new(gaps: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Self {
        GapTracker {
            gaps,
            ..Default::default()
        }
    }

    /// For a transport that keeps every message (the etcd backend's watch
    /// resumes from its revision): a publisher's restart loses nothing.
    pub fn lossless(mut self) -> Self {
        self.lossless = true;
        self
    }

    /// Also keeps `shown` equal to this subscriber's positions.
    pub fn showing(mut self, shown: SharedPositions) -> Self {
        self.shown = Some(shown);
        self
    }

    /// Copies the positions to the subscriber's handle, if it has one.
    fn show(&self) {
        if let Some(shown) = &self.shown {
            let mut shown = shown.lock().unwrap_or_else(|e| e.into_inner());
            shown.clear();
            shown.extend(self.verified.iter().map(|(s, p)| (s.clone(), *p)));
        }
    }

    /// Notes the run a message or heartbeat came from; a new one waits for
    /// verification.
    fn saw_run(&mut self, publisher: &str, epoch: u64) {
        let before = self.runs.insert(publisher.to_owned(), epoch);
        if before != Some(epoch) && !self.lossless {
            self.unverified
                .insert(publisher.to_owned(), before.is_some());
        }
    }

    /// Where a gap of `publisher`'s can be repaired: its service, this
    /// subscriber's position for it, and the publisher's replay endpoint;
    /// else why it cannot be (the reason a `sync` carries).
    pub fn repair_point(&self, publisher: &str) -> Result<(String, i64, String), &'static str> {
        let (service, replay) = self
            .services
            .get(publisher)
            .ok_or("no heartbeat of this publisher received yet")?;
        let replay = replay.clone().ok_or(
            "the publisher keeps no replay buffer: its source keeps no history (Redis) or bridge.replay_bind is empty",
        )?;
        let at = self
            .position(service)
            .ok_or("this subscriber has no position in its stream yet")?;
        Ok((service.clone(), at, replay))
    }

    /// A repair brought this subscriber up to `to` for `service`.
    pub fn repaired(&mut self, service: &str, to: i64) {
        let at = self.verified.entry(service.to_owned()).or_insert(to);
        *at = (*at).max(to);
        self.show();
    }

    /// Takes from a heartbeat only who sent it and where it answers gaps
    /// (a restarted bridge answers on a new endpoint), before the gap it
    /// may show is repaired.
    pub fn learn(&mut self, heartbeat: &DbUpdate, envelope: &crate::codec::Envelope) {
        let (Some(publisher), Some(beat)) = (
            &envelope.publisher,
            heartbeat.value.as_deref().and_then(Heartbeat::parse),
        ) else {
            return;
        };
        if let Some(service) = beat.service {
            self.services
                .insert(publisher.clone(), (service, beat.replay));
        }
    }

    /// A repair (or a `sync`) covered everything of `publisher`'s up to
    /// now: its sequence numbers and run start afresh, its position and
    /// replay endpoint stay.
    pub fn caught_up(&mut self, publisher: &str) {
        self.last.retain(|(p, _), _| p != publisher);
        self.runs.remove(publisher);
        self.unverified.remove(publisher);
    }

    /// The application was told to re-read (a `sync`) for `publisher`: as
    /// [`GapTracker::caught_up`], and its position is taken afresh from
    /// its next heartbeat.
    pub fn resynced(&mut self, publisher: &str) {
        self.caught_up(publisher);
        if let Some((service, _)) = self.services.get(publisher) {
            self.verified.remove(service);
        }
        self.show();
    }

    /// The publishers this subscriber has heard heartbeats from.
    pub fn publishers(&self) -> Vec<String> {
        self.services.keys().cloned().collect()
    }

    /// Where this subscriber stands for `service`: everything up to it was
    /// received on its topics (`None` before a heartbeat said so).
    pub fn position(&self, service: &str) -> Option<i64> {
        self.verified.get(service).copied()
    }

    /// Checks a heartbeat against what was received on the topics `wants`
    /// selects, and a new run's start against this subscriber's position;
    /// returns why the subscriber should re-sync, if it should.
    pub fn heartbeat(
        &mut self,
        heartbeat: &DbUpdate,
        envelope: &crate::codec::Envelope,
        wants: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let (Some(publisher), Some(epoch)) = (&envelope.publisher, envelope.epoch) else {
            return None;
        };
        let beat = Heartbeat::parse(heartbeat.value.as_deref()?)?;
        self.saw_run(publisher, epoch);
        if let Some(service) = &beat.service {
            self.services
                .insert(publisher.clone(), (service.clone(), beat.replay.clone()));
        }
        let mut reasons = Vec::new();
        if let Some(restarted) = self.unverified.remove(publisher) {
            let verified = beat.service.as_ref().and_then(|s| self.position(s));
            match (beat.start, verified) {
                (Some(start), Some(pos)) if start <= pos => {} // nothing missed
                (Some(start), Some(pos)) => reasons.push(format!(
                    "publisher {publisher} started after revision {start}, past this subscriber's position {pos}"
                )),
                // A first contact: nothing to have missed.
                (_, None) if !restarted => {}
                _ => reasons.push(format!("publisher {publisher} restarted")),
            }
        }
        for (topic, seq) in beat.seqs.into_iter().filter(|(t, _)| wants(t)) {
            let key = (publisher.clone(), topic);
            match self.last.get(&key).copied() {
                // First news of this topic in this run: nothing to compare.
                None => {
                    self.last.insert(key, (epoch, seq));
                }
                Some((last_epoch, _)) if last_epoch != epoch => {
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
        // Past a heartbeat that shows nothing missed, the subscriber has
        // everything up to `pos`. One that shows a gap leaves the position
        // where it was: the repair asks from there (and moves it), and a
        // `sync` makes the application re-read, after which the next
        // heartbeat moves it.
        if let (Some(service), Some(pos), true) = (beat.service, beat.pos, reasons.is_empty()) {
            let at = self.verified.entry(service).or_insert(pos);
            *at = (*at).max(pos);
            self.show();
        }
        reasons.dedup();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    /// Forgets what was received from `publisher` (after the subscriber
    /// delivered a `sync` for it: its next message starts afresh).
    pub fn forget(&mut self, publisher: &str) {
        self.last.retain(|(p, _), _| p != publisher);
        self.runs.remove(publisher);
        self.unverified.remove(publisher);
        self.services.remove(publisher);
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
        self.saw_run(publisher, epoch);
        let previous = self
            .last
            .insert((publisher.clone(), topic.to_owned()), (epoch, seq));
        match previous {
            None => None, // first message seen from this publisher on this topic
            // A new run: its first heartbeat says whether anything was missed.
            Some((last_epoch, _)) if last_epoch != epoch => None,
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

/// Drops the updates a subscriber has already delivered: a run that
/// resumes from its checkpoint repeats what came after it, and so does an
/// HA member that takes over. Keyed by row, on the source's revision, so
/// each row's updates reach the application once and in order.
#[derive(Debug, Default)]
pub struct Dedup {
    last: std::collections::HashMap<(String, String), i64>,
}

impl Dedup {
    /// Whether `update` is new to the application (updates without a
    /// revision always are).
    pub fn fresh(&mut self, update: &DbUpdate) -> bool {
        let Some(revision) = update.revision else {
            return true;
        };
        match self
            .last
            .get_mut(&(update.table.clone(), update.key.clone()))
        {
            Some(last) if *last >= revision => false,
            Some(last) => {
                *last = revision;
                true
            }
            None => {
                self.last
                    .insert((update.table.clone(), update.key.clone()), revision);
                true
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
        assert_eq!(tracker.check("a", &r1), None, "judged at its heartbeat");
        // A publisher that announces no position: a restart is a gap.
        let (hb, env) = restarted.heartbeat().unwrap();
        assert!(tracker
            .heartbeat(&hb, &env, |_| true)
            .unwrap()
            .contains("restarted"));
        assert_eq!(tracker.check("a", &crate::codec::Envelope::default()), None);
    }

    /// A publisher of service `s` with positions, `start` and `published`.
    fn run(id: &str, start: i64, published: i64) -> (Sequencer, Arc<Positions>) {
        let positions = Arc::new(Positions::new("s"));
        positions.start_after(start);
        positions.published(published);
        let mut p = Sequencer::new(id).with_positions(positions.clone());
        p.epoch = start as u64 * 1000 + published as u64; // a run of its own
        (p, positions)
    }

    #[test]
    fn a_run_that_starts_at_or_before_the_verified_position_is_no_gap() {
        let mut tracker = GapTracker::new(Arc::new(AtomicU64::new(0)));
        let all = |_: &str| true;
        // First contact: nothing to have missed.
        let (first, _) = run("p", 10, 100);
        let (hb, env) = first.heartbeat().unwrap();
        assert_eq!(tracker.heartbeat(&hb, &env, all), None);
        assert_eq!(tracker.position("s"), Some(100));
        // A restart from checkpoint 90 (<= 100): resumed, no sync; the
        // updates it repeats are dropped by Dedup.
        let (second, _) = run("p", 90, 150);
        assert_eq!(tracker.check("D", &second.stamp("D")), None);
        let (hb, env) = second.heartbeat().unwrap();
        assert_eq!(tracker.heartbeat(&hb, &env, all), None);
        assert_eq!(tracker.position("s"), Some(150));
        // An HA member of the same service taking over from 140: no sync.
        let (member, _) = run("q", 140, 160);
        let (hb, env) = member.heartbeat().unwrap();
        assert_eq!(tracker.heartbeat(&hb, &env, all), None);
        // A run that starts past what this subscriber verified: a gap.
        let (late, _) = run("q", 200, 210);
        let (hb, env) = late.heartbeat().unwrap();
        assert!(tracker
            .heartbeat(&hb, &env, all)
            .unwrap()
            .contains("past this subscriber's position 160"));
        // Over an etcd watch nothing is lost: restarts are no gap at all.
        let mut lossless = GapTracker::new(Arc::default()).lossless();
        let (a, _) = run("p", 10, 20);
        let (b, _) = run("p", 500, 600);
        assert_eq!(lossless.check("D", &a.stamp("D")), None);
        assert_eq!(lossless.check("D", &b.stamp("D")), None);
    }

    /// Found by the nemesis (seed 7): a heartbeat that revealed a lost tail
    /// also moved the position past it, so the repair asked from after the
    /// loss and got nothing.
    #[test]
    fn a_heartbeat_that_shows_a_gap_leaves_the_position_for_the_repair() {
        let mut tracker = GapTracker::new(Arc::new(AtomicU64::new(0)));
        let all = |_: &str| true;
        let (p, positions) = run("p", 10, 100);
        let (hb, env) = p.heartbeat().unwrap();
        assert_eq!(tracker.heartbeat(&hb, &env, all), None);
        assert_eq!(tracker.check("D", &p.stamp("D")), None);
        let _lost = p.stamp("D");
        positions.published(120);
        let (hb, env) = p.heartbeat().unwrap();
        assert!(tracker
            .heartbeat(&hb, &env, all)
            .unwrap()
            .contains("missed 1"));
        assert_eq!(
            tracker.position("s"),
            Some(100),
            "the repair asks from here"
        );
        let (hb, env) = p.heartbeat().unwrap();
        assert_eq!(tracker.heartbeat(&hb, &env, all), None);
        assert_eq!(
            tracker.position("s"),
            Some(120),
            "a clean heartbeat moves it"
        );
    }

    #[test]
    fn a_checkpoint_waits_for_a_position_announced_a_heartbeat_ago() {
        let positions = Arc::new(Positions::new("s"));
        let p = Sequencer::new("p").with_positions(positions.clone());
        assert!(
            p.heartbeat().is_none(),
            "not before the term knows its start"
        );
        positions.begin();
        assert!(!positions.announcing());
        positions.published(7);
        p.heartbeat().unwrap();
        assert!(positions.announcing());
        assert_eq!(positions.safe(false), None, "just announced");
        assert_eq!(positions.safe(true), Some(7), "a graceful stop may use it");
        std::thread::sleep(SAFE_AFTER);
        positions.published(9);
        p.heartbeat().unwrap();
        assert_eq!(positions.safe(false), Some(7));
    }

    #[test]
    fn dedup_drops_what_a_row_already_had() {
        let mut dedup = Dedup::default();
        let at = |key: &str, rev| {
            let mut u = DbUpdate::new("t", key, crate::Action::Set, Some("v".into()));
            u.revision = Some(rev);
            u
        };
        assert!(dedup.fresh(&at("a", 5)));
        assert!(dedup.fresh(&at("b", 3)), "another row");
        assert!(!dedup.fresh(&at("a", 5)), "the same revision again");
        assert!(!dedup.fresh(&at("a", 4)));
        assert!(dedup.fresh(&at("a", 6)));
        assert!(dedup.fresh(&DbUpdate::sync("no revision")));
    }

    #[test]
    fn heartbeats_reveal_a_lost_tail() {
        let publisher = Sequencer::new("p");
        let mut tracker = GapTracker::new(Arc::new(AtomicU64::new(0)));
        let (hb, env) = publisher.heartbeat().expect("alive before publishing");
        assert_eq!(hb.value.as_deref(), Some(r#"{"seqs":{}}"#));
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
