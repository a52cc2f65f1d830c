//! systemd readiness (`Type=notify`): the daemon tells a NOTIFY_SOCKET the
//! test made that it is ready only once XDP is attached and the existing
//! connections are counted, keeps STATUS= fresh, pets the watchdog, and
//! says RELOADING=1 / READY=1 around a live change and STOPPING=1 at exit.

use std::{
    os::unix::net::UnixDatagram,
    path::PathBuf,
    time::{Duration, Instant},
};

use limiter_tests::{
    Cgroup, HoldServer, Lab, Limiter,
    daemon::Launch,
    lab::{client_v4, server_v4},
    scenario::{LISTEN, connector},
};

/// A NOTIFY_SOCKET, removed on drop.
struct NotifySocket {
    socket: UnixDatagram,
    dir: PathBuf,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = std::env::temp_dir().join(format!(
            "limiter-test-notify-{}-{}",
            std::process::id(),
            limiter_tests::next_id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = UnixDatagram::bind(dir.join("notify.sock")).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        NotifySocket { socket, dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("notify.sock")
    }

    /// The next message within `timeout`.
    fn next(&self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut buffer = vec![0; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buffer) {
                return Some(String::from_utf8_lossy(&buffer[..n]).into_owned());
            }
        }
        None
    }

    /// Every message within `period`.
    fn during(&self, period: Duration) -> Vec<String> {
        let deadline = Instant::now() + period;
        let mut messages = Vec::new();
        while let Some(m) = self.next(deadline.saturating_duration_since(Instant::now())) {
            messages.push(m);
        }
        messages
    }

    /// Messages until one satisfies `pred` (included), within `timeout`.
    fn until(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut messages = Vec::new();
        while let Some(m) = self.next(deadline.saturating_duration_since(Instant::now())) {
            let done = pred(&m);
            messages.push(m);
            if done {
                return messages;
            }
        }
        panic!("no such message within {timeout:?}: {messages:#?}");
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn lines(message: &str) -> Vec<&str> {
    message.lines().collect()
}

#[test]
fn ready_only_once_enforcing_then_status_watchdog_reloading_and_stopping() {
    let lab = Lab::new();
    let cgroup = Cgroup::new();
    let _server = HoldServer::start(&lab, Some(&cgroup), LISTEN);
    // Two connections before the daemon: READY=1 waits until they count.
    let _existing: Vec<_> = (0..2)
        .map(|_| {
            lab.connect(client_v4(0).into(), server_v4(25), Duration::from_secs(2))
                .unwrap()
        })
        .collect();
    let notify = std::sync::Arc::new(NotifySocket::new());
    // Looks at the interface the moment READY=1 arrives.
    let watcher = {
        let (notify, ns, iface) = (
            notify.clone(),
            lab.server_ns().clone(),
            lab.server_iface().to_string(),
        );
        std::thread::spawn(move || {
            let messages = notify.until(Duration::from_secs(30), |m| lines(m).contains(&"READY=1"));
            (messages, ns.ip(&["link", "show", "dev", &iface]))
        })
    };
    let limiter = Limiter::start_launched(
        &lab,
        &cgroup,
        Some(&connector("Frontend", "[\"0.0.0.0/0\"]", "100", "10", 100)),
        &[],
        Launch {
            env: vec![
                ("NOTIFY_SOCKET".into(), notify.path().into()),
                ("WATCHDOG_USEC".into(), "500000".into()),
            ],
            ..Launch::default()
        },
    );
    let (ready, xdp_at_ready) = watcher.join().unwrap();
    assert!(xdp_at_ready.contains("prog/xdp"), "{xdp_at_ready}");
    // READY=1 is the first message, with the status of what it enforces.
    assert_eq!(ready.len(), 1, "{ready:#?}");
    let first = lines(&ready[0]);
    let status = first
        .iter()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("STATUS= in {first:?}"));
    assert!(
        status.starts_with(&format!("enforcing on {} (", lab.server_iface()))
            && status.contains("1 connector(s), 2 live connection(s)")
            && status.ends_with(": Frontend 2"),
        "{status}"
    );

    // WatchdogSec=: pets every quarter second (half of 0.5 s), each with
    // the status.
    let beats = notify.during(Duration::from_millis(1300));
    let pets = beats
        .iter()
        .filter(|m| lines(m).contains(&"WATCHDOG=1"))
        .count();
    assert!((2..=8).contains(&pets), "{beats:#?}");
    assert!(
        beats.iter().all(|m| m.contains("STATUS=enforcing on ")),
        "{beats:#?}"
    );

    // A live change: RELOADING=1 (with the time, for systemd), then READY=1.
    limiter.cli_ok(&[
        "connector",
        "set",
        "Frontend",
        "--max-inbound-connection-per-source",
        "5",
    ]);
    let change: Vec<String> = notify
        .until(Duration::from_secs(5), |m| lines(m).contains(&"READY=1"))
        .into_iter()
        .filter(|m| !m.contains("WATCHDOG=1"))
        .collect();
    assert_eq!(change.len(), 2, "{change:#?}");
    assert!(
        lines(&change[0]).contains(&"RELOADING=1") && change[0].contains("MONOTONIC_USEC="),
        "{change:#?}"
    );
    assert_eq!(lines(&change[1]), ["READY=1"]);

    limiter.stop();
    let last = notify.until(Duration::from_secs(5), |m| lines(m).contains(&"STOPPING=1"));
    assert!(!last.is_empty());
}
