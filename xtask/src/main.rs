//! Project tasks: `cargo xtask setup | run | test | lint | demo | bench`.

mod setup;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "limiter's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need (idempotent).
    Setup,
    /// Set up, build, and run `limiter run` with the given arguments
    /// (e.g. `cargo xtask run -- --iface eth0`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run every test (the privileged ones need root) and fail
    /// if any test was skipped.
    Test {
        /// Passed to the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// cargo fmt --check and cargo clippy -D warnings.
    Lint,
    /// Set up, build, and make the Debian package
    /// target/dist/limiter_<version>_amd64.deb: the binary, the systemd
    /// unit, /etc/default/limiter, an example connectors.toml, the man
    /// pages and the shell completions.
    Dist {
        /// The cargo profile to build with (a package of another profile
        /// than release goes to target/dist/PROFILE/).
        #[arg(long, default_value = "release")]
        profile: String,
    },
    /// Set up, build, and run the try-it lab: the limiter in front of a real
    /// Postfix, with real SMTP clients, in network namespaces it removes
    /// afterwards (root).
    Demo {
        /// Seconds of mail.
        #[arg(long, default_value_t = 30)]
        duration: u64,
    },
    /// Set up, build, and benchmark the limiter against a bare XDP program,
    /// iptables connlimit and nftables ct count (root). Writes
    /// BENCHMARKS.md and its chart at the top of the workspace.
    Bench {
        /// Fewer rounds and shorter floods: under a minute.
        #[arg(long)]
        quick: bool,
        /// Print the figures, targets included, as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Run only this part: micro, scale or flood (repeatable); then
        /// BENCHMARKS.md is left as it is.
        #[arg(long)]
        only: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> anyhow::Result<()> {
    match task {
        Task::Setup => setup::setup(),
        Task::Run { args } => {
            setup::setup()?;
            cargo(&["build", "--release", "--package", "limiter-user"])?;
            let binary = workspace_root().join("target/release/limiter");
            let status = Command::new(&binary)
                .arg("run")
                .args(&args)
                .status()
                .with_context(|| format!("running {}", binary.display()))?;
            if !status.success() {
                bail!("limiter run exited with {status}");
            }
            Ok(())
        }
        Task::Test { args } => {
            setup::setup()?;
            test(&args)
        }
        Task::Demo { duration } => {
            setup::setup()?;
            cargo(&[
                "build",
                "--release",
                "--package",
                "limiter-user",
                "--package",
                "limiter-tests",
                "--bins",
            ])?;
            let root = workspace_root();
            let status = Command::new(root.join("target/release/limiter-demo"))
                .args(["--duration", &duration.to_string()])
                .env("LIMITER_BIN", root.join("target/release/limiter"))
                .status()
                .context("running the demo")?;
            if !status.success() {
                bail!("the demo failed ({status})");
            }
            Ok(())
        }
        Task::Bench { quick, json, only } => {
            setup::setup()?;
            cargo(&[
                "build",
                "--release",
                "--package",
                "limiter-tests",
                "--bin",
                "limiter-bench",
            ])?;
            let root = workspace_root();
            let mut bench = Command::new(root.join("target/release/limiter-bench"));
            bench.arg("--out").arg(&root);
            if quick {
                bench.arg("--quick");
            }
            if json {
                bench.arg("--json");
            }
            for part in &only {
                bench.args(["--only", part]);
            }
            let status = bench.status().context("running the benchmarks")?;
            if !status.success() {
                bail!("the benchmarks failed ({status})");
            }
            Ok(())
        }
        Task::Dist { profile } => {
            setup::setup()?;
            dist(&profile)?;
            Ok(())
        }
        Task::Lint => {
            cargo(&["fmt", "--all", "--check"])?;
            cargo(&[
                "clippy",
                "--workspace",
                "--exclude",
                "limiter-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])
        }
    }
}

/// Builds the Debian package with `profile`; returns its path.
fn dist(profile: &str) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    cargo(&[
        "build",
        "--profile",
        profile,
        "--package",
        "limiter-user",
        "--bins",
    ])?;
    let profile_dir = if profile == "dev" { "debug" } else { profile };
    // The man pages and completions, from the clap definitions the binary
    // parses its arguments with; the package's assets name them here.
    let built = root.join("target").join(profile_dir);
    let generated = built.join("limiter-dist-docs");
    let _ = std::fs::remove_dir_all(&generated);
    let status = Command::new(built.join("limiter-docs"))
        .arg(&generated)
        .status()
        .context("running limiter-docs")?;
    if !status.success() {
        bail!("limiter-docs failed ({status})");
    }
    // Debian ships man pages gzipped (policy 12.1); cargo-deb leaves files
    // from the target directory as they are.
    let man = generated.join("man/man8");
    let pages: Vec<PathBuf> = std::fs::read_dir(&man)
        .with_context(|| format!("reading {}", man.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    let status = Command::new("gzip")
        .arg("-9n")
        .args(&pages)
        .status()
        .context("running gzip")?;
    if !status.success() {
        bail!("gzip of the man pages failed ({status})");
    }
    let version = env!("CARGO_PKG_VERSION");
    // Another profile's package (the tests') never overwrites the release's.
    let out = match profile {
        "release" => root.join("target/dist"),
        other => root.join("target/dist").join(other),
    };
    let deb = out.join(format!("limiter_{version}_amd64.deb"));
    let deb_arg = deb.to_str().context("a UTF-8 target directory")?;
    cargo(&[
        "deb",
        "--package",
        "limiter-user",
        "--no-build",
        "--profile",
        profile,
        "--deb-version",
        version,
        "--output",
        deb_arg,
    ])?;
    Ok(deb)
}

/// Runs the whole test suite and checks that nothing was skipped.
fn test(args: &[String]) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the end-to-end tests create network namespaces, cgroups and XDP attachments: run them as root"
        );
    }
    // The package test's .deb, built first as the product is (without the
    // test crate's `bench` feature): the workspace build below then leaves
    // the binary the tests run, and nothing is rebuilt under them.
    let deb = dist("dev")?;
    // limiter-ebpf is built for the bpf target by limiter-user's build
    // script, never for the host.
    cargo(&[
        "build",
        "--workspace",
        "--exclude",
        "limiter-ebpf",
        "--all-targets",
    ])?;
    let limiter = workspace_root().join("target/debug/limiter");
    let mut command = Command::new(cargo_bin());
    command
        .current_dir(workspace_root())
        .args([
            "test",
            "--workspace",
            "--exclude",
            "limiter-ebpf",
            "--no-fail-fast",
            "--",
        ])
        .args(args)
        .env("LIMITER_BIN", &limiter)
        .env("LIMITER_DEB", &deb)
        .stdout(Stdio::piped());
    let mut child = command.spawn().context("running cargo test")?;
    let stdout = child.stdout.take().context("cargo test output")?;
    let mut summary = Summary::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        summary.add(&line);
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!(
        "xtask: {} passed, {} failed, {} ignored in {} test binaries",
        summary.passed, summary.failed, summary.ignored, summary.binaries
    );
    if !status.success() {
        bail!("tests failed");
    }
    if summary.ignored > 0 {
        bail!(
            "{} test(s) were skipped; every test must run",
            summary.ignored
        );
    }
    if summary.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// Totals of the `test result:` lines of `cargo test`.
#[derive(Default)]
struct Summary {
    passed: u64,
    failed: u64,
    ignored: u64,
    binaries: u64,
}

impl Summary {
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        self.binaries += 1;
        for part in rest.split(&[';', '.'][..]) {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// The cargo that runs xtask (`cargo xtask` sets `CARGO`).
pub(crate) fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(cargo_bin())
        .current_dir(workspace_root())
        .args(args)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Summary;

    #[test]
    fn reads_cargo_test_summaries() {
        let mut s = Summary::default();
        s.add("test result: ok. 18 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.06s");
        s.add("test result: FAILED. 1 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s");
        s.add("running 4 tests");
        assert_eq!((s.passed, s.failed, s.ignored, s.binaries), (19, 3, 2, 2));
    }
}
