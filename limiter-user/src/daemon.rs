//! `limiter run`: loads the programs, attaches them, counts what already
//! exists, expires abandoned handshakes, and answers the control socket.

use std::{
    collections::HashSet,
    io::ErrorKind,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use limiter_common::maps::{FLOW_SEEDED, FlowKey, SourceKey, control as op};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
};

use crate::{
    config::{Config, LimitValue},
    control::{ConnectorStatus, InterfaceStatus, Reply, Request, Status},
    kernel::{AttachedMode, Kernel, TableSizes, XdpModeRequest, error_chain},
    selection::{SelectionTable, from_addr},
    sockdiag,
};

/// Default config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/limiter/connectors.toml";
/// Default pin directory.
pub const DEFAULT_BPFFS_PATH: &str = "/sys/fs/bpf/limiter";
/// An idle source (no live connection) is forgotten after this long.
const SOURCE_IDLE_FORGET: Duration = Duration::from_secs(120);
/// Longest accepted control request line.
const MAX_REQUEST_LEN: u64 = 64 * 1024;

/// What `limiter run` was asked to do.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub ifaces: Vec<String>,
    /// `None`: the default path, falling back to the built-in default
    /// connector when that file does not exist.
    pub config: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
    pub bpffs: PathBuf,
    pub control: PathBuf,
    pub xdp_mode: XdpModeRequest,
}

/// The daemon's state, shared by the control socket and the sweeper.
struct Daemon {
    kernel: Kernel,
    config: Config,
    config_source: String,
    /// Connector `i` of `config` has kernel id `ids[i]`.
    ids: Vec<u32>,
    table: SelectionTable,
    cgroup: PathBuf,
    interfaces: Vec<(String, AttachedMode)>,
    started: Instant,
    /// Connections counted from the socket table, which only the daemon
    /// sees close.
    seeded: HashSet<FlowKey>,
    warned_untracked: bool,
    last_source_gc: Instant,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    let (config, config_source) = load_config(options.config.as_deref())?;
    if options.ifaces.is_empty() {
        bail!("no interface given: use --iface IFACE (repeatable)");
    }
    let cgroup = match &options.cgroup {
        Some(path) => path.clone(),
        None => cgroup2_root().context("finding the cgroup v2 mount (use --cgroup)")?,
    };
    if !cgroup.join("cgroup.procs").exists() {
        bail!("{} is not a cgroup v2 directory", cgroup.display());
    }
    let listener = bind_control(&options.control)?;
    ensure_bpffs(&options.bpffs)?;

    let mut kernel = Kernel::load(TableSizes::default(), Some(&options.bpffs))
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let ids: Vec<u32> = (0..config.connectors.len() as u32).collect();
    let table = SelectionTable::build_with_ids(&config, &ids);
    kernel
        .set_settings(
            &config,
            netns_cookie().context("reading the network namespace cookie")?,
        )
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    kernel
        .install(&config, &ids, &table)
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    // sock_ops first: from then on every completed handshake is seen, so the
    // seeding below misses nothing.
    kernel
        .attach_sock_ops(&cgroup)
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let mut interfaces = Vec::new();
    for iface in &options.ifaces {
        let mode = kernel
            .attach_xdp(iface, options.xdp_mode)
            .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
        log::info!("enforcing on {iface} ({} XDP)", mode.name());
        interfaces.push((iface.clone(), mode));
    }

    let mut daemon = Daemon {
        kernel,
        config,
        config_source,
        ids,
        table,
        cgroup,
        interfaces,
        started: Instant::now(),
        seeded: HashSet::new(),
        warned_untracked: false,
        last_source_gc: Instant::now(),
    };
    let seeded = daemon.seed_from_socket_table()?;
    log::info!(
        "counting {seeded} established connection(s) found on bound ports; {} connector(s) from {}",
        daemon.config.connectors.len(),
        daemon.config_source
    );
    let sweep_every = sweep_interval(daemon.config.handshake_timeout);
    let daemon = Arc::new(Mutex::new(daemon));

    let control_path = options.control.clone();
    let server = tokio::spawn(serve_control(listener, daemon.clone()));
    let sweeper = tokio::spawn(sweep_forever(daemon.clone(), sweep_every));

    let mut terminate = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    tokio::select! {
        _ = terminate.recv() => log::info!("SIGTERM: detaching"),
        _ = interrupt.recv() => log::info!("SIGINT: detaching"),
        result = sweeper => {
            // The sweeper only ends on an error, which it has reported.
            if let Ok(Err(e)) = result {
                log::error!("{e:#}");
            }
        }
    }
    server.abort();
    let _ = std::fs::remove_file(&control_path);
    // Dropping the kernel handle detaches the programs and removes the pins.
    drop(daemon);
    Ok(())
}

fn load_config(path: Option<&Path>) -> anyhow::Result<(Config, String)> {
    match path {
        Some(path) => {
            let config = Config::load(path)?;
            Ok((config, path.display().to_string()))
        }
        None => {
            let default = Path::new(DEFAULT_CONFIG_PATH);
            if default.exists() {
                Ok((Config::load(default)?, DEFAULT_CONFIG_PATH.to_string()))
            } else {
                log::info!(
                    "{DEFAULT_CONFIG_PATH} does not exist: using the built-in \"Default Frontend\" connector"
                );
                Ok((Config::builtin_default(), "built-in default".to_string()))
            }
        }
    }
}

/// The mount point of the cgroup v2 hierarchy, from /proc/self/mounts.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _source = fields.next()?;
            let target = fields.next()?;
            let fstype = fields.next()?;
            (fstype == "cgroup2").then(|| PathBuf::from(target))
        })
        .next()
        .context("no cgroup2 file system is mounted")
}

/// Makes sure `dir`'s parent is on a bpffs, mounting one at /sys/fs/bpf
/// when that is where it should be and nothing is mounted there yet.
fn ensure_bpffs(dir: &Path) -> anyhow::Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let parent = dir
        .parent()
        .with_context(|| format!("--bpffs {} has no parent directory", dir.display()))?;
    let on_bpffs = |path: &Path| -> bool {
        let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        // SAFETY: a valid C string and a zeroed out-parameter.
        let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
        unsafe { libc::statfs(c_path.as_ptr(), &mut stat) == 0 && stat.f_type == BPF_FS_MAGIC }
    };
    if on_bpffs(parent) {
        return Ok(());
    }
    if parent == Path::new("/sys/fs/bpf") {
        std::fs::create_dir_all(parent).context("creating /sys/fs/bpf")?;
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .context("running mount")?;
        if status.success() && on_bpffs(parent) {
            log::info!("mounted a bpffs at /sys/fs/bpf");
            return Ok(());
        }
        bail!("cannot mount a bpffs at /sys/fs/bpf");
    }
    bail!(
        "--bpffs {}: {} is not a bpffs (mount one with `mount -t bpf bpf {}`)",
        dir.display(),
        parent.display(),
        parent.display()
    )
}

/// The cookie of the daemon's network namespace, which is the namespace of
/// the interfaces it attaches to and of the sockets it counts.
fn netns_cookie() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and an out-parameter of the given size.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Binds the control socket, refusing to start when another daemon answers
/// on it.
fn bind_control(path: &Path) -> anyhow::Result<UnixListener> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!(
            "another limiter daemon is running on {} (stop it first)",
            path.display()
        );
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(listener)
}

fn sweep_interval(handshake_timeout: Duration) -> Duration {
    (handshake_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// `bpf_ktime_get_ns()` now.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

async fn sweep_forever(daemon: Arc<Mutex<Daemon>>, every: Duration) -> anyhow::Result<()> {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let daemon = daemon.clone();
        tokio::task::spawn_blocking(move || {
            let mut daemon = daemon.lock().expect("daemon lock");
            daemon.sweep()
        })
        .await
        .context("sweeper task")??;
    }
}

impl Daemon {
    fn bound_ports(&self) -> HashSet<u16> {
        self.table.ports.iter().copied().collect()
    }

    /// Counts the established connections on bound ports that are already
    /// there. Returns how many were counted.
    fn seed_from_socket_table(&mut self) -> anyhow::Result<usize> {
        let flows =
            sockdiag::established(&self.bound_ports()).context("reading the socket table")?;
        let mut counted = 0;
        for flow in flows {
            match self
                .kernel
                .seed(&flow)
                .map_err(|e| anyhow::anyhow!(error_chain(&e)))?
            {
                op::DONE => {
                    self.seeded.insert(flow);
                    counted += 1;
                }
                op::FULL => log::warn!(
                    "the established table is full; not counting {}",
                    show(&flow)
                ),
                _ => {}
            }
        }
        Ok(counted)
    }

    /// One round of housekeeping: expires abandoned handshakes, releases
    /// seeded connections that closed, forgets idle sources.
    fn sweep(&mut self) -> anyhow::Result<()> {
        let now = monotonic_ns();
        let timeout = self.config.handshake_timeout.as_nanos() as u64;
        let mut expired = Vec::new();
        for (flow, value) in self.kernel.handshakes() {
            if now.saturating_sub(value.since_ns) >= timeout
                && self
                    .kernel
                    .expire_handshake(&flow)
                    .map_err(|e| anyhow::anyhow!(error_chain(&e)))?
            {
                expired.push(flow);
            }
        }
        if !expired.is_empty() || !self.seeded.is_empty() {
            let live: HashSet<FlowKey> = sockdiag::established(&self.bound_ports())
                .context("reading the socket table")?
                .into_iter()
                .collect();
            // A handshake that expired although its connection is up: the
            // server's socket is outside the tracked cgroup (or completed
            // just now). Count it and watch it here.
            for flow in expired.iter().filter(|f| live.contains(f)) {
                if self
                    .kernel
                    .seed(flow)
                    .map_err(|e| anyhow::anyhow!(error_chain(&e)))?
                    == op::DONE
                {
                    self.seeded.insert(*flow);
                    if !self.warned_untracked {
                        self.warned_untracked = true;
                        log::warn!(
                            "connection {} completed without passing the sock_ops program: is the mail server in cgroup {}? Counting it by polling instead.",
                            show(flow),
                            self.cgroup.display()
                        );
                    }
                }
            }
            let gone: Vec<FlowKey> = self
                .seeded
                .iter()
                .filter(|f| !live.contains(f))
                .copied()
                .collect();
            for flow in gone {
                self.kernel
                    .release_seeded(&flow)
                    .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
                self.seeded.remove(&flow);
            }
            // Seeded entries that sock_ops took over (the 4-tuple was reused).
            let still_seeded: HashSet<FlowKey> = self
                .kernel
                .established()
                .into_iter()
                .filter(|(_, v)| v.flags & FLOW_SEEDED != 0)
                .map(|(k, _)| k)
                .collect();
            self.seeded.retain(|f| still_seeded.contains(f));
        }
        if self.last_source_gc.elapsed() >= SOURCE_IDLE_FORGET / 4 {
            self.last_source_gc = Instant::now();
            self.forget_idle_sources(now);
        }
        Ok(())
    }

    /// Deletes source entries that have held nothing for a long time, so
    /// that a flood of spoofed sources does not fill the table for good.
    fn forget_idle_sources(&mut self, now: u64) {
        let idle = SOURCE_IDLE_FORGET.as_nanos() as u64;
        let stale: Vec<SourceKey> = self
            .kernel
            .sources()
            .into_iter()
            .filter(|(_, count)| {
                count.live == 0 && now.saturating_sub(count.last_change_ns) >= idle
            })
            .map(|(key, _)| key)
            .collect();
        for key in stale {
            let _ = self.kernel.forget_source(&key);
        }
    }

    fn status(&self) -> anyhow::Result<Status> {
        let mut connectors = Vec::new();
        let mut live_total = 0u64;
        for (connector, id) in self.config.connectors.iter().zip(&self.ids) {
            let live = self
                .kernel
                .connector_live(*id)
                .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
            live_total += live as u64;
            connectors.push(ConnectorStatus {
                name: connector.name.clone(),
                bindings: connector.bindings.iter().map(|b| b.to_string()).collect(),
                remote_ip_ranges: connector
                    .remote_ip_ranges
                    .iter()
                    .map(|r| r.to_string())
                    .collect(),
                max_inbound_connection: limit_json(connector.limits.max_inbound_connection),
                max_inbound_connection_per_source: limit_json(
                    connector.limits.max_inbound_connection_per_source,
                ),
                max_inbound_connection_percentage_per_source: connector
                    .limits
                    .max_inbound_connection_percentage_per_source,
                action: connector.action.name().to_string(),
                live,
            });
        }
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_seconds: self.started.elapsed().as_secs(),
            config: self.config_source.clone(),
            cgroup: self.cgroup.display().to_string(),
            pins: self.kernel.pin_dir().map(|p| p.display().to_string()),
            interfaces: self
                .interfaces
                .iter()
                .map(|(name, mode)| InterfaceStatus {
                    name: name.clone(),
                    xdp_mode: mode.name().to_string(),
                })
                .collect(),
            connectors,
            live_total,
            handshakes: self.kernel.handshakes().len() as u64,
            established: self.kernel.established().len() as u64,
        })
    }

    fn handle(&mut self, request: Request) -> Reply {
        let result = match request {
            Request::Status => self
                .status()
                .and_then(|s| serde_json::to_value(s).map_err(Into::into)),
        };
        match result {
            Ok(value) => Reply::Ok(value),
            Err(e) => Reply::Error(format!("{e:#}")),
        }
    }
}

fn limit_json(raw: u32) -> serde_json::Value {
    if raw == limiter_common::UNLIMITED {
        serde_json::Value::from(LimitValue::display(raw))
    } else {
        serde_json::Value::from(raw)
    }
}

/// A flow for people: `remote -> local:port`.
fn show(flow: &FlowKey) -> String {
    let remote = std::net::SocketAddr::new(from_addr(&flow.remote), flow.remote_port);
    let local = std::net::SocketAddr::new(from_addr(&flow.local), flow.local_port);
    format!("{remote} -> {local}")
}

async fn serve_control(listener: UnixListener, daemon: Arc<Mutex<Daemon>>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::warn!("control socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(serve_client(stream, daemon.clone()));
    }
}

async fn serve_client(stream: UnixStream, daemon: Arc<Mutex<Daemon>>) {
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == 0 => {}
        _ => {
            let (_, mut writer) = stream.into_split();
            let _ = write_reply(
                &mut writer,
                &Reply::Error("only root may use the control socket".into()),
            )
            .await;
            return;
        }
    }
    let (reader, mut writer) = stream.into_split();
    let mut lines = BufReader::new(tokio::io::AsyncReadExt::take(reader, MAX_REQUEST_LEN)).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                let daemon = daemon.clone();
                tokio::task::spawn_blocking(move || {
                    daemon.lock().expect("daemon lock").handle(request)
                })
                .await
                .unwrap_or_else(|e| Reply::Error(format!("internal error: {e}")))
            }
            Err(e) => Reply::Error(format!("malformed request: {e}")),
        };
        if write_reply(&mut writer, &reply).await.is_err() {
            return;
        }
    }
}

async fn write_reply(
    writer: &mut tokio::net::unix::OwnedWriteHalf,
    reply: &Reply,
) -> std::io::Result<()> {
    let mut line = serde_json::to_string(reply).map_err(std::io::Error::other)?;
    line.push('\n');
    writer.write_all(line.as_bytes()).await
}
