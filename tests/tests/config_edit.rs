//! What `limiter connector new|set|remove` do to the operator's config
//! file, end to end against the real daemon.

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use limiter_tests::{
    lab::client_v4,
    scenario::{Scenario, connector},
};

/// A directory of the test's own, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "limiter-test-{what}-{}-{}",
            std::process::id(),
            limiter_tests::next_id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

const COMMENTED: &str = "# Our MX.
[[connector]]
name = \"Frontend\"
bindings = [\"0.0.0.0:25\", \"[::]:25\"]   # both families
remote_ip_ranges = [\"0.0.0.0/0\", \"::/0\"]
max_inbound_connection = 100
max_inbound_connection_per_source = 20   # agreed with security, ticket 4711
max_inbound_connection_percentage_per_source = 100

# The application servers.
[[connector]]
name = \"Relay\"
bindings = [\"0.0.0.0:25\"]
remote_ip_ranges = [
    \"10.77.0.20-10.77.0.29\",   # app servers
    \"10.77.0.40\",              # scanner
]

# Submission comes later (ticket 4712).
";

#[test]
fn changes_keep_the_operators_comments() {
    let s = Scenario::start(COMMENTED);
    let path = s.limiter.config_path().unwrap().to_path_buf();
    s.limiter.cli_ok(&[
        "connector",
        "set",
        "Frontend",
        "--max-inbound-connection-per-source",
        "2",
        "--bindings",
        "[::]:25,0.0.0.0:25",
    ]);
    s.limiter.cli_ok(&[
        "connector",
        "set",
        "Relay",
        "--remote-ip-ranges",
        "10.77.0.20-10.77.0.29,10.77.0.41",
    ]);
    s.limiter.cli_ok(&[
        "connector",
        "new",
        "Submission",
        "--bindings",
        "10.77.0.1:2525",
    ]);
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "# Our MX.
[[connector]]
name = \"Frontend\"
bindings = [\"[::]:25\", \"0.0.0.0:25\"]   # both families
remote_ip_ranges = [\"0.0.0.0/0\", \"::/0\"]
max_inbound_connection = 100
max_inbound_connection_per_source = 2   # agreed with security, ticket 4711
max_inbound_connection_percentage_per_source = 100

# The application servers.
[[connector]]
name = \"Relay\"
bindings = [\"0.0.0.0:25\"]
remote_ip_ranges = [
    \"10.77.0.20-10.77.0.29\",   # app servers
    \"10.77.0.41\",
]

# Submission comes later (ticket 4712).

[[connector]]
name = \"Submission\"
bindings = [\"10.77.0.1:2525\"]
"
    );
    // And the kernel has the change.
    let _two = s.open(client_v4(0), 2);
    s.refused(client_v4(0));
    // Removed again: its comment stays, the file is as it was.
    s.limiter.cli_ok(&["connector", "remove", "Submission"]);
    let file = std::fs::read_to_string(&path).unwrap();
    assert!(
        file.ends_with("]\n\n# Submission comes later (ticket 4712).\n"),
        "{file}"
    );
}

#[test]
fn a_symlinked_config_is_written_through_to_its_target() {
    let dir = TempDir::new("symlink");
    let (etc, deployed) = (dir.path().join("etc"), dir.path().join("deployed"));
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&deployed).unwrap();
    // As config management leaves it: a link to a file of its own, with
    // its own mode and owner.
    let target = deployed.join("connectors.toml");
    std::fs::write(
        &target,
        connector("Frontend", "[\"0.0.0.0/0\", \"::/0\"]", "100", "2", 100),
    )
    .unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&target, Some(65534), Some(65534)).unwrap();
    let link = etc.join("connectors.toml");
    std::os::unix::fs::symlink("../deployed/connectors.toml", &link).unwrap();
    let s = Scenario::start_with(None, &["--config", link.to_str().unwrap()]);
    for per_source in ["3", "4"] {
        s.limiter.cli_ok(&[
            "connector",
            "set",
            "Frontend",
            "--max-inbound-connection-per-source",
            per_source,
        ]);
        let meta = std::fs::symlink_metadata(&link).unwrap();
        assert!(meta.file_type().is_symlink(), "the link was replaced");
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            Path::new("../deployed/connectors.toml")
        );
        let text = std::fs::read_to_string(&target).unwrap();
        assert!(
            text.contains(&format!(
                "max_inbound_connection_per_source = {per_source}\n"
            )),
            "{text}"
        );
        let meta = std::fs::metadata(&target).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        assert_eq!(names_in(&etc), ["connectors.toml"]);
        assert_eq!(names_in(&deployed), ["connectors.toml"]);
    }
    let _four = s.open(client_v4(0), 4);
    s.refused(client_v4(0));
}

#[test]
fn the_last_connector_stays_unless_the_daemon_allows_empty() {
    let s = Scenario::start(&format!(
        "{}{}",
        connector("Frontend", "[\"0.0.0.0/0\", \"::/0\"]", "100", "1", 100),
        connector("Relay", "[\"10.77.0.20-10.77.0.29\"]", "100", "2", 100)
    ));
    let path = s.limiter.config_path().unwrap().to_path_buf();
    s.limiter.cli_ok(&["connector", "remove", "Relay"]);
    let before = std::fs::read(&path).unwrap();
    assert_eq!(
        s.limiter.cli_err(&["connector", "remove", "frontend"]),
        "limiter: connector \"Frontend\" is the last one, and without it nothing would be enforced: \
         the daemon allows that only when started with --allow-empty (nothing changed)"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before, "the file changed");
    assert_eq!(s.limiter.status().connectors.len(), 1);
    let _one = s.open(client_v4(0), 1);
    s.refused(client_v4(0));
}

#[test]
fn with_allow_empty_a_config_without_connectors_runs_and_enforces_nothing() {
    let s = Scenario::start_with(
        Some("# Connectors come later.\nipv6_prefix_length = 64\n"),
        &["--allow-empty"],
    );
    let path = s.limiter.config_path().unwrap().to_path_buf();
    assert!(s.limiter.status().connectors.is_empty());
    let log = s.limiter.log();
    assert!(
        log.contains("no connectors (--allow-empty): nothing is enforced"),
        "{log}"
    );
    s.limiter.cli_ok(&[
        "connector",
        "new",
        "Frontend",
        "--bindings",
        "0.0.0.0:25",
        "--max-inbound-connection-per-source",
        "1",
    ]);
    let _one = s.open(client_v4(0), 1);
    s.refused(client_v4(0));
    // The last one may go: then nothing is enforced.
    s.limiter.cli_ok(&["connector", "remove", "Frontend"]);
    assert!(s.limiter.status().connectors.is_empty());
    let _more = s.open(client_v4(0), 2);
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "# Connectors come later.\nipv6_prefix_length = 64\n"
    );
}
