//! `limiter-docs DIR`: writes limiter's man pages and shell completions
//! under DIR, laid out as under /usr/share (`cargo xtask dist` packages
//! them). They come from the clap definitions the `limiter` binary uses.

use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: limiter-docs DIR");
        return ExitCode::FAILURE;
    };
    match limiter::docs::write_all(&dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("limiter-docs: writing under {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}
