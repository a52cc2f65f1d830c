//! What `limiter connector new|set|remove` do to the operator's config
//! file, end to end against the real daemon.

use limiter_tests::{lab::client_v4, scenario::Scenario};

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
