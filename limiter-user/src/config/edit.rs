//! Changes to the config file made by `limiter connector new|set|remove`:
//! edits of the TOML document that keep its comments and layout, and an
//! atomic write-back.

use std::{
    io::Write,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use toml_edit::{Array, ArrayOfTables, DocumentMut, Item, RawString, Table, Value, value};

use crate::config::{self, Action, Config, FieldNames, LimitValue};

/// The fields a `connector new|set` may change, as typed (the command
/// line's flags, spelled as in Exchange, are these); `None` leaves a field
/// as it is (or at its default for a new connector).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct ConnectorChanges {
    /// Local IP:PORT bindings, comma-separated (0.0.0.0:25, [::]:25 for any
    /// local address).
    #[arg(long, value_delimiter = ',', value_name = "B[,B...]")]
    pub bindings: Option<Vec<String>>,
    /// Where connections to the bindings end up after NAT (REDIRECT to
    /// another port, DNAT into a container): the server's own IP:PORT,
    /// comma-separated; an empty value removes them.
    #[serde(default)]
    #[arg(long, value_delimiter = ',', value_name = "IP:PORT[,...]")]
    pub forwarded_to: Option<Vec<String>>,
    /// Remote ranges, comma-separated: addresses, CIDR blocks, first-last.
    #[arg(long, value_delimiter = ',', value_name = "R[,R...]")]
    pub remote_ip_ranges: Option<Vec<String>>,
    /// 1 to 2147483647, or unlimited.
    #[arg(long, value_name = "N|unlimited")]
    pub max_inbound_connection: Option<String>,
    /// 1 to 10000, or unlimited.
    #[arg(long, value_name = "N|unlimited")]
    pub max_inbound_connection_per_source: Option<String>,
    /// 1 to 100 (100 turns the rule off).
    #[arg(long, value_name = "1..100")]
    pub max_inbound_connection_percentage_per_source: Option<String>,
    /// New connections a source may open per --connection-rate-time-unit:
    /// 1 to 60000, or unlimited (limiter's own limit; Exchange has none).
    // Left out of the request when not given: a daemon older than the rate
    // refuses fields it does not know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long, value_name = "N|unlimited")]
    pub max_inbound_connection_rate_per_source: Option<String>,
    /// The rate's time unit, in seconds: 6 to 3600 (a new connector: 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long, value_name = "SECONDS")]
    pub connection_rate_time_unit: Option<String>,
    /// drop, reset, monitor or reply.
    #[arg(long)]
    pub action: Option<String>,
    /// With action reply: the line the sender gets ("421 ...").
    #[serde(default)]
    #[arg(long, value_name = "TEXT")]
    pub reply_text: Option<String>,
}

impl ConnectorChanges {
    pub fn is_empty(&self) -> bool {
        *self == ConnectorChanges::default()
    }

    /// The changes with an empty `--forwarded-to ''` as no endpoints, as
    /// the daemon reads them (and one from before this reads them too).
    pub fn normalized(mut self) -> ConnectorChanges {
        self.forwarded_to = self.forwarded_endpoints();
        self
    }

    /// The `forwarded_to` endpoints, an empty value (`--forwarded-to ''`)
    /// meaning none.
    fn forwarded_endpoints(&self) -> Option<Vec<String>> {
        self.forwarded_to
            .as_ref()
            .map(|list| list.iter().filter(|e| !e.is_empty()).cloned().collect())
    }

    /// Checks each value on its own, naming the flag it came with: a bad
    /// value is the operator's typing, not the file's.
    pub fn check(&self) -> Result<(), EditError> {
        let flags = &FieldNames::FLAGS;
        if let Some(list) = &self.bindings {
            config::parse_bindings(flags, list)?;
        }
        if let Some(list) = &self.forwarded_endpoints() {
            config::parse_forwarded_to(flags, list)?;
        }
        if let Some(list) = &self.remote_ip_ranges {
            config::parse_remote_ip_ranges(flags, list)?;
        }
        let limits: [(&str, &Option<String>, config::LimitCheck); 4] = [
            (
                flags.max_inbound_connection,
                &self.max_inbound_connection,
                config::check_max_inbound_connection,
            ),
            (
                flags.max_inbound_connection_per_source,
                &self.max_inbound_connection_per_source,
                config::check_max_inbound_connection_per_source,
            ),
            (
                flags.max_inbound_connection_percentage_per_source,
                &self.max_inbound_connection_percentage_per_source,
                config::check_max_inbound_connection_percentage_per_source,
            ),
            (
                flags.max_inbound_connection_rate_per_source,
                &self.max_inbound_connection_rate_per_source,
                config::check_max_inbound_connection_rate_per_source,
            ),
        ];
        for (flag, text, check) in limits {
            if let Some(text) = text {
                let v: LimitValue = text.trim().parse().map_err(|e| format!("{flag} {e}"))?;
                check(flag, v)?;
            }
        }
        if let Some(text) = &self.connection_rate_time_unit {
            let flag = flags.connection_rate_time_unit;
            let v: LimitValue = text
                .trim()
                .parse()
                .map_err(|_| config::not_seconds(flag, &format!("{:?}", text.trim())))?;
            config::check_connection_rate_time_unit(flag, v)?;
        }
        if let Some(action) = &self.action {
            Action::parse_named(flags.action, action.trim())?;
        }
        if let Some(text) = &self.reply_text {
            config::check_reply_text(flags.reply_text, text)?;
        }
        Ok(())
    }
}

/// A config file as a document that can be edited and written back.
#[derive(Clone, Debug)]
pub struct ConfigDocument {
    doc: DocumentMut,
}

/// Why an edit was refused.
pub type EditError = String;

impl ConfigDocument {
    /// Whether the file sets `key` at its top level.
    pub fn sets(&self, key: &str) -> bool {
        self.doc.contains_key(key)
    }

    /// The document of a config file's text.
    pub fn parse(text: &str) -> Result<ConfigDocument, EditError> {
        let doc = text
            .parse::<DocumentMut>()
            .map_err(|e| e.message().trim().to_string())?;
        Ok(ConfigDocument { doc })
    }

    /// A document holding `config`, for a daemon that started without a
    /// file.
    pub fn from_config(config: &Config) -> ConfigDocument {
        let mut text = format!(
            "# limiter connectors (see `limiter connector --help`).\n\
             ipv6_prefix_length = {}\n",
            config.ipv6_prefix_length,
        );
        for c in &config.connectors {
            let list = |items: Vec<String>| {
                let quoted: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
                format!("[{}]", quoted.join(", "))
            };
            let limit = |raw: u32| match LimitValue::display(raw).parse::<u32>() {
                Ok(n) => n.to_string(),
                Err(_) => "\"unlimited\"".to_string(),
            };
            let forwarded = if c.forwarded_to.is_empty() {
                String::new()
            } else {
                format!(
                    "forwarded_to = {}\n",
                    list(c.forwarded_to.iter().map(|b| b.to_string()).collect())
                )
            };
            let reply_text = if c.reply_text == crate::config::EXCHANGE_REPLY {
                String::new()
            } else {
                format!("reply_text = {:?}\n", c.reply_text)
            };
            // Written only when set: Exchange's connectors have no rate.
            let defaults = limiter_common::Limits::EXCHANGE_DEFAULT;
            let mut rate = String::new();
            if c.limits.max_inbound_connection_rate_per_source
                != defaults.max_inbound_connection_rate_per_source
            {
                rate.push_str(&format!(
                    "max_inbound_connection_rate_per_source = {}\n",
                    limit(c.limits.max_inbound_connection_rate_per_source)
                ));
            }
            if c.limits.connection_rate_time_unit != defaults.connection_rate_time_unit {
                rate.push_str(&format!(
                    "connection_rate_time_unit = {}\n",
                    c.limits.connection_rate_time_unit
                ));
            }
            text.push_str(&format!(
                "\n[[connector]]\nname = {:?}\nbindings = {}\n{forwarded}remote_ip_ranges = {}\n\
                 max_inbound_connection = {}\nmax_inbound_connection_per_source = {}\n\
                 max_inbound_connection_percentage_per_source = {}\n{rate}action = {:?}\n{reply_text}",
                c.name,
                list(c.bindings.iter().map(|b| b.to_string()).collect()),
                list(c.remote_ip_ranges.iter().map(|r| r.to_string()).collect()),
                limit(c.limits.max_inbound_connection),
                limit(c.limits.max_inbound_connection_per_source),
                c.limits.max_inbound_connection_percentage_per_source,
                c.action.name(),
            ));
        }
        ConfigDocument::parse(&text).expect("a rendered config parses")
    }

    fn connectors_mut(&mut self) -> Result<&mut ArrayOfTables, EditError> {
        let item = self
            .doc
            .entry("connector")
            .or_insert_with(|| Item::ArrayOfTables(ArrayOfTables::new()));
        item.as_array_of_tables_mut().ok_or_else(|| {
            "the config file writes its connectors in a form that cannot be edited; use [[connector]] tables"
                .to_string()
        })
    }

    fn index_of(&mut self, name: &str) -> Result<Option<usize>, EditError> {
        Ok(self.connectors_mut()?.iter().position(|t| {
            t.get("name")
                .and_then(Item::as_str)
                .is_some_and(|n| n.trim().eq_ignore_ascii_case(name.trim()))
        }))
    }

    /// Adds a connector called `name`.
    pub fn new_connector(
        &mut self,
        name: &str,
        changes: &ConnectorChanges,
    ) -> Result<(), EditError> {
        if self.index_of(name)?.is_some() {
            return Err(format!("connector \"{name}\" already exists"));
        }
        if changes.bindings.is_none() {
            return Err(format!(
                "connector \"{name}\": a new connector needs --bindings"
            ));
        }
        changes.check()?;
        let mut table = Table::new();
        table.insert("name", value(name));
        apply(&mut table, changes);
        // What follows the last connector (comments, a commented-out
        // example) stays where it was: above the new one.
        let trailing = raw(Some(self.doc.trailing()));
        if trailing.contains('#') {
            table
                .decor_mut()
                .set_prefix(format!("{}\n\n", trailing.trim_end()));
            self.doc.set_trailing("");
        }
        self.connectors_mut()?.push(table);
        Ok(())
    }

    /// Changes connector `name`.
    pub fn set_connector(
        &mut self,
        name: &str,
        changes: &ConnectorChanges,
    ) -> Result<(), EditError> {
        if changes.is_empty() {
            return Err(format!("connector \"{name}\": nothing to change"));
        }
        let index = self
            .index_of(name)?
            .ok_or_else(|| format!("there is no connector \"{name}\""))?;
        changes.check()?;
        let table = self
            .connectors_mut()?
            .get_mut(index)
            .ok_or_else(|| format!("there is no connector \"{name}\""))?;
        apply(table, changes);
        Ok(())
    }

    /// Removes connector `name`. The comments above it stay: they may say
    /// something about what follows, and a comment wrongly kept is easier
    /// to delete than a lost one is to get back.
    pub fn remove_connector(&mut self, name: &str) -> Result<(), EditError> {
        let index = self
            .index_of(name)?
            .ok_or_else(|| format!("there is no connector \"{name}\""))?;
        let connectors = self.connectors_mut()?;
        let above = connectors
            .get(index)
            .map(|t| raw(t.decor().prefix()))
            .unwrap_or_default();
        connectors.remove(index);
        if above.contains('#') {
            match connectors.get_mut(index) {
                Some(next) => {
                    let prefix = format!("{above}{}", raw(next.decor().prefix()));
                    next.decor_mut().set_prefix(prefix);
                }
                None => {
                    let trailing =
                        format!("{}\n{}", above.trim_end(), raw(Some(self.doc.trailing())));
                    self.doc.set_trailing(trailing);
                }
            }
        }
        Ok(())
    }

    /// Validates the document as a config file called `file`.
    pub fn validate(&self, file: &str) -> Result<Config, EditError> {
        Config::parse(&self.to_string(), file).map_err(|e| e.to_string())
    }

    /// Validates the document after a change to connector `changed` (see
    /// [`Config::parse_change`]).
    pub fn validate_change(&self, changed: &str) -> Result<Config, EditError> {
        Config::parse_change(&self.to_string(), changed)
    }

    /// Writes the document to `path` atomically: a temporary file in the
    /// same directory, flushed to disk, then renamed over the old one (whose
    /// permissions and owner it keeps). A symlink is written through: its
    /// target is replaced and the link stays, as config management left it.
    pub fn write_atomically(&self, path: &Path) -> std::io::Result<()> {
        let path = resolve_symlinks(path)?;
        let path = path.as_path();
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "connectors.toml".to_string());
        let temp: PathBuf = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
        let result = (|| {
            let mut file = std::fs::File::create(&temp)?;
            if let Ok(meta) = std::fs::metadata(path) {
                file.set_permissions(meta.permissions())?;
                let made = file.metadata()?;
                if (made.uid(), made.gid()) != (meta.uid(), meta.gid())
                    && let Err(e) =
                        std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid()))
                {
                    // Without CAP_CHOWN the change still takes: an owner
                    // lost is said, a change refused would not be better.
                    if e.kind() != std::io::ErrorKind::PermissionDenied {
                        return Err(e);
                    }
                    log::warn!(
                        "{}: written as {}:{}, not its owner {}:{} ({e})",
                        path.display(),
                        made.uid(),
                        made.gid(),
                        meta.uid(),
                        meta.gid()
                    );
                }
            }
            file.write_all(self.to_string().as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&temp, path)?;
            std::fs::File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        result
    }
}

/// The file `path` names once symlinks are followed (which need not exist
/// yet).
fn resolve_symlinks(path: &Path) -> std::io::Result<PathBuf> {
    let mut path = path.to_path_buf();
    // The kernel's own limit on a chain of links.
    for _ in 0..40 {
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = std::fs::read_link(&path)?;
                path = match path.parent() {
                    Some(dir) => dir.join(target),
                    None => target,
                };
            }
            _ => return Ok(path),
        }
    }
    Err(std::io::Error::from_raw_os_error(libc::ELOOP))
}

impl std::fmt::Display for ConfigDocument {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.doc.fmt(f)
    }
}

/// The text of a piece of layout (whitespace and comments).
fn raw(text: Option<&RawString>) -> String {
    text.and_then(RawString::as_str)
        .unwrap_or_default()
        .to_string()
}

/// `text` split after its first newline: the rest of a line, and what
/// follows it.
fn split_line(text: &str) -> (&str, &str) {
    match text.find('\n') {
        Some(i) => text.split_at(i + 1),
        None => ("", text),
    }
}

/// Sets `key` of `table` to `new`, keeping the layout of the value it
/// replaces: its spacing and the comment after it.
fn put(table: &mut Table, key: &str, mut new: Value) {
    match table.get_mut(key).and_then(Item::as_value_mut) {
        Some(old) => {
            *new.decor_mut() = old.decor().clone();
            *old = new;
        }
        None => {
            table.insert(key, Item::Value(new));
        }
    }
}

/// A list of `items` laid out like `old`, the list it replaces: written on
/// several lines, each item that stays keeps its line, comment included,
/// and new ones get lines of their own.
fn list_like(old: Option<&Value>, items: &[String]) -> Value {
    let mut array = Array::new();
    for item in items {
        array.push(item.trim());
    }
    let Some(Value::Array(old)) = old else {
        return Value::Array(array);
    };
    let prefixes: Vec<String> = old.iter().map(|v| raw(v.decor().prefix())).collect();
    if prefixes.iter().any(|p| p.contains('\n')) {
        // An item's comment is the rest of its line, which the parser puts
        // before the next item (or at the end of the list).
        let mut end = raw(Some(old.trailing()));
        if !old.trailing_comma() {
            end = format!(
                "{}{end}",
                raw(old.iter().last().and_then(|v| v.decor().suffix()))
            );
        }
        let line_rests: Vec<&str> = prefixes
            .iter()
            .skip(1)
            .map(|p| split_line(p).0)
            .chain([split_line(&end).0])
            .collect();
        let kept: Vec<(Option<&str>, &str, &str)> = old
            .iter()
            .zip(&prefixes)
            .zip(&line_rests)
            .map(|((v, prefix), rest)| (v.as_str().map(str::trim), split_line(prefix).1, *rest))
            .collect();
        let indent = kept
            .iter()
            .rev()
            .map(|(_, above, _)| above.rsplit('\n').next().unwrap_or_default())
            .find(|i| i.trim().is_empty())
            .unwrap_or("    ");
        // What goes before an item: the rest of the line before it, then
        // its own lines.
        let mut before = split_line(&prefixes[0]).0.to_string();
        for item in array.iter_mut() {
            let (above, rest) = kept
                .iter()
                .find(|(text, _, _)| *text == item.as_str())
                .map(|(_, above, rest)| (*above, *rest))
                .unwrap_or((indent, "\n"));
            item.decor_mut().set_prefix(format!("{before}{above}"));
            item.decor_mut().set_suffix("");
            before = rest.to_string();
        }
        let after_end = split_line(&end).1;
        match array.iter_mut().last() {
            Some(last) if !old.trailing_comma() => {
                last.decor_mut().set_suffix(before);
                array.set_trailing(after_end);
            }
            _ => {
                array.set_trailing_comma(old.trailing_comma());
                array.set_trailing(format!("{before}{after_end}"));
            }
        }
    }
    *array.decor_mut() = old.decor().clone();
    Value::Array(array)
}

fn apply(table: &mut Table, changes: &ConnectorChanges) {
    let list = |table: &mut Table, key: &str, items: &[String]| {
        let new = list_like(table.get(key).and_then(Item::as_value), items);
        put(table, key, new);
    };
    // A number stays a number; anything else is kept as text for validation
    // to judge ("unlimited", or a mistake it will name).
    let limit = |text: &str| match text.trim().parse::<i64>() {
        Ok(n) => Value::from(n),
        Err(_) => Value::from(text.trim()),
    };
    if let Some(bindings) = &changes.bindings {
        list(table, "bindings", bindings);
    }
    if let Some(endpoints) = &changes.forwarded_endpoints() {
        if endpoints.is_empty() {
            table.remove("forwarded_to");
        } else {
            list(table, "forwarded_to", endpoints);
        }
    }
    if let Some(ranges) = &changes.remote_ip_ranges {
        list(table, "remote_ip_ranges", ranges);
    }
    for (key, change) in [
        ("max_inbound_connection", &changes.max_inbound_connection),
        (
            "max_inbound_connection_per_source",
            &changes.max_inbound_connection_per_source,
        ),
        (
            "max_inbound_connection_percentage_per_source",
            &changes.max_inbound_connection_percentage_per_source,
        ),
        (
            "max_inbound_connection_rate_per_source",
            &changes.max_inbound_connection_rate_per_source,
        ),
        (
            "connection_rate_time_unit",
            &changes.connection_rate_time_unit,
        ),
    ] {
        if let Some(text) = change {
            put(table, key, limit(text));
        }
    }
    if let Some(action) = &changes.action {
        put(table, "action", Value::from(action.trim()));
    }
    if let Some(text) = &changes.reply_text {
        put(table, "reply_text", Value::from(text.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# Our MX.\nipv6_prefix_length = 64 # per /64\n\n\
        [[connector]]\n# The front door.\nname = \"Default Frontend\"\nbindings = [\"0.0.0.0:25\"]\n\
        max_inbound_connection_per_source = 20 # Exchange's default\n";

    fn set(what: &str, to: &str) -> ConnectorChanges {
        let mut c = ConnectorChanges::default();
        match what {
            "per_source" => c.max_inbound_connection_per_source = Some(to.into()),
            "max" => c.max_inbound_connection = Some(to.into()),
            "pct" => c.max_inbound_connection_percentage_per_source = Some(to.into()),
            "ranges" => c.remote_ip_ranges = Some(to.split(',').map(String::from).collect()),
            "bindings" => c.bindings = Some(to.split(',').map(String::from).collect()),
            "rate" => c.max_inbound_connection_rate_per_source = Some(to.into()),
            "unit" => c.connection_rate_time_unit = Some(to.into()),
            _ => unreachable!(),
        }
        c
    }

    #[test]
    fn set_keeps_comments_and_validates() {
        let mut d = ConfigDocument::parse(FILE).unwrap();
        d.set_connector("default frontend", &set("per_source", "unlimited"))
            .unwrap();
        let text = d.to_string();
        assert!(
            text.contains("# Our MX.")
                && text.contains("# The front door.")
                && text.contains("# per /64")
        );
        assert!(
            text.contains("max_inbound_connection_per_source = \"unlimited\""),
            "{text}"
        );
        let config = d.validate("c.toml").unwrap();
        assert_eq!(
            config.connectors[0]
                .limits
                .max_inbound_connection_per_source,
            limiter_common::UNLIMITED
        );
    }

    #[test]
    fn bad_values_name_the_flag_not_the_file() {
        for (what, to, expected) in [
            (
                "per_source",
                "0",
                "--max-inbound-connection-per-source 0 is out of range (1 to 10000, or unlimited)",
            ),
            (
                "pct",
                "0",
                "--max-inbound-connection-percentage-per-source 0 is out of range (1 to 100)",
            ),
            (
                "pct",
                "unlimited",
                "--max-inbound-connection-percentage-per-source cannot be unlimited (1 to 100; 100 turns it off)",
            ),
            (
                "max",
                "lots",
                "--max-inbound-connection \"lots\" is not a number or \"unlimited\"",
            ),
            (
                "ranges",
                "10.0.0.0/33",
                "--remote-ip-ranges \"10.0.0.0/33\" is not an IP address, a CIDR block or a first-last range",
            ),
            (
                "bindings",
                "0.0.0.0",
                "--bindings \"0.0.0.0\" is not IP:port (IPv6 as [addr]:port)",
            ),
            (
                "bindings",
                "0.0.0.0:25,0.0.0.0:25",
                "--bindings 0.0.0.0:25 is listed twice",
            ),
            (
                "rate",
                "0",
                "--max-inbound-connection-rate-per-source 0 is out of range (1 to 60000 a time unit, or unlimited)",
            ),
            (
                "rate",
                "often",
                "--max-inbound-connection-rate-per-source \"often\" is not a number or \"unlimited\"",
            ),
            (
                "unit",
                "5",
                "--connection-rate-time-unit 5 is out of range (6 to 3600 seconds)",
            ),
            (
                "unit",
                "unlimited",
                "--connection-rate-time-unit must be a number of seconds (6 to 3600)",
            ),
            (
                "unit",
                "1m",
                "--connection-rate-time-unit \"1m\" is not a number of seconds (6 to 3600)",
            ),
        ] {
            let mut d = ConfigDocument::parse(FILE).unwrap();
            assert_eq!(
                d.set_connector("Default Frontend", &set(what, to)),
                Err(expected.to_string())
            );
            assert_eq!(d.to_string(), FILE, "nothing changed");
        }
        let mut d = ConfigDocument::parse(FILE).unwrap();
        let mut bad = set("bindings", "0.0.0.0:587");
        bad.action = Some("bounce".into());
        assert_eq!(
            d.new_connector("Relay", &bad),
            Err("--action \"bounce\" is not drop, reset, monitor or reply".to_string())
        );
        // Errors of the file itself still name the file and its keys.
        let e = Config::parse(
            &FILE.replace("= 20 #", "= 0 #"),
            "/etc/limiter/connectors.toml",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "/etc/limiter/connectors.toml: connector \"Default Frontend\": max_inbound_connection_per_source 0 is out of range (1 to 10000, or unlimited)"
        );
    }

    #[test]
    fn a_collision_names_the_changed_connector_first() {
        let two = "[[connector]]\nname = \"Old\"\nbindings = [\"0.0.0.0:25\"]\n\
                   remote_ip_ranges = [\"10.1.0.0/24\"]\n\
                   [[connector]]\nname = \"Later\"\nbindings = [\"0.0.0.0:25\"]\n\
                   remote_ip_ranges = [\"10.2.0.0/24\"]\n";
        // Added with a range that starts first: at start the old one would
        // be blamed.
        let mut d = ConfigDocument::parse(two).unwrap();
        let mut crossing = set("bindings", "0.0.0.0:25");
        crossing.remote_ip_ranges = Some(vec!["10.0.255.0-10.1.0.5".into()]);
        d.new_connector("New", &crossing).unwrap();
        assert_eq!(
            d.validate_change("New").unwrap_err(),
            "connector \"New\": remote range 10.0.255.0-10.1.0.5 overlaps 10.1.0.0/24 (connector \"Old\") on binding 0.0.0.0:25 without one containing the other"
        );
        assert!(
            d.validate("c.toml")
                .unwrap_err()
                .starts_with("c.toml: connector \"Old\": ")
        );
        // The earlier connector changed to the later one's range.
        let mut d = ConfigDocument::parse(two).unwrap();
        d.set_connector("old", &set("ranges", "10.2.0.0-10.2.0.255"))
            .unwrap();
        assert_eq!(
            d.validate_change("old").unwrap_err(),
            "connector \"Old\": remote range 10.2.0.0-10.2.0.255 on binding 0.0.0.0:25 is also on connector \"Later\""
        );
        // A new binding that is where an old connector's connections end up.
        let mut d = ConfigDocument::parse(two).unwrap();
        let forwarded = ConnectorChanges {
            forwarded_to: Some(vec!["10.0.0.2:25".into()]),
            ..ConnectorChanges::default()
        };
        d.set_connector("Old", &forwarded).unwrap();
        d.new_connector("New", &set("bindings", "10.0.0.2:25"))
            .unwrap();
        assert_eq!(
            d.validate_change("New").unwrap_err(),
            "connector \"New\": binding 10.0.0.2:25 is a forwarded_to endpoint of connector \"Old\""
        );
    }

    #[test]
    fn set_keeps_inline_comments_and_list_layout() {
        let file = "[[connector]]\nname = \"Frontend\"\n\
            bindings = [\"0.0.0.0:25\"]    # the MX\n\
            remote_ip_ranges = [\n    \"10.1.0.0/24\",     # app servers\n    \"192.168.1.75\",    # scanner\n]\n\
            max_inbound_connection_per_source = 20   # agreed with security, ticket 4711\n";
        let mut d = ConfigDocument::parse(file).unwrap();
        let mut change = set("per_source", "30");
        change.bindings = Some(vec!["0.0.0.0:25".into(), "[::]:25".into()]);
        change.remote_ip_ranges = Some(vec!["192.168.1.75".into(), "10.3.0.0/24".into()]);
        d.set_connector("Frontend", &change).unwrap();
        assert_eq!(
            d.to_string(),
            "[[connector]]\nname = \"Frontend\"\n\
             bindings = [\"0.0.0.0:25\", \"[::]:25\"]    # the MX\n\
             remote_ip_ranges = [\n    \"192.168.1.75\",    # scanner\n    \"10.3.0.0/24\",\n]\n\
             max_inbound_connection_per_source = 30   # agreed with security, ticket 4711\n"
        );
        // Without a trailing comma, and an item added in the middle.
        let file = "[[connector]]\nname = \"F\"\nbindings = [\"0.0.0.0:25\"]\n\
            remote_ip_ranges = [ # who may\n  \"10.1.0.0/24\", # apps\n  \"10.2.0.0/24\" # backup\n] # end\n";
        let mut d = ConfigDocument::parse(file).unwrap();
        d.set_connector("F", &set("ranges", "10.1.0.0/24,10.5.0.0/24,10.2.0.0/24"))
            .unwrap();
        assert_eq!(
            d.to_string(),
            "[[connector]]\nname = \"F\"\nbindings = [\"0.0.0.0:25\"]\n\
             remote_ip_ranges = [ # who may\n  \"10.1.0.0/24\", # apps\n  \"10.5.0.0/24\",\n  \"10.2.0.0/24\" # backup\n] # end\n"
        );
        d.validate("c.toml").unwrap();
    }

    #[test]
    fn comments_between_connectors_stay_where_they_were() {
        let shipped = include_str!("../../../dist/connectors.toml");
        let mut d = ConfigDocument::parse(shipped).unwrap();
        let mut relay = set("bindings", "0.0.0.0:25");
        relay.remote_ip_ranges = Some(vec!["10.1.0.0/24".into()]);
        d.new_connector("Relay", &relay).unwrap();
        let text = d.to_string();
        let example = text.find("# name = \"Application Relay\"").unwrap();
        let added = text.find("name = \"Relay\"").unwrap();
        assert!(example < added, "{text}");
        assert!(text.starts_with(shipped.trim_end()), "{text}");
        assert_eq!(d.validate("c.toml").unwrap().connectors.len(), 2);
        // Removed again: the file as it was.
        d.remove_connector("Relay").unwrap();
        assert_eq!(d.to_string(), shipped);
        // A comment above a removed connector stays for the next one.
        let file = "[[connector]]\nname = \"A\"\nbindings = [\"0.0.0.0:25\"]\n\n\
            # Submission.\n[[connector]]\nname = \"B\"\nbindings = [\"0.0.0.0:587\"]\n\n\
            [[connector]]\nname = \"C\"\nbindings = [\"0.0.0.0:465\"]\n";
        let mut d = ConfigDocument::parse(file).unwrap();
        d.remove_connector("B").unwrap();
        assert_eq!(
            d.to_string(),
            "[[connector]]\nname = \"A\"\nbindings = [\"0.0.0.0:25\"]\n\n\
             # Submission.\n\n[[connector]]\nname = \"C\"\nbindings = [\"0.0.0.0:465\"]\n"
        );
    }

    #[test]
    fn new_and_remove() {
        let mut d = ConfigDocument::parse(FILE).unwrap();
        let mut relay = set("bindings", "0.0.0.0:25");
        relay.remote_ip_ranges = Some(vec!["10.1.0.0/24".into()]);
        d.new_connector("Relay", &relay).unwrap();
        assert_eq!(d.validate("c.toml").unwrap().connectors.len(), 2);
        assert!(
            d.new_connector("relay", &relay)
                .unwrap_err()
                .contains("already exists")
        );
        assert!(
            d.new_connector("Other", &ConnectorChanges::default())
                .unwrap_err()
                .contains("needs --bindings")
        );
        // Overlapping without nesting is refused by validation.
        let mut crossing = set("bindings", "0.0.0.0:25");
        crossing.remote_ip_ranges = Some(vec!["10.1.0.128-10.1.1.5".into()]);
        let mut d2 = d.clone();
        d2.new_connector("Crossing", &crossing).unwrap();
        assert!(d2.validate("c.toml").unwrap_err().contains("overlaps"));
        d.remove_connector("Relay").unwrap();
        assert_eq!(d.validate("c.toml").unwrap().connectors.len(), 1);
        assert!(
            d.remove_connector("Relay")
                .unwrap_err()
                .contains("no connector")
        );
        assert!(
            d.set_connector("Nope", &set("max", "5"))
                .unwrap_err()
                .contains("no connector \"Nope\"")
        );
    }

    #[test]
    fn the_builtin_default_round_trips() {
        let config = Config::builtin_default();
        let d = ConfigDocument::from_config(&config);
        assert_eq!(d.validate("c.toml").unwrap(), config);
        assert!(!d.to_string().contains("rate"), "{d}");
        // A rate is written when there is one.
        let mut rated = config.clone();
        rated.connectors[0]
            .limits
            .max_inbound_connection_rate_per_source = 30;
        rated.connectors[0].limits.connection_rate_time_unit = 10;
        let d = ConfigDocument::from_config(&rated);
        assert_eq!(d.validate("c.toml").unwrap(), rated);
    }

    #[test]
    fn the_rate_is_written_like_the_other_limits() {
        let mut d = ConfigDocument::parse(FILE).unwrap();
        let mut change = set("rate", "30");
        change.connection_rate_time_unit = Some(" 10 ".into());
        d.set_connector("Default Frontend", &change).unwrap();
        let text = d.to_string();
        assert!(
            text.ends_with(
                "max_inbound_connection_per_source = 20 # Exchange's default\n\
                 max_inbound_connection_rate_per_source = 30\n\
                 connection_rate_time_unit = 10\n"
            ),
            "{text}"
        );
        let limits = d.validate("c.toml").unwrap().connectors[0].limits;
        assert_eq!(
            (
                limits.max_inbound_connection_rate_per_source,
                limits.connection_rate_time_unit
            ),
            (30, 10)
        );
        // Back to unlimited, in place; the unit stays.
        d.set_connector("Default Frontend", &set("rate", "unlimited"))
            .unwrap();
        assert!(
            d.to_string().contains(
                "max_inbound_connection_rate_per_source = \"unlimited\"\nconnection_rate_time_unit = 10\n"
            ),
            "{d}"
        );
        let limits = d.validate("c.toml").unwrap().connectors[0].limits;
        assert_eq!(
            limits.max_inbound_connection_rate_per_source,
            limiter_common::UNLIMITED
        );
        // A new connector with a rate.
        let mut relay = set("bindings", "0.0.0.0:587");
        relay.max_inbound_connection_rate_per_source = Some("5".into());
        d.new_connector("Relay", &relay).unwrap();
        let config = d.validate("c.toml").unwrap();
        let relay = &config.connectors[1].limits;
        assert_eq!(
            (
                relay.max_inbound_connection_rate_per_source,
                relay.connection_rate_time_unit
            ),
            (5, limiter_common::rate::DEFAULT_RATE_UNIT_SECS)
        );
    }

    #[test]
    fn changes_without_a_rate_are_sent_as_an_older_daemon_reads_them() {
        let json = serde_json::to_value(set("max", "5")).unwrap();
        assert!(
            json.get("max_inbound_connection_rate_per_source").is_none()
                && json.get("connection_rate_time_unit").is_none(),
            "{json}"
        );
        let mut both = set("rate", "30");
        both.connection_rate_time_unit = Some("10".into());
        let json = serde_json::to_value(&both).unwrap();
        assert_eq!(
            (
                &json["max_inbound_connection_rate_per_source"],
                &json["connection_rate_time_unit"]
            ),
            (&"30".into(), &"10".into())
        );
        assert_eq!(
            serde_json::from_value::<ConnectorChanges>(json).unwrap(),
            both
        );
    }

    #[test]
    fn atomic_write() {
        let dir = std::env::temp_dir().join(format!("limiter-edit-{}", std::process::id()));
        let path = dir.join("connectors.toml");
        let d = ConfigDocument::parse(FILE).unwrap();
        d.write_atomically(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), FILE);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_symlink_is_written_through() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("limiter-edit-link-{}", std::process::id()));
        let (etc, deployed) = (dir.join("etc"), dir.join("deployed"));
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(&deployed).unwrap();
        let target = deployed.join("connectors.toml");
        std::fs::write(&target, "# old\n").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).unwrap();
        // A relative link, through a second link.
        std::os::unix::fs::symlink("../deployed/connectors.toml", etc.join("real.toml")).unwrap();
        std::os::unix::fs::symlink("real.toml", etc.join("connectors.toml")).unwrap();
        let d = ConfigDocument::parse(FILE).unwrap();
        d.write_atomically(&etc.join("connectors.toml")).unwrap();
        for link in ["connectors.toml", "real.toml"] {
            let meta = std::fs::symlink_metadata(etc.join(link)).unwrap();
            assert!(meta.file_type().is_symlink(), "{link} is still a link");
        }
        assert_eq!(std::fs::read_to_string(&target).unwrap(), FILE);
        let mode = std::fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
        assert_eq!(std::fs::read_dir(&etc).unwrap().count(), 2);
        assert_eq!(std::fs::read_dir(&deployed).unwrap().count(), 1);
        // A dangling link: its target is made.
        std::fs::remove_file(&target).unwrap();
        d.write_atomically(&etc.join("connectors.toml")).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), FILE);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Gives up CAP_CHOWN on the calling thread only (capabilities are
    /// per thread): what a daemon whose unit does not grant it has.
    fn drop_cap_chown() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        const CAP_CHOWN: u32 = 0;
        let mut header = Header {
            version: VERSION_3,
            pid: 0,
        };
        let mut data = [Data::default(); 2];
        // SAFETY: capget/capset with a v3 header and two data words.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
                0
            );
            data[0].effective &= !(1 << CAP_CHOWN);
            data[0].permitted &= !(1 << CAP_CHOWN);
            assert_eq!(
                libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()),
                0
            );
        }
    }

    #[test]
    fn without_cap_chown_a_change_is_still_written() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        // SAFETY: no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "run as root (cargo xtask test)"
        );
        let dir = std::env::temp_dir().join(format!("limiter-edit-chown-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("connectors.toml");
        std::fs::write(&path, "# old\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        let d = ConfigDocument::parse(FILE).unwrap();
        let written = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    drop_cap_chown();
                    d.write_atomically(&path)
                })
                .join()
                .unwrap()
        });
        written.expect("written, though its owner could not be kept");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), FILE);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o640));
        // With CAP_CHOWN (this thread), the owner is kept.
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        d.write_atomically(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().uid(), 65534);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
