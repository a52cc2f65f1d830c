//! A start that fails leaves the host exactly as it found it: each failure
//! is one line naming the thing, and afterwards no program of limiter's is
//! attached, no pin is left, the cgroup has no sock_ops program and the
//! control socket is gone. State adopted from an earlier run that kept its
//! programs attached is left as it was found, still enforcing.

use std::{
    ffi::OsString,
    io::ErrorKind,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use aya::programs::XdpMode;
use limiter_tests::{
    BpfFs, Cgroup, HoldServer, Lab, Limiter,
    daemon::limiter_bin,
    lab::{client_v4, server_v4},
    passxdp::PassXdp,
    scenario::{ADMIT_WAIT, connector},
    spawn_in, tcp_hold_bin,
};

/// A place for one failing start: its bpffs, config and control socket.
struct Attempt {
    bpffs: BpfFs,
    dir: PathBuf,
}

impl Attempt {
    fn new() -> Attempt {
        let dir = std::env::temp_dir().join(format!(
            "limiter-test-start-{}-{}",
            std::process::id(),
            limiter_tests::next_id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("connectors.toml"),
            connector("Frontend", "[\"0.0.0.0/0\"]", "100", "1", 100),
        )
        .unwrap();
        Attempt {
            bpffs: BpfFs::new(),
            dir,
        }
    }

    fn pins(&self) -> PathBuf {
        self.bpffs.path().join("limiter")
    }

    fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// `limiter run` in the lab's server namespace with `args` after the
    /// usual ones (which `overrides` replace, by flag).
    fn run(&self, lab: &Lab, cgroup: &Cgroup, extra: &[&str]) -> Output {
        let mut args: Vec<OsString> = vec!["run".into()];
        let mut usual: Vec<(&str, OsString)> = vec![
            ("--iface", lab.server_iface().into()),
            ("--cgroup", cgroup.path().into()),
            ("--bpffs", self.pins().into()),
            ("--control", self.control().into()),
            ("--config", self.dir.join("connectors.toml").into()),
            ("--syslog", "off".into()),
        ];
        usual.retain(|(flag, _)| !extra.contains(flag));
        for (flag, value) in usual {
            args.push(flag.into());
            args.push(value);
        }
        args.extend(extra.iter().map(OsString::from));
        let mut cmd = Command::new(limiter_bin());
        cmd.args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        spawn_in(lab.server_ns(), None, cmd)
            .wait_with_output()
            .unwrap()
    }

    /// Runs a start that must fail with exit 1 and exactly one line on
    /// stderr, which must contain every one of `words`; and checks that it
    /// left nothing behind.
    fn fails(&self, lab: &Lab, cgroup: &Cgroup, extra: &[&str], words: &[&str]) -> String {
        let output = self.run(lab, cgroup, extra);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.contains(" INFO ") && !l.contains(" DEBUG "))
            .collect();
        assert_eq!(lines.len(), 1, "one line, and no warning: {stderr}");
        assert!(lines[0].starts_with("limiter: "), "{stderr}");
        for word in words {
            assert!(lines[0].contains(word), "{word:?} not in {stderr}");
        }
        assert!(
            !self.pins().exists(),
            "pins left in {}",
            self.pins().display()
        );
        assert!(!self.control().exists(), "the control socket is left");
        assert_eq!(cgroup.sock_ops_programs(), 0, "a sock_ops program is left");
        lines[0].to_string()
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The XDP program id on `iface` in the server namespace, if any.
fn xdp_program(lab: &Lab, iface: &str) -> Option<u32> {
    let out = lab.server_ns().ip(&["-d", "link", "show", "dev", iface]);
    let at = out.find("prog/xdp id ")?;
    out[at + 12..]
        .split_whitespace()
        .next()
        .and_then(|id| id.parse().ok())
}

#[test]
fn a_missing_interface_is_named_once_and_nothing_is_made() {
    let lab = Lab::new();
    let cgroup = Cgroup::new();
    let attempt = Attempt::new();
    let line = attempt.fails(
        &lab,
        &cgroup,
        &["--iface", "nosuch0"],
        &["no interface nosuch0"],
    );
    assert!(!line.contains("generic"), "{line}");
    assert_eq!(xdp_program(&lab, lab.server_iface()), None);
}

#[test]
fn an_empty_config_is_refused_unless_allowed() {
    let lab = Lab::new();
    let cgroup = Cgroup::new();
    let attempt = Attempt::new();
    let file = attempt.dir.join("connectors.toml");
    for text in ["", "# Connectors come later.\nipv6_prefix_length = 64\n"] {
        std::fs::write(&file, text).unwrap();
        let line = attempt.fails(&lab, &cgroup, &[], &[]);
        assert_eq!(
            line,
            format!(
                "limiter: {}: no connectors, so limiter would enforce nothing: add a [[connector]], or start with --allow-empty",
                file.display()
            )
        );
        assert_eq!(xdp_program(&lab, lab.server_iface()), None);
    }
}

#[test]
fn a_wrong_cgroup_bpffs_control_socket_or_metrics_address_is_refused_first() {
    let lab = Lab::new();
    let cgroup = Cgroup::new();
    let plain_dir = std::env::temp_dir().join(format!("limiter-test-plain-{}", std::process::id()));
    std::fs::create_dir_all(&plain_dir).unwrap();
    let plain = plain_dir.to_str().unwrap();
    let attempt = Attempt::new();
    attempt.fails(
        &lab,
        &cgroup,
        &["--cgroup", plain],
        &["--cgroup", plain, "not a cgroup v2 directory"],
    );
    let not_bpffs = format!("{plain}/limiter");
    attempt.fails(
        &lab,
        &cgroup,
        &["--bpffs", &not_bpffs],
        &["is not a bpffs", "mount -t bpf"],
    );
    assert!(!Path::new(&not_bpffs).exists());
    // Another daemon answers on the control socket.
    let control = attempt.control();
    let other = lab
        .server_ns()
        .run(|| std::os::unix::net::UnixListener::bind(&control).unwrap());
    let output = attempt.run(&lab, &cgroup, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("another limiter daemon is running"),
        "{stderr}"
    );
    assert!(control.exists(), "the other daemon's socket is left alone");
    drop(other);
    std::fs::remove_file(&control).unwrap();
    assert!(!attempt.pins().exists());
    assert_eq!(cgroup.sock_ops_programs(), 0);
    // The metrics port is taken.
    let _taken = lab
        .server_ns()
        .run(|| std::net::TcpListener::bind("127.0.0.1:9465").unwrap());
    attempt.fails(
        &lab,
        &cgroup,
        &["--metrics", "127.0.0.1:9465"],
        &["--metrics 127.0.0.1:9465", "cannot listen there"],
    );
    std::fs::remove_dir_all(&plain_dir).unwrap();
    assert_eq!(xdp_program(&lab, lab.server_iface()), None);
}

#[test]
fn a_syslog_socket_that_is_not_there_is_refused_first() {
    let lab = Lab::new();
    let cgroup = Cgroup::new();
    let attempt = Attempt::new();
    let missing = attempt.dir.join("no-syslogd.sock");
    let missing = missing.to_str().unwrap();
    attempt.fails(
        &lab,
        &cgroup,
        &["--syslog", missing],
        &[missing, "no such socket"],
    );
    let plain = attempt.dir.join("connectors.toml");
    let plain = plain.to_str().unwrap();
    attempt.fails(
        &lab,
        &cgroup,
        &["--syslog", plain],
        &[plain, "not a socket"],
    );
    if !Path::new("/run/systemd/journal/socket").exists() {
        attempt.fails(
            &lab,
            &cgroup,
            &["--syslog", "journal"],
            &["--syslog journal", "journald does not run here"],
        );
    }
    assert_eq!(xdp_program(&lab, lab.server_iface()), None);
}

#[test]
fn xdp_refused_in_both_modes_rolls_back_what_was_attached() {
    let lab = Lab::new();
    let cgroup = Cgroup::new();
    // Another program holds the interface: the kernel refuses limiter's in
    // driver mode and in generic mode, after its sock_ops program and pins
    // are in place.
    let foreign = PassXdp::attach_to(lab.server_ns(), lab.server_iface(), XdpMode::Skb);
    let before = xdp_program(&lab, lab.server_iface()).expect("the foreign program");
    let attempt = Attempt::new();
    attempt.fails(
        &lab,
        &cgroup,
        &[],
        &[
            lab.server_iface(),
            "refused XDP in driver mode",
            "and in generic mode",
        ],
    );
    assert_eq!(xdp_program(&lab, lab.server_iface()), Some(before));
    drop(foreign);
}

#[test]
fn a_load_that_fails_removes_what_it_pinned() {
    let lab = Lab::new();
    let cgroup = Cgroup::new();
    let attempt = Attempt::new();
    attempt.fails(
        &lab,
        &cgroup,
        &["--table-entries", "2000000000"],
        &["--table-entries 2000000000", "failed to create map"],
    );
    assert_eq!(xdp_program(&lab, lab.server_iface()), None);
}

#[test]
fn a_failed_start_leaves_adopted_programs_attached_and_enforcing() {
    let lab = Lab::new();
    let cgroup = Cgroup::new();
    let _server = HoldServer::start_with(tcp_hold_bin!(), &lab, Some(&cgroup), &["10.77.0.1:25"]);
    // A second interface, held by another program.
    lab.server_ns().ip(&[
        "link", "add", "held0", "type", "veth", "peer", "name", "held1",
    ]);
    lab.server_ns().ip(&["link", "set", "held0", "up"]);
    lab.server_ns().ip(&["link", "set", "held1", "up"]);
    let _foreign = PassXdp::attach_to(lab.server_ns(), "held0", XdpMode::Skb);
    let mut limiter = Limiter::start_with(
        &lab,
        &cgroup,
        Some(&connector("Frontend", "[\"0.0.0.0/0\"]", "100", "1", 100)),
        &["--keep-attached"],
    );
    let _held: TcpStream = lab
        .connect(client_v4(0).into(), server_v4(25), ADMIT_WAIT)
        .unwrap();
    limiter.terminate();
    let pins = limiter.bpffs();
    let xdp = xdp_program(&lab, lab.server_iface()).expect("left attached");
    assert_eq!(cgroup.sock_ops_programs(), 1);
    let control = limiter.control().to_path_buf();
    let config = limiter.config_path().unwrap().to_path_buf();
    let start = |extra: &[&str]| -> Output {
        let mut cmd = Command::new(limiter_bin());
        cmd.arg("run")
            .args(["--iface", lab.server_iface()])
            .arg("--cgroup")
            .arg(cgroup.path())
            .arg("--bpffs")
            .arg(&pins)
            .arg("--control")
            .arg(&control)
            .arg("--config")
            .arg(&config)
            .args(["--syslog", "off"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        spawn_in(lab.server_ns(), None, cmd)
            .wait_with_output()
            .unwrap()
    };
    // Refused before anything is touched.
    let output = start(&["--iface", "nosuch0"]);
    assert_eq!(output.status.code(), Some(1));
    // Refused after its program went into the adopted XDP link: the link
    // gets its program back.
    let output = start(&["--iface", "held0"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("adopting the maps"), "{stderr}");
    assert!(stderr.contains("refused XDP"), "{stderr}");
    for what in ["maps/SOURCE_LIVE", "maps/ESTABLISHED"] {
        assert!(
            pins.join(format!("v{}", limiter_common::maps::MAP_LAYOUT_VERSION))
                .join(what)
                .exists(),
            "{what}"
        );
    }
    assert_eq!(xdp_program(&lab, lab.server_iface()), Some(xdp));
    assert_eq!(cgroup.sock_ops_programs(), 1);
    assert!(!control.exists());
    // Still enforcing: the source at its cap is refused, another admitted.
    let refused = lab
        .connect(client_v4(0).into(), server_v4(25), ADMIT_WAIT)
        .expect_err("over the cap");
    assert_eq!(refused.kind(), ErrorKind::TimedOut);
    let _other = lab
        .connect(client_v4(1).into(), server_v4(25), ADMIT_WAIT)
        .expect("another source");
    // `limiter status` says what is attached without a daemon, and how to
    // remove it.
    let output = Command::new(limiter_bin())
        .args(["status", "--control"])
        .arg(&control)
        .arg("--bpffs")
        .arg(&pins)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("still attached and enforcing")
            && stderr.contains(lab.server_iface())
            && stderr.contains("limiter detach"),
        "{stderr}"
    );
    // And a start that works adopts it all.
    limiter.spawn();
    assert_eq!(limiter.status().live_total, 2);
}
