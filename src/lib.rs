//! feedbridge: a change-feed bridge for NoSQL databases.
//!
//! It tails an etcd or Redis server, turns every row change into a
//! Dragonflow-compatible [`DbUpdate`], and republishes it through ZeroMQ,
//! Redis PUBLISH or etcd `/pubsub` keys. It also provides the subscriber
//! side, with Dragonflow's pub/sub vocabulary.
//!
//! # Layout
//!
//! - [`update`]: `DbUpdate`, `Action`, ordering, `SEND_ALL_TOPIC`.
//! - [`codec`]: msgpack / json payloads (Dragonflow's wire).
//! - [`keymap`]: key layouts, database key ↔ table / topic / key.
//! - [`mapper`]: the pure transform, raw change → `DbUpdate` or a counted skip.
//! - [`config`]: typed TOML config, defaults and validation.
//! - [`db`]: the etcd and Redis clients everything else connects through.
//! - [`pubsub`]: the `Publisher` / `Subscriber` traits (Dragonflow's API); no backend.
//! - [`source`]: change sources (etcd watch, Redis keyspace notifications).
//! - [`backend`]: publish backends (ZeroMQ, Redis, etcd), publisher and subscriber,
//!   and the `PubSub` manager that picks one from config; heartbeats, positions,
//!   gap and silence tracking, and the replay buffer that repairs gaps.
//! - [`discovery`]: publisher ids, registration in the `publisher` table, discovery.
//! - [`ha`]: active/standby instances through etcd leader election or a Redis lock.
//! - [`bridge`]: the source → mapper → publisher pipeline, checkpoints, shutdown.
//! - [`service`]: the publisher service's multiproc (PULL) channel.
//! - [`checkpoint`]: the last-published revision, in etcd or an atomically written file.
//! - [`retry`]: reconnection with capped, jittered exponential backoff.
//! - [`stats`]: Prometheus metrics of what the bridge did.
//! - [`status`]: `feedbridge status`, one screen read from the admin listener.
//! - [`admin`]: the admin HTTP listener: `/metrics`, `/healthz`, `/readyz`.
//! - [`zmq_socket`]: the libzmq context and safe binding, shared by the
//!   ZeroMQ backend and the multiproc channel.
//! - `testing` (feature `test-util`): real etcd / Redis servers and a
//!   fault-injecting TCP proxy for the tests and the benchmark; not compiled
//!   into the release binary.

#![deny(unreachable_pub, rustdoc::broken_intra_doc_links)]
#![warn(missing_docs)]

pub mod admin;
pub mod backend;
pub mod bridge;
pub mod checkpoint;
pub mod codec;
pub mod config;
pub mod db;
pub mod discovery;
pub mod ha;
pub mod keymap;
pub mod mapper;
pub mod pubsub;
pub mod retry;
pub mod service;
pub mod source;
pub mod stats;
pub mod status;
#[cfg(feature = "test-util")]
pub mod testing;
pub mod update;
pub mod zmq_socket;

pub use update::{Action, DbUpdate, SEND_ALL_TOPIC};
