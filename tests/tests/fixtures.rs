//! Tests of the fixtures themselves. They need root (namespaces, cgroups,
//! mounts), as in CI.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use limiter_tests::{
    BpfFs, Cgroup, HoldServer, Lab, Netns, OwnedNetns, established, lab, run_checked,
    sockets_in_state, spawn_in, tcp_hold_bin, tcp_hold_path, wait_until,
};

const PORT: u16 = 2525;
const SEC: Duration = Duration::from_secs(1);

fn hold(lab: &Lab, cgroup: Option<&Cgroup>) -> HoldServer {
    HoldServer::start_with(
        tcp_hold_bin!(),
        lab,
        cgroup,
        &["10.77.0.1:2525", "[fd77::1]:2525"],
    )
}

fn netns_names() -> BTreeSet<String> {
    run_checked(Command::new("ip").args(["netns", "list"]))
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn mounts() -> String {
    std::fs::read_to_string("/proc/self/mounts").unwrap()
}

fn is_mounted(path: &Path, fstype: &str) -> bool {
    limiter_tests::cgroup::mount_points(&mounts(), fstype)
        .iter()
        .any(|p| p == path)
}

fn echo(s: &mut TcpStream, text: &str) -> String {
    s.set_read_timeout(Some(5 * SEC)).unwrap();
    s.write_all(format!("{text}\n").as_bytes()).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    line
}

fn thread_netns() -> (u64, u64) {
    let m = std::fs::metadata("/proc/thread-self/ns/net").unwrap();
    (m.dev(), m.ino())
}

#[test]
fn hold_server_v4_v6_echo_close_reset() {
    let lab = Lab::new();
    let _srv = hold(&lab, None);

    // Connect from several sources of both families.
    let mut conns: Vec<TcpStream> = Vec::new();
    for i in 0..4 {
        let src = IpAddr::V4(lab::client_v4(i));
        let s = lab.connect(src, lab::server_v4(PORT), 5 * SEC).unwrap();
        assert_eq!(s.local_addr().unwrap().ip(), src);
        conns.push(s);
    }
    for i in 0..5 {
        let src = IpAddr::V6(lab::client_v6(i));
        let s = lab.connect(src, lab::server_v6(PORT), 5 * SEC).unwrap();
        assert_eq!(s.local_addr().unwrap().ip(), src);
        conns.push(s);
    }

    // The server's kernel sees exactly these connections.
    let expected: BTreeSet<(SocketAddr, SocketAddr)> = conns
        .iter()
        .map(|s| (s.peer_addr().unwrap(), s.local_addr().unwrap()))
        .collect();
    assert!(
        wait_until(5 * SEC, Duration::from_millis(20), || {
            established(lab.server_ns(), PORT)
                .into_iter()
                .collect::<BTreeSet<_>>()
                == expected
        }),
        "server established: {:?}\nexpected: {expected:?}",
        established(lab.server_ns(), PORT)
    );
    assert_eq!(lab.server_established(PORT).len(), 9);
    // The client side sees them from its end (remote port 2525, not local).
    assert!(established(lab.client_ns(), PORT).is_empty());
    assert_eq!(
        sockets_in_state(
            lab.client_ns(),
            "established",
            conns[0].local_addr().unwrap().port()
        )
        .len(),
        1
    );

    // Echo on a v4 and a v6 connection.
    assert_eq!(echo(&mut conns[0], "hello"), "hello\n");
    assert_eq!(
        echo(&mut conns[5], "EHLO example.org"),
        "EHLO example.org\n"
    );

    // `close` → FIN: the client reads EOF.
    let closed = conns.remove(1);
    let closed_key = (closed.peer_addr().unwrap(), closed.local_addr().unwrap());
    (&closed).write_all(b"close\n").unwrap();
    closed.set_read_timeout(Some(5 * SEC)).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        (&closed).read(&mut buf).unwrap(),
        0,
        "expected EOF after close"
    );

    // `reset` → RST: the client's read fails with ECONNRESET.
    let reset = conns.remove(5); // a v6 one
    let reset_key = (reset.peer_addr().unwrap(), reset.local_addr().unwrap());
    (&reset).write_all(b"reset\n").unwrap();
    reset.set_read_timeout(Some(5 * SEC)).unwrap();
    let err = (&reset).read(&mut buf).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");

    assert!(wait_until(5 * SEC, Duration::from_millis(20), || {
        let now: BTreeSet<_> = established(lab.server_ns(), PORT).into_iter().collect();
        !now.contains(&closed_key) && !now.contains(&reset_key) && now.len() == 7
    }));

    // EOF from the client → the server closes too.
    let eof = conns.remove(0);
    eof.shutdown(std::net::Shutdown::Write).unwrap();
    eof.set_read_timeout(Some(5 * SEC)).unwrap();
    assert_eq!((&eof).read(&mut buf).unwrap(), 0);
    assert!(wait_until(5 * SEC, Duration::from_millis(20), || lab
        .server_established(PORT)
        .len()
        == 6));
}

#[test]
fn connect_many_burst() {
    let lab = Lab::new();
    let _srv = hold(&lab, None);
    let src = IpAddr::V4(lab::client_v4(7));
    let start = Instant::now();
    let conns = lab.connect_many(src, lab::server_v4(PORT), 50, 5 * SEC);
    assert_eq!(conns.len(), 50);
    let conns: Vec<TcpStream> = conns.into_iter().map(|r| r.unwrap()).collect();
    assert!(start.elapsed() < 5 * SEC);
    let ports: BTreeSet<u16> = conns
        .iter()
        .map(|c| c.local_addr().unwrap().port())
        .collect();
    assert_eq!(ports.len(), 50);
    assert!(wait_until(5 * SEC, Duration::from_millis(20), || {
        let e = lab.server_established(PORT);
        e.len() == 50 && e.iter().all(|(_, r)| r.ip() == src)
    }));

    // IPv6 as well, and a larger burst.
    let src6 = IpAddr::V6(lab::client_v6(3));
    let conns6 = lab.connect_many(src6, lab::server_v6(PORT), 200, 10 * SEC);
    assert!(
        conns6.iter().all(|r| r.is_ok()),
        "{:?}",
        conns6.iter().find(|r| r.is_err())
    );
    assert!(wait_until(5 * SEC, Duration::from_millis(20), || lab
        .server_established(PORT)
        .len()
        == 250));
}

#[test]
fn connect_errors_refused_and_timeout() {
    let lab = Lab::new();
    // Nothing listens: RST → refused, at once.
    let err = lab
        .connect(lab::client_v4(0).into(), lab::server_v4(2600), 5 * SEC)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    let err = lab
        .connect(lab::client_v6(0).into(), lab::server_v6(2600), 5 * SEC)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    // Family mismatch.
    let err = lab
        .connect(lab::client_v6(0).into(), lab::server_v4(2600), SEC)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);

    // The server's answers to one source vanish (blackhole route back to
    // it): its SYNs go unanswered and connect times out.
    let _srv = hold(&lab, None);
    let src = lab::client_v4(19);
    lab.server_ns()
        .ip(&["route", "add", "blackhole", &format!("{src}/32")]);
    let start = Instant::now();
    let err = lab
        .connect(src.into(), lab::server_v4(PORT), Duration::from_millis(400))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
    assert!(start.elapsed() >= Duration::from_millis(400) && start.elapsed() < 3 * SEC);
    let many = lab.connect_many(
        src.into(),
        lab::server_v4(PORT),
        5,
        Duration::from_millis(300),
    );
    assert!(
        many.iter()
            .all(|r| r.as_ref().unwrap_err().kind() == ErrorKind::TimedOut)
    );
    // Other sources are unaffected.
    lab.connect(lab::client_v4(18).into(), lab::server_v4(PORT), 5 * SEC)
        .unwrap();
}

#[test]
fn lab_names_sysctls_and_isolation() {
    let lab = Lab::new();
    let (s, c) = (lab.server_ns(), lab.client_ns());
    assert!(s.name().len() <= 15 && c.name().len() <= 15 && lab.server_iface().len() <= 15);
    assert!(s.name().ends_with('s') && c.name().ends_with('c'));
    assert_eq!(s.path(), Path::new("/run/netns").join(s.name()));
    let names = netns_names();
    assert!(names.contains(s.name()) && names.contains(c.name()));

    assert_eq!(c.sysctl("net.ipv4.tcp_syn_retries"), "1");
    assert_eq!(s.sysctl("net.ipv4.tcp_synack_retries"), "1");

    // The veth ends live in the namespaces, not in ours.
    let links = run_checked(Command::new("ip").args(["-o", "link"]));
    assert!(!links.contains(lab.server_iface()) && !links.contains(lab.client_iface()));
    assert!(
        s.ip(&["-o", "addr", "show", "dev", lab.server_iface()])
            .contains("10.77.0.1/24")
    );
    let caddrs = c.ip(&["-o", "addr", "show", "dev", lab.client_iface()]);
    for a in lab::CLIENT_V4 {
        assert!(
            caddrs.contains(&format!("inet {a}/24")),
            "{a} missing:\n{caddrs}"
        );
    }
    for a in lab::CLIENT_V6 {
        assert!(
            caddrs.contains(&format!("inet6 {a}/48")),
            "{a} missing:\n{caddrs}"
        );
    }

    // Netns::run leaves the calling thread where it was.
    let before = thread_netns();
    let inside = s.run(thread_netns);
    assert_eq!(inside, s.id());
    assert_ne!(inside, before);
    assert_eq!(thread_netns(), before);
    // A panic inside run is passed on, and still leaves us where we were.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        s.run(|| panic!("inside run"))
    }));
    assert!(r.is_err());
    assert_eq!(thread_netns(), before);

    // Netns::command runs in the namespace.
    let out = run_checked(c.command("ip").args(["-o", "link", "show"]));
    assert!(out.contains(lab.client_iface()), "{out}");
}

#[test]
fn lab_is_removed_on_drop_and_on_panic() {
    let lab = Lab::new();
    let names = [
        lab.server_ns().name().to_owned(),
        lab.client_ns().name().to_owned(),
    ];
    let mut srv = hold(&lab, None);
    let pid = srv.pid();
    // A stray process in the client namespace, not owned by any guard.
    let mut stray = Command::new("sleep");
    stray.arg("600");
    let stray = spawn_in(lab.client_ns(), None, stray);
    let stray_pid = stray.id();
    std::mem::forget(stray); // only the lab can clean this one up
    drop(lab);
    for n in &names {
        assert!(!netns_names().contains(n), "{n} still in `ip netns list`");
        assert!(!Path::new("/run/netns").join(n).exists());
    }
    // The lab killed both processes (the server's guard only reaps it).
    assert!(
        srv.child().try_wait().is_some(),
        "hold server survived the lab"
    );
    assert!(!Path::new(&format!("/proc/{pid}/ns/net")).exists());
    // The forgotten child is a zombie now (killed, not reaped): reap it.
    let mut st = 0;
    // SAFETY: waitpid on our own child.
    let r = unsafe { libc::waitpid(stray_pid as i32, &mut st, 0) };
    assert_eq!(r, stray_pid as i32);
    assert!(libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL);

    // Unwinding through a test that panics removes everything as well.
    let names = std::sync::Mutex::new(Vec::new());
    let r = std::panic::catch_unwind(|| {
        let lab = Lab::new();
        let ns = OwnedNetns::new();
        names.lock().unwrap().extend([
            lab.server_ns().name().to_owned(),
            lab.client_ns().name().to_owned(),
            ns.name().to_owned(),
        ]);
        let _srv = hold(&lab, None);
        panic!("test failure inside a lab");
    });
    assert!(r.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 3);
    let now = netns_names();
    for n in &names {
        assert!(!now.contains(n), "{n} leaked after a panic");
    }
}

#[test]
fn labs_in_parallel_threads_are_independent() {
    let handles: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                let lab = Lab::new();
                let _srv = hold(&lab, None);
                let s = lab
                    .connect(lab::client_v4(i).into(), lab::server_v4(PORT), 5 * SEC)
                    .unwrap();
                assert!(wait_until(5 * SEC, Duration::from_millis(20), || {
                    lab.server_established(PORT)
                        == vec![(s.peer_addr().unwrap(), s.local_addr().unwrap())]
                }));
                (
                    lab.server_ns().name().to_owned(),
                    lab.server_iface().to_owned(),
                )
            })
        })
        .collect();
    let names: BTreeSet<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(names.len(), 4);
}

#[test]
fn cgroup_is_created_and_removed() {
    let lab = Lab::new();
    let cg = Cgroup::new();
    let path = cg.path().to_owned();
    let root = limiter_tests::cgroup::cgroup2_mount().unwrap();
    assert_eq!(path.parent().unwrap(), root);
    assert!(
        path.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("limiter-test-")
    );
    assert!(path.join("cgroup.procs").exists());
    assert_eq!(cg.id(), std::fs::metadata(&path).unwrap().ino());

    // A hold server in the cgroup.
    let mut srv = HoldServer::start_with(tcp_hold_bin!(), &lab, Some(&cg), &["10.77.0.1:2525"]);
    let pid = srv.pid();
    assert_eq!(cg.procs(), vec![pid]);
    let proc_cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        proc_cg
            .lines()
            .any(|l| l == format!("0::{}", cg.rel_path())),
        "{proc_cg}"
    );
    lab.connect(lab::client_v4(0).into(), lab::server_v4(PORT), 5 * SEC)
        .unwrap();

    // Without a cgroup the child stays in ours.
    let mut sleep = Command::new("sleep");
    sleep.arg("600");
    let mut plain = spawn_in(lab.server_ns(), None, sleep);
    let ours = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let theirs = std::fs::read_to_string(format!("/proc/{}/cgroup", plain.id())).unwrap();
    assert_eq!(
        ours.lines().find(|l| l.starts_with("0::")),
        theirs.lines().find(|l| l.starts_with("0::"))
    );
    plain.kill();

    // A sub-cgroup with a process of its own is cleaned up too.
    let sub = path.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let mut sleep = Command::new("sleep");
    sleep.arg("600");
    let mut in_sub = spawn_in(lab.server_ns(), None, sleep);
    std::fs::write(sub.join("cgroup.procs"), in_sub.id().to_string()).unwrap();

    // Drop the cgroup while processes are still in it: they are killed.
    drop(cg);
    assert!(!path.exists(), "{} still exists", path.display());
    assert!(
        srv.child().wait_timeout(5 * SEC).is_some(),
        "process in the cgroup survived"
    );
    assert!(
        in_sub.wait_timeout(5 * SEC).is_some(),
        "process in the sub-cgroup survived"
    );
}

#[test]
fn cgroup_with_the_test_process_inside_moves_it_out() {
    // Moving the test process into a cgroup would pull every other test
    // running in parallel (and their children) in with it, so this runs in a
    // child process of its own: this test binary, filtered to this test.
    const VAR: &str = "LIMITER_TESTS_SELF_IN_CGROUP";
    if std::env::var_os(VAR).is_some() {
        return self_in_cgroup();
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "cgroup_with_the_test_process_inside_moves_it_out",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(VAR, "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("1 passed"), "{text}");
}

fn self_in_cgroup() {
    let original = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let original = original
        .lines()
        .find(|l| l.starts_with("0::"))
        .unwrap()
        .to_owned();
    let cg = Cgroup::new();
    let path = cg.path().to_owned();
    let me = std::process::id();
    cg.add(me);
    assert!(cg.procs().contains(&me));
    drop(cg); // moves us to the parent (the cgroup2 root), never kills us
    assert!(!path.exists());
    let now = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    assert!(now.lines().any(|l| l == "0::/"), "{now} (was {original})");
}

#[test]
fn bpffs_is_mounted_and_removed() {
    let fs = BpfFs::new();
    let path = fs.path().to_owned();
    assert!(
        is_mounted(&path, "bpf"),
        "{} not in /proc/self/mounts",
        path.display()
    );
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut sfs) }, 0);
    assert_eq!(sfs.f_type as i64, 0xcafe4a11, "not a bpffs");
    // A directory inside (as a daemon's pin path would be).
    std::fs::create_dir(path.join("limiter")).unwrap();
    let other = BpfFs::new();
    assert_ne!(other.path(), fs.path());
    assert!(
        !other.path().join("limiter").exists(),
        "bpffs instances are shared"
    );
    drop(fs);
    drop(other);
    assert!(!is_mounted(&path, "bpf"));
    assert!(!path.exists());
}

#[test]
fn spawn_in_joins_the_namespace_and_captures_output() {
    let lab = Lab::new();
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "ip -o link show; echo to-stderr >&2; readlink /proc/self/ns/net",
    ]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = spawn_in(lab.server_ns(), None, cmd);
    child.capture();
    assert_eq!(
        child
            .wait_for_line(5 * SEC, |l| l == "to-stderr")
            .as_deref(),
        Some("to-stderr")
    );
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains(lab.server_iface()), "{stdout}");
    assert!(
        stdout.contains(&format!("net:[{}]", lab.server_ns().id().1)),
        "{stdout}"
    );
    assert_eq!(String::from_utf8(out.stderr).unwrap(), "to-stderr\n");

    // terminate(): SIGTERM first.
    let mut sleep = Command::new("sleep");
    sleep.arg("600");
    let mut child = spawn_in(lab.client_ns(), None, sleep);
    assert!(child.try_wait().is_none());
    let st = child.terminate(5 * SEC);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(libc::SIGTERM));

    // A HoldServer that cannot bind reports its error.
    let r = std::panic::catch_unwind(|| {
        HoldServer::start_with(tcp_hold_bin!(), &lab, None, &["192.0.2.1:25"]);
    });
    let msg = r.unwrap_err();
    let msg = msg.downcast_ref::<String>().unwrap();
    assert!(msg.contains("cannot listen on 192.0.2.1:25"), "{msg}");
}

#[test]
fn tcp_hold_path_finds_the_binary() {
    let found = tcp_hold_path().canonicalize().unwrap();
    assert_eq!(found, tcp_hold_bin!().canonicalize().unwrap());
    let lab = Lab::new();
    let _srv = HoldServer::start(&lab, None, &["[fd77::1]:2525"]);
    lab.connect(lab::client_v6(4).into(), lab::server_v6(PORT), 5 * SEC)
        .unwrap();
}

#[test]
fn netns_handles() {
    let ns = OwnedNetns::new();
    let h: Netns = (*ns).clone();
    assert!(netns_names().contains(h.name()));
    // Loopback is up in a fresh namespace.
    assert!(h.ip(&["-o", "link", "show", "lo"]).contains("UP"));
    let name = h.name().to_owned();
    drop(ns);
    assert!(!netns_names().contains(&name));
}
