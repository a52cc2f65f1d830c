//! `cargo xtask bench`: see `limiter_tests::bench`. Writes BENCHMARKS.md
//! and its chart into the directory given with --out; with --json, prints
//! the figures (targets included) as JSON.

use std::{path::PathBuf, process::ExitCode};

use limiter_tests::bench::{self, Options};

const CHART: &str = "BENCHMARKS-flood.svg";

fn main() -> ExitCode {
    let mut options = Options { quick: false };
    let mut json = false;
    let mut out = PathBuf::from(".");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => options.quick = true,
            "--json" => json = true,
            "--out" => match args.next() {
                Some(dir) => out = PathBuf::from(dir),
                None => return usage(),
            },
            _ => return usage(),
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("limiter-bench: run it as root (BPF, namespaces, XDP)");
        return ExitCode::FAILURE;
    }
    let report = bench::run(&options);
    let written = std::fs::write(out.join(CHART), bench::chart_svg(&report))
        .and_then(|()| std::fs::write(out.join("BENCHMARKS.md"), bench::markdown(&report, CHART)));
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

fn usage() -> ExitCode {
    eprintln!("usage: limiter-bench [--quick] [--json] [--out DIR]");
    ExitCode::FAILURE
}
