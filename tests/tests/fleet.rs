//! One command for several servers: two servers, each with a real sshd and
//! its own limiter daemon, driven from the ops namespace through the system
//! ssh client (`LIMITER_SSH` carries the lab's `ssh_config`).

use std::{
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use limiter_tests::{
    FleetLab, HoldServer, connect_from,
    fleet::{ops_addr, server_addr},
    scenario::connector,
    tcp_hold_path,
};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs the CLI in the ops namespace; its exit code, stdout and stderr.
fn cli(fleet: &FleetLab, args: &[&str]) -> (Option<i32>, String, String) {
    let out = fleet.cli(args);
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

fn per_source(fleet: &FleetLab, k: usize) -> serde_json::Value {
    fleet
        .limiter(k)
        .cli_json(&["connector", "show", "Default Frontend"])["max_inbound_connection_per_source"]
        .clone()
}

#[test]
fn one_command_reads_and_changes_every_server_and_names_the_one_that_failed() {
    let mut fleet = FleetLab::new(2);
    for k in 1..=2 {
        fleet.start_limiter(
            k,
            &connector("Default Frontend", "[\"0.0.0.0/0\"]", "100", "10", 100),
        );
    }
    let _servers: Vec<HoldServer> = (1..=2)
        .map(|k| {
            HoldServer::start_in(
                &tcp_hold_path(),
                fleet.server_ns(k),
                Some(fleet.cgroup(k)),
                &[&format!("{}:25", server_addr(k))],
            )
        })
        .collect();
    // The ops side holds 2 connections on mx1 and 3 on mx2.
    let held: Vec<TcpStream> = [(1, 2), (2, 3)]
        .into_iter()
        .flat_map(|(k, n)| std::iter::repeat_n(k, n))
        .map(|k| {
            fleet
                .ops_ns()
                .run(|| {
                    connect_from(
                        ops_addr(k).into(),
                        SocketAddr::new(server_addr(k).into(), 25),
                        Duration::from_secs(5),
                    )
                })
                .expect("admitted")
        })
        .collect();

    // Who holds how many, fleet-wide: JSON with a server field each.
    let (code, out, err) = cli(
        &fleet,
        &["sources", "--server", "mx1", "--server", "mx2", "--json"],
    );
    assert_eq!(code, Some(0), "{err}");
    let sources: serde_json::Value = serde_json::from_str(&out).unwrap();
    let seen: Vec<(String, String, u64)> = sources
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["server"].as_str().unwrap().to_string(),
                e["source"].as_str().unwrap().to_string(),
                e["live"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("mx1".to_string(), ops_addr(1).to_string(), 2),
            ("mx2".to_string(), ops_addr(2).to_string(), 3)
        ]
    );
    // And as one table, the servers from a file.
    let file = fleet.servers_file(&["mx1", "mx2"]);
    let (code, out, err) = cli(
        &fleet,
        &["sources", "--servers-file", file.to_str().unwrap()],
    );
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0][..3], ["SERVER", "CONNECTOR", "SOURCE"], "{out}");
    // The connector's name has a space: it went through the remote shell
    // whole.
    assert_eq!(
        lines[1][..5],
        ["mx1", "Default", "Frontend", &ops_addr(1).to_string(), "2"]
    );
    assert_eq!(
        lines[2][..5],
        ["mx2", "Default", "Frontend", &ops_addr(2).to_string(), "3"]
    );

    // One change for both: each says it took, and each wrote its file.
    let set = |fleet: &FleetLab, n: &str| {
        cli(
            fleet,
            &[
                "connector",
                "set",
                "Default Frontend",
                "--max-inbound-connection-per-source",
                n,
                "--server",
                "mx1",
                "--server",
                "mx2",
            ],
        )
    };
    let (code, out, err) = set(&fleet, "3");
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("mx1     changed: \"Default Frontend\""))
            && out
                .lines()
                .any(|l| l.starts_with("mx2     changed: \"Default Frontend\"")),
        "{out}"
    );
    for k in 1..=2 {
        assert_eq!(per_source(&fleet, k), 3, "mx{k}");
        let file = std::fs::read_to_string(fleet.limiter(k).config_path().unwrap()).unwrap();
        assert!(
            file.contains("max_inbound_connection_per_source = 3"),
            "{file}"
        );
    }

    // mx2's daemon stops mid-way: mx1 is changed, mx2 reported failed.
    fleet.kill_limiter(2);
    let (code, out, err) = set(&fleet, "4");
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("mx1     changed: \"Default Frontend\""))
            && out.lines().any(|l| l.starts_with(
                "mx2     FAILED, nothing changed there: cannot reach the limiter daemon"
            )),
        "{out}"
    );
    assert_eq!(
        err.trim_end(),
        "limiter: 1 of 2 servers failed: mx2",
        "{err}"
    );
    assert_eq!(per_source(&fleet, 1), 4);

    // mx2 unreachable (its sshd gone): named in JSON, the other answers.
    fleet.stop_sshd(2);
    let (code, out, err) = cli(
        &fleet,
        &["stats", "--server", "mx1", "--server", "mx2", "--json"],
    );
    assert_eq!(code, Some(1), "{err}");
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats[0]["server"], "mx1", "{stats}");
    assert!(stats[0]["admitted"].as_u64().unwrap() >= 2, "{stats}");
    assert_eq!(stats[1]["server"], "mx2", "{stats}");
    assert!(
        stats[1]["error"]
            .as_str()
            .unwrap()
            .contains("Connection refused"),
        "{stats}"
    );
    // ssh failed: whether a change would have taken is not known.
    assert_eq!(stats[1]["refused"], false, "{stats}");
    drop(held);
}
