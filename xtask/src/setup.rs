//! `cargo xtask setup`: installs what building and testing limiter needs,
//! following ../shared/docs/TOOLCHAIN.md. Each step checks first and is
//! skipped when already done, so a second run takes seconds.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

/// Debian packages: the bpf toolchain (Debian's rustc with a precompiled
/// `core` for bpfel-unknown-none, and the LLVM it was built with, for
/// bpf-linker), and what the end-to-end tests drive.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    // Tests: namespaces, veth, `ss`, `nsenter`; a real syslog daemon.
    "iproute2",
    "util-linux",
    "rsyslog",
    // `systemd-analyze verify` checks the unit in dist/; the journal tests
    // run a real systemd-journald.
    "systemd",
    // The package test installs the .deb into a Debian 12 root made with
    // debootstrap from Debian's archive.
    "debootstrap",
    // The demo: a real MTA and real SMTP clients (swaks speaks IPv6 with
    // IO::Socket::INET6).
    "postfix",
    "swaks",
    "libio-socket-inet6-perl",
    // The benchmarks: what the limiter is compared with, and the veth's
    // XDP counters and NAPI settings.
    "iptables",
    "nftables",
    "ethtool",
    // The fleet tests (`limiter ... --server HOST`): a real sshd per server,
    // each started by the test in its own namespace with a config, keys
    // and known_hosts of the test's own; ssh and ssh-keygen on the
    // operator's side. Installed without starting a system-wide sshd (see
    // `ServicesHeld`).
    "openssh-server",
    "openssh-client",
];

/// Debian's hook for maintainer scripts: while it exits 101, `invoke-rc.d`
/// (and `deb-systemd-invoke`) start no service.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Builds the .deb (`cargo xtask dist`).
const CARGO_DEB_VERSION: &str = "3.8.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// The rustup name for Debian's toolchain (sysroot /usr), used by
/// limiter-user's build script.
const BPF_TOOLCHAIN: &str = "bpf-debian";

pub fn setup() -> anyhow::Result<()> {
    install_packages()?;
    install_bpf_linker()?;
    install_cargo_deb()?;
    link_toolchain()?;
    Ok(())
}

fn install_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing {}", missing.join(" "));
    require_root("installing Debian packages")?;
    // Postfix only runs inside the demo's namespaces, with a config of its
    // own: the package is installed without a system-wide configuration.
    let mut preseed = Command::new("debconf-set-selections")
        .stdin(Stdio::piped())
        .spawn()
        .context("running debconf-set-selections")?;
    std::io::Write::write_all(
        preseed
            .stdin
            .as_mut()
            .context("debconf-set-selections stdin")?,
        b"postfix postfix/main_mailer_type select No configuration\n",
    )?;
    if !preseed.wait()?.success() {
        bail!("debconf-set-selections failed");
    }
    run(Command::new("apt-get").args(["update", "-q"]))?;
    // The packages' services (sshd, postfix, rsyslog, ...) are not started:
    // the tests run their own, inside their namespaces.
    let held = ServicesHeld::new()?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    held.release()?;
    // Nor at the next boot: the package enables sshd, and this machine
    // needs none listening (the tests start their own).
    if missing.contains(&"openssh-server") {
        let disabled = Command::new("systemctl")
            .args(["--no-reload", "disable", "ssh.service", "ssh.socket"])
            .stderr(Stdio::null())
            .status();
        if !disabled.is_ok_and(|s| s.success()) {
            println!(
                "setup: could not disable ssh.service: run `systemctl disable --now ssh` if no sshd should run here"
            );
        }
    }
    Ok(())
}

/// The first line after the shebang of the policy-rc.d this writes: one
/// found at start was left by a setup that was killed, and is not put back.
const POLICY_RC_D_MARK: &str = "# cargo xtask setup: no service starts while installing.";

/// A /usr/sbin/policy-rc.d that denies every service start, for the time
/// of an install: the file that was there before (if any) is put back, or
/// ours removed, when this is released or dropped (also on an error).
struct ServicesHeld {
    original: Original,
    released: bool,
}

/// What was at [`POLICY_RC_D`] before.
enum Original {
    Nothing,
    /// A file: its content and permissions.
    File(Vec<u8>, std::fs::Permissions),
    /// A symlink (e.g. from update-alternatives): its target, untouched.
    Link(PathBuf),
}

impl ServicesHeld {
    fn new() -> anyhow::Result<ServicesHeld> {
        use std::os::unix::fs::PermissionsExt;
        let original = match std::fs::symlink_metadata(POLICY_RC_D) {
            Ok(meta) if meta.file_type().is_symlink() => Original::Link(
                std::fs::read_link(POLICY_RC_D)
                    .with_context(|| format!("reading {POLICY_RC_D}"))?,
            ),
            Ok(meta) => {
                let content =
                    std::fs::read(POLICY_RC_D).with_context(|| format!("reading {POLICY_RC_D}"))?;
                if String::from_utf8_lossy(&content).contains(POLICY_RC_D_MARK) {
                    Original::Nothing
                } else {
                    Original::File(content, meta.permissions())
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Original::Nothing,
            Err(e) => return Err(e).with_context(|| format!("reading {POLICY_RC_D}")),
        };
        let held = ServicesHeld {
            original,
            released: false,
        };
        // Never written through a link: the link goes, and comes back.
        if let Original::Link(_) = held.original {
            std::fs::remove_file(POLICY_RC_D)
                .with_context(|| format!("replacing {POLICY_RC_D}"))?;
        }
        std::fs::write(
            POLICY_RC_D,
            format!("#!/bin/sh\n{POLICY_RC_D_MARK}\nexit 101\n"),
        )
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
        std::fs::set_permissions(POLICY_RC_D, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {POLICY_RC_D} executable"))?;
        Ok(held)
    }

    /// Puts back what was there before.
    fn restore(&mut self) -> anyhow::Result<()> {
        self.released = true;
        match std::mem::replace(&mut self.original, Original::Nothing) {
            Original::File(content, permissions) => {
                std::fs::write(POLICY_RC_D, content)
                    .with_context(|| format!("restoring {POLICY_RC_D}"))?;
                std::fs::set_permissions(POLICY_RC_D, permissions)
                    .with_context(|| format!("restoring {POLICY_RC_D}'s mode"))?;
            }
            Original::Link(target) => {
                std::fs::remove_file(POLICY_RC_D)
                    .with_context(|| format!("removing {POLICY_RC_D}"))?;
                std::os::unix::fs::symlink(&target, POLICY_RC_D)
                    .with_context(|| format!("restoring the link {POLICY_RC_D}"))?;
            }
            Original::Nothing => std::fs::remove_file(POLICY_RC_D)
                .with_context(|| format!("removing {POLICY_RC_D}"))?,
        }
        Ok(())
    }

    fn release(mut self) -> anyhow::Result<()> {
        self.restore()
    }
}

impl Drop for ServicesHeld {
    fn drop(&mut self) {
        if !self.released
            && let Err(e) = self.restore()
        {
            eprintln!("setup: {e:#}");
        }
    }
}

fn package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn cargo_bin_dir() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    home.join("bin")
}

fn install_bpf_linker() -> anyhow::Result<()> {
    let linker = cargo_bin_dir().join("bpf-linker");
    let installed = Command::new(&linker)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if installed {
        return Ok(());
    }
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a minute or two)");
    // Without LLVM_PREFIX its build script finds Debian's default
    // llvm-config (14) and fails.
    run(Command::new(crate::cargo_bin())
        .args(["install", "--locked"])
        .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", LLVM_PREFIX))?;
    Ok(())
}

fn install_cargo_deb() -> anyhow::Result<()> {
    let installed = Command::new(cargo_bin_dir().join("cargo-deb"))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_DEB_VERSION))
        .unwrap_or(false);
    if installed {
        return Ok(());
    }
    println!("setup: building cargo-deb {CARGO_DEB_VERSION} (a minute or two)");
    run(Command::new(crate::cargo_bin())
        .args(["install", "--locked"])
        .arg(format!("cargo-deb@{CARGO_DEB_VERSION}")))
}

fn link_toolchain() -> anyhow::Result<()> {
    let list = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("running rustup")?;
    let linked = String::from_utf8_lossy(&list.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(BPF_TOOLCHAIN));
    if linked {
        return Ok(());
    }
    println!("setup: linking Debian's toolchain into rustup as {BPF_TOOLCHAIN}");
    run(Command::new("rustup").args(["toolchain", "link", BPF_TOOLCHAIN, "/usr"]))
}

fn require_root(why: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{why} needs root");
    }
    Ok(())
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{command:?}");
    let status = command
        .status()
        .with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}
