//! `feedbridge status` and `feedbridge health`: read a running bridge's
//! admin listener.

use std::process::ExitCode;

/// `feedbridge status`: exit 0 when ready, 1 when the listener does not
/// answer, 2 when the bridge answers but is not ready.
pub fn status(url: &str, watch: Option<std::time::Duration>) -> ExitCode {
    let mut before: Option<(feedbridge::status::Snapshot, std::time::Instant)> = None;
    loop {
        let snapshot = match feedbridge::status::read(url) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: no bridge answers at {url} ({e}); is [admin] listen set?");
                return ExitCode::FAILURE;
            }
        };
        let screen = snapshot.render(url, before.as_ref().map(|(s, t)| (s, t.elapsed())));
        let Some(every) = watch else {
            print!("{screen}");
            return if snapshot.ready.0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        };
        // Clear the screen and draw again in place.
        print!("\x1b[2J\x1b[H{screen}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
        before = Some((snapshot, std::time::Instant::now()));
        std::thread::sleep(every);
    }
}

/// `feedbridge health`: exit 0 if the admin URL answers 200.
pub fn health(url: &str) -> ExitCode {
    match feedbridge::admin::probe(url) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
