//! `feedbridge completions` and `feedbridge man`: generated from the same
//! CLI definition as `--help`.

use std::process::ExitCode;

use super::Cli;

/// Prints the completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) -> ExitCode {
    let mut command = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut command, "feedbridge", &mut std::io::stdout());
    ExitCode::SUCCESS
}

/// Prints the manual page (roff).
pub fn man() -> ExitCode {
    let command = <Cli as clap::CommandFactory>::command();
    match clap_mangen::Man::new(command).render(&mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
