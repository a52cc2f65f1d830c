//! Starting: the programs loaded and attached, the config installed, the
//! connections that already exist counted.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use anyhow::Context;
use limiter_common::maps::FlowKey;
use tokio::net::UnixListener;

use crate::{
    kernel::{AttachedMode, Kernel, LinkLayer, TableSizes, pins::PinDir},
    preflight::{self, Bpffs},
    resets::Resetter,
    responder::Replies,
    selection::SelectionTable,
};

use super::{
    Daemon, Made, RunOptions,
    apply::{LoadedConfig, assign_ids, install, start_replies, uses_replies, warn_about_replies},
    housekeeping::reconcile,
    server::bind_control,
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
