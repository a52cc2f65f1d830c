//! The config file (`connectors.toml`) and its validation, which follows
//! Exchange: limits in Exchange's ranges, unique (binding, remote range)
//! pairs, and ranges on one binding that overlap only when one contains the
//! other.

pub mod edit;
pub mod range;

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, SocketAddr},
    path::Path,
    str::FromStr,
    time::Duration,
};

use limiter_common::{
    Limits, UNLIMITED,
    admission::{MAX_INBOUND_CONNECTION_LIMIT, MAX_INBOUND_CONNECTION_PER_SOURCE_LIMIT},
    maps::MAX_CONNECTORS,
    rate::{MAX_RATE_LIMIT, MAX_RATE_UNIT_SECS, MIN_RATE_UNIT_SECS},
};
use serde::{Deserialize, Serialize};

use self::range::IpRange;

/// The name of the built-in connector used when there is no config file.
pub const DEFAULT_CONNECTOR_NAME: &str = "Default Frontend";
const DEFAULT_IPV6_PREFIX_LENGTH: u8 = 64;
const MIN_HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(100);
const MAX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(600);
/// Exchange's limit on the length of a connector name.
const MAX_NAME_LEN: usize = 64;

/// A validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// IPv6 sources are counted per prefix of this length.
    pub ipv6_prefix_length: u8,
    pub connectors: Vec<Connector>,
}

/// A receive connector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connector {
    pub name: String,
    pub bindings: Vec<Binding>,
    /// Where the connections to the bindings end up after NAT (a REDIRECT
    /// to another port, DNAT into a container): the server's sockets, judged
    /// as this connector's, in whatever network namespace they are.
    pub forwarded_to: Vec<Binding>,
    pub remote_ip_ranges: Vec<IpRange>,
    pub limits: Limits,
    pub action: Action,
    /// With action `reply`, the line the sender gets (CRLF added).
    pub reply_text: String,
}

/// Exchange's answer to a sender over one of these limits.
pub const EXCHANGE_REPLY: &str = "421 4.3.2 The maximum number of concurrent connections has exceeded a limit, closing transmission channel";
/// The longest `reply_text` (RFC 5321's limit on a reply line, CRLF left
/// out).
const MAX_REPLY_TEXT: usize = 510;

/// A `reply_text` as the sender may get it: a 421 line of printable ASCII;
/// `name` is what the operator calls it (the key or the flag).
pub fn check_reply_text(name: &str, text: &str) -> Result<(), String> {
    if !text.starts_with("421 ") || text[4..].trim().is_empty() {
        return Err(format!(
            "{name} {text:?} must be \"421 \" and a text (a transient refusal: the sender retries)"
        ));
    }
    if text.len() > MAX_REPLY_TEXT || !text.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(format!(
            "{name} {text:?} must be one line of printable ASCII, at most {MAX_REPLY_TEXT} characters"
        ));
    }
    Ok(())
}

/// What a connector's fields are called in a message: the file's keys when
/// the file is at fault, the flags of `connector new|set` when a flag is.
#[derive(Clone, Copy, Debug)]
pub struct FieldNames {
    /// Of one binding (the key is a list).
    pub binding: &'static str,
    pub forwarded_to: &'static str,
    pub remote_ip_ranges: &'static str,
    pub max_inbound_connection: &'static str,
    pub max_inbound_connection_per_source: &'static str,
    pub max_inbound_connection_percentage_per_source: &'static str,
    pub max_inbound_connection_rate_per_source: &'static str,
    pub connection_rate_time_unit: &'static str,
    pub action: &'static str,
    pub reply_text: &'static str,
}

impl FieldNames {
    /// The config file's keys.
    pub const KEYS: FieldNames = FieldNames {
        binding: "binding",
        forwarded_to: "forwarded_to",
        remote_ip_ranges: "remote_ip_ranges",
        max_inbound_connection: "max_inbound_connection",
        max_inbound_connection_per_source: "max_inbound_connection_per_source",
        max_inbound_connection_percentage_per_source: "max_inbound_connection_percentage_per_source",
        max_inbound_connection_rate_per_source: "max_inbound_connection_rate_per_source",
        connection_rate_time_unit: "connection_rate_time_unit",
        action: "action",
        reply_text: "reply_text",
    };
    /// The flags of `limiter connector new|set`.
    pub const FLAGS: FieldNames = FieldNames {
        binding: "--bindings",
        forwarded_to: "--forwarded-to",
        remote_ip_ranges: "--remote-ip-ranges",
        max_inbound_connection: "--max-inbound-connection",
        max_inbound_connection_per_source: "--max-inbound-connection-per-source",
        max_inbound_connection_percentage_per_source: "--max-inbound-connection-percentage-per-source",
        max_inbound_connection_rate_per_source: "--max-inbound-connection-rate-per-source",
        connection_rate_time_unit: "--connection-rate-time-unit",
        action: "--action",
        reply_text: "--reply-text",
    };
}

/// The bindings of a list, each once.
pub fn parse_bindings(names: &FieldNames, list: &[String]) -> Result<Vec<Binding>, String> {
    if list.is_empty() {
        return Err("no bindings".to_string());
    }
    let mut bindings = Vec::new();
    for b in list {
        let binding = Binding::parse_named(names.binding, b)?;
        if bindings.contains(&binding) {
            return Err(format!("{} {binding} is listed twice", names.binding));
        }
        bindings.push(binding);
    }
    Ok(bindings)
}

/// The `forwarded_to` endpoints of a list: the server's own addresses, each
/// once (that they are not also bindings is checked with the bindings).
pub fn parse_forwarded_to(names: &FieldNames, list: &[String]) -> Result<Vec<Binding>, String> {
    let name = names.forwarded_to;
    let mut endpoints = Vec::new();
    for f in list {
        let endpoint = Binding::parse_named(name, f)?;
        if endpoint.is_wildcard() {
            return Err(format!(
                "{name} {endpoint} is not an address: give the server's own (a container's, say)"
            ));
        }
        if endpoints.contains(&endpoint) {
            return Err(format!("{name} {endpoint} is listed twice"));
        }
        endpoints.push(endpoint);
    }
    Ok(endpoints)
}

/// The remote ranges of a list.
pub fn parse_remote_ip_ranges(names: &FieldNames, list: &[String]) -> Result<Vec<IpRange>, String> {
    let name = names.remote_ip_ranges;
    if list.is_empty() {
        return Err(format!("{name} is empty"));
    }
    list.iter()
        .map(|r| r.parse::<IpRange>().map_err(|e| format!("{name} {e}")))
        .collect()
}

/// A local `IP:port`; `0.0.0.0` and `::` stand for any local address of the
/// family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Binding(pub SocketAddr);

impl Binding {
    pub fn is_wildcard(&self) -> bool {
        self.0.ip().is_unspecified()
    }

    pub fn is_ipv4(&self) -> bool {
        self.0.is_ipv4()
    }

    pub fn port(&self) -> u16 {
        self.0.port()
    }
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Binding {
    /// Parses `s`, calling it `name` in an error.
    pub fn parse_named(name: &str, s: &str) -> Result<Binding, String> {
        let addr: SocketAddr = s
            .trim()
            .parse()
            .map_err(|_| format!("{name} {s:?} is not IP:port (IPv6 as [addr]:port)"))?;
        if addr.port() == 0 {
            return Err(format!("{name} {s:?} has port 0"));
        }
        if let IpAddr::V6(v6) = addr.ip()
            && v6.to_ipv4_mapped().is_some()
        {
            return Err(format!(
                "{name} {s:?} is an IPv4-mapped address; write it as IPv4"
            ));
        }
        Ok(Binding(addr))
    }
}

impl FromStr for Binding {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Binding::parse_named("binding", s)
    }
}

/// What happens to a SYN over the cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Drop it; the client retries later.
    #[default]
    Drop,
    /// Answer it with a RST; the client moves on at once.
    Reset,
    /// Admit it, but count and report it.
    Monitor,
    /// Answer it as Exchange does: a `421 4.3.2` line, then close.
    Reply,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Drop => "drop",
            Action::Reset => "reset",
            Action::Monitor => "monitor",
            Action::Reply => "reply",
        }
    }

    pub fn to_raw(self) -> u32 {
        use limiter_common::maps::action;
        match self {
            Action::Drop => action::DROP,
            Action::Reset => action::RESET,
            Action::Monitor => action::MONITOR,
            Action::Reply => action::REPLY,
        }
    }
}

impl Action {
    /// Parses `s`, calling it `name` in an error.
    pub fn parse_named(name: &str, s: &str) -> Result<Action, String> {
        match s {
            "drop" => Ok(Action::Drop),
            "reset" => Ok(Action::Reset),
            "monitor" => Ok(Action::Monitor),
            "reply" => Ok(Action::Reply),
            _ => Err(format!("{name} {s:?} is not drop, reset, monitor or reply")),
        }
    }
}

impl FromStr for Action {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Action::parse_named("action", s)
    }
}

/// A limit as written: a number or `unlimited`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitValue {
    Unlimited,
    Value(i64),
}

impl LimitValue {
    /// Formats a kernel limit as Exchange prints it.
    pub fn display(raw: u32) -> String {
        if raw == UNLIMITED {
            "unlimited".to_string()
        } else {
            raw.to_string()
        }
    }
}

impl FromStr for LimitValue {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("unlimited") {
            return Ok(LimitValue::Unlimited);
        }
        s.parse::<i64>()
            .map(LimitValue::Value)
            .map_err(|_| format!("{s:?} is not a number or \"unlimited\""))
    }
}

impl LimitValue {
    /// A limit as the config file writes it: an integer or "unlimited".
    pub fn from_toml(name: &str, value: &toml::Value) -> Result<LimitValue, String> {
        match value {
            toml::Value::Integer(n) => Ok(LimitValue::Value(*n)),
            toml::Value::String(s) => s.parse().map_err(|e| format!("{name} {e}")),
            other => Err(format!("{name} {other} is not a number or \"unlimited\"")),
        }
    }
}

/// A check of one limit against Exchange's range, calling it by the given
/// name in an error.
pub type LimitCheck = fn(&str, LimitValue) -> Result<u32, String>;

/// The three limits of a connector as numbers checked against Exchange's
/// ranges.
pub fn check_max_inbound_connection(name: &str, v: LimitValue) -> Result<u32, String> {
    match v {
        LimitValue::Unlimited => Ok(UNLIMITED),
        LimitValue::Value(n) if (1..=MAX_INBOUND_CONNECTION_LIMIT as i64).contains(&n) => {
            Ok(n as u32)
        }
        LimitValue::Value(n) => Err(format!(
            "{name} {n} is out of range (1 to {MAX_INBOUND_CONNECTION_LIMIT}, or unlimited)"
        )),
    }
}

pub fn check_max_inbound_connection_per_source(name: &str, v: LimitValue) -> Result<u32, String> {
    match v {
        LimitValue::Unlimited => Ok(UNLIMITED),
        LimitValue::Value(n)
            if (1..=MAX_INBOUND_CONNECTION_PER_SOURCE_LIMIT as i64).contains(&n) =>
        {
            Ok(n as u32)
        }
        LimitValue::Value(n) => Err(format!(
            "{name} {n} is out of range (1 to {MAX_INBOUND_CONNECTION_PER_SOURCE_LIMIT}, or unlimited)"
        )),
    }
}

pub fn check_max_inbound_connection_rate_per_source(
    name: &str,
    v: LimitValue,
) -> Result<u32, String> {
    match v {
        LimitValue::Unlimited => Ok(UNLIMITED),
        LimitValue::Value(n) if (1..=MAX_RATE_LIMIT as i64).contains(&n) => Ok(n as u32),
        LimitValue::Value(n) => Err(format!(
            "{name} {n} is out of range (1 to {MAX_RATE_LIMIT} a time unit, or unlimited)"
        )),
    }
}

/// The time unit of the rate, in seconds (a number; `unlimited` makes no
/// sense here).
pub fn check_connection_rate_time_unit(name: &str, v: LimitValue) -> Result<u32, String> {
    match v {
        LimitValue::Value(n)
            if (MIN_RATE_UNIT_SECS as i64..=MAX_RATE_UNIT_SECS as i64).contains(&n) =>
        {
            Ok(n as u32)
        }
        LimitValue::Value(n) => Err(format!(
            "{name} {n} is out of range ({MIN_RATE_UNIT_SECS} to {MAX_RATE_UNIT_SECS} seconds)"
        )),
        LimitValue::Unlimited => Err(format!(
            "{name} must be a number of seconds ({MIN_RATE_UNIT_SECS} to {MAX_RATE_UNIT_SECS})"
        )),
    }
}

/// Why a `connection_rate_time_unit` written as something else than a
/// number (`written`, as typed) is refused: it is whole seconds ("1m" or
/// "60s" are not taken).
pub fn not_seconds(name: &str, written: &str) -> String {
    format!(
        "{name} {written} is not a number of seconds ({MIN_RATE_UNIT_SECS} to {MAX_RATE_UNIT_SECS})"
    )
}

/// `connection_rate_time_unit` as the file writes it, checked.
fn time_unit_from_toml(name: &str, value: &toml::Value) -> Result<u32, String> {
    let v =
        LimitValue::from_toml(name, value).map_err(|_| not_seconds(name, &value.to_string()))?;
    check_connection_rate_time_unit(name, v)
}

pub fn check_max_inbound_connection_percentage_per_source(
    name: &str,
    v: LimitValue,
) -> Result<u32, String> {
    match v {
        LimitValue::Value(n) if (1..=100).contains(&n) => Ok(n as u32),
        LimitValue::Unlimited => Err(format!(
            "{name} cannot be unlimited (1 to 100; 100 turns it off)"
        )),
        LimitValue::Value(n) => Err(format!("{name} {n} is out of range (1 to 100)")),
    }
}

/// Why a configuration is refused: one line, naming the file, the connector
/// and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read it: {reason}")]
    Read { file: String, reason: String },
    #[error("{file}:{line}: {reason}")]
    Syntax {
        file: String,
        line: usize,
        reason: String,
    },
    #[error("{file}: {reason}")]
    Global { file: String, reason: String },
    #[error("{file}: connector \"{connector}\": {reason}")]
    Connector {
        file: String,
        connector: String,
        reason: String,
    },
}

impl ConfigError {
    /// The error without the file's name: for a change, where the file is
    /// not at fault.
    pub fn without_file(&self) -> String {
        match self {
            ConfigError::Global { reason, .. } => reason.clone(),
            ConfigError::Syntax { line, reason, .. } => format!("line {line}: {reason}"),
            ConfigError::Connector {
                connector, reason, ..
            } => format!("connector \"{connector}\": {reason}"),
            other => other.to_string(),
        }
    }
}

/// The file as written; validated into [`Config`].
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub ipv6_prefix_length: Option<i64>,
    pub handshake_timeout: Option<String>,
    #[serde(default, rename = "connector")]
    pub connectors: Vec<RawConnector>,
}

#[derive(Debug, Default, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawConnector {
    pub name: String,
    pub bindings: Vec<String>,
    pub forwarded_to: Option<Vec<String>>,
    pub remote_ip_ranges: Option<Vec<String>>,
    /// Limits stay untyped here so that a bad value is reported with the
    /// connector's name.
    pub max_inbound_connection: Option<toml::Value>,
    pub max_inbound_connection_per_source: Option<toml::Value>,
    pub max_inbound_connection_percentage_per_source: Option<toml::Value>,
    pub max_inbound_connection_rate_per_source: Option<toml::Value>,
    pub connection_rate_time_unit: Option<toml::Value>,
    pub action: Option<String>,
    pub reply_text: Option<String>,
}

impl Config {
    /// The configuration used when there is no config file: Exchange's
    /// "Default Frontend" on port 25, every remote address, 5000 / 20 / 2.
    pub fn builtin_default() -> Config {
        Config {
            ipv6_prefix_length: DEFAULT_IPV6_PREFIX_LENGTH,
            connectors: vec![Connector {
                name: DEFAULT_CONNECTOR_NAME.to_string(),
                bindings: vec![
                    Binding("0.0.0.0:25".parse().expect("valid")),
                    Binding("[::]:25".parse().expect("valid")),
                ],
                forwarded_to: Vec::new(),
                remote_ip_ranges: vec![IpRange::everything(true), IpRange::everything(false)],
                limits: Limits::EXCHANGE_DEFAULT,
                action: Action::Drop,
                reply_text: EXCHANGE_REPLY.to_string(),
            }],
        }
    }

    /// Reads and validates `path`; a missing file at the default path is the
    /// caller's business (see [`Config::builtin_default`]).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            file: file.clone(),
            reason: e.to_string(),
        })?;
        Config::parse(&text, &file)
    }

    /// Parses and validates the text of a config file called `file`.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        Config::parse_blaming(text, file, None)
    }

    /// Validates the text of a config file after a change to connector
    /// `changed`. The file was valid before, so the change is at fault: the
    /// error names neither the file nor its line, and a collision names the
    /// changed connector first.
    pub fn parse_change(text: &str, changed: &str) -> Result<Config, String> {
        Config::parse_blaming(text, "", Some(changed)).map_err(|e| e.without_file())
    }

    fn parse_blaming(text: &str, file: &str, changed: Option<&str>) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1)
                .unwrap_or(1);
            // The parser's message may run over several lines; ours is one.
            let reason = e
                .message()
                .trim()
                .lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("; ");
            match connector_at_line(text, line) {
                Some(connector) => ConfigError::Connector {
                    file: file.to_string(),
                    connector,
                    reason: format!("line {line}: {reason}"),
                },
                None => ConfigError::Syntax {
                    file: file.to_string(),
                    line,
                    reason,
                },
            }
        })?;
        Config::from_raw_blaming(&raw, file, changed)
    }

    /// Validates a raw configuration.
    pub fn from_raw(raw: &RawConfig, file: &str) -> Result<Config, ConfigError> {
        Config::from_raw_blaming(raw, file, None)
    }

    fn from_raw_blaming(
        raw: &RawConfig,
        file: &str,
        changed: Option<&str>,
    ) -> Result<Config, ConfigError> {
        let global = |reason: String| ConfigError::Global {
            file: file.to_string(),
            reason,
        };
        let ipv6_prefix_length = match raw.ipv6_prefix_length {
            None => DEFAULT_IPV6_PREFIX_LENGTH,
            Some(n) if (1..=128).contains(&n) => n as u8,
            Some(n) => return Err(global(format!("ipv6_prefix_length {n} is not 1 to 128"))),
        };
        // No longer used (a connection counts from the moment its handshake
        // completes), but still checked, so that a file that was valid stays
        // valid and a typo is still caught.
        if let Some(text) = &raw.handshake_timeout {
            let d = humantime::parse_duration(text).map_err(|e| {
                global(format!("handshake_timeout {text:?} is not a duration: {e}"))
            })?;
            if !(MIN_HANDSHAKE_TIMEOUT..=MAX_HANDSHAKE_TIMEOUT).contains(&d) {
                return Err(global(format!(
                    "handshake_timeout {text:?} is not between {} and {}",
                    humantime::format_duration(MIN_HANDSHAKE_TIMEOUT),
                    humantime::format_duration(MAX_HANDSHAKE_TIMEOUT)
                )));
            }
        }
        if raw.connectors.len() > MAX_CONNECTORS as usize {
            return Err(global(format!(
                "{} connectors; at most {MAX_CONNECTORS} are supported",
                raw.connectors.len()
            )));
        }
        let mut connectors = Vec::with_capacity(raw.connectors.len());
        let mut names = HashSet::new();
        for rc in &raw.connectors {
            let c = Connector::from_raw(rc).map_err(|reason| ConfigError::Connector {
                file: file.to_string(),
                connector: rc.name.clone(),
                reason,
            })?;
            if !names.insert(c.name.to_lowercase()) {
                return Err(ConfigError::Connector {
                    file: file.to_string(),
                    connector: c.name,
                    reason: "another connector has the same name".to_string(),
                });
            }
            connectors.push(c);
        }
        let config = Config {
            ipv6_prefix_length,
            connectors,
        };
        config
            .check_pairs(changed)
            .map_err(|(connector, reason)| ConfigError::Connector {
                file: file.to_string(),
                connector,
                reason,
            })?;
        Ok(config)
    }

    /// Exchange's rule for (binding, remote range) pairs: on each binding, no
    /// pair twice, and two ranges overlap only when one contains the other.
    /// Returns the connector to blame and why: connector `changed` when it is
    /// one of the two.
    fn check_pairs(&self, changed: Option<&str>) -> Result<(), (String, String)> {
        let is_changed = |i: usize| {
            changed.is_some_and(|c| self.connectors[i].name.eq_ignore_ascii_case(c.trim()))
        };
        // An endpoint is a binding of some connectors or a forward target of
        // some, never both: the kernel gives it one binding id.
        for (i, c) in self.connectors.iter().enumerate() {
            for endpoint in &c.forwarded_to {
                if let Some((j, other)) = self
                    .connectors
                    .iter()
                    .enumerate()
                    .find(|(_, o)| o.bindings.contains(endpoint))
                {
                    if is_changed(j) && !is_changed(i) {
                        return Err((
                            other.name.clone(),
                            format!(
                                "binding {endpoint} is a forwarded_to endpoint of connector \"{}\"",
                                c.name
                            ),
                        ));
                    }
                    return Err((
                        c.name.clone(),
                        format!(
                            "forwarded_to {endpoint} is a binding of connector \"{}\"",
                            other.name
                        ),
                    ));
                }
            }
        }
        let mut bindings: Vec<Binding> = self
            .connectors
            .iter()
            .flat_map(|c| c.endpoints().copied())
            .collect();
        bindings.sort();
        bindings.dedup();
        for binding in bindings {
            // (range, connector index) of every pair on this binding.
            let mut pairs: Vec<(IpRange, usize)> = self
                .connectors
                .iter()
                .enumerate()
                .filter(|(_, c)| c.endpoints().any(|e| *e == binding))
                .flat_map(|(i, c)| {
                    c.remote_ip_ranges
                        .iter()
                        .filter(|r| r.is_ipv4() == binding.is_ipv4())
                        .map(move |r| (*r, i))
                })
                .collect();
            // Widest first among equal starts, so that a range is always
            // checked against the ranges that might contain it.
            pairs.sort_by(|a, b| {
                a.0.first()
                    .cmp(&b.0.first())
                    .then(b.0.last().cmp(&a.0.last()))
            });
            let mut open: Vec<(IpRange, usize)> = Vec::new();
            for (range, owner) in pairs {
                while open.last().is_some_and(|(r, _)| r.last() < range.first()) {
                    open.pop();
                }
                if let Some(&(outer, outer_owner)) = open.last() {
                    let same = outer.first() == range.first() && outer.last() == range.last();
                    if same || !outer.contains_range(&range) {
                        // Told from the side of the later one in the file, or of
                        // the connector being changed.
                        let ((mine, me), (theirs, them)) =
                            if is_changed(outer_owner) && !is_changed(owner) {
                                ((outer, outer_owner), (range, owner))
                            } else {
                                ((range, owner), (outer, outer_owner))
                            };
                        let other = &self.connectors[them].name;
                        let reason = if me == them && same {
                            format!("remote range {mine} is listed twice for binding {binding}")
                        } else if same {
                            format!(
                                "remote range {mine} on binding {binding} is also on connector \"{other}\""
                            )
                        } else {
                            format!(
                                "remote range {mine} overlaps {theirs} (connector \"{other}\") on binding {binding} without one containing the other"
                            )
                        };
                        return Err((self.connectors[me].name.clone(), reason));
                    }
                }
                open.push((range, owner));
            }
        }
        Ok(())
    }

    /// The connector called `name` (case-insensitive, as in Exchange).
    pub fn connector(&self, name: &str) -> Option<&Connector> {
        self.connectors
            .iter()
            .find(|c| c.name.eq_ignore_ascii_case(name))
    }
}

/// The name of the `[[connector]]` table that line `line` belongs to, when
/// the file is valid TOML and only its content is wrong.
fn connector_at_line(text: &str, line: usize) -> Option<String> {
    let value: toml::Value = toml::from_str(text).ok()?;
    let index = text
        .lines()
        .take(line)
        .filter(|l| l.trim_start().starts_with("[[connector]]"))
        .count()
        .checked_sub(1)?;
    let name = value.get("connector")?.get(index)?.get("name")?.as_str()?;
    Some(name.to_string())
}

impl Connector {
    /// Its bindings and its `forwarded_to` endpoints: where its connections
    /// are judged.
    pub fn endpoints(&self) -> impl Iterator<Item = &Binding> {
        self.bindings.iter().chain(&self.forwarded_to)
    }

    fn from_raw(rc: &RawConnector) -> Result<Connector, String> {
        let name = rc.name.trim().to_string();
        if name.is_empty() {
            return Err("the name is empty".to_string());
        }
        if name.chars().count() > MAX_NAME_LEN {
            return Err(format!("the name is longer than {MAX_NAME_LEN} characters"));
        }
        if name.chars().any(|ch| ch.is_control() || ch == '"') {
            return Err("the name contains a control character or a double quote".to_string());
        }
        let keys = &FieldNames::KEYS;
        let bindings = parse_bindings(keys, &rc.bindings)?;
        let forwarded_to = parse_forwarded_to(keys, rc.forwarded_to.as_deref().unwrap_or(&[]))?;
        if let Some(endpoint) = forwarded_to.iter().find(|e| bindings.contains(e)) {
            return Err(format!("{endpoint} is listed twice"));
        }
        let remote_ip_ranges = match &rc.remote_ip_ranges {
            None => vec![IpRange::everything(true), IpRange::everything(false)],
            Some(list) => parse_remote_ip_ranges(keys, list)?,
        };
        let serves_something = bindings
            .iter()
            .any(|b| remote_ip_ranges.iter().any(|r| r.is_ipv4() == b.is_ipv4()));
        if !serves_something {
            return Err(
                "no remote range is of the same family (IPv4 or IPv6) as any binding".to_string(),
            );
        }
        let defaults = Limits::EXCHANGE_DEFAULT;
        let limit = |name: &str, value: &Option<toml::Value>, default: u32, check: LimitCheck| {
            match value {
                None => Ok(default),
                Some(v) => check(name, LimitValue::from_toml(name, v)?),
            }
        };
        let limits = Limits {
            max_inbound_connection: limit(
                keys.max_inbound_connection,
                &rc.max_inbound_connection,
                defaults.max_inbound_connection,
                check_max_inbound_connection,
            )?,
            max_inbound_connection_per_source: limit(
                keys.max_inbound_connection_per_source,
                &rc.max_inbound_connection_per_source,
                defaults.max_inbound_connection_per_source,
                check_max_inbound_connection_per_source,
            )?,
            max_inbound_connection_percentage_per_source: limit(
                keys.max_inbound_connection_percentage_per_source,
                &rc.max_inbound_connection_percentage_per_source,
                defaults.max_inbound_connection_percentage_per_source,
                check_max_inbound_connection_percentage_per_source,
            )?,
            max_inbound_connection_rate_per_source: limit(
                keys.max_inbound_connection_rate_per_source,
                &rc.max_inbound_connection_rate_per_source,
                defaults.max_inbound_connection_rate_per_source,
                check_max_inbound_connection_rate_per_source,
            )?,
            connection_rate_time_unit: match &rc.connection_rate_time_unit {
                None => defaults.connection_rate_time_unit,
                Some(value) => time_unit_from_toml(keys.connection_rate_time_unit, value)?,
            },
        };
        let action = match &rc.action {
            None => Action::Drop,
            Some(a) => Action::parse_named(keys.action, a)?,
        };
        let reply_text = rc
            .reply_text
            .clone()
            .unwrap_or_else(|| EXCHANGE_REPLY.to_string());
        check_reply_text(keys.reply_text, &reply_text)?;
        Ok(Connector {
            name,
            bindings,
            forwarded_to,
            remote_ip_ranges,
            limits,
            action,
            reply_text,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
ipv6_prefix_length = 64          # sources in IPv6 are counted per this prefix
handshake_timeout = "10s"        # accepted, no longer used

[[connector]]
name = "Default Frontend"
bindings = ["0.0.0.0:25", "[::]:25"]
remote_ip_ranges = ["0.0.0.0/0", "::/0"]
max_inbound_connection = 5000
max_inbound_connection_per_source = 20
max_inbound_connection_percentage_per_source = 2
action = "drop"

[[connector]]
name = "Unauthenticated SMTP"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = ["10.1.0.0/24", "192.168.1.75", "10.2.0.5-10.2.0.9"]
max_inbound_connection_per_source = "unlimited"
max_inbound_connection_percentage_per_source = 100
"#;

    #[test]
    fn the_packaged_example_is_the_built_in_default_answering_like_exchange() {
        let shipped = include_str!("../../../dist/connectors.toml");
        let mut expected = Config::builtin_default();
        expected.connectors[0].action = Action::Reply;
        assert_eq!(Config::parse(shipped, "connectors.toml").unwrap(), expected);
        // Its commented rate lines, taken in, are a valid rate of 60 a minute.
        let with_rate = shipped
            .replace(
                "# max_inbound_connection_rate",
                "max_inbound_connection_rate",
            )
            .replace("# connection_rate_time_unit", "connection_rate_time_unit");
        let limits = Config::parse(&with_rate, "connectors.toml")
            .unwrap()
            .connectors[0]
            .limits;
        assert_eq!(
            (
                limits.max_inbound_connection_rate_per_source,
                limits.connection_rate_time_unit
            ),
            (60, 60)
        );
    }

    #[test]
    fn reply_text_must_be_one_421_line() {
        let with = |text: &str| {
            parse(&format!(
                "[[connector]]\nname = \"F\"\nbindings = [\"0.0.0.0:25\"]\naction = \"reply\"\nreply_text = {text:?}\n"
            ))
        };
        assert_eq!(
            with("421 4.3.2 busy").unwrap().connectors[0].reply_text,
            "421 4.3.2 busy"
        );
        for bad in [
            "550 5.7.1 no",
            "421 two\r\n250 lines",
            "421 ",
            "421 \u{e9}t\u{e9}",
        ] {
            assert!(with(bad).is_err(), "{bad:?} accepted");
        }
        assert!(with(&format!("421 {}", "x".repeat(600))).is_err());
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "connectors.toml")
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn the_interface_example_parses() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.ipv6_prefix_length, 64);
        assert_eq!(c.connectors.len(), 2);
        assert_eq!(c.connectors[0], Config::builtin_default().connectors[0]);
        let u = &c.connectors[1];
        assert_eq!(u.name, "Unauthenticated SMTP");
        assert_eq!(u.limits, Limits::exchange(5000, UNLIMITED, 100));
        assert_eq!(u.action, Action::Drop);
        assert_eq!(u.remote_ip_ranges.len(), 3);
    }

    #[test]
    fn defaults_apply_to_what_is_left_out() {
        let c = parse("[[connector]]\nname = \"a\"\nbindings = [\"0.0.0.0:587\"]\n").unwrap();
        assert_eq!(c.ipv6_prefix_length, 64);
        assert_eq!(c.connectors[0].limits, Limits::EXCHANGE_DEFAULT);
        assert_eq!(c.connectors[0].remote_ip_ranges.len(), 2);
    }

    fn connector(fields: &str) -> String {
        format!("[[connector]]\nname = \"Relay\"\nbindings = [\"0.0.0.0:25\"]\n{fields}\n")
    }

    #[test]
    fn limits_out_of_exchange_ranges_are_refused() {
        for (fields, needle) in [
            (
                "max_inbound_connection = 0",
                "max_inbound_connection 0 is out of range",
            ),
            (
                "max_inbound_connection = 2147483648",
                "max_inbound_connection 2147483648 is out of range",
            ),
            (
                "max_inbound_connection_per_source = 10001",
                "max_inbound_connection_per_source 10001 is out of range",
            ),
            (
                "max_inbound_connection_per_source = 0",
                "max_inbound_connection_per_source 0 is out of range",
            ),
            (
                "max_inbound_connection_percentage_per_source = 101",
                "percentage_per_source 101 is out of range",
            ),
            (
                "max_inbound_connection_percentage_per_source = 0",
                "percentage_per_source 0 is out of range",
            ),
            (
                "max_inbound_connection_percentage_per_source = \"unlimited\"",
                "cannot be unlimited",
            ),
            ("max_inbound_connection = \"lots\"", "is not a number"),
            (
                "max_inbound_connection_rate_per_source = 0",
                "max_inbound_connection_rate_per_source 0 is out of range (1 to 60000 a time unit, or unlimited)",
            ),
            (
                "max_inbound_connection_rate_per_source = 60001",
                "max_inbound_connection_rate_per_source 60001 is out of range",
            ),
            (
                "connection_rate_time_unit = 5",
                "connection_rate_time_unit 5 is out of range (6 to 3600 seconds)",
            ),
            (
                "connection_rate_time_unit = 3601",
                "connection_rate_time_unit 3601 is out of range",
            ),
            (
                "connection_rate_time_unit = \"unlimited\"",
                "connection_rate_time_unit must be a number of seconds (6 to 3600)",
            ),
            (
                "connection_rate_time_unit = \"1m\"",
                "connection_rate_time_unit \"1m\" is not a number of seconds (6 to 3600)",
            ),
            ("action = \"bounce\"", "action \"bounce\""),
            (
                "remote_ip_ranges = [\"10.0.0.0/33\"]",
                "is not an IP address",
            ),
            ("remote_ip_ranges = []", "remote_ip_ranges is empty"),
            ("remote_ip_ranges = [\"::/0\"]", "same family"),
        ] {
            let e = error(&connector(fields));
            assert!(
                e.starts_with("connectors.toml: connector \"Relay\": ") && e.contains(needle),
                "{fields}: {e}"
            );
        }
        let ok = parse(&connector(
            "max_inbound_connection = \"unlimited\"\nmax_inbound_connection_per_source = 10000\nmax_inbound_connection_percentage_per_source = 1",
        ))
        .unwrap();
        assert_eq!(ok.connectors[0].limits.max_inbound_connection, UNLIMITED);
        let rated = parse(&connector(
            "max_inbound_connection_rate_per_source = 60000\nconnection_rate_time_unit = 6",
        ))
        .unwrap();
        let limits = rated.connectors[0].limits;
        assert_eq!(
            (
                limits.max_inbound_connection_rate_per_source,
                limits.connection_rate_time_unit
            ),
            (60000, 6)
        );
    }

    #[test]
    fn bad_bindings_are_refused() {
        for (bindings, needle) in [
            ("[]", "no bindings"),
            ("[\"0.0.0.0\"]", "is not IP:port"),
            ("[\"0.0.0.0:0\"]", "port 0"),
            ("[\"[::ffff:10.0.0.1]:25\"]", "IPv4-mapped"),
            ("[\"0.0.0.0:25\", \"0.0.0.0:25\"]", "listed twice"),
        ] {
            let e = error(&format!(
                "[[connector]]\nname = \"X\"\nbindings = {bindings}\n"
            ));
            assert!(e.contains("connector \"X\"") && e.contains(needle), "{e}");
        }
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = error("ipv6_prefix_length = 64\n[[connector]]\nname = \"x\"\nbindingz = []\n");
        assert!(
            e.starts_with("connectors.toml: connector \"x\": line 4: unknown field `bindingz`"),
            "{e}"
        );
        assert!(!e.contains('\n'), "one line: {e}");
        let e = error("ipv6_prefix_length = \n");
        assert!(e.starts_with("connectors.toml:1: "), "{e}");
    }

    #[test]
    fn global_settings_are_checked() {
        assert!(error("ipv6_prefix_length = 0").contains("ipv6_prefix_length 0"));
        assert!(error("ipv6_prefix_length = 129").contains("ipv6_prefix_length 129"));
        assert!(error("handshake_timeout = \"soon\"").contains("not a duration"));
        assert!(error("handshake_timeout = \"1h\"").contains("not between"));
        // Accepted (and checked) for the files that have it; not used.
        let c = parse("handshake_timeout = \"1500ms\"\nipv6_prefix_length = 48").unwrap();
        assert_eq!(c.ipv6_prefix_length, 48);
    }

    #[test]
    fn names_are_unique_and_sane() {
        let two = "[[connector]]\nname = \"A\"\nbindings = [\"0.0.0.0:25\"]\nremote_ip_ranges = [\"10.0.0.0/8\"]\n\
                   [[connector]]\nname = \"a\"\nbindings = [\"0.0.0.0:587\"]\n";
        assert!(error(two).contains("same name"));
        assert!(
            error("[[connector]]\nname = \"\"\nbindings = [\"0.0.0.0:25\"]\n").contains("empty")
        );
        assert!(
            error("[[connector]]\nname = \"a\\\"b\"\nbindings = [\"0.0.0.0:25\"]\n")
                .contains("double quote")
        );
    }

    fn two_connectors(a: &str, b: &str) -> Result<Config, ConfigError> {
        parse(&format!(
            "[[connector]]\nname = \"A\"\nbindings = [\"0.0.0.0:25\"]\nremote_ip_ranges = {a}\n\
             [[connector]]\nname = \"B\"\nbindings = [\"0.0.0.0:25\"]\nremote_ip_ranges = {b}\n"
        ))
    }

    #[test]
    fn pairs_follow_exchange() {
        // Nested ranges on one binding are fine, in either order.
        assert!(
            two_connectors(
                "[\"0.0.0.0/0\"]",
                "[\"10.1.0.0/24\", \"10.2.0.5-10.2.0.9\"]"
            )
            .is_ok()
        );
        assert!(two_connectors("[\"10.1.0.0/24\"]", "[\"10.0.0.0/8\"]").is_ok());
        // The same pair twice.
        let e = two_connectors("[\"10.1.0.0/24\"]", "[\"10.1.0.0-10.1.0.255\"]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("is also on connector \"A\""), "{e}");
        // Overlap without containment.
        let e = two_connectors("[\"10.1.0.0/24\"]", "[\"10.1.0.128-10.1.1.5\"]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("overlaps 10.1.0.0/24 (connector \"A\")"), "{e}");
        // Within one connector as well.
        let e = two_connectors(
            "[\"10.1.0.0/24\", \"10.1.0.0/24\"]",
            "[\"::/0\", \"10.9.0.1\"]",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("listed twice"), "{e}");
        // Different bindings never conflict.
        assert!(parse(
            "[[connector]]\nname = \"A\"\nbindings = [\"0.0.0.0:25\"]\nremote_ip_ranges = [\"10.1.0.0/24\"]\n\
             [[connector]]\nname = \"B\"\nbindings = [\"10.0.0.1:25\"]\nremote_ip_ranges = [\"10.1.0.0/24\"]\n"
        )
        .is_ok());
        // The default connector plus a default-like one on the same binding.
        let e = two_connectors("[\"0.0.0.0/0\"]", "[\"0.0.0.0/0\"]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("also on connector"), "{e}");
    }
}

/// The parsers must take any input without panicking: a config file or a
/// CLI value is untrusted text.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::config::range::IpRange;

    /// Pieces a config file is made of, put together at random.
    fn fragment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("[[connector]]\n".to_string()),
            Just("name = \"A\"\n".to_string()),
            Just("name = \"B\"\n".to_string()),
            Just("bindings = [\"0.0.0.0:25\", \"[::]:25\"]\n".to_string()),
            Just("bindings = [\"10.0.0.1:25\"]\n".to_string()),
            "remote_ip_ranges = \\[\"[0-9a-f.:/-]{0,24}\"\\]\n",
            "max_inbound_connection = -?[0-9]{1,11}\n",
            Just("max_inbound_connection_per_source = \"unlimited\"\n".to_string()),
            "max_inbound_connection_percentage_per_source = [0-9]{1,4}\n",
            "max_inbound_connection_rate_per_source = -?[0-9]{1,6}\n",
            "connection_rate_time_unit = \"?[0-9a-z]{0,5}\"?\n",
            "action = \"[a-z]{0,8}\"\n",
            "handshake_timeout = \"[0-9]{0,3}(ms|s|m|h|x)\"\n",
            "ipv6_prefix_length = -?[0-9]{1,4}\n",
            "[ -~]{0,30}\n",
        ]
    }

    proptest! {
        #[test]
        fn any_text_is_a_config_or_one_line_of_error(text in "\\PC{0,400}") {
            if let Err(e) = Config::parse(&text, "fuzz.toml") {
                prop_assert!(!e.to_string().contains('\n'));
            }
        }

        #[test]
        fn config_like_text_never_panics(parts in proptest::collection::vec(fragment(), 0..25)) {
            let text = parts.concat();
            match Config::parse(&text, "fuzz.toml") {
                Ok(config) => {
                    // What validation accepts is what Exchange allows.
                    for c in &config.connectors {
                        prop_assert!(!c.bindings.is_empty());
                        let pct = c.limits.max_inbound_connection_percentage_per_source;
                        prop_assert!((1..=100).contains(&pct));
                        let unit = c.limits.connection_rate_time_unit;
                        prop_assert!((MIN_RATE_UNIT_SECS..=MAX_RATE_UNIT_SECS).contains(&unit));
                    }
                }
                Err(e) => prop_assert!(!e.to_string().contains('\n'), "{}", e),
            }
        }

        #[test]
        fn any_text_is_a_range_or_an_error(text in "\\PC{0,60}") {
            let _ = text.parse::<IpRange>();
        }

        #[test]
        fn range_like_text_round_trips(text in "[0-9a-f.:/ -]{1,48}") {
            if let Ok(range) = text.parse::<IpRange>() {
                let again: IpRange = range.to_string().parse().expect("prints what it parses");
                prop_assert_eq!(again, range);
            }
        }

        #[test]
        fn any_binding_or_limit_text_is_judged(text in "\\PC{0,40}") {
            let _ = text.parse::<Binding>();
            if let Ok(value) = text.parse::<LimitValue>() {
                let _ = check_max_inbound_connection("max", value);
                let _ = check_max_inbound_connection_per_source("per_source", value);
                let _ = check_max_inbound_connection_percentage_per_source("pct", value);
                let _ = check_max_inbound_connection_rate_per_source("rate", value);
                let _ = check_connection_rate_time_unit("unit", value);
            }
        }
    }
}
