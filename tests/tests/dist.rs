//! What ships: the systemd unit, and the Debian package `cargo xtask dist`
//! makes, installed into a fresh Debian 12 root and run end to end.

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use limiter_tests::{
    daemon::Launch,
    lab::client_v4,
    package::{Chroot, bookworm_root, deb},
    scenario::{Scenario, connector},
    wait_until,
};

#[test]
fn the_systemd_unit_verifies() {
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist");
    let unit = std::fs::read_to_string(dist.join("limiter.service")).unwrap();
    // systemd checks that ExecStart names an executable: point it at the
    // binary under test.
    let binary = limiter_tests::daemon::limiter_bin();
    let under_test = unit.replace("/usr/bin/limiter", binary.to_str().unwrap());
    let dir = std::env::temp_dir().join(format!("limiter-test-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("limiter.service");
    std::fs::write(&path, under_test).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (package systemd)");
    std::fs::remove_dir_all(&dir).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Complaints about other units of this machine are not ours.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("limiter.service"))
        .collect();
    assert!(out.status.success() && ours.is_empty(), "{stderr}");
    // Restarts must not detach: the unit keeps the programs attached.
    assert!(unit.contains("run --keep-attached"));
    assert!(unit.contains("ProtectSystem=strict") && unit.contains("CapabilityBoundingSet="));
    // Started means enforcing (see tests/notify.rs), and a hung daemon is
    // restarted.
    assert!(unit.contains("\nType=notify\n") && unit.contains("\nWatchdogSec="));
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut child = Command::new("gzip")
        .arg("-dc")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    writer.join().unwrap().unwrap();
    assert!(child.wait().unwrap().success());
    out
}

/// The output of one `== NAME` section of the install script.
fn section(output: &str, name: &str) -> String {
    let header = format!("== {name}");
    let mut lines = output.lines().skip_while(|l| *l != header);
    assert!(lines.next().is_some(), "section {name} in {output}");
    lines
        .take_while(|l| !l.starts_with("== "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_package_installs_into_a_fresh_debian_12_root() {
    let deb = deb();
    let root = bookworm_root();
    let chroot = Chroot::new(&root);
    let out_dir = Scratch::new("limiter-test-installed");
    let script = r#"
        DEB=$1; OUT=$2
        cp "$DEB" "$ROOT/tmp/limiter.deb"
        echo "== install"; chroot "$ROOT" dpkg -i /tmp/limiter.deb 2>&1
        echo "== version"; chroot "$ROOT" limiter --version
        echo "== man"; chroot "$ROOT" env MANWIDTH=80 man -P cat -l /usr/share/man/man8/limiter.8.gz 2>&1
        echo "== man run"; chroot "$ROOT" env MANWIDTH=80 man -P cat -l /usr/share/man/man8/limiter-run.8.gz 2>&1
        echo "== verify"; chroot "$ROOT" systemd-analyze verify --man=no /lib/systemd/system/limiter.service 2>&1
        echo "== enabled"; chroot "$ROOT" systemctl is-enabled limiter.service 2>&1 || true
        echo "== conffiles"; chroot "$ROOT" dpkg-query -W -f '${Conffiles}\n' limiter
        echo "== bash"; chroot "$ROOT" bash -c '. /usr/share/bash-completion/completions/limiter; complete -p limiter'
        cp -r "$ROOT/usr/share/man/man8" "$OUT/man8"
        (cd "$ROOT/usr/share" && cp --parents bash-completion/completions/limiter \
            zsh/vendor-completions/_limiter fish/vendor_completions.d/limiter.fish "$OUT")
        echo "== purge"; chroot "$ROOT" dpkg --purge limiter 2>&1
        echo "== left"; ls "$ROOT/etc/limiter" "$ROOT/usr/bin/limiter" 2>&1 || true
    "#;
    let out = chroot.run(script, &[deb.as_os_str(), out_dir.as_os_str()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        section(&stdout, "install").contains("Setting up limiter ("),
        "{stdout}"
    );
    assert_eq!(
        section(&stdout, "version").trim(),
        format!("limiter {}", env!("CARGO_PKG_VERSION"))
    );
    let man = section(&stdout, "man");
    assert!(
        man.contains("limiter(8)") && man.contains("NAME") && man.contains("limiter-run(8)"),
        "{man}"
    );
    let man_run = section(&stdout, "man run");
    assert!(
        man_run.contains("--syslog") && man_run.contains("--syslog-format"),
        "{man_run}"
    );
    assert_eq!(
        section(&stdout, "verify").trim(),
        "",
        "systemd-analyze verify"
    );
    // Installed, not enabled: the interface is the operator's to set first.
    assert_eq!(section(&stdout, "enabled").trim(), "disabled", "{stdout}");
    let conffiles = section(&stdout, "conffiles");
    assert!(
        conffiles.contains("/etc/limiter/connectors.toml")
            && conffiles.contains("/etc/default/limiter"),
        "{conffiles}"
    );
    assert!(
        section(&stdout, "bash").contains(" -F _limiter limiter"),
        "{stdout}"
    );
    // Removing it detaches what a stopped daemon left (nothing, here).
    let purge = section(&stdout, "purge");
    assert!(
        purge.contains("nothing attached under /sys/fs/bpf/limiter"),
        "{purge}"
    );
    assert!(
        section(&stdout, "left").contains("No such file"),
        "{stdout}"
    );

    // The man pages and completions it installed are what the clap
    // definitions of this very source make.
    let installed = |name: &str| std::fs::read(out_dir.join(name)).unwrap();
    for (shell, path) in limiter::docs::COMPLETIONS {
        assert!(
            installed(path) == limiter::docs::completion(shell),
            "{path} differs from the clap definitions' completion"
        );
    }
    let pages = limiter::docs::man_pages().unwrap();
    let installed_pages: Vec<String> = std::fs::read_dir(out_dir.join("man8"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("limiter"))
        .collect();
    assert_eq!(installed_pages.len(), pages.len(), "{installed_pages:?}");
    for (name, roff) in pages {
        let gz = installed(&format!("man8/{name}.gz"));
        assert!(
            gunzip(&gz) == roff,
            "{name} differs from the clap definitions' page"
        );
    }
}

/// A directory of the test's, removed on drop (also when the test fails).
struct Scratch(PathBuf);

impl Scratch {
    fn new(prefix: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            limiter_tests::next_id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_packaged_binary_enforces() {
    let unpacked = Scratch::new("limiter-test-unpacked");
    limiter_tests::run_checked(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb())
            .arg(&*unpacked),
    );
    let s = Scenario::start_launched(
        Some(&connector("Frontend", "[\"0.0.0.0/0\"]", "100", "2", 100)),
        &[],
        Launch {
            bin: Some(unpacked.join("usr/bin/limiter")),
            ..Launch::default()
        },
    );
    let _held = s.open(client_v4(0), 2);
    s.refused(client_v4(0));
    let _other = s.open(client_v4(1), 1);
    assert_eq!(s.limiter.status().live_total, 3);
    let reported = wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
        s.limiter
            .cli_ok(&["events", "--json"])
            .contains("\"event_id\":1021")
    });
    assert!(reported, "{}", s.limiter.log());
}
