//! `cargo xtask bench`: see `limiter_tests::bench`. Writes BENCHMARKS.md
//! and its chart into the directory given with --out; with --json, prints
//! the figures (targets included) as JSON.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use limiter_tests::bench::{self, Options, Part};

const CHART: &str = "BENCHMARKS-flood.svg";

/// Per-packet cost, scale and floods, side by side with bare XDP programs,
/// iptables connlimit and nftables ct count (root).
#[derive(Parser)]
#[command(name = "limiter-bench")]
struct Args {
    /// Fewer rounds and shorter floods: under a minute.
    #[arg(long)]
    quick: bool,
    /// Print the figures and the targets as JSON.
    #[arg(long)]
    json: bool,
    /// Run only these parts (repeatable); BENCHMARKS.md is then left alone.
    #[arg(long, value_enum)]
    only: Vec<Part>,
    /// Where BENCHMARKS.md and its chart go.
    #[arg(long, default_value = ".")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let Args {
        quick,
        json,
        only,
        out,
    } = Args::parse();
    let partial = !only.is_empty();
    let options = Options { quick, only };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("limiter-bench: run it as root (BPF, namespaces, XDP)");
        return ExitCode::FAILURE;
    }
    // Before minutes of measuring, not after.
    if let Err(e) = std::fs::create_dir_all(&out) {
        eprintln!("limiter-bench: creating {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    let report = bench::run(&options);
    let written = if partial {
        Ok(())
    } else {
        std::fs::write(out.join(CHART), bench::chart_svg(&report)).and_then(|()| {
            std::fs::write(out.join("BENCHMARKS.md"), bench::markdown(&report, CHART))
        })
    };
    if let Err(e) = written {
        eprintln!("limiter-bench: writing into {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report).expect("JSON"));
    } else {
        print!("{}", bench::markdown(&report, CHART));
    }
    ExitCode::SUCCESS
}
