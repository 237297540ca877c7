//! What a subscriber listens to (topics, publisher addresses), shared
//! between the API calls and the subscriber's receive loop.

use std::collections::BTreeSet;

use tokio::sync::watch;

/// What a subscriber currently listens to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registration {
    /// Exact topics; the empty topic means every topic.
    pub topics: BTreeSet<String>,
    /// Publisher endpoints (ZeroMQ).
    pub addresses: BTreeSet<String>,
}

impl Registration {
    /// Whether an update on `topic` is for this subscriber. ZeroMQ matches
    /// by prefix (`D` also receives `Dx`), so every backend filters again
    /// here, exactly.
    pub fn wants(&self, topic: &str) -> bool {
        self.topics.contains("") || self.topics.contains(topic)
    }
}

/// Registration shared between the API calls (any thread) and the
/// subscriber's receive loop, which is woken on every change.
#[derive(Debug)]
pub struct Registry(watch::Sender<Registration>);

impl Default for Registry {
    fn default() -> Self {
        Registry(watch::Sender::new(Registration::default()))
    }
}

impl Registry {
    /// Adds or removes a topic.
    pub fn topic(&self, topic: &str, add: bool) {
        self.0.send_if_modified(|r| {
            if add {
                r.topics.insert(topic.to_owned())
            } else {
                r.topics.remove(topic)
            }
        });
    }

    /// Adds or removes a publisher address.
    pub fn address(&self, uri: &str, add: bool) {
        self.0.send_if_modified(|r| {
            if add {
                r.addresses.insert(uri.to_owned())
            } else {
                r.addresses.remove(uri)
            }
        });
    }

    /// A receiver that sees every later change.
    pub fn watch(&self) -> watch::Receiver<Registration> {
        self.0.subscribe()
    }
}
