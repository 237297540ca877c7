//! Database clients, one module per database: [`etcd`] and [`redis`].
//! Sources, backends, discovery, HA and the checkpoint all connect
//! through these, so connection options, TLS, auth, response limits and
//! the redaction of secrets live in one place each.

pub mod etcd;
pub mod redis;
