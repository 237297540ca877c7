//! The `feedbridge` command: parses the command line and hands each
//! command to its file in `cli/`. Exit codes: 0 success, 1 runtime failure,
//! 2 bad config or usage, 3 stopped with updates unpublished.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match &cli.command {
        Command::Run { config } | Command::Check { config } => Some(config.as_path()),
        _ => None,
    };
    let format = cli::shared::log_format(cli.log_format.as_deref(), config);
    cli::shared::init_logging(&cli.log_level, format);
    match cli.command {
        Command::Run { config } => cli::run::run(&config),
        Command::Check { config } => cli::run::check(&config),
        Command::Tail(args) => cli::tail::tail(args),
        Command::Status { url, watch } => cli::status::status(&url, watch),
        Command::Health { url } => cli::status::health(&url),
        Command::Completions { shell } => cli::docs::completions(shell),
        Command::Man => cli::docs::man(),
    }
}
