//! `limiter run`: checks what it can, loads the programs, attaches them,
//! counts what already exists, resets the connections the kernel judged
//! over a cap, and answers the control socket. A start that fails undoes
//! what it made.
//!
//! `run` here sets up, spawns the daemon's tasks, waits and tears down; each
//! job has a file: `startup` (programs loaded and attached, existing
//! connections counted), `apply` (the config file read, and where a config
//! goes into the kernel: at start, on a change, on a reload), `ring` (the
//! kernel's rings: rejection reports into events, resets to do, the kernel
//! programs' log), `housekeeping` (sweeps, reconciliation, idle sources),
//! `queries` (status, metrics) and `server` (the control socket's server
//! half).

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use limiter_common::maps::FlowKey;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    config::Config,
    config::edit::ConfigDocument,
    events::EventHub,
    kernel::{AttachedMode, Kernel, XdpModeRequest, pins::PinDir},
    metrics, netns, notify, preflight,
    resets::Resetter,
    responder::Replies,
    selection::SelectionTable,
    sockdiag,
};

mod apply;
mod housekeeping;
mod queries;
mod ring;
mod server;
mod startup;

use self::{
    apply::{load_config, reload_on_hangup},
    housekeeping::{keep_replying, sweep_forever},
    ring::{report_events, reset_connections, tell_kernel_log},
    server::serve_control,
    startup::start,
};
use crate::preflight::{cgroup2_root, group_id};

/// Default config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/limiter/connectors.toml";
/// Default pin directory.
pub const DEFAULT_BPFFS_PATH: &str = "/sys/fs/bpf/limiter";

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
            log::error!("detaching: {:#}", anyhow::Error::from(e));
        }
    }
    match failure {
        None => Ok(()),
        Some((what, Ok(Err(e)))) => Err(e.context(format!("the {what} failed"))),
        Some((what, Ok(Ok(())))) => bail!("the {what} stopped"),
        Some((what, Err(e))) => bail!("the {what} failed: {e}"),
    }
}
