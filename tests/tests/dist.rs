//! The systemd unit shipped in dist/ is one systemd accepts, and runs the
//! daemon in a way that survives its own restarts.

use std::{path::Path, process::Command};

#[test]
fn the_systemd_unit_verifies() {
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist");
    let unit = std::fs::read_to_string(dist.join("limiter.service")).unwrap();
    // systemd checks that ExecStart names an executable: point it at the
    // binary under test.
    let binary = limiter_tests::daemon::limiter_bin();
    let under_test = unit.replace("/usr/local/bin/limiter", binary.to_str().unwrap());
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
}
