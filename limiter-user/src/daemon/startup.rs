//! Starting: the config read and checked, the programs loaded and attached,
//! the connections that already exist counted.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use anyhow::{Context, anyhow, bail};
use limiter_common::maps::{FlowKey, MAX_CONNECTORS};
use tokio::net::UnixListener;

use crate::{
    config::Config,
    config::edit::ConfigDocument,
    kernel::{AttachedMode, Kernel, LinkLayer, TableSizes, pins::PinDir},
    preflight::{self, Bpffs},
    resets::Resetter,
    responder::{self, Replies},
    selection::SelectionTable,
};

use super::{
    DEFAULT_CONFIG_PATH, Daemon, Made, RunOptions, housekeeping::reconcile, server::bind_control,
};

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
pub(super) fn start(
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
    let mut kernel = Kernel::load_with_log(sizes, Some(pins), options.kernel_log_level)
        .with_context(|| {
            format!(
                "loading the programs and maps (--table-entries {})",
                options.table_entries
            )
        })?;
    let result = attach_and_count(options, loaded, links, cgroup, netns_cookie, &mut kernel);
    match result {
        Ok(parts) => {
            let mut daemon = Daemon::new(kernel, parts, cgroup.to_path_buf(), netns_cookie);
            daemon.allow_empty = options.allow_empty;
            daemon.config_arg = options.config.clone();
            daemon.kernel.commit();
            for what in daemon.kernel.detach_others(&options.ifaces, cgroup)? {
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
pub(super) struct StartParts {
    pub(super) loaded: LoadedConfig,
    pub(super) ids: Vec<u32>,
    pub(super) table: SelectionTable,
    pub(super) interfaces: Vec<(String, AttachedMode)>,
    /// Connections released and counted by the first reconciliation.
    pub(super) reconciled: (usize, usize),
    /// Flows counted from the socket table.
    pub(super) seeded: HashSet<FlowKey>,
    pub(super) resetter: Arc<Resetter>,
    pub(super) replies: Result<Option<Arc<Replies>>, String>,
}

pub(super) fn attach_and_count(
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
    kernel.set_settings(config, netns_cookie)?;
    let replies = if uses_replies(config) {
        start_replies(kernel)
            .map(Some)
            .map_err(|e| format!("{e:#}"))
    } else {
        Ok(None)
    };
    install(kernel, config, &ids, &table)?;
    if let Ok(Some(replies)) = &replies {
        replies.set_texts(config, &ids);
    }
    // sock_ops first: from then on every completed handshake is judged and
    // counted, so the reconciliation below misses nothing.
    kernel.attach_sock_ops(cgroup)?;
    let mut interfaces = Vec::new();
    for (iface, link) in links {
        let mode = kernel.attach_xdp(iface, *link, options.xdp_mode)?;
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

pub(super) fn uses_replies(config: &Config) -> bool {
    config
        .connectors
        .iter()
        .any(|c| c.action == crate::config::Action::Reply)
}

/// Starts the responder of action `reply`: its listening sockets, the
/// `steer` program that hands it refused SYNs, and its tasks.
pub(super) fn start_replies(kernel: &mut Kernel) -> anyhow::Result<Arc<Replies>> {
    let (ipv4, ipv6) = responder::listen().context("listening on loopback for the responder")?;
    kernel
        .start_replies(&ipv4, ipv6.as_ref())
        .context("handing refused SYNs to a responder needs sk_lookup (Linux 5.9+)")?;
    let flows = kernel.reply_flows_handle()?;
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
pub(super) fn warn_about_replies(config: &Config, unavailable: Option<&str>) {
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

/// Kernel ids for the connectors of `config`. A connector that already has
/// an id (`current`: id and name) keeps it, since its connections hold
/// counts under it; a new one gets an id that holds no count (`in_use`),
/// preferably one not handed out before (`used`).
pub(super) fn assign_ids(
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
pub(super) fn install(
    kernel: &mut Kernel,
    config: &Config,
    ids: &[u32],
    table: &SelectionTable,
) -> anyhow::Result<()> {
    kernel.install(config, ids, table)?;
    let named: Vec<(u32, &str)> = ids
        .iter()
        .copied()
        .zip(config.connectors.iter().map(|c| c.name.as_str()))
        .collect();
    kernel
        .set_connector_names(&named)
        .map_err(anyhow::Error::from)
}

/// The configuration the daemon starts with.
pub(super) struct LoadedConfig {
    pub(super) config: Config,
    /// For `status`: the file, or "built-in default".
    pub(super) source: String,
    pub(super) document: ConfigDocument,
    /// Where `connector new|set|remove` write.
    pub(super) path: PathBuf,
    /// The file's text, if there is a file.
    pub(super) text: Option<String>,
}

pub(super) fn load_config(path: Option<&Path>) -> anyhow::Result<LoadedConfig> {
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
pub(super) fn group_id(name: &str) -> anyhow::Result<u32> {
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

impl Daemon {
    pub(super) fn new(
        kernel: Kernel,
        parts: StartParts,
        cgroup: PathBuf,
        netns_cookie: u64,
    ) -> Daemon {
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
}
