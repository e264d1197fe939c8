//! `roost.toml`: an app's configuration, in the spirit of fly.toml.
//!
//! Parsing is strict (`deny_unknown_fields`, so a typo is an error that names
//! the key and its line, not a silently ignored setting), and
//! [`AppConfig::validate`] reports every problem at once, each with the path
//! of the offending key, so a user fixes the file in one pass. Names follow
//! fly.toml wherever the concept is the same. `docs/roost-toml.md` documents
//! the schema.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use roost_raft::state::{MAX_INSTANCES_PER_GROUP, MAX_RELEASE_HISTORY};
use serde::Deserialize;

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    pub app: String,
    #[serde(default)]
    pub build: Build,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub deploy: Deploy,
    #[serde(default)]
    pub vm: Vec<Vm>,
    pub http_service: Option<HttpService>,
    /// Raw TCP services, each on public ports of every node.
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub checks: BTreeMap<String, Check>,
    /// Process groups: name -> command. Empty means one group, `app`, running
    /// the image's own command.
    #[serde(default)]
    pub processes: BTreeMap<String, String>,
    #[serde(default)]
    pub restart: Vec<Restart>,
    #[serde(default)]
    pub placement: Placement,
    /// How long an instance has between SIGTERM and SIGKILL when it is
    /// stopped: seconds (`30`) or a duration (`"30s"`) [default: 5s].
    pub kill_timeout: Option<KillTimeout>,
}

/// `kill_timeout`, written as fly.toml writes it: a number of seconds or a
/// duration.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum KillTimeout {
    Seconds(u64),
    Duration(String),
}

/// The longest `kill_timeout`, as on fly.io.
pub const MAX_KILL_TIMEOUT: Duration = Duration::from_secs(300);

impl KillTimeout {
    pub fn duration(&self) -> Result<Duration, String> {
        let duration = match self {
            KillTimeout::Seconds(seconds) => Duration::from_secs(*seconds),
            KillTimeout::Duration(text) => duration(text)?,
        };
        if duration < Duration::from_secs(1) || duration > MAX_KILL_TIMEOUT {
            return Err(format!("must be from 1s to {}s, got {duration:?}", MAX_KILL_TIMEOUT.as_secs()));
        }
        Ok(duration)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Build {
    pub dockerfile: Option<String>,
    pub image: Option<String>,
    #[serde(default)]
    pub args: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    #[default]
    Rolling,
    Immediate,
    Bluegreen,
    Canary,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deploy {
    #[serde(default)]
    pub strategy: Strategy,
    /// How many instances (or, below 1, what fraction) may be down at once
    /// during a rolling deploy.
    pub max_unavailable: Option<f64>,
    pub release_command: Option<String>,
    /// How many instances each process group starts with when the app
    /// first deploys it (default 1); afterwards `roost scale count` decides.
    pub initial_count: Option<u32>,
    /// How many of the newest releases the app keeps for `roost releases`
    /// and rollbacks (default 10); the serving release and the one a
    /// rollback returns to are kept in any case.
    pub release_history: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    #[serde(default = "default_cpus")]
    pub cpus: f64,
    /// "256mb", "1gb", or a number of megabytes.
    #[serde(default = "default_memory")]
    pub memory: Memory,
    /// The process groups this size applies to; empty means all.
    #[serde(default)]
    pub processes: Vec<String>,
}

fn default_cpus() -> f64 {
    1.0
}

fn default_memory() -> Memory {
    Memory::Text("256mb".into())
}

/// Memory as written: a string with a unit, or a number of megabytes.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Memory {
    Megabytes(u64),
    Text(String),
}

impl Memory {
    /// The size in bytes, or why it cannot be read.
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            Memory::Megabytes(mb) => Ok(mb.saturating_mul(1 << 20)),
            Memory::Text(text) => parse_memory(text),
        }
    }
}

fn parse_memory(text: &str) -> Result<u64, String> {
    let lower = text.trim().to_ascii_lowercase();
    let digits = lower.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &lower[digits.len()..];
    let number: u64 = digits.trim().parse().map_err(|_| format!("'{text}' is not a size like \"256mb\" or \"1gb\""))?;
    let scale: u64 = match unit {
        "" | "mb" | "m" | "mib" => 1 << 20,
        "gb" | "g" | "gib" => 1 << 30,
        "kb" | "k" | "kib" => 1 << 10,
        _ => return Err(format!("'{text}' has an unknown unit '{unit}' (use mb or gb)")),
    };
    Ok(number.saturating_mul(scale))
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpService {
    pub internal_port: u16,
    #[serde(default)]
    pub force_https: bool,
    pub concurrency: Option<Concurrency>,
    #[serde(default)]
    pub checks: Vec<Check>,
    /// The process groups that serve; empty means all.
    #[serde(default)]
    pub processes: Vec<String>,
}

/// `[[services]]`: a TCP service that every node's edge forwards, from
/// each of `ports`, to `internal_port` of a healthy instance.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Only "tcp"; HTTP goes in `[http_service]`.
    pub protocol: String,
    pub internal_port: u16,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// The process groups that serve it; empty means all.
    #[serde(default)]
    pub processes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConcurrencyKind {
    #[default]
    Requests,
    Connections,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Concurrency {
    #[serde(rename = "type", default)]
    pub kind: ConcurrencyKind,
    pub soft_limit: Option<u32>,
    pub hard_limit: Option<u32>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    #[default]
    Http,
    Tcp,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    #[serde(rename = "type", default)]
    pub kind: CheckKind,
    /// Defaults to the http_service's internal_port.
    pub port: Option<u16>,
    pub path: Option<String>,
    pub method: Option<String>,
    #[serde(default = "default_interval")]
    pub interval: String,
    #[serde(default = "default_timeout")]
    pub timeout: String,
    #[serde(default = "default_grace")]
    pub grace_period: String,
    /// Probes that must fail in a row before the check fails [default: 3].
    pub failure_threshold: Option<u32>,
    /// For `[checks.NAME]`: the process groups it checks. Empty means the
    /// groups `[http_service]` serves, or all groups without one.
    #[serde(default)]
    pub processes: Vec<String>,
}

fn default_interval() -> String {
    "10s".into()
}

fn default_timeout() -> String {
    "2s".into()
}

fn default_grace() -> String {
    "5s".into()
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restart {
    #[serde(default)]
    pub policy: RestartPolicy,
    pub max_retries: Option<u32>,
    #[serde(default)]
    pub processes: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// `label == value` or `label != value`, all of which must hold.
    #[serde(default)]
    pub constraints: Vec<String>,
    pub max_per_node: Option<u32>,
}

pub use roost_raft::workload::Constraint;

/// Why `roost.toml` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// toml's message names the line, the column and the key.
    #[error("{} is not a valid roost.toml: {message}", .path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{} has {} problem(s):\n{}", .path.display(), .problems.len(), ProblemList(.problems))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
}

/// One thing wrong in a configuration, with the key it concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

struct ProblemList<'a>(&'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  - {problem}")?;
        }
        Ok(())
    }
}

impl AppConfig {
    /// Reads, parses and validates `path`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let config = Self::parse(&text).map_err(|message| ConfigError::Parse { path: path.to_owned(), message })?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid { path: path.to_owned(), problems })
        }
    }

    /// Parses without validating; the error text names line, column and key.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// Every problem in the configuration, each with its key; empty if none.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| problems.push(Problem { key: key.to_owned(), message });

        if let Err(reason) = roost_raft::state::validate_name(&self.app) {
            problem("app", format!("'{}' is not a valid app name: {reason}", self.app));
        }
        if self.build.dockerfile.is_some() && self.build.image.is_some() {
            problem("build", "set either dockerfile or image, not both".into());
        }
        if self.build.image.as_deref().is_some_and(|i| i.trim().is_empty()) {
            problem("build.image", "is empty".into());
        }
        for key in self.env.keys() {
            if !is_env_name(key) {
                problem(&format!("env.{key}"), "is not a valid environment variable name".into());
            }
        }
        if let Some(Err(reason)) = self.kill_timeout.as_ref().map(KillTimeout::duration) {
            problem("kill_timeout", reason);
        }
        if let Some(max) = self.deploy.max_unavailable {
            if max.is_nan() || max <= 0.0 {
                problem(
                    "deploy.max_unavailable",
                    format!("must be above 0 (a count, or a fraction below 1), got {max}"),
                );
            }
        }
        if let Some(count) = self.deploy.initial_count {
            if !(1..=MAX_INSTANCES_PER_GROUP).contains(&count) {
                problem("deploy.initial_count", format!("must be from 1 to {MAX_INSTANCES_PER_GROUP}, got {count}"));
            }
        }
        if let Some(history) = self.deploy.release_history {
            if !(1..=MAX_RELEASE_HISTORY).contains(&history) {
                problem("deploy.release_history", format!("must be from 1 to {MAX_RELEASE_HISTORY}, got {history}"));
            }
        }
        if let Some(command) = &self.deploy.release_command {
            if command.trim().is_empty() {
                problem("deploy.release_command", "is empty".into());
            } else if shlex::split(command).is_none() {
                problem("deploy.release_command", UNBALANCED.into());
            }
        }
        for (name, command) in &self.processes {
            if let Err(reason) = roost_raft::state::validate_name(name) {
                problem(&format!("processes.{name}"), format!("is not a valid process group name: {reason}"));
            }
            if command.trim().is_empty() {
                problem(&format!("processes.{name}"), "has an empty command".into());
            } else if shlex::split(command).is_none() {
                problem(&format!("processes.{name}"), UNBALANCED.into());
            }
        }
        let groups = self.process_groups();
        let mut known_groups = |key: &str, listed: &[String]| {
            for group in listed.iter().filter(|g| !groups.contains(g)) {
                problem(key, format!("names process group '{group}', which [processes] does not define"));
            }
        };
        for (i, vm) in self.vm.iter().enumerate() {
            known_groups(&format!("vm[{i}].processes"), &vm.processes);
        }
        for (i, restart) in self.restart.iter().enumerate() {
            known_groups(&format!("restart[{i}].processes"), &restart.processes);
        }
        if let Some(http) = &self.http_service {
            known_groups("http_service.processes", &http.processes);
        }
        for (name, check) in &self.checks {
            known_groups(&format!("checks.{name}.processes"), &check.processes);
        }
        for (i, service) in self.services.iter().enumerate() {
            known_groups(&format!("services[{i}].processes"), &service.processes);
        }
        for (i, vm) in self.vm.iter().enumerate() {
            if vm.cpus.is_nan() || vm.cpus <= 0.0 || vm.cpus > 256.0 {
                problem(&format!("vm[{i}].cpus"), format!("must be above 0 and at most 256, got {}", vm.cpus));
            }
            match vm.memory.bytes() {
                Ok(bytes) if bytes < (16 << 20) => problem(&format!("vm[{i}].memory"), "must be at least 16mb".into()),
                Ok(_) => {}
                Err(reason) => problem(&format!("vm[{i}].memory"), reason),
            }
        }
        if let Some(http) = &self.http_service {
            if http.internal_port == 0 {
                problem("http_service.internal_port", "must be a port from 1 to 65535".into());
            }
            if let Some(c) = &http.concurrency {
                if let (Some(soft), Some(hard)) = (c.soft_limit, c.hard_limit) {
                    if soft > hard {
                        problem("http_service.concurrency", format!("soft_limit {soft} is above hard_limit {hard}"));
                    }
                }
                if c.hard_limit == Some(0) {
                    problem("http_service.concurrency.hard_limit", "must be at least 1".into());
                }
            }
            for (i, check) in http.checks.iter().enumerate() {
                for p in check_problems(check, true) {
                    problem(&format!("http_service.checks[{i}].{}", p.key), p.message);
                }
            }
        }
        for (name, check) in &self.checks {
            for p in check_problems(check, self.http_service.is_some()) {
                problem(&format!("checks.{name}.{}", p.key), p.message);
            }
        }
        let mut public_ports = std::collections::BTreeSet::new();
        for (i, service) in self.services.iter().enumerate() {
            if service.protocol != "tcp" {
                problem(
                    &format!("services[{i}].protocol"),
                    format!("'{}' is not supported: only \"tcp\" (HTTP goes in [http_service])", service.protocol),
                );
            }
            if service.internal_port == 0 {
                problem(&format!("services[{i}].internal_port"), "must be a port from 1 to 65535".into());
            }
            if service.ports.is_empty() {
                problem(&format!("services[{i}].ports"), "needs at least one [[services.ports]] port".into());
            }
            for (j, port) in service.ports.iter().enumerate() {
                if port.port == 0 {
                    problem(&format!("services[{i}].ports[{j}].port"), "must be a port from 1 to 65535".into());
                } else if !public_ports.insert(port.port) {
                    problem(&format!("services[{i}].ports[{j}].port"), format!("{} is listed twice", port.port));
                }
            }
        }
        for (i, restart) in self.restart.iter().enumerate() {
            if restart.max_retries.is_some() && restart.policy != RestartPolicy::OnFailure {
                problem(&format!("restart[{i}].max_retries"), "only applies to policy = \"on-failure\"".into());
            }
        }
        for (i, text) in self.placement.constraints.iter().enumerate() {
            if let Err(reason) = Constraint::parse(text) {
                problem(&format!("placement.constraints[{i}]"), reason);
            }
        }
        if self.placement.max_per_node == Some(0) {
            problem("placement.max_per_node", "must be at least 1".into());
        }
        problems
    }

    /// The process groups instances are scheduled in.
    pub fn process_groups(&self) -> Vec<String> {
        if self.processes.is_empty() {
            vec!["app".to_owned()]
        } else {
            self.processes.keys().cloned().collect()
        }
    }
}

/// Whether `name` can be an environment variable (and so a secret) name.
pub fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("'{text}' is not a duration like \"10s\": {e}"))
}

/// Problems of one check; keys are relative to the check.
fn check_problems(check: &Check, has_http_service: bool) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut problem = |key: &str, message: String| problems.push(Problem { key: key.to_owned(), message });
    if check.port.is_none() && !has_http_service {
        problem("port", "is required when there is no [http_service] to take it from".into());
    }
    if check.port == Some(0) {
        problem("port", "must be a port from 1 to 65535".into());
    }
    match check.kind {
        CheckKind::Http => match &check.path {
            Some(path) if !path.starts_with('/') => problem("path", format!("'{path}' must start with '/'")),
            _ => {}
        },
        CheckKind::Tcp => {
            if check.path.is_some() || check.method.is_some() {
                problem("type", "a tcp check takes no path or method".into());
            }
        }
    }
    let interval = duration(&check.interval);
    let timeout = duration(&check.timeout);
    if let Err(reason) = &interval {
        problem("interval", reason.clone());
    }
    if let Err(reason) = &timeout {
        problem("timeout", reason.clone());
    }
    if let Err(reason) = duration(&check.grace_period) {
        problem("grace_period", reason);
    }
    if check.failure_threshold.is_some_and(|n| !(1..=MAX_FAILURE_THRESHOLD).contains(&n)) {
        problem("failure_threshold", format!("must be from 1 to {MAX_FAILURE_THRESHOLD}"));
    }
    if let (Ok(interval), Ok(timeout)) = (interval, timeout) {
        if interval.is_zero() {
            problem("interval", "must be above 0".into());
        }
        if timeout > interval {
            problem("timeout", format!("{} is longer than the interval {}", check.timeout, check.interval));
        }
    }
    problems
}

#[cfg(test)]
mod tests;

/// The most probes a check may need to fail in a row: beyond this, a
/// failing instance would go unnoticed for too long to be useful.
pub const MAX_FAILURE_THRESHOLD: u32 = 100;

const UNBALANCED: &str =
    "has an unclosed quote or a trailing backslash (commands are split as a POSIX shell does: \"sh -c 'a && b'\")";

/// A command of `roost.toml` as arguments, split as a POSIX shell splits
/// words (quotes and backslashes; no expansion): `sh -c 'a && b'` is three.
/// Commands are checked by `validate`, so an unsplittable one is empty here.
pub fn split_command(command: &str) -> Vec<String> {
    shlex::split(command).unwrap_or_default()
}
