//! The command line: its definition (the source of `--help`, the man page
//! and the completions), and one file per command.
//!
//! - `run`: `run` and `check` (load a config; run the bridge, or validate);
//! - `tail`: subscribe through any backend and print updates;
//! - `status`: `status` and `health`, read from the admin listener;
//! - `docs`: `completions` and `man`;
//! - `shared`: logging, the runtime, signals, a config in one line.

pub mod docs;
pub mod run;
pub mod shared;
pub mod status;
pub mod systemd;
pub mod tail;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "feedbridge",
    version,
    about = "Change-feed bridge: etcd / Redis changes to ZeroMQ, Redis or etcd pub/sub"
)]
pub struct Cli {
    /// Log level (overridden by RUST_LOG): error, warn, info, debug, trace.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    /// Log lines as `text` or `json` (one object per line); default: the
    /// config's `admin.log_format`, else text.
    #[arg(long, global = true, value_parser = ["text", "json"])]
    pub log_format: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Print a shell completion script (e.g. `feedbridge completions bash
    /// > /etc/bash_completion.d/feedbridge`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), from the same definition as `--help`.
    Man,
    /// One screen about a running bridge, from its admin listener: role,
    /// readiness, what it read and published, skips, lag, reconnects.
    Status {
        /// The admin listener (`[admin] listen`).
        #[arg(long, default_value = "http://127.0.0.1:9095")]
        url: String,
        /// Refresh in place every this long (e.g. `2s`), with rates.
        #[arg(long, value_parser = humantime::parse_duration, num_args = 0..=1, default_missing_value = "2s")]
        watch: Option<std::time::Duration>,
    },
    /// Run the bridge until SIGINT or SIGTERM.
    Run {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file: exit 0 when usable, 2 with the reason otherwise.
    Check {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Exit 0 if an admin URL answers 200 (for container health checks).
    Health {
        /// e.g. http://127.0.0.1:9095/readyz
        #[arg(long, default_value = "http://127.0.0.1:9095/healthz")]
        url: String,
    },
    /// Subscribe and print one JSON object per update on stdout.
    Tail(tail::TailArgs),
}
