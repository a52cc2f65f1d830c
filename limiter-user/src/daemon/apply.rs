//! The config file read, and where a config goes into the kernel: at
//! start, on a live change from the control socket, on a reload of the file
//! (SIGHUP, `limiter reload`).

use crate::kernel::Kernel;
use limiter_common::maps::MAX_CONNECTORS;
use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

use std::sync::{Arc, Mutex};

use anyhow::{Context, anyhow, bail};

use crate::{
    api::Reloaded,
    config::{Config, edit::ConfigDocument},
    notify,
    selection::SelectionTable,
};

use super::{DEFAULT_CONFIG_PATH, Daemon};
use crate::responder::{self, Replies};

/// Reloads the config on every SIGHUP (`systemctl reload` with
/// `kill -HUP`); a refused file is said in the log, and nothing changes.
pub(super) async fn reload_on_hangup(
    mut hangup: tokio::signal::unix::Signal,
    daemon: Arc<Mutex<Daemon>>,
) {
    while hangup.recv().await.is_some() {
        let result = tokio::task::block_in_place(|| daemon.lock().expect("daemon lock").reload());
        if let Err(e) = result {
            log::error!("SIGHUP: reload refused, still enforcing the config read before: {e:#}");
        }
    }
}

impl Daemon {
    /// Kernel ids for the connectors of `config` (see [`assign_ids`]).
    pub(super) fn assign_ids(&self, config: &Config) -> anyhow::Result<Vec<u32>> {
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
    pub(super) fn change(
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
    pub(super) fn reload(&mut self) -> anyhow::Result<Reloaded> {
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
    pub(super) fn apply(
        &mut self,
        config: Config,
    ) -> anyhow::Result<(Config, Vec<u32>, SelectionTable)> {
        let ids = self.assign_ids(&config)?;
        let table = SelectionTable::build_with_ids(&config, &ids);
        self.prepare_replies(&config);
        if let Some(replies) = &self.replies {
            replies.set_texts(&config, &ids);
        }
        if let Err(e) = self.kernel.install(&config, &ids, &table) {
            self.restore();
            return Err(
                anyhow::Error::new(e).context("updating the kernel tables (nothing changed)")
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
    pub(super) fn undo(&mut self, (config, ids, table): (Config, Vec<u32>, SelectionTable)) {
        self.config = config;
        self.ids = ids;
        self.table = table;
        self.restore();
    }

    /// Puts the current config back into the kernel after a failed change.
    pub(super) fn restore(&mut self) {
        if let Some(replies) = &self.replies {
            replies.set_texts(&self.config, &self.ids);
        }
        if let Err(e) = install(&mut self.kernel, &self.config, &self.ids, &self.table) {
            log::error!("restoring the kernel tables: {e:#}");
        }
    }

    /// Starts the responder when `config` is the first to use action
    /// reply, and says what it cannot do.
    pub(super) fn prepare_replies(&mut self, config: &Config) {
        if uses_replies(config) && self.replies.is_none() && self.replies_unavailable.is_none() {
            match start_replies(&mut self.kernel) {
                Ok(replies) => self.replies = Some(replies),
                Err(why) => self.replies_unavailable = Some(format!("{why:#}")),
            }
        }
        if !uses_replies(config) {
            self.kernel.clear_reply_marks();
        }
        warn_about_replies(config, self.replies_unavailable.as_deref());
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

pub(super) fn uses_replies(config: &Config) -> bool {
    config
        .connectors
        .iter()
        .any(|c| c.action == crate::config::Action::Reply)
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
