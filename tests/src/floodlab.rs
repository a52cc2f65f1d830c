//! [`FloodLab`]: a generator namespace and a server namespace joined by a
//! veth, for the flood benchmark. The server's receive path runs in a
//! threaded-NAPI kernel thread pinned to one core, so that its packet rate
//! and CPU time can be read off that one thread; the generator
//! (BPF_PROG_TEST_RUN live frames of `flood_gen`) runs on the other core.

use std::{
    net::Ipv4Addr,
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, XdpMode};
use limiter::baseline::{Baseline, FLOOD_GEN};

use crate::{OwnedNetns, run_checked, wait_for};

/// The server's address; the flood's sources are 10.128.0.0/16.
pub const SERVER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const GENERATOR: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const FLOOD_BASE: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 0);
/// The flood's `i`-th source address.
pub fn flood_source(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(FLOOD_BASE) + i)
}

/// The core the server's receive path is pinned to, and the generator's.
pub const SERVER_CPU: usize = 1;
const GENERATOR_CPU: usize = 0;

/// The two namespaces, removed on drop (which also frees their conntrack
/// tables, given time).
pub struct FloodLab {
    pub server: OwnedNetns,
    pub generator: OwnedNetns,
    pub server_iface: String,
    pub generator_iface: String,
    generator_ifindex: u32,
    /// The server veth's NAPI kernel thread.
    napi_pid: u32,
    template: Vec<u8>,
}

fn mac(ns: &OwnedNetns, iface: &str) -> [u8; 6] {
    let out = ns.ip(&["-o", "link", "show", "dev", iface]);
    let text = out
        .split("link/ether ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("a MAC address");
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(part, 16).expect("hex");
    }
    mac
}

/// A SYN from FLOOD_BASE:1024 to SERVER:25, checksums right.
fn template(destination: [u8; 6], source: [u8; 6]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(54);
    frame.extend_from_slice(&destination);
    frame.extend_from_slice(&source);
    frame.extend_from_slice(&[0x08, 0x00]);
    let packet =
        crate::flood::syn_packet(FLOOD_BASE, 1024, std::net::SocketAddrV4::new(SERVER, 25));
    frame.extend_from_slice(&packet);
    // The generator updates the checksums, it does not compute them: they
    // must be right to begin with.
    assert_eq!(crate::flood::fold(crate::flood::sum(&frame[14..34])), 0);
    frame
}

/// Pins thread or process `pid` (0: the caller) to `cpu`.
pub fn pin(pid: u32, cpu: usize) {
    // SAFETY: a zeroed cpu_set_t, filled by the libc macros' equivalent.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(pid as i32, size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "pinning {pid} to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Nanoseconds a thread has run on a CPU (from /proc/PID/schedstat, which
/// counts in nanoseconds where /proc/PID/stat counts in 10 ms ticks).
pub fn cpu_nanoseconds(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

impl Default for FloodLab {
    fn default() -> Self {
        FloodLab::new()
    }
}

impl FloodLab {
    /// The two namespaces and the veth between them (root).
    pub fn new() -> FloodLab {
        let server = OwnedNetns::new();
        let generator = OwnedNetns::new();
        let id = crate::next_id();
        let server_iface = format!("fb{}x{id}s", std::process::id());
        let generator_iface = format!("fb{}x{id}g", std::process::id());
        run_checked(
            std::process::Command::new("ip")
                .args(["link", "add", &server_iface, "netns", server.name()])
                .args([
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &generator_iface,
                    "netns",
                    generator.name(),
                ]),
        );
        server.ip(&["addr", "add", &format!("{SERVER}/24"), "dev", &server_iface]);
        generator.ip(&[
            "addr",
            "add",
            &format!("{GENERATOR}/24"),
            "dev",
            &generator_iface,
        ]);
        for (ns, iface) in [(&server, &server_iface), (&generator, &generator_iface)] {
            ns.ip(&["link", "set", "lo", "up"]);
            ns.ip(&["link", "set", iface, "up"]);
        }
        // NAPI on the server's end (GRO turns it on for a veth without XDP),
        // in a kernel thread of its own.
        run_checked(
            server
                .command("ethtool")
                .args(["-K", &server_iface, "gro", "on"]),
        );
        run_checked(
            std::process::Command::new("ip")
                .args(["netns", "exec", server.name(), "sh", "-c"])
                .arg(format!("echo 1 > /sys/class/net/{server_iface}/threaded")),
        );
        let thread_name = format!("napi/{server_iface}");
        let napi_pid = wait_for(Duration::from_secs(5), || {
            std::fs::read_dir("/proc").ok()?.find_map(|entry| {
                let entry = entry.ok()?;
                let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
                let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
                comm.trim().starts_with(&thread_name).then_some(pid)
            })
        })
        .unwrap_or_else(|| panic!("no {thread_name} kernel thread"));
        pin(napi_pid, SERVER_CPU);
        let generator_ifindex = generator
            .ip(&["-o", "link", "show", "dev", &generator_iface])
            .split(':')
            .next()
            .and_then(|i| i.trim().parse().ok())
            .expect("an ifindex");
        let template = template(
            mac(&server, &server_iface),
            mac(&generator, &generator_iface),
        );
        FloodLab {
            server,
            generator,
            server_iface,
            generator_iface,
            generator_ifindex,
            napi_pid,
            template,
        }
    }

    /// The server's NAPI thread's CPU time so far, in seconds.
    pub fn server_cpu_seconds(&self) -> f64 {
        cpu_nanoseconds(self.napi_pid) as f64 / 1e9
    }

    /// Frames the server's end has taken off the veth (whatever became of
    /// them): what its NAPI thread got through.
    pub fn server_frames(&self) -> u64 {
        let ethtool = run_checked(
            self.server
                .command("ethtool")
                .args(["-S", &self.server_iface]),
        );
        ethtool
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rx_queue_0_xdp_packets:"))
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .sum()
    }

    /// Sends SYNs from `sources` addresses as fast as it can (or, with
    /// `rate`, at that many a second) for `duration`, on the generator's
    /// core. Returns the frames sent.
    pub fn flood(
        &self,
        generator: &mut Baseline,
        sources: u32,
        duration: Duration,
        rate: Option<u64>,
    ) -> u64 {
        generator
            .set_flood_sources(sources)
            .expect("setting the sources");
        let before = generator.flood_count().expect("the generator's count");
        let ifindex = self.generator_ifindex;
        let template = self.template.clone();
        let program = generator.program(FLOOD_GEN).expect("the generator");
        let netns = self.generator.open();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    // SAFETY: a valid namespace fd; only this thread moves.
                    let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                    pin(0, GENERATOR_CPU);
                    // struct xdp_md: data_end is the frame's length (the
                    // kernel insists), and the frames come in on the
                    // generator's end, so that XDP_TX sends them out of it.
                    let mut context = [0u8; 24];
                    context[4..8].copy_from_slice(&(template.len() as u32).to_ne_bytes());
                    context[12..16].copy_from_slice(&ifindex.to_ne_bytes());
                    let started = Instant::now();
                    let mut sent: u64 = 0;
                    let batch: u32 = match rate {
                        Some(rate) => (rate / 20).max(1) as u32,
                        None => 1 << 18,
                    };
                    while started.elapsed() < duration {
                        program
                            .test_run(TestRunOptions {
                                data_in: Some(&template),
                                ctx_in: Some(&context),
                                repeat: batch,
                                attrs: TestRunAttrs::new().xdp_live_frames(64),
                                ..Default::default()
                            })
                            .expect("BPF_PROG_TEST_RUN live frames");
                        sent += batch as u64;
                        if let Some(rate) = rate {
                            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                            if let Some(ahead) = due.checked_sub(started.elapsed()) {
                                std::thread::sleep(ahead);
                            }
                        }
                    }
                })
                .join()
                .expect("the generator thread");
        });
        generator.flood_count().expect("the generator's count") - before
    }

    /// Attaches a baseline program to the server's end.
    pub fn attach_baseline(&self, baseline: &mut Baseline, name: &'static str) {
        let iface = self.server_iface.clone();
        self.server.run(move || {
            baseline
                .attach(name, &iface, XdpMode::Driver)
                .expect("attaching a baseline program")
        });
    }
}
