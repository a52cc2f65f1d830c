//! `limiter run`: checks what it can, loads the programs, attaches them,
//! counts what already exists, resets the connections the kernel judged
//! over a cap, and answers the control socket. A start that fails undoes
//! what it made.

use std::{
    collections::{HashMap, HashSet},
    io::ErrorKind,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use aya::maps::{MapData, RingBuf};
use limiter_common::maps::{
    ConnKey, FLOW_SEEDED, FlowKey, MAX_CONNECTORS, REPORT_INTERVAL_NS, RejectionEvent,
    ResetRequest, SourceKey, control as op, gate, stat,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Interest, unix::AsyncFd},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
};

use crate::{
    config::Config,
    control::{ConnectorStatus, InterfaceStatus, Reloaded, Reply, Request, Status},
    edit::ConfigDocument,
    events::{Event, EventHub, Folder, SyslogSink},
    kernel::{
        AttachedMode, Kernel, LinkLayer, TableSizes, XdpModeRequest, error_chain, monotonic_ns,
    },
    metrics, netns, notify,
    pins::PinDir,
    preflight::{self, Bpffs},
    report::{self, Connectors, limit_json},
    resets::Resetter,
    responder::{self, Replies},
    selection::{SelectionTable, canonical, from_addr},
    sockdiag,
};

/// Default config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/limiter/connectors.toml";
/// Default pin directory.
pub const DEFAULT_BPFFS_PATH: &str = "/sys/fs/bpf/limiter";
/// An idle source (no live connection) is forgotten after this long.
const SOURCE_IDLE_FORGET: Duration = Duration::from_secs(120);
/// ...or after this long when the source table is half full.
const PRESSURE_SOURCE_IDLE: Duration = Duration::from_secs(1);
/// The counts are checked against the socket table this often, as a safety
/// net: a correction is logged and counted (`reconciled`).
const RECONCILE_EVERY: Duration = Duration::from_secs(30);
/// Housekeeping runs this often: seeded connections that closed, resets
/// that found the ring full, connections outside the tracked cgroup.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
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
    /// A group whose members may use the control socket besides root.
    pub control_group: Option<String>,
    pub xdp_mode: XdpModeRequest,
    /// Where events go; `None`: off.
    pub syslog: Option<crate::logging::Destination>,
    /// Repeats of a (connector, source, rule) are folded over this period.
    pub event_period: Duration,
    /// Where to serve Prometheus metrics.
    pub metrics: Option<std::net::SocketAddr>,
    /// Leave the programs attached and pinned at exit, for a restart
    /// without a gap.
    pub keep_attached: bool,
    /// Entries of the source and established tables.
    pub table_entries: u32,
    /// aya-log's level for the kernel programs' diagnostics (0: off).
    pub kernel_log_level: u8,
    /// Start on a config without connectors, and let the last connector be
    /// removed: enforcing nothing is then what the operator asked for.
    pub allow_empty: bool,
}

/// The daemon's state, shared by the control socket and the sweeper.
struct Daemon {
    kernel: Kernel,
    config: Config,
    config_source: String,
    /// The config as an editable document, and where changes are written.
    document: ConfigDocument,
    config_path: PathBuf,
    /// The file's text as last read or written, to notice edits by hand.
    config_on_disk: Option<String>,
    /// Connector ids handed out since start, reused only when all are.
    used_ids: HashSet<u32>,
    /// Connector `i` of `config` has kernel id `ids[i]`.
    ids: Vec<u32>,
    table: SelectionTable,
    cgroup: PathBuf,
    interfaces: Vec<(String, AttachedMode)>,
    started: Instant,
    /// The daemon's network namespace: the one whose socket table it reads.
    netns_cookie: u64,
    resetter: Arc<Resetter>,
    /// Undeclared NAT targets already warned about.
    warned_forwards: HashSet<String>,
    /// Connections counted from the socket table, which only the daemon
    /// sees close.
    seeded: HashSet<FlowKey>,
    /// Held connections on bound ports that were not counted at the last
    /// sweep: counted at the next if they still are not (their server is
    /// outside the tracked cgroup).
    uncounted: HashSet<FlowKey>,
    warned_untracked: bool,
    last_source_gc: Instant,
    last_reconcile: Instant,
    /// The responder of action `reply`, once a connector uses it.
    replies: Option<Arc<Replies>>,
    /// Why the responder could not start (said once; connectors with
    /// action reply drop instead).
    replies_unavailable: Option<String>,
    /// `--allow-empty`: a config without connectors is accepted.
    allow_empty: bool,
    /// `--config`, as given: what a reload reads again.
    config_arg: Option<PathBuf>,
}

/// What a start made before the kernel's own undo list: undone if the
/// start fails.
#[derive(Default)]
struct Made {
    mounted: Option<PathBuf>,
    control_socket: Option<PathBuf>,
}

impl Made {
    fn undo(self) {
        if let Some(path) = self.control_socket {
            let _ = std::fs::remove_file(path);
        }
        if let Some(at) = self.mounted {
            preflight::unmount_bpffs(&at);
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    // Everything that can be checked, before anything is made.
    let loaded = load_config(options.config.as_deref())?;
    if loaded.config.connectors.is_empty() {
        if !options.allow_empty {
            bail!(
                "{}: no connectors, so limiter would enforce nothing: add a [[connector]], or start with --allow-empty",
                loaded.source
            );
        }
        log::warn!(
            "{}: no connectors (--allow-empty): nothing is enforced until `limiter connector new` adds one",
            loaded.source
        );
    }
    if options.ifaces.is_empty() {
        bail!("no interface given: use --iface IFACE (repeatable)");
    }
    let links = options
        .ifaces
        .iter()
        .map(|iface| preflight::interface(iface).map(|link| (iface.clone(), link)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cgroup = match &options.cgroup {
        Some(path) => path.clone(),
        None => cgroup2_root().context("finding the cgroup v2 mount (use --cgroup)")?,
    };
    preflight::cgroup(&cgroup)?;
    let control_gid = match &options.control_group {
        Some(group) => Some(group_id(group)?),
        None => None,
    };
    preflight::control_socket(&options.control)?;
    let bpffs = preflight::bpffs(&options.bpffs)?;
    let pins = PinDir::open(&options.bpffs)?;
    let metrics_listener = options.metrics.map(preflight::metrics).transpose()?;
    let netns_cookie = netns::current_cookie().context("reading the network namespace's cookie")?;
    sockdiag::can_destroy().map_err(|e| match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => anyhow!(
            "this kernel cannot reset a connection from outside it (sock_diag SOCK_DESTROY, CONFIG_INET_DIAG_DESTROY): limiter needs that to reset connections judged over a cap"
        ),
        _ => anyhow!("resetting connections (sock_diag SOCK_DESTROY): {e} (run as root)"),
    })?;
    if loaded.document.sets("handshake_timeout") {
        log::info!(
            "{}: handshake_timeout is no longer used: a connection counts from the moment its handshake completes",
            loaded.source
        );
    }

    // Before anything answers: a client that sees the control socket may
    // stop the daemon at once, and must find it handling SIGTERM.
    let mut terminate = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let hangup = signal(SignalKind::hangup()).context("installing a SIGHUP handler")?;

    // Then make things, undoing them all if a step fails.
    let mut made = Made::default();
    let started = start(
        &options,
        loaded,
        &links,
        &cgroup,
        &pins,
        bpffs,
        control_gid,
        netns_cookie,
        &mut made,
    );
    let (mut daemon, listener) = match started {
        Ok(started) => started,
        Err(e) => {
            made.undo();
            return Err(e);
        }
    };
    let ring = daemon
        .kernel
        .take_events()
        .context("the event ring is missing")?;
    let resets = daemon
        .kernel
        .take_resets()
        .context("the reset ring is missing")?;
    let kernel_log = daemon
        .kernel
        .take_kernel_log(options.kernel_log_level)
        .context("reading the kernel programs' log (--kernel-log-level)")?;
    let reset_with = daemon.resetter.clone();
    let daemon = Arc::new(Mutex::new(daemon));
    let hub = Arc::new(EventHub::default());

    let mut tasks = Vec::new();
    if let Some(listener) = metrics_listener {
        let listener = tokio::net::TcpListener::from_std(listener).context("--metrics")?;
        if let Ok(addr) = listener.local_addr() {
            log::info!("serving metrics at http://{addr}/metrics");
        }
        let (daemon, hub) = (daemon.clone(), hub.clone());
        let snapshot = move || -> Result<metrics::Snapshot, String> {
            daemon
                .lock()
                .expect("daemon lock")
                .metrics(&hub)
                .map_err(|e| format!("{e:#}"))
        };
        tasks.push(tokio::spawn(metrics::serve(listener, Arc::new(snapshot))));
    }
    let control_path = options.control.clone();
    tasks.push(tokio::spawn(serve_control(
        listener,
        daemon.clone(),
        hub.clone(),
        control_gid,
    )));
    let reporter = tokio::spawn(report_events(
        ring,
        daemon.clone(),
        hub.clone(),
        options.syslog.clone(),
        options.event_period,
    ));
    let resetter = tokio::spawn(reset_connections(resets, daemon.clone(), reset_with));
    let sweeper = tokio::spawn(sweep_forever(daemon.clone()));
    if let Some(kernel_log) = kernel_log {
        tasks.push(tokio::spawn(tell_kernel_log(kernel_log)));
    }
    tasks.push(tokio::spawn(keep_replying(daemon.clone())));
    tasks.push(tokio::spawn(reload_on_hangup(hangup, daemon.clone())));
    let status = daemon.clone();
    tasks.push(notify::ready(move || {
        status.lock().expect("daemon lock").status()
    }));

    let (why, failure) = tokio::select! {
        _ = terminate.recv() => ("SIGTERM", None),
        _ = interrupt.recv() => ("SIGINT", None),
        result = sweeper => ("the sweeper ended", Some(("sweeper", result))),
        result = reporter => ("the event reader ended", Some(("event reader", result))),
        result = resetter => ("the resetter ended", Some(("resetter", result))),
    };
    notify::stopping();
    for task in tasks {
        task.abort();
    }
    let _ = std::fs::remove_file(&control_path);
    // One line that says what happens to enforcement.
    if options.keep_attached {
        log::info!(
            "{why}: stopping; the programs stay attached (--keep-attached): they keep enforcing, and the next `limiter run` adopts them"
        );
    } else {
        log::info!("{why}: stopping and detaching the programs");
        if let Err(e) = daemon.lock().expect("daemon lock").kernel.detach() {
            log::error!("detaching: {}", error_chain(&e));
        }
    }
    match failure {
        None => Ok(()),
        Some((what, Ok(Err(e)))) => Err(e.context(format!("the {what} failed"))),
        Some((what, Ok(Ok(())))) => bail!("the {what} stopped"),
        Some((what, Err(e))) => bail!("the {what} failed: {e}"),
    }
}

/// Makes what a run needs, in order: the bpffs mount, the control socket,
/// the programs and maps, the config in the kernel, sock_ops, XDP on each
/// interface, the counts of the connections that exist. Anything it made
/// is recorded in `made` (or in the kernel's own undo list) until the start
/// succeeds; a failure rolls the kernel back here and leaves `made` to the
/// caller.
#[expect(
    clippy::too_many_arguments,
    reason = "the checked inputs of a start, once each"
)]
fn start(
    options: &RunOptions,
    loaded: LoadedConfig,
    links: &[(String, LinkLayer)],
    cgroup: &Path,
    pins: &PinDir,
    bpffs: Bpffs,
    control_gid: Option<u32>,
    netns_cookie: u64,
    made: &mut Made,
) -> anyhow::Result<(Daemon, UnixListener)> {
    if let Bpffs::Mount(at) = bpffs {
        preflight::mount_bpffs(&at)?;
        made.mounted = Some(at);
    }
    let listener = bind_control(&options.control, control_gid)?;
    made.control_socket = Some(options.control.clone());

    let sizes = TableSizes {
        sources: options.table_entries,
        established: options.table_entries,
    };
    let mut kernel =
        Kernel::load_with_log(sizes, Some(pins), options.kernel_log_level).map_err(|e| {
            anyhow!(
                "loading the programs and maps (--table-entries {}): {}",
                options.table_entries,
                error_chain(&e)
            )
        })?;
    let result = attach_and_count(options, loaded, links, cgroup, netns_cookie, &mut kernel);
    match result {
        Ok(parts) => {
            let mut daemon = Daemon::new(kernel, parts, cgroup.to_path_buf(), netns_cookie);
            daemon.allow_empty = options.allow_empty;
            daemon.config_arg = options.config.clone();
            daemon.kernel.commit();
            for what in daemon
                .kernel
                .detach_others(&options.ifaces, cgroup)
                .map_err(|e| anyhow!(error_chain(&e)))?
            {
                log::info!("detached {what}, which this run was not given");
            }
            Ok((daemon, listener))
        }
        Err(e) => {
            kernel.roll_back();
            Err(e)
        }
    }
}

/// What a start found and installed, for [`Daemon::new`].
struct StartParts {
    loaded: LoadedConfig,
    ids: Vec<u32>,
    table: SelectionTable,
    interfaces: Vec<(String, AttachedMode)>,
    /// Connections released and counted by the first reconciliation.
    reconciled: (usize, usize),
    /// Flows counted from the socket table.
    seeded: HashSet<FlowKey>,
    resetter: Arc<Resetter>,
    replies: Result<Option<Arc<Replies>>, String>,
}

fn attach_and_count(
    options: &RunOptions,
    loaded: LoadedConfig,
    links: &[(String, LinkLayer)],
    cgroup: &Path,
    netns_cookie: u64,
    kernel: &mut Kernel,
) -> anyhow::Result<StartParts> {
    let config = &loaded.config;
    let previous = if kernel.adopted() {
        log::info!(
            "adopting the maps, counts and links that a daemon that is gone left in {}: {}",
            options.bpffs.display(),
            PinDir::open(&options.bpffs)
                .map(|pins| pins.describe())
                .unwrap_or_default()
        );
        kernel.connector_names()
    } else {
        Vec::new()
    };
    let ids = assign_ids(
        &previous,
        config,
        &kernel.connector_ids_in_use(),
        &HashSet::new(),
    )?;
    let table = SelectionTable::build_with_ids(config, &ids);
    kernel
        .set_settings(config, netns_cookie)
        .map_err(|e| anyhow!(error_chain(&e)))?;
    let replies = if uses_replies(config) {
        start_replies(kernel).map(Some)
    } else {
        Ok(None)
    };
    install(kernel, config, &ids, &table)?;
    if let Ok(Some(replies)) = &replies {
        replies.set_texts(config, &ids);
    }
    // sock_ops first: from then on every completed handshake is judged and
    // counted, so the reconciliation below misses nothing.
    kernel
        .attach_sock_ops(cgroup)
        .map_err(|e| anyhow!(error_chain(&e)))?;
    let mut interfaces = Vec::new();
    for (iface, link) in links {
        let mode = kernel
            .attach_xdp(iface, *link, options.xdp_mode)
            .map_err(|e| anyhow!(error_chain(&e)))?;
        log::info!(
            "enforcing on {iface} ({} XDP{})",
            mode.name(),
            if *link == LinkLayer::None {
                ", no link layer"
            } else {
                ""
            }
        );
        interfaces.push((iface.clone(), mode));
    }
    // What the kernel judged over a cap while no daemon ran is reset first,
    // or the reconciliation would count it as a connection that predates
    // the daemon.
    let resetter = Arc::new(Resetter::new(netns_cookie));
    let mut waiting = kernel.ringed_resets();
    waiting.extend(kernel.pending_resets());
    for request in &waiting {
        if resetter.reset(request).settled() {
            kernel.resolve_reset(&request.conn);
        }
    }
    let ports: HashSet<u16> = table.ports.iter().copied().collect();
    let (reconciled, seeded) = reconcile(kernel, &ports, netns_cookie)?;
    Ok(StartParts {
        loaded,
        ids,
        table,
        interfaces,
        reconciled,
        seeded,
        resetter,
        replies,
    })
}

fn uses_replies(config: &Config) -> bool {
    config
        .connectors
        .iter()
        .any(|c| c.action == crate::config::Action::Reply)
}

/// Starts the responder of action `reply`: its listening sockets, the
/// `steer` program that hands it refused SYNs, and its tasks.
fn start_replies(kernel: &mut Kernel) -> Result<Arc<Replies>, String> {
    let (ipv4, ipv6) =
        responder::listen().map_err(|e| format!("listening on loopback for the responder: {e}"))?;
    kernel.start_replies(&ipv4, ipv6.as_ref()).map_err(|e| {
        format!(
            "handing refused SYNs to a responder needs sk_lookup (Linux 5.9+): {}",
            error_chain(&e)
        )
    })?;
    let flows = kernel.reply_flows_handle().map_err(|e| error_chain(&e))?;
    let replies = Arc::new(Replies::new(flows));
    for listener in std::iter::once(ipv4).chain(ipv6) {
        let replies = replies.clone();
        tokio::spawn(async move {
            if let Err(e) = responder::serve(listener, replies).await {
                log::error!("the responder stopped: {e:#}");
            }
        });
    }
    log::info!("action reply: refused senders get the connector's 421 line");
    Ok(replies)
}

/// Says what action `reply` cannot do for this config.
fn warn_about_replies(config: &Config, unavailable: Option<&str>) {
    for c in config.connectors.iter().filter(|c| {
        c.action != crate::config::Action::Reply && c.reply_text != crate::config::EXCHANGE_REPLY
    }) {
        log::warn!(
            "connector {:?}: reply_text is used only with action reply (its action is {})",
            c.name,
            c.action.name()
        );
    }
    for c in config
        .connectors
        .iter()
        .filter(|c| c.action == crate::config::Action::Reply)
    {
        if let Some(why) = unavailable {
            log::warn!(
                "connector {:?}: action reply is not available ({why}): its refused SYNs are dropped instead",
                c.name
            );
        } else if !c.forwarded_to.is_empty() {
            log::warn!(
                "connector {:?}: action reply answers SYNs to this host's own sockets; a SYN that NAT forwards (forwarded_to) reaches the server and, over a cap, is reset when its handshake completes",
                c.name
            );
        }
    }
}

/// Reads the kernel's rejection reports: each goes to `limiter events`
/// followers, and, folded, to syslog.
async fn report_events(
    ring: RingBuf<MapData>,
    daemon: Arc<Mutex<Daemon>>,
    hub: Arc<EventHub>,
    syslog: Option<crate::logging::Destination>,
    period: Duration,
) -> anyhow::Result<()> {
    // SAFETY: the ring buffer owns its map fd, which stays open and the same
    // for as long as the AsyncFd owns the ring.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow!("watching the event ring: {}", e.into_parts().1))?;
    let mut folder = Folder::new(period);
    let mut sink = syslog.map(SyslogSink::new);
    let mut ticker = tokio::time::interval(
        (period / 4).clamp(Duration::from_millis(100), Duration::from_secs(1)),
    );
    // The gates that reported lately, and their last event: what a gate
    // still holds once it goes quiet is collected and folded under that
    // event (see `ReportGate`).
    let mut gates: HashMap<(u32, SourceKey), (Instant, Event)> = HashMap::new();
    // Refusals counted by the refusal caches are claimed by one sweep and
    // reported by the next (see `limiter_common::refusals`).
    let mut swept = Instant::now();
    loop {
        let mut batch = Vec::new();
        let mut events = Vec::new();
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the event ring")?;
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if item.len() >= size_of::<RejectionEvent>() {
                        // SAFETY: the kernel wrote a RejectionEvent there;
                        // the length was checked.
                        batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<RejectionEvent>()) });
                    }
                }
                guard.clear_ready();
            }
            _ = ticker.tick() => {
                if swept.elapsed() >= REFUSAL_SWEEP_INTERVAL {
                    swept = Instant::now();
                    let mut daemon = daemon.lock().expect("daemon lock");
                    if let Err(e) = daemon.kernel.sweep_refusals(SWEEP_REPORTS_AT_MOST) {
                        log::warn!("sweeping the refusal caches: {}", error_chain(&e));
                    }
                }
                events = collect_quiet_gates(&daemon, &mut gates);
                // Summaries are for syslog only: followers have every
                // report already, and would count its rejections twice.
                for summary in folder.tick(Instant::now()) {
                    if let Some(sink) = sink.as_mut() {
                        sink.write(&summary);
                    }
                }
            }
        }
        if !batch.is_empty() {
            let daemon = daemon.lock().expect("daemon lock");
            for raw in &batch {
                let event = daemon.event(raw);
                // A report judged at completion went through no gate.
                if raw.gate != gate::NONE {
                    gates.insert(gate_of(raw), (Instant::now(), event.clone()));
                }
                events.push(event);
            }
        }
        for event in events {
            if let Some(first) = folder.offer(event.clone(), Instant::now())
                && let Some(sink) = sink.as_mut()
            {
                sink.write(&first);
            }
            hub.publish(event);
        }
        if let Some(sink) = &sink {
            hub.syslog_errors
                .store(sink.errors, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// How often the refusal caches are swept: a refusal they counted is
/// reported within two of these once its flood stops.
const REFUSAL_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Reports a sweep puts on the event ring at most (it holds about 2,300):
/// what is left waits, claimed, for the next sweep.
const SWEEP_REPORTS_AT_MOST: usize = 512;

/// The gate a report went through: its kind and the source (for a
/// connector's gate, only the connector).
fn gate_of(raw: &RejectionEvent) -> (u32, SourceKey) {
    let addr = if raw.gate == gate::SOURCE {
        raw.source
    } else {
        [0; 16]
    };
    (
        raw.gate,
        SourceKey {
            connector: raw.connector,
            addr,
        },
    )
}

/// Collects the rejections held by gates quiet for longer than the kernel
/// holds them, as events that repeat each gate's last one.
fn collect_quiet_gates(
    daemon: &Mutex<Daemon>,
    gates: &mut HashMap<(u32, SourceKey), (Instant, Event)>,
) -> Vec<Event> {
    // The kernel reports again after REPORT_INTERVAL_NS; a little longer,
    // and the gate is surely quiet (or has reported anew).
    let quiet = Duration::from_nanos(REPORT_INTERVAL_NS) + Duration::from_millis(100);
    let now = Instant::now();
    let mut repeats = Vec::new();
    let mut daemon = daemon.lock().expect("daemon lock");
    gates.retain(|(kind, source), (last_seen, last)| {
        if now.duration_since(*last_seen) < quiet {
            return true;
        }
        match daemon.kernel.collect_unreported(*kind, source) {
            Ok(0) => {}
            Ok(held) => {
                let mut repeat = last.clone();
                repeat.count = u64::from(held);
                repeat.time =
                    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
                repeats.push(repeat);
            }
            Err(e) => log::warn!("collecting held rejection reports: {}", error_chain(&e)),
        }
        false
    });
    repeats
}

/// Kernel ids for the connectors of `config`. A connector that already has
/// an id (`current`: id and name) keeps it, since its connections hold
/// counts under it; a new one gets an id that holds no count (`in_use`),
/// preferably one not handed out before (`used`).
fn assign_ids(
    current: &[(u32, String)],
    config: &Config,
    in_use: &HashSet<u32>,
    used: &HashSet<u32>,
) -> anyhow::Result<Vec<u32>> {
    let mut taken: HashSet<u32> = HashSet::new();
    let mut ids: Vec<Option<u32>> = config
        .connectors
        .iter()
        .map(|c| {
            let id = current
                .iter()
                .find(|(_, name)| name.eq_ignore_ascii_case(&c.name))
                .map(|(id, _)| *id)?;
            taken.insert(id);
            Some(id)
        })
        .collect();
    // Ids of connectors that are gone stay reserved while they hold counts.
    for slot in ids.iter_mut().filter(|s| s.is_none()) {
        let free = |id: &u32| !taken.contains(id) && !in_use.contains(id);
        let id = (0..MAX_CONNECTORS)
            .find(|id| free(id) && !used.contains(id))
            .or_else(|| (0..MAX_CONNECTORS).find(free))
            .ok_or_else(|| {
                anyhow!("no connector slot is free (at most {MAX_CONNECTORS}, and removed connectors keep theirs until their connections close)")
            })?;
        taken.insert(id);
        *slot = Some(id);
    }
    Ok(ids.into_iter().map(|id| id.expect("assigned")).collect())
}

/// Puts a configuration into the kernel, names included.
fn install(
    kernel: &mut Kernel,
    config: &Config,
    ids: &[u32],
    table: &SelectionTable,
) -> anyhow::Result<()> {
    kernel
        .install(config, ids, table)
        .map_err(|e| anyhow!(error_chain(&e)))?;
    let named: Vec<(u32, &str)> = ids
        .iter()
        .copied()
        .zip(config.connectors.iter().map(|c| c.name.as_str()))
        .collect();
    kernel
        .set_connector_names(&named)
        .map_err(|e| anyhow!(error_chain(&e)))
}

/// The configuration the daemon starts with.
struct LoadedConfig {
    config: Config,
    /// For `status`: the file, or "built-in default".
    source: String,
    document: ConfigDocument,
    /// Where `connector new|set|remove` write.
    path: PathBuf,
    /// The file's text, if there is a file.
    text: Option<String>,
}

fn load_config(path: Option<&Path>) -> anyhow::Result<LoadedConfig> {
    let (path, explicit) = match path {
        Some(path) => (path.to_path_buf(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    if !explicit && !path.exists() {
        log::info!(
            "{DEFAULT_CONFIG_PATH} does not exist: using the built-in \"Default Frontend\" connector"
        );
        let config = Config::builtin_default();
        return Ok(LoadedConfig {
            document: ConfigDocument::from_config(&config),
            config,
            source: "built-in default".to_string(),
            path,
            text: None,
        });
    }
    // Read once: what is enforced is what edits later compare with.
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let config = Config::parse(&text, &path.display().to_string())?;
    let document = ConfigDocument::parse(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(LoadedConfig {
        config,
        source: path.display().to_string(),
        document,
        path,
        text: Some(text),
    })
}

/// The id of group `name`.
fn group_id(name: &str) -> anyhow::Result<u32> {
    let c_name = std::ffi::CString::new(name).context("group name")?;
    // SAFETY: a valid C string; the result is read at once.
    let group = unsafe { libc::getgrnam(c_name.as_ptr()) };
    if group.is_null() {
        bail!("--control-group {name}: no such group");
    }
    // SAFETY: non-null result of getgrnam.
    Ok(unsafe { (*group).gr_gid })
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

/// Binds the control socket (checked free by `preflight::control_socket`),
/// mode 0600 (root), or 0660 with group `gid`.
fn bind_control(path: &Path, gid: Option<u32>) -> anyhow::Result<UnixListener> {
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
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("restricting {}", path.display()))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, Some(0), Some(gid))
            .with_context(|| format!("giving {} to group {gid}", path.display()))?;
    }
    Ok(listener)
}

/// Whether the process `pid` (with primary group `gid`) is in group
/// `group`, its supplementary groups included.
fn in_group(pid: Option<i32>, gid: u32, group: u32) -> bool {
    if gid == group {
        return true;
    }
    let Some(pid) = pid else { return false };
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .is_some_and(|groups| {
            groups
                .split_whitespace()
                .any(|g| g.parse::<u32>() == Ok(group))
        })
}

/// Writes what the kernel programs tell (aya-log) to the daemon's log.
async fn tell_kernel_log(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's fd, which stays open and
    // the same for as long as the AsyncFd owns the logger.
    let mut logger = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(logger) => logger,
        Err(e) => {
            log::error!("watching the kernel programs' log: {}", e.into_parts().1);
            return;
        }
    };
    loop {
        let mut guard = match logger.readable_mut().await {
            Ok(guard) => guard,
            Err(e) => {
                log::error!("reading the kernel programs' log stopped: {e}");
                return;
            }
        };
        // Writing a line may wait on a slow syslog collector: off the
        // runtime's workers.
        tokio::task::block_in_place(|| guard.get_inner_mut().flush());
        guard.clear_ready();
    }
}

/// Tells the XDP program, twice a second, that the responder answers:
/// without it (the daemon gone, and its `steer` program with it) refused
/// SYNs of a reply connector are dropped.
async fn keep_replying(daemon: Arc<Mutex<Daemon>>) {
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    loop {
        ticker.tick().await;
        let mut daemon = daemon.lock().expect("daemon lock");
        if daemon.kernel.replies()
            && let Err(e) = daemon.kernel.responders_alive()
        {
            log::error!(
                "telling the kernel the responder answers: {}",
                error_chain(&e)
            );
        }
    }
}

async fn sweep_forever(daemon: Arc<Mutex<Daemon>>) -> anyhow::Result<()> {
    let mut ticker = tokio::time::interval(SWEEP_EVERY);
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

/// Resets the connections the kernel judged over a cap when their
/// handshake completed, as it asks on the `RESETS` ring.
async fn reset_connections(
    ring: RingBuf<MapData>,
    daemon: Arc<Mutex<Daemon>>,
    resetter: Arc<Resetter>,
) -> anyhow::Result<()> {
    // SAFETY: the ring buffer owns its map fd, which stays open and the same
    // for as long as the AsyncFd owns the ring.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow!("watching the reset ring: {}", e.into_parts().1))?;
    loop {
        let mut guard = ring
            .readable_mut()
            .await
            .context("waiting on the reset ring")?;
        let mut requests = Vec::new();
        let inner = guard.get_inner_mut();
        while let Some(item) = inner.next() {
            if item.len() >= size_of::<ResetRequest>() {
                // SAFETY: the kernel wrote a ResetRequest there; the length
                // was checked.
                requests.push(unsafe {
                    std::ptr::read_unaligned(item.as_ptr().cast::<ResetRequest>())
                });
            }
        }
        guard.clear_ready();
        if requests.is_empty() {
            continue;
        }
        let (daemon, resetter) = (daemon.clone(), resetter.clone());
        tokio::task::spawn_blocking(move || {
            // The resets without the daemon's lock: the control socket and
            // the sweep go on meanwhile.
            let settled: Vec<ConnKey> = requests
                .iter()
                .filter(|request| resetter.reset(request).settled())
                .map(|request| request.conn)
                .collect();
            let mut daemon = daemon.lock().expect("daemon lock");
            for conn in &settled {
                daemon.kernel.resolve_reset(conn);
            }
        })
        .await
        .context("resetter task")?;
    }
}

/// The counts made to agree with the kernel's socket table: counted
/// connections that are gone (closed while no daemon or no sock_ops program
/// watched) are released, held ones that are not counted (they predate the
/// daemon) are counted. Returns (released, counted) and the flows counted
/// from the socket table, which only the daemon sees close.
///
/// The counted ones are read before the socket table, so a connection that
/// completes in between is never taken for gone; the missing ones after it,
/// so that one is never counted twice (and a count taken twice in a race is
/// given back by the kernel's own checks). Connections in other network
/// namespaces (containers behind DNAT) are left to the sock_ops program:
/// this namespace's table does not show them.
fn reconcile(
    kernel: &mut Kernel,
    ports: &HashSet<u16>,
    netns: u64,
) -> anyhow::Result<((usize, usize), HashSet<FlowKey>)> {
    let counted_before = kernel.established_in(netns);
    let held = held_by_servers(ports)?;
    let mut released = 0;
    for (flow, _) in counted_before.iter().filter(|(f, _)| !held.contains(f)) {
        if kernel
            .release_established(flow)
            .map_err(|e| anyhow!(error_chain(&e)))?
        {
            released += 1;
        }
    }
    // Nor is a connection waiting for its reset one that predates the
    // daemon.
    let known: HashSet<FlowKey> = kernel
        .established_in(netns)
        .into_iter()
        .map(|(flow, _)| flow)
        .chain(
            kernel
                .pending_resets()
                .into_iter()
                .filter(|r| r.conn.netns == netns)
                .map(|r| r.conn.flow),
        )
        .collect();
    let mut counted = 0;
    for flow in held.iter().filter(|f| !known.contains(f)) {
        match kernel.seed(flow).map_err(|e| anyhow!(error_chain(&e)))? {
            op::DONE => counted += 1,
            op::FULL => log::warn!("a table is full; not counting {}", show(flow)),
            _ => {}
        }
    }
    let seeded = kernel
        .established_in(netns)
        .into_iter()
        .filter(|(_, v)| v.flags & FLOW_SEEDED != 0)
        .map(|(flow, _)| flow)
        .collect();
    Ok(((released, counted), seeded))
}

/// The connections servers hold on `ports` (the responder's left out).
fn held_by_servers(ports: &HashSet<u16>) -> anyhow::Result<HashSet<FlowKey>> {
    Ok(sockdiag::held_connections(ports)
        .context("reading the socket table")?
        .into_iter()
        .collect())
}

impl Daemon {
    fn new(kernel: Kernel, parts: StartParts, cgroup: PathBuf, netns_cookie: u64) -> Daemon {
        let StartParts {
            loaded,
            ids,
            table,
            interfaces,
            reconciled,
            seeded,
            resetter,
            replies,
        } = parts;
        let (replies, replies_unavailable) = match replies {
            Ok(replies) => (replies, None),
            Err(why) => (None, Some(why)),
        };
        warn_about_replies(&loaded.config, replies_unavailable.as_deref());
        let daemon = Daemon {
            kernel,
            config: loaded.config,
            config_source: loaded.source,
            document: loaded.document,
            config_path: loaded.path,
            config_on_disk: loaded.text,
            used_ids: ids.iter().copied().collect(),
            ids,
            table,
            cgroup,
            interfaces,
            started: Instant::now(),
            netns_cookie,
            resetter,
            warned_forwards: HashSet::new(),
            seeded,
            uncounted: HashSet::new(),
            warned_untracked: false,
            last_source_gc: Instant::now(),
            last_reconcile: Instant::now(),
            replies,
            replies_unavailable,
            allow_empty: false,
            config_arg: None,
        };
        let (released, counted) = reconciled;
        log::info!(
            "{} connector(s) from {}; counting {counted} connection(s) found in the socket table{}",
            daemon.config.connectors.len(),
            daemon.config_source,
            if released > 0 {
                format!(", releasing {released} that closed while no daemon ran")
            } else {
                String::new()
            }
        );
        daemon
    }

    fn bound_ports(&self) -> HashSet<u16> {
        self.table.ports.iter().copied().collect()
    }

    /// One round of housekeeping: resets that found the ring full, seeded
    /// connections that closed, connections outside the tracked cgroup,
    /// the periodic reconciliation, idle sources.
    fn sweep(&mut self) -> anyhow::Result<()> {
        // Resets the ring's reader has not settled a second after they were
        // asked for: the ring was full, or they failed.
        let now = monotonic_ns();
        let pending = self.kernel.pending_resets();
        for request in &pending {
            if now.saturating_sub(request.time_ns) >= 1_000_000_000
                && self.resetter.reset(request).settled()
            {
                self.kernel.resolve_reset(&request.conn);
            }
        }
        self.warn_about_undeclared_forwards();
        let held = held_by_servers(&self.bound_ports())?;
        let counted: HashMap<FlowKey, u32> = self
            .kernel
            .established_in(self.netns_cookie)
            .into_iter()
            .map(|(flow, value)| (flow, value.flags))
            .collect();
        let waiting_reset: HashSet<FlowKey> = pending
            .iter()
            .filter(|r| r.conn.netns == self.netns_cookie)
            .map(|r| r.conn.flow)
            .collect();
        // Seeded entries that sock_ops took over (the 4-tuple was reused).
        self.seeded
            .retain(|f| counted.get(f).is_some_and(|flags| flags & FLOW_SEEDED != 0));
        let gone: Vec<FlowKey> = self
            .seeded
            .iter()
            .filter(|f| !held.contains(f))
            .copied()
            .collect();
        for flow in gone {
            self.kernel
                .release_seeded(&flow)
                .map_err(|e| anyhow!(error_chain(&e)))?;
            self.seeded.remove(&flow);
        }
        // Held and still not counted a sweep later: the sock_ops program
        // never saw its handshake complete (its server is outside the
        // tracked cgroup). Counted from here on, and watched by polling.
        let uncounted: HashSet<FlowKey> = held
            .iter()
            .filter(|f| !counted.contains_key(f) && !waiting_reset.contains(f))
            .copied()
            .collect();
        for flow in uncounted.intersection(&self.uncounted) {
            if self
                .kernel
                .seed(flow)
                .map_err(|e| anyhow!(error_chain(&e)))?
                == op::DONE
            {
                self.seeded.insert(*flow);
                if !self.warned_untracked {
                    self.warned_untracked = true;
                    log::warn!(
                        "connection {} completed without passing the sock_ops program: is the mail server in cgroup {}? It is counted, but by polling and without a judgement.",
                        show(flow),
                        self.cgroup.display()
                    );
                }
            }
        }
        self.uncounted = uncounted;
        if self.last_reconcile.elapsed() >= RECONCILE_EVERY {
            let ports = self.bound_ports();
            let ((released, counted), seeded) =
                reconcile(&mut self.kernel, &ports, self.netns_cookie)?;
            self.seeded = seeded;
            self.last_reconcile = Instant::now();
            if released + counted > 0 {
                log::warn!(
                    "reconciled with the socket table: released {released}, counted {counted}"
                );
            }
        }
        let sources_crowded = self.kernel.sources_len() * 2 >= self.kernel.sizes().sources as usize;
        if sources_crowded {
            self.forget_idle_sources(PRESSURE_SOURCE_IDLE);
        } else if self.last_source_gc.elapsed() >= SOURCE_IDLE_FORGET / 4 {
            self.last_source_gc = Instant::now();
            self.forget_idle_sources(SOURCE_IDLE_FORGET);
        }
        Ok(())
    }

    /// Starts the responder when `config` is the first to use action
    /// reply, and says what it cannot do.
    fn prepare_replies(&mut self, config: &Config) {
        if uses_replies(config) && self.replies.is_none() && self.replies_unavailable.is_none() {
            match start_replies(&mut self.kernel) {
                Ok(replies) => self.replies = Some(replies),
                Err(why) => self.replies_unavailable = Some(why),
            }
        }
        if !uses_replies(config) {
            self.kernel.clear_reply_marks();
        }
        warn_about_replies(config, self.replies_unavailable.as_deref());
    }

    /// Warns, once each, about server endpoints that SYNs to a bound port
    /// were seen to end up at (NAT) and that no `forwarded_to` names.
    fn warn_about_undeclared_forwards(&mut self) {
        for (endpoint, connector) in self.kernel.undeclared_forwards() {
            let shown =
                std::net::SocketAddr::new(from_addr(&endpoint.addr), endpoint.port).to_string();
            if self.warned_forwards.insert(shown.clone()) {
                let name = self
                    .connectors()
                    .by_id(connector)
                    .map_or_else(|| format!("#{connector}"), |c| c.name.clone());
                log::warn!(
                    "connections to connector \"{name}\" end up at {shown} (a REDIRECT, or DNAT into a container?), which no connector's forwarded_to names: they are not counted; add forwarded_to = [\"{shown}\"] to the connector"
                );
            }
        }
    }

    /// Deletes source entries that have held nothing for `idle`, so that
    /// sources that come and go do not fill the table for good. The kernel
    /// checks again, under the connector's lock, at the moment of each
    /// deletion: a connection counted meanwhile keeps its entry.
    fn forget_idle_sources(&mut self, idle: Duration) {
        let now = monotonic_ns();
        let idle_ns = idle.as_nanos() as u64;
        let stale: Vec<SourceKey> = self
            .kernel
            .sources()
            .into_iter()
            .filter(|(_, count)| {
                count.live == 0 && now.saturating_sub(count.last_change_ns) >= idle_ns
            })
            .map(|(key, _)| key)
            .collect();
        for key in stale {
            if let Err(e) = self.kernel.forget_source(&key, idle) {
                log::warn!("forgetting an idle source: {}", error_chain(&e));
            }
        }
    }

    fn connector_status(&self, index: usize) -> anyhow::Result<ConnectorStatus> {
        let connector = &self.config.connectors[index];
        let live = self
            .kernel
            .connector_live(self.ids[index])
            .map_err(|e| anyhow!(error_chain(&e)))?;
        Ok(ConnectorStatus {
            name: connector.name.clone(),
            bindings: connector.bindings.iter().map(|b| b.to_string()).collect(),
            forwarded_to: connector
                .forwarded_to
                .iter()
                .map(|b| b.to_string())
                .collect(),
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
            reply_text: (connector.action == crate::config::Action::Reply)
                .then(|| connector.reply_text.clone()),
            live,
        })
    }

    fn connector_statuses(&self) -> anyhow::Result<Vec<ConnectorStatus>> {
        (0..self.config.connectors.len())
            .map(|i| self.connector_status(i))
            .collect()
    }

    fn status(&self) -> anyhow::Result<Status> {
        let connectors = self.connector_statuses()?;
        let configured: u64 = connectors.iter().map(|c| c.live as u64).sum();
        let live_total = self
            .kernel
            .live_total()
            .map_err(|e| anyhow!(error_chain(&e)))?;
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
            live_total,
            live_removed_connectors: live_total.saturating_sub(configured),
            connectors,
            undeclared_forwards: {
                let mut shown: Vec<String> = self.warned_forwards.iter().cloned().collect();
                shown.sort();
                shown
            },
        })
    }

    /// A kernel rejection report as an event line.
    fn event(&self, raw: &RejectionEvent) -> Event {
        let name = self
            .ids
            .iter()
            .position(|id| *id == raw.connector)
            .map(|i| self.config.connectors[i].name.clone())
            .unwrap_or_else(|| format!("connector #{} (removed)", raw.connector));
        let age = Duration::from_nanos(monotonic_ns().saturating_sub(raw.time_ns));
        let time = std::time::SystemTime::now()
            .checked_sub(age)
            .unwrap_or_else(std::time::SystemTime::now);
        Event::from_kernel(raw, &name, self.config.ipv6_prefix_length, time)
    }

    /// What a metrics scrape reports.
    fn metrics(&self, hub: &EventHub) -> anyhow::Result<metrics::Snapshot> {
        let stats = self.kernel.stats().map_err(|e| anyhow!(error_chain(&e)))?;
        let report = report::stats(&self.connectors(), &stats);
        let mut connectors = Vec::new();
        for (i, counters) in report.connectors.into_iter().enumerate() {
            let live = self
                .kernel
                .connector_live(self.ids[i])
                .map_err(|e| anyhow!(error_chain(&e)))?;
            connectors.push((counters.name, counters.counters, live));
        }
        let configured: u64 = connectors.iter().map(|(_, _, l)| *l as u64).sum();
        let live_total = self
            .kernel
            .live_total()
            .map_err(|e| anyhow!(error_chain(&e)))?;
        let sizes = self.kernel.sizes();
        Ok(metrics::Snapshot {
            connectors,
            live_removed: live_total.saturating_sub(configured),
            events_lost: stats.global[stat::EVENTS_LOST as usize],
            syslog_errors: hub.syslog_errors.load(std::sync::atomic::Ordering::Relaxed),
            unreadable_dropped: stats.global[stat::UNREADABLE as usize],
            resets_pending: self.kernel.pending_resets().len() as u64,
            undeclared_forwards: stats.global[stat::UNDECLARED_FORWARDS as usize],
            maps: vec![
                (
                    "sources",
                    self.kernel.sources_len() as u64,
                    sizes.sources as u64,
                ),
                (
                    "established",
                    self.kernel.established().len() as u64,
                    sizes.established as u64,
                ),
            ],
        })
    }

    fn connectors(&self) -> Connectors<'_> {
        Connectors {
            config: &self.config,
            ids: &self.ids,
        }
    }

    fn index_of(&self, name: &str) -> anyhow::Result<usize> {
        self.config
            .connectors
            .iter()
            .position(|c| c.name.eq_ignore_ascii_case(name.trim()))
            .ok_or_else(|| anyhow!("there is no connector \"{name}\""))
    }

    /// Kernel ids for the connectors of `config` (see [`assign_ids`]).
    fn assign_ids(&self, config: &Config) -> anyhow::Result<Vec<u32>> {
        let current: Vec<(u32, String)> = self
            .ids
            .iter()
            .copied()
            .zip(self.config.connectors.iter().map(|c| c.name.clone()))
            .collect();
        assign_ids(
            &current,
            config,
            &self.kernel.connector_ids_in_use(),
            &self.used_ids,
        )
    }

    /// Applies `edit` of connector `changed` to the config: validated like
    /// the file, installed in the kernel for the next SYN, written back
    /// atomically. Any failure leaves the kernel and the file as they were.
    fn change(
        &mut self,
        changed: &str,
        edit: impl FnOnce(&mut ConfigDocument) -> Result<(), String>,
    ) -> anyhow::Result<()> {
        let _reloading = notify::Reloading::start();
        let mut document = self.document.clone();
        edit(&mut document).map_err(|e| anyhow!(e))?;
        let file = self.config_path.display().to_string();
        let config = document.validate_change(changed).map_err(|e| anyhow!(e))?;
        if config.connectors.is_empty() && !self.allow_empty {
            bail!(
                "connector \"{changed}\" is the last one, and without it nothing would be enforced: the daemon allows that only when started with --allow-empty (nothing changed)"
            );
        }
        if config.ipv6_prefix_length != self.config.ipv6_prefix_length {
            bail!("ipv6_prefix_length takes effect only at start");
        }
        let on_disk = std::fs::read_to_string(&self.config_path).ok();
        if on_disk != self.config_on_disk {
            bail!(
                "{file} was changed by hand since the daemon read it: `limiter reload` loads it (nothing changed)"
            );
        }
        let previous = self.apply(config)?;
        if let Err(e) = document.write_atomically(&self.config_path) {
            self.undo(previous);
            bail!("writing {file}: {e} (nothing changed)");
        }
        log::info!("config changed and written to {file}");
        self.config_on_disk = Some(document.to_string());
        self.config_source = file;
        self.document = document;
        Ok(())
    }

    /// Reads the config file again, checks it exactly as `limiter run`
    /// does, and applies it like a live change: for the next SYN,
    /// established connections untouched, connector ids kept by name. The
    /// file is then what live changes edit. A file that does not pass
    /// changes nothing: the daemon keeps enforcing what it had.
    fn reload(&mut self) -> anyhow::Result<Reloaded> {
        let _reloading = notify::Reloading::start();
        // A file that was there and is gone is a mistake to report, not a
        // reason to fall back to the built-in default.
        if self.config_on_disk.is_some() && !self.config_path.exists() {
            bail!(
                "{} does not exist any more: put it back (nothing changed)",
                self.config_path.display()
            );
        }
        let loaded = load_config(self.config_arg.as_deref())?;
        if loaded.config.connectors.is_empty() && !self.allow_empty {
            bail!(
                "{}: no connectors, so limiter would enforce nothing: add a [[connector]], or start the daemon with --allow-empty (nothing changed)",
                loaded.source
            );
        }
        if loaded.config.ipv6_prefix_length != self.config.ipv6_prefix_length {
            bail!(
                "{}: ipv6_prefix_length {} takes effect only at start (the daemon counts per /{}; nothing changed)",
                loaded.source,
                loaded.config.ipv6_prefix_length,
                self.config.ipv6_prefix_length
            );
        }
        let before = self.config.connectors.clone();
        self.apply(loaded.config)?;
        let named = |list: &[crate::config::Connector], other: &[crate::config::Connector]| {
            list.iter()
                .filter(|c| !other.iter().any(|o| o.name.eq_ignore_ascii_case(&c.name)))
                .map(|c| c.name.clone())
                .collect::<Vec<_>>()
        };
        let reloaded = Reloaded {
            config: loaded.source.clone(),
            connectors: self.config.connectors.len(),
            added: named(&self.config.connectors, &before),
            removed: named(&before, &self.config.connectors),
            changed: self
                .config
                .connectors
                .iter()
                .filter(|c| {
                    before
                        .iter()
                        .any(|b| b.name.eq_ignore_ascii_case(&c.name) && b != *c)
                })
                .map(|c| c.name.clone())
                .collect(),
        };
        self.config_on_disk = loaded.text;
        self.config_source = loaded.source;
        self.config_path = loaded.path;
        self.document = loaded.document;
        log::info!("{}", reloaded.describe());
        Ok(reloaded)
    }

    /// Installs `config` for the next SYN (ids kept by name), and returns
    /// what it replaced, for [`Daemon::undo`]. A failure leaves the kernel
    /// as it was.
    fn apply(&mut self, config: Config) -> anyhow::Result<(Config, Vec<u32>, SelectionTable)> {
        let ids = self.assign_ids(&config)?;
        let table = SelectionTable::build_with_ids(&config, &ids);
        self.prepare_replies(&config);
        if let Some(replies) = &self.replies {
            replies.set_texts(&config, &ids);
        }
        if let Err(e) = self.kernel.install(&config, &ids, &table) {
            self.restore();
            bail!(
                "updating the kernel tables: {} (nothing changed)",
                error_chain(&e)
            );
        }
        self.used_ids.extend(ids.iter().copied());
        let previous = (
            std::mem::replace(&mut self.config, config),
            std::mem::replace(&mut self.ids, ids),
            std::mem::replace(&mut self.table, table),
        );
        Ok(previous)
    }

    /// Puts back what [`Daemon::apply`] replaced.
    fn undo(&mut self, (config, ids, table): (Config, Vec<u32>, SelectionTable)) {
        self.config = config;
        self.ids = ids;
        self.table = table;
        self.restore();
    }

    /// Puts the current config back into the kernel after a failed change.
    fn restore(&mut self) {
        if let Some(replies) = &self.replies {
            replies.set_texts(&self.config, &self.ids);
        }
        if let Err(e) = install(&mut self.kernel, &self.config, &self.ids, &self.table) {
            log::error!("restoring the kernel tables: {e:#}");
        }
    }

    fn handle(&mut self, request: Request) -> Reply {
        match self.answer(request) {
            Ok(value) => Reply::Ok(value),
            Err(e) => Reply::Error(format!("{e:#}")),
        }
    }

    fn answer(&mut self, request: Request) -> anyhow::Result<serde_json::Value> {
        let value = match request {
            Request::Status => serde_json::to_value(self.status()?)?,
            Request::ConnectorList => serde_json::to_value(self.connector_statuses()?)?,
            Request::ConnectorShow { name } => {
                serde_json::to_value(self.connector_status(self.index_of(&name)?)?)?
            }
            Request::ConnectorNew { name, changes } => {
                self.change(&name, |d| d.new_connector(name.trim(), &changes))?;
                serde_json::to_value(self.connector_status(self.index_of(&name)?)?)?
            }
            Request::ConnectorSet { name, changes } => {
                self.change(&name, |d| d.set_connector(&name, &changes))?;
                serde_json::to_value(self.connector_status(self.index_of(&name)?)?)?
            }
            Request::ConnectorRemove { name } => {
                let index = self.index_of(&name)?;
                let removed = self.config.connectors[index].name.clone();
                self.change(&removed, |d| d.remove_connector(&name))?;
                serde_json::json!({ "removed": removed })
            }
            Request::Sources { connector, top } => serde_json::to_value(
                report::sources(&self.connectors(), &self.kernel, connector.as_deref(), top)
                    .map_err(|e| anyhow!(e))?,
            )?,
            Request::Explain { ip, local } => {
                let ip: std::net::IpAddr = ip
                    .trim()
                    .parse()
                    .map_err(|_| anyhow!("{ip:?} is not an IP address"))?;
                let local: Option<std::net::SocketAddr> = match local {
                    Some(text) => Some(text.trim().parse().map_err(|_| {
                        anyhow!("--local {text:?} is not IP:PORT (IPv6 as [addr]:port)")
                    })?),
                    None => None,
                };
                // An IPv4 packet carries an IPv4 destination: it never
                // reaches an IPv6 binding such as [::]:25, and the reverse.
                if let Some(local) = local
                    && canonical(local.ip()).is_ipv4() != canonical(ip).is_ipv4()
                {
                    let family = |v4: bool| if v4 { "IPv4" } else { "IPv6" };
                    let ip_v4 = canonical(ip).is_ipv4();
                    bail!(
                        "{ip} is {} and cannot reach --local {local} ({}): give an {} local address",
                        family(ip_v4),
                        family(!ip_v4),
                        family(ip_v4)
                    );
                }
                let explanation =
                    report::explain(&self.connectors(), &self.table, &self.kernel, ip, local)
                        .map_err(|e| anyhow!(error_chain(&e)))?;
                serde_json::to_value(explanation)?
            }
            Request::Events { .. } => {
                bail!("events are answered by the connection handler")
            }
            Request::Reload => serde_json::to_value(self.reload()?)?,
            Request::Stats => {
                let stats = self.kernel.stats().map_err(|e| anyhow!(error_chain(&e)))?;
                serde_json::to_value(report::stats(&self.connectors(), &stats))?
            }
        };
        Ok(value)
    }
}

/// Reloads the config on every SIGHUP (`systemctl reload` with
/// `kill -HUP`); a refused file is said in the log, and nothing changes.
async fn reload_on_hangup(mut hangup: tokio::signal::unix::Signal, daemon: Arc<Mutex<Daemon>>) {
    while hangup.recv().await.is_some() {
        let result = tokio::task::block_in_place(|| daemon.lock().expect("daemon lock").reload());
        if let Err(e) = result {
            log::error!("SIGHUP: reload refused, still enforcing the config read before: {e:#}");
        }
    }
}

/// A flow for people: `remote -> local:port`.
fn show(flow: &FlowKey) -> String {
    let remote = std::net::SocketAddr::new(from_addr(&flow.remote), flow.remote_port);
    let local = std::net::SocketAddr::new(from_addr(&flow.local), flow.local_port);
    format!("{remote} -> {local}")
}

async fn serve_control(
    listener: UnixListener,
    daemon: Arc<Mutex<Daemon>>,
    hub: Arc<EventHub>,
    group: Option<u32>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::warn!("control socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(serve_client(stream, daemon.clone(), hub.clone(), group));
    }
}

async fn serve_client(
    stream: UnixStream,
    daemon: Arc<Mutex<Daemon>>,
    hub: Arc<EventHub>,
    group: Option<u32>,
) {
    let allowed = stream.peer_cred().is_ok_and(|cred| {
        cred.uid() == 0 || group.is_some_and(|g| in_group(cred.pid(), cred.gid(), g))
    });
    match allowed {
        true => {}
        false => {
            let (_, mut writer) = stream.into_split();
            let refusal = match group {
                Some(_) => {
                    "permission denied: only root and members of the daemon's --control-group may use the control socket"
                }
                None => {
                    "permission denied: only root may use the control socket (the daemon runs without --control-group)"
                }
            };
            let _ = write_reply(&mut writer, &Reply::Error(refusal.into())).await;
            return;
        }
    }
    let (reader, mut writer) = stream.into_split();
    let mut lines = BufReader::new(tokio::io::AsyncReadExt::take(reader, MAX_REQUEST_LEN)).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Events { follow }) => {
                // Subscribed before the snapshot, so nothing falls between.
                let receiver = follow.then(|| hub.follow());
                let recent = serde_json::to_value(hub.recent()).unwrap_or_default();
                if write_reply(&mut writer, &Reply::Ok(recent)).await.is_err() {
                    return;
                }
                if let Some(receiver) = receiver {
                    stream_events(receiver, &mut writer, &mut lines).await;
                    return;
                }
                continue;
            }
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

/// Sends every event to a follower until it hangs up. A follower that reads
/// too slowly is skipped ahead and told how many events it lost; the daemon
/// never waits for it.
async fn stream_events<R: tokio::io::AsyncBufRead + Unpin>(
    mut receiver: tokio::sync::broadcast::Receiver<Event>,
    writer: &mut tokio::net::unix::OwnedWriteHalf,
    lines: &mut tokio::io::Lines<R>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let reply = tokio::select! {
            received = receiver.recv() => match received {
                Ok(event) => Reply::Event(Box::new(event)),
                Err(RecvError::Lagged(lost)) => Reply::Lost(lost),
                Err(RecvError::Closed) => return,
            },
            // Anything from the follower, or its hanging up, ends the stream.
            _ = lines.next_line() => return,
        };
        if write_reply(writer, &reply).await.is_err() {
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
