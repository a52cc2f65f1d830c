//! Where a config change is applied: a live change from the control
//! socket, or a reload of the file (SIGHUP, `limiter reload`).

use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail};

use crate::{
    api::Reloaded,
    config::{Config, edit::ConfigDocument},
    notify,
    selection::SelectionTable,
};

use super::{
    Daemon,
    startup::{assign_ids, install, load_config, start_replies, uses_replies, warn_about_replies},
};

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
