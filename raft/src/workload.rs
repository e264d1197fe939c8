//! What the cluster runs: releases, instances and secrets, as replicated data.
//!
//! These are plain values. The deploy crate turns a `roost.toml` into a
//! [`ReleaseSpec`], decides placements and rollouts from the state, and talks
//! to Docker; this crate only records the decisions, so it knows nothing about
//! containers. A release's spec is complete: it names an image by id and says
//! what each process group runs with which resources and checks, so any node
//! can start an instance from the state alone.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::state::UnixMillis;
use crate::NodeId;

/// CPU and memory reserved for an instance, or offered by a node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Thousandths of a CPU.
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

impl Resources {
    pub fn saturating_sub(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_sub(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
        }
    }

    pub fn fits_in(self, free: Resources) -> bool {
        self.cpu_millis <= free.cpu_millis && self.memory_bytes <= free.memory_bytes
    }
}

impl std::ops::Add for Resources {
    type Output = Resources;

    fn add(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis + other.cpu_millis,
            memory_bytes: self.memory_bytes + other.memory_bytes,
        }
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} CPU, {}", format_cpus(self.cpu_millis), format_bytes(self.memory_bytes))
    }
}

pub fn format_cpus(cpu_millis: u64) -> String {
    if cpu_millis.is_multiple_of(1000) {
        format!("{}", cpu_millis / 1000)
    } else {
        format!("{:.2}", cpu_millis as f64 / 1000.0)
    }
}

/// Bytes in the largest binary unit that keeps the number whole-ish.
pub fn format_bytes(bytes: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    const GIB: u64 = 1024 * MIB;
    if bytes >= GIB && bytes.is_multiple_of(GIB) {
        format!("{} GiB", bytes / GIB)
    } else if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else if bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// New instances start a few at a time (`max_unavailable`) beside the
    /// old ones; each old one stops as a new one passes its checks. A failure
    /// stops the deploy and brings the old release back to full strength.
    #[default]
    Rolling,
    /// The old instances stop as soon as the new ones are placed; checks are
    /// not waited for.
    Immediate,
    /// Every new instance starts beside the old ones; the switch happens
    /// once all of them pass their checks.
    Bluegreen,
    /// One new instance first; once it passes its checks, the rest as in
    /// bluegreen.
    Canary,
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::Rolling => "rolling",
            Strategy::Immediate => "immediate",
            Strategy::Bluegreen => "bluegreen",
            Strategy::Canary => "canary",
        })
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartSpec {
    pub policy: RestartPolicy,
    /// Restarts allowed before the instance is `failed`; none means no limit.
    pub max_retries: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    Http,
    Tcp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSpec {
    pub name: String,
    pub kind: CheckKind,
    pub port: u16,
    /// For http checks; `/` when unset.
    pub path: Option<String>,
    pub method: Option<String>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub grace_period_ms: u64,
    /// Probes that must fail in a row, after the grace period, before the
    /// instance is failing (one failed probe of a passing instance changes
    /// nothing). Releases made before this existed read as the default.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
}

/// How many probes in a row must fail before a check fails, as Kubernetes'
/// `failureThreshold` and Nomad's `check_restart.limit` default to.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;

fn default_failure_threshold() -> u32 {
    DEFAULT_FAILURE_THRESHOLD
}

/// One process group of a release: what its instances run and need.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSpec {
    /// The command line; empty runs the image's own entrypoint and command.
    pub command: Vec<String>,
    pub resources: Resources,
    pub restart: RestartSpec,
    /// The port where the group's service answers, if it has one.
    pub internal_port: Option<u16>,
    pub checks: Vec<CheckSpec>,
    /// Seconds an instance has between SIGTERM and SIGKILL when stopped.
    #[serde(default = "default_kill_timeout")]
    pub kill_timeout_seconds: u32,
}

/// fly.io's and Roost's default `kill_timeout`.
pub const DEFAULT_KILL_TIMEOUT_SECONDS: u32 = 5;

fn default_kill_timeout() -> u32 {
    DEFAULT_KILL_TIMEOUT_SECONDS
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementSpec {
    /// `label == value` / `label != value`, as written in roost.toml.
    pub constraints: Vec<String>,
    pub max_per_node: Option<u32>,
}

/// A placement constraint on node labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Constraint {
    pub label: String,
    pub equal: bool,
    pub value: String,
}

impl Constraint {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (label, equal, value) = if let Some((l, v)) = text.split_once("==") {
            (l, true, v)
        } else if let Some((l, v)) = text.split_once("!=") {
            (l, false, v)
        } else {
            return Err(format!("'{text}' is not `label == value` or `label != value`"));
        };
        let (label, value) = (label.trim(), value.trim().trim_matches('"'));
        if label.is_empty() || value.is_empty() {
            return Err(format!("'{text}' needs a label and a value on either side"));
        }
        Ok(Self { label: label.to_owned(), equal, value: value.to_owned() })
    }

    pub fn holds(&self, labels: &BTreeMap<String, String>) -> bool {
        (labels.get(&self.label) == Some(&self.value)) == self.equal
    }
}

/// `[http_service]`: what every node's edge proxy routes to the app.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpServiceSpec {
    pub internal_port: u16,
    /// Plain HTTP requests are redirected to HTTPS.
    pub force_https: bool,
    #[serde(default)]
    pub concurrency: Concurrency,
    /// The process groups that serve it.
    pub groups: Vec<String>,
}

/// `[http_service.concurrency]`: how much one instance takes from one edge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Concurrency {
    /// Connections rather than requests.
    #[serde(default)]
    pub connections: bool,
    /// Balancing prefers instances below this.
    pub soft_limit: Option<u32>,
    /// An instance never gets more than this; the rest wait briefly, then 503.
    pub hard_limit: Option<u32>,
}

/// `[[services]]`: raw TCP from public ports of every node to an instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpServiceSpec {
    pub internal_port: u16,
    pub ports: Vec<u16>,
    /// The process groups that serve it.
    pub groups: Vec<String>,
}

/// Everything needed to run a release's instances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseSpec {
    /// The image id (`sha256:…`), which names the content, not a tag.
    pub image: String,
    /// What the user knows the image as, for display.
    pub image_ref: String,
    /// A node whose Docker engine has the image, to fetch it from.
    pub image_source: NodeId,
    pub env: BTreeMap<String, String>,
    pub groups: BTreeMap<String, GroupSpec>,
    pub strategy: Strategy,
    /// For rolling deploys: how many new instances may be starting at once.
    #[serde(default)]
    pub max_unavailable: Option<MaxUnavailable>,
    /// `[deploy] initial_count`: the instances a process group new to the
    /// app starts with (default 1); a group the app already has keeps its count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_count: Option<u32>,
    /// `[deploy] release_history`: how many of the newest releases the app
    /// keeps (default [`crate::state::RELEASE_HISTORY`], at most
    /// [`crate::state::MAX_RELEASE_HISTORY`]); the newest release's says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_history: Option<u32>,
    pub placement: PlacementSpec,
    /// What the edge routes over HTTP(S), if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpServiceSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<TcpServiceSpec>,
}

/// `[deploy] max_unavailable`: a count, or a share of the instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaxUnavailable {
    Count(u32),
    Percent(u32),
}

impl MaxUnavailable {
    /// fly.io's default: a third of the instances at a time.
    pub const DEFAULT: MaxUnavailable = MaxUnavailable::Percent(33);

    /// How many of `total` instances may be replaced at once (at least one).
    pub fn wave(self, total: usize) -> usize {
        match self {
            MaxUnavailable::Count(count) => count as usize,
            MaxUnavailable::Percent(percent) => (total * percent as usize).div_ceil(100),
        }
        .max(1)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseStatus {
    /// Its instances are starting; the previous release still serves.
    Deploying,
    /// The release that serves.
    Active,
    /// Replaced by a later release.
    Superseded,
    /// Its deploy failed and was rolled back.
    Failed,
}

impl fmt::Display for ReleaseStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReleaseStatus::Deploying => "deploying",
            ReleaseStatus::Active => "active",
            ReleaseStatus::Superseded => "superseded",
            ReleaseStatus::Failed => "failed",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub version: u64,
    pub spec: ReleaseSpec,
    /// The app's secrets version this release was made with.
    pub secrets_version: u64,
    /// The app's secrets as they were then: what its instances get, so a
    /// rolled-back or staged change never reaches the running release.
    #[serde(default)]
    pub secrets: BTreeMap<String, SealedSecret>,
    pub status: ReleaseStatus,
    /// Why the release exists: "deploy", "rollback to v2", "secrets", ….
    pub description: String,
    /// Why it failed, when it did.
    pub reason: Option<String>,
    pub created_at: UnixMillis,
}

/// The largest secret value, in bytes before sealing.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;
/// The most bytes (before sealing) one app's secrets may hold together.
/// Every release keeps a copy, so this bounds what an app costs the state.
pub const MAX_APP_SECRETS_BYTES: usize = 512 * 1024;
/// The most secrets one app may hold.
pub const MAX_SECRETS_PER_APP: usize = 100;
/// What sealing adds to a value: a 12-byte nonce and a 16-byte tag.
pub const SEAL_OVERHEAD: usize = 28;
/// The longest sealed form of a value of [`MAX_SECRET_BYTES`] (hex).
pub const MAX_SEALED_SECRET_CHARS: usize = 2 * (MAX_SECRET_BYTES + SEAL_OVERHEAD);
/// The longest instance reason (a check's output, an exit) the state keeps.
pub const MAX_REASON_BYTES: usize = 512;

/// `text` cut to at most `max` bytes, at a character boundary, marked with
/// an ellipsis when cut.
pub fn truncated(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// A secret value sealed with the cluster's secrets key; only nodes can open it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSecret {
    /// Nonce and ciphertext, hex.
    pub sealed: String,
    /// SHA-256 of the value, hex, first 16 characters: lets a user see that a
    /// value changed without seeing it.
    pub digest: String,
    pub updated_at: UnixMillis,
}

impl fmt::Debug for SealedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedSecret").field("digest", &self.digest).finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Not yet placed, or placed but not yet seen by its node.
    #[default]
    Pending,
    Starting,
    Running,
    Stopped,
    Failed,
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InstanceState::Pending => "pending",
            InstanceState::Starting => "starting",
            InstanceState::Running => "running",
            InstanceState::Stopped => "stopped",
            InstanceState::Failed => "failed",
        })
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    #[default]
    Unknown,
    Passing,
    Failing,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Unknown => "unknown",
            Health::Passing => "passing",
            Health::Failing => "failing",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub app: String,
    pub release: u64,
    pub group: String,
    /// Where it runs; `None` while it waits for a place.
    pub node: Option<NodeId>,
    pub state: InstanceState,
    pub health: Health,
    /// IP:PORT where its internal port answers, once it runs.
    pub address: Option<String>,
    /// Its mesh address, once it runs: reachable from every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// Why it is pending or failed, or the last check output when failing.
    pub reason: Option<String>,
    /// Taken off a node that went down or was removed (`Reschedule`):
    /// placing it again is all it needs, so a deploy does not fail on it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub displaced: bool,
    pub restarts: u32,
    /// Bumped by `roost restart`; a node recreates the container when the
    /// one it runs has an older generation.
    pub generation: u32,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
}

/// What a node observed about one of its instances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceReport {
    pub id: String,
    pub state: InstanceState,
    pub health: Health,
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    pub reason: Option<String>,
    pub restarts: u32,
    /// The generation of the container observed. A report about an older
    /// generation than the state's (a container `roost restart` has already
    /// replaced) is stale, and apply ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u32>,
}

/// One decision of the scheduler.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Placement {
    Place {
        instance: String,
        node: NodeId,
    },
    /// It cannot be placed now; the reason says what would let it.
    Unplaceable {
        instance: String,
        reason: String,
    },
}

impl Instance {
    /// Whether the instance runs and passes its checks (or has none).
    pub fn ready(&self, group: Option<&GroupSpec>) -> bool {
        let checked = group.is_some_and(|g| !g.checks.is_empty());
        self.state == InstanceState::Running && (!checked || self.health == Health::Passing)
    }
}

/// How a deploy ended, as the leader's controller decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Outcome {
    Active,
    Failed { reason: String },
}
