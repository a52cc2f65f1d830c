//! `cargo xtask demo`: the limiter in front of a real Postfix, with real
//! SMTP clients, in network namespaces of its own. See `limiter_tests::demo`.

use std::{
    process::ExitCode,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use clap::Parser;
use limiter_tests::demo::{self, Options};

/// The limiter in front of a real Postfix, with real SMTP clients, in
/// network namespaces it removes afterwards (root).
#[derive(Parser)]
#[command(name = "limiter-demo")]
struct Args {
    /// Seconds of mail.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Print only the summary.
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let options = Options {
        duration: Duration::from_secs(args.duration),
        show: !args.quiet,
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("limiter-demo: run it as root (network namespaces, XDP, cgroups)");
        return ExitCode::FAILURE;
    }
    // Ctrl-C ends the run early; the lab is taken down either way.
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(signal, stop.clone()) {
            eprintln!("limiter-demo: {e}");
            return ExitCode::FAILURE;
        }
    }
    println!(
        "limiter demo: a Postfix in a network namespace, SMTP clients in another, {}s of mail\n\
         (Ctrl-C stops early; everything is removed at the end)",
        options.duration.as_secs()
    );
    let summary = demo::run(&options, &stop);
    summary.print();
    if summary.interrupted {
        println!("\n(interrupted)");
    }
    ExitCode::SUCCESS
}
