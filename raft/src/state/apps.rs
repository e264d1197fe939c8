//! Applying the workload commands: releases, instances, scale and secrets.
//!
//! Every command either applies whole or is rejected with nothing changed:
//! checks come first, mutation after. The leader's controller (in the deploy
//! crate) decides placements and rollout outcomes; these functions only check
//! that a decision still fits the state (an instance may have been removed
//! since it was decided) and record it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{App, NodeRecord, RestartProgress, State, UnixMillis};
use crate::command::{Rejection, Response};
use crate::workload::{truncated, Constraint, SEAL_OVERHEAD};
use crate::workload::{
    Health, Instance, InstanceReport, InstanceState, MaxUnavailable, Outcome, Placement, Release, ReleaseSpec,
    ReleaseStatus, Resources, SealedSecret, MAX_APP_SECRETS_BYTES, MAX_REASON_BYTES, MAX_SEALED_SECRET_CHARS,
    MAX_SECRETS_PER_APP,
};
use crate::NodeId;

/// The most instances one process group may have; a typo in `roost scale`
/// must not make every node apply millions of instances.
pub const MAX_INSTANCES_PER_GROUP: u32 = 10_000;

/// The instances a process group new to the app starts with, if the
/// release's `initial_count` is within bounds.
fn check_initial_count(spec: &ReleaseSpec) -> Result<u32, Rejection> {
    match spec.initial_count.unwrap_or(1) {
        0 => Err(Rejection::InvalidRelease {
            reason: "its initial_count is 0; a process group starts with at least one instance".into(),
        }),
        count if count > MAX_INSTANCES_PER_GROUP => {
            Err(Rejection::TooManyInstances { count, max: MAX_INSTANCES_PER_GROUP })
        }
        count => Ok(count),
    }
}

impl State {
    fn app_mut(&mut self, name: &str) -> Result<&mut App, Rejection> {
        self.apps.get_mut(name).ok_or_else(|| Rejection::AppNotFound { name: name.to_owned() })
    }

    pub(super) fn deploy(&mut self, app: &str, spec: &ReleaseSpec, description: &str, at: UnixMillis) -> Response {
        // Checked before the app is created, so a refused deploy creates nothing.
        if spec.groups.is_empty() {
            return Response::Rejected(Rejection::InvalidRelease { reason: "it has no process group".into() });
        }
        if let Some((port, owner)) = self.port_taken(app, spec) {
            return Response::Rejected(Rejection::PortTaken { port, app: owner });
        }
        if let Err(rejection) = check_initial_count(spec) {
            return Response::Rejected(rejection);
        }
        if !self.apps.contains_key(app) {
            if let Err(reason) = super::validate_name(app) {
                return Response::Rejected(Rejection::InvalidAppName { name: app.to_owned(), reason });
            }
            self.apps.insert(app.to_owned(), App::new(app, at));
        }
        self.new_release(app, spec.clone(), description, at)
    }

    /// Records a release of `spec` as deploying, with its instances pending.
    fn new_release(&mut self, app_name: &str, spec: ReleaseSpec, description: &str, at: UnixMillis) -> Response {
        if spec.groups.is_empty() {
            return Response::Rejected(Rejection::InvalidRelease { reason: "it has no process group".into() });
        }
        let app = match self.app_mut(app_name) {
            Ok(app) => app,
            Err(rejection) => return Response::Rejected(rejection),
        };
        if app.suspended {
            return Response::Rejected(Rejection::AppSuspended { name: app_name.to_owned() });
        }
        if let Some(deploying) = app.deploying() {
            return Response::Rejected(Rejection::DeployInProgress {
                app: app_name.to_owned(),
                version: deploying.version,
            });
        }
        if let Some((port, owner)) = self.port_taken(app_name, &spec) {
            return Response::Rejected(Rejection::PortTaken { port, app: owner });
        }
        let Some(app) = self.apps.get_mut(app_name) else {
            return Response::Rejected(Rejection::AppNotFound { name: app_name.to_owned() });
        };
        let initial = match check_initial_count(&spec) {
            Ok(initial) => initial,
            Err(rejection) => return Response::Rejected(rejection),
        };
        let version = app.releases.keys().next_back().map_or(1, |v| v + 1);
        let counts: Vec<(String, u32)> = spec
            .groups
            .keys()
            .map(|group| (group.clone(), *app.scale.entry(group.clone()).or_insert(initial)))
            .collect();
        app.releases.insert(
            version,
            Release {
                version,
                spec,
                secrets_version: app.secrets_version,
                secrets: app.secrets.clone(),
                status: ReleaseStatus::Deploying,
                description: description.to_owned(),
                reason: None,
                created_at: at,
            },
        );
        prune_releases(app);
        // A new release replaces every instance: a restart under way is moot.
        app.restart = None;
        for (group, count) in counts {
            for _ in 0..count {
                self.add_instance(app_name, version, &group, at);
            }
        }
        Response::ReleaseCreated { version }
    }

    /// A public TCP port of `spec` that another app's serving or deploying
    /// release already listens on, and that app.
    fn port_taken(&self, app_name: &str, spec: &ReleaseSpec) -> Option<(u16, String)> {
        let wanted: Vec<u16> = spec.services.iter().flat_map(|s| s.ports.iter().copied()).collect();
        self.apps.values().filter(|app| app.name != app_name).find_map(|app| {
            [app.current(), app.deploying()]
                .into_iter()
                .flatten()
                .flat_map(|release| release.spec.services.iter().flat_map(|s| s.ports.iter().copied()))
                .find(|port| wanted.contains(port))
                .map(|port| (port, app.name.clone()))
        })
    }

    fn add_instance(&mut self, app: &str, release: u64, group: &str, at: UnixMillis) {
        let id = loop {
            self.next_instance += 1;
            let id = instance_id(self.next_instance);
            if !self.instances.contains_key(&id) {
                break id;
            }
        };
        self.instances.insert(
            id.clone(),
            Instance {
                id,
                app: app.to_owned(),
                release,
                group: group.to_owned(),
                node: None,
                state: InstanceState::Pending,
                health: Health::Unknown,
                address: None,
                ip: None,
                reason: None,
                displaced: false,
                restarts: 0,
                generation: 0,
                created_at: at,
                updated_at: at,
            },
        );
    }

    pub(super) fn finish_release(
        &mut self,
        app_name: &str,
        version: u64,
        outcome: &Outcome,
        at: UnixMillis,
    ) -> Response {
        let Some(app) = self.apps.get_mut(app_name) else {
            return Response::Rejected(Rejection::AppNotFound { name: app_name.to_owned() });
        };
        let Some(release) = app.releases.get(&version) else {
            return Response::Rejected(Rejection::ReleaseNotFound { app: app_name.to_owned(), version });
        };
        if release.status != ReleaseStatus::Deploying {
            // Decided twice (a leader change); the first decision stands.
            return Response::Done;
        }
        match outcome {
            Outcome::Active => {
                for release in app.releases.values_mut() {
                    if release.status == ReleaseStatus::Active {
                        release.status = ReleaseStatus::Superseded;
                    }
                }
                if let Some(release) = app.releases.get_mut(&version) {
                    release.status = ReleaseStatus::Active;
                }
                self.instances.retain(|_, i| i.app != app_name || i.release == version);
            }
            Outcome::Failed { reason } => {
                if let Some(release) = app.releases.get_mut(&version) {
                    release.status = ReleaseStatus::Failed;
                    release.reason = Some(reason.clone());
                }
                // Scale changes made for this release do not outlive it.
                let current = app.current().map(|r| r.version);
                let groups: Vec<String> =
                    app.current().map(|r| r.spec.groups.keys().cloned().collect()).unwrap_or_default();
                app.scale.retain(|group, _| groups.contains(group));
                let scale = app.scale.clone();
                self.instances.retain(|_, i| i.app != app_name || i.release != version);
                // A rolling deploy retired some old instances: bring the
                // serving release back to full strength.
                if let Some(current) = current {
                    for (group, count) in scale {
                        let have = self
                            .instances
                            .values()
                            .filter(|i| i.app == app_name && i.release == current && i.group == group)
                            .count();
                        for _ in have..count as usize {
                            self.add_instance(app_name, current, &group, at);
                        }
                    }
                }
            }
        }
        Response::Done
    }

    pub(super) fn retire(&mut self, app_name: &str, ids: &[String]) -> Response {
        let Some(app) = self.apps.get(app_name) else {
            return Response::Rejected(Rejection::AppNotFound { name: app_name.to_owned() });
        };
        // Only instances of releases that are not being deployed.
        let deploying = app.deploying().map(|r| r.version);
        for id in ids {
            if self.instances.get(id).is_some_and(|i| i.app == app_name && Some(i.release) != deploying) {
                self.instances.remove(id);
            }
        }
        Response::Done
    }

    /// Places instances as the scheduler decided. A decision may have been
    /// made on a stale state (a new leader, a write not yet confirmed), so
    /// each is checked again, in order, against what the node has left, the
    /// release's constraints and `max_per_node`; one that no longer holds
    /// leaves the instance waiting, with the reason, for the next decision.
    pub(super) fn place(&mut self, placements: &[Placement]) -> Response {
        let mut reserved = self.reserved();
        // Instances per app, release and node, counted once per command
        // (not per placement: a command places thousands).
        let mut placed: HashMap<String, HashMap<(u64, NodeId), usize>> = HashMap::new();
        for instance in self.instances.values() {
            if let Some(node) = instance.node {
                *placed.entry(instance.app.clone()).or_default().entry((instance.release, node)).or_default() += 1;
            }
        }
        for placement in placements {
            match placement {
                Placement::Place { instance: id, node } => {
                    let Some(instance) = self.instances.get(id).filter(|i| i.node.is_none()) else { continue };
                    let Some(record) = self.nodes.get(node) else { continue };
                    let there = placed
                        .get(instance.app.as_str())
                        .and_then(|counts| counts.get(&(instance.release, *node)))
                        .copied()
                        .unwrap_or(0);
                    let checked = self.placement_holds(instance, record, &reserved, there);
                    let Some(instance) = self.instances.get_mut(id) else { continue };
                    match checked {
                        Ok(need) => {
                            let entry = reserved.entry(*node).or_default();
                            *entry = *entry + need;
                            *placed
                                .entry(instance.app.clone())
                                .or_default()
                                .entry((instance.release, *node))
                                .or_default() += 1;
                            instance.node = Some(*node);
                            instance.reason = None;
                            instance.displaced = false;
                        }
                        Err(reason) => {
                            instance.reason = Some(reason);
                            instance.displaced = false;
                        }
                    }
                }
                Placement::Unplaceable { instance, reason } => {
                    if let Some(instance) = self.instances.get_mut(instance) {
                        if instance.node.is_none() {
                            instance.reason = Some(reason.clone());
                            instance.displaced = false;
                        }
                    }
                }
            }
        }
        Response::Done
    }

    /// Whether `instance` may go on `node` now, where `there` instances of
    /// its release already are; what it reserves if so.
    fn placement_holds(
        &self,
        instance: &Instance,
        node: &NodeRecord,
        reserved: &BTreeMap<NodeId, Resources>,
        there: usize,
    ) -> Result<Resources, String> {
        let release = self.apps.get(&instance.app).and_then(|a| a.releases.get(&instance.release));
        let (Some(release), Some(need)) = (release, self.instance_resources(instance)) else {
            return Err("its release is gone".into());
        };
        let free = node.resources.saturating_sub(reserved.get(&node.id).copied().unwrap_or_default());
        if !need.fits_in(free) {
            return Err(format!(
                "{} no longer has room for it (needs {} mCPU and {} MiB; {} mCPU and {} MiB free)",
                node.name,
                need.cpu_millis,
                need.memory_bytes >> 20,
                free.cpu_millis,
                free.memory_bytes >> 20
            ));
        }
        let placement = &release.spec.placement;
        for text in &placement.constraints {
            match Constraint::parse(text) {
                Ok(constraint) if constraint.holds(&node.labels) => {}
                Ok(_) => return Err(format!("{} does not meet its constraint {text}", node.name)),
                Err(reason) => return Err(format!("its placement constraint is invalid: {reason}")),
            }
        }
        if let Some(max) = placement.max_per_node {
            if there >= max as usize {
                return Err(format!("{} already runs {there} of its release (max_per_node = {max})", node.name));
            }
        }
        Ok(need)
    }

    pub(super) fn reschedule(&mut self, ids: &[String], reason: &str) -> Response {
        for id in ids {
            if let Some(instance) = self.instances.get_mut(id) {
                instance.node = None;
                instance.state = InstanceState::Pending;
                instance.health = Health::Unknown;
                instance.address = None;
                instance.ip = None;
                instance.reason = Some(reason.to_owned());
                instance.displaced = true;
            }
        }
        Response::Done
    }

    pub(super) fn report_instances(&mut self, node: NodeId, reports: &[InstanceReport], at: UnixMillis) -> Response {
        for report in reports {
            // A report from a node the instance has been moved away from is stale.
            // So is one about a container older than the instance's generation.
            let current =
                |i: &&mut Instance| i.node == Some(node) && report.generation.is_none_or(|g| g >= i.generation);
            if let Some(instance) = self.instances.get_mut(&report.id).filter(current) {
                instance.state = report.state;
                instance.health = report.health;
                instance.address = report.address.clone();
                instance.ip = report.ip;
                // App code writes check output: the state keeps a bounded part.
                instance.reason = report.reason.as_deref().map(|r| truncated(r, MAX_REASON_BYTES));
                instance.restarts = report.restarts;
                instance.updated_at = at;
            }
        }
        Response::Done
    }

    /// Checks shared by the commands that change a running app.
    fn changeable(&self, app_name: &str) -> Result<&App, Rejection> {
        let app = self.apps.get(app_name).ok_or_else(|| Rejection::AppNotFound { name: app_name.to_owned() })?;
        if let Some(deploying) = app.deploying() {
            return Err(Rejection::DeployInProgress { app: app_name.to_owned(), version: deploying.version });
        }
        Ok(app)
    }

    pub(super) fn scale(&mut self, app_name: &str, group: &str, count: u32, at: UnixMillis) -> Response {
        if count > MAX_INSTANCES_PER_GROUP {
            return Response::Rejected(Rejection::TooManyInstances { count, max: MAX_INSTANCES_PER_GROUP });
        }
        let current = match self.changeable(app_name) {
            Ok(app) => match app.current() {
                Some(current) => current.clone(),
                None => return Response::Rejected(Rejection::NoRelease { app: app_name.to_owned() }),
            },
            Err(rejection) => return Response::Rejected(rejection),
        };
        if !current.spec.groups.contains_key(group) {
            return Response::Rejected(unknown_group(app_name, group, &current.spec));
        }
        let mut existing: Vec<&Instance> =
            self.instances.values().filter(|i| i.app == app_name && i.group == group).collect();
        // Remove pending ones first, then the newest.
        existing.sort_by_key(|i| (i.node.is_some(), std::cmp::Reverse(i.created_at), std::cmp::Reverse(i.id.clone())));
        let surplus: Vec<String> =
            existing.iter().take(existing.len().saturating_sub(count as usize)).map(|i| i.id.clone()).collect();
        let missing = (count as usize).saturating_sub(existing.len());
        for id in surplus {
            self.instances.remove(&id);
        }
        for _ in 0..missing {
            self.add_instance(app_name, current.version, group, at);
        }
        if let Some(app) = self.apps.get_mut(app_name) {
            app.scale.insert(group.to_owned(), count);
        }
        Response::Done
    }

    pub(super) fn scale_vm(
        &mut self,
        app_name: &str,
        group: Option<&str>,
        resources: Resources,
        at: UnixMillis,
    ) -> Response {
        let mut spec = match self.current_spec(app_name) {
            Ok(spec) => spec,
            Err(rejection) => return Response::Rejected(rejection),
        };
        match group {
            Some(group) => match spec.groups.get_mut(group) {
                Some(g) => g.resources = resources,
                None => return Response::Rejected(unknown_group(app_name, group, &spec)),
            },
            None => spec.groups.values_mut().for_each(|g| g.resources = resources),
        }
        self.new_release(app_name, spec, &format!("scale vm to {resources}"), at)
    }

    fn current_spec(&self, app_name: &str) -> Result<ReleaseSpec, Rejection> {
        let app = self.changeable(app_name)?;
        app.current().map(|r| r.spec.clone()).ok_or_else(|| Rejection::NoRelease { app: app_name.to_owned() })
    }

    pub(super) fn rollback(&mut self, app_name: &str, version: Option<u64>, at: UnixMillis) -> Response {
        let app = match self.changeable(app_name) {
            Ok(app) => app,
            Err(rejection) => return Response::Rejected(rejection),
        };
        let Some(current) = app.current() else {
            return Response::Rejected(Rejection::NoRelease { app: app_name.to_owned() });
        };
        let target = match version {
            Some(version) => match app.releases.get(&version) {
                Some(release) => release,
                None => return Response::Rejected(Rejection::ReleaseNotFound { app: app_name.to_owned(), version }),
            },
            None => match app
                .releases
                .values()
                .rev()
                .find(|r| r.version < current.version && r.status == ReleaseStatus::Superseded)
            {
                Some(release) => release,
                None => return Response::Rejected(Rejection::NothingToRollBackTo { app: app_name.to_owned() }),
            },
        };
        let (mut spec, description) = (target.spec.clone(), format!("rollback to v{}", target.version));
        // The history the app keeps is today's, not the old release's.
        spec.release_history = app.releases.values().next_back().and_then(|r| r.spec.release_history);
        self.new_release(app_name, spec, &description, at)
    }

    pub(super) fn set_secrets(
        &mut self,
        app_name: &str,
        set: &BTreeMap<String, SealedSecret>,
        unset: &[String],
        stage: bool,
        at: UnixMillis,
    ) -> Response {
        let app = match self.changeable(app_name) {
            Ok(app) => app,
            Err(rejection) => return Response::Rejected(rejection),
        };
        let missing: Vec<&str> = unset.iter().filter(|k| !app.secrets.contains_key(*k)).map(String::as_str).collect();
        if !missing.is_empty() {
            return Response::Rejected(Rejection::SecretNotFound {
                app: app_name.to_owned(),
                names: missing.join(", "),
            });
        }
        if let Some((name, sealed)) = set.iter().find(|(_, v)| v.sealed.len() > MAX_SEALED_SECRET_CHARS) {
            return Response::Rejected(Rejection::SecretTooLarge {
                app: app_name.to_owned(),
                name: name.clone(),
                bytes: (sealed.sealed.len() / 2).saturating_sub(SEAL_OVERHEAD),
            });
        }
        let count = app.secrets.keys().filter(|k| !unset.contains(k)).chain(set.keys()).collect::<BTreeSet<_>>().len();
        if count > MAX_SECRETS_PER_APP {
            return Response::Rejected(Rejection::TooManySecrets {
                app: app_name.to_owned(),
                count,
                max: MAX_SECRETS_PER_APP,
            });
        }
        // Sealed values are hex, with a nonce and a tag.
        let bytes: usize = app
            .secrets
            .iter()
            .filter(|(k, _)| !unset.contains(k) && !set.contains_key(*k))
            .chain(set.iter())
            .map(|(_, v)| (v.sealed.len() / 2).saturating_sub(SEAL_OVERHEAD))
            .sum();
        if bytes > MAX_APP_SECRETS_BYTES {
            return Response::Rejected(Rejection::AppSecretsTooLarge { app: app_name.to_owned(), bytes });
        }
        let spec = app.current().map(|r| r.spec.clone());
        if !stage && spec.is_some() && app.suspended {
            return Response::Rejected(Rejection::AppSuspended { name: app_name.to_owned() });
        }
        let Ok(app) = self.app_mut(app_name) else {
            return Response::Rejected(Rejection::AppNotFound { name: app_name.to_owned() });
        };
        for name in unset {
            app.secrets.remove(name);
        }
        app.secrets.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
        app.secrets_version += 1;
        match spec {
            Some(spec) if !stage => self.new_release(app_name, spec, "secrets", at),
            _ => Response::Done,
        }
    }

    pub(super) fn restart(&mut self, app_name: &str, at: UnixMillis) -> Response {
        if let Err(rejection) = self.changeable(app_name) {
            return Response::Rejected(rejection);
        }
        let placed = || self.instances.values().filter(|i| i.app == app_name && i.node.is_some());
        let Some(newest) = placed().map(|i| i.generation).max() else {
            // Nothing runs: there is nothing to restart.
            return Response::Done;
        };
        let generation = newest + 1;
        if let Ok(app) = self.app_mut(app_name) {
            app.restart = Some(RestartProgress { generation, requested_at: at });
        }
        Response::Done
    }

    /// The next wave of the app's restart: instances still on an older
    /// generation, as many as `max_unavailable` allows beside those of the
    /// new generation that are not ready yet; unready ones go first, since
    /// they serve nothing. Only placed instances count: one waiting for a
    /// node gets a new container anyway.
    pub fn restart_wave(&self, app_name: &str) -> Option<(u32, Vec<String>)> {
        let app = self.apps.get(app_name)?;
        let progress = app.restart?;
        let release_spec = |i: &Instance| app.releases.get(&i.release).and_then(|r| r.spec.groups.get(&i.group));
        let max = app.current().and_then(|r| r.spec.max_unavailable).unwrap_or(MaxUnavailable::DEFAULT);
        let instances: Vec<&Instance> = self.restarting(app_name, progress).collect();
        let in_flight =
            instances.iter().filter(|i| i.generation >= progress.generation && !i.ready(release_spec(i))).count();
        let mut behind: Vec<&&Instance> = instances.iter().filter(|i| i.generation < progress.generation).collect();
        behind.sort_by_key(|i| (i.ready(release_spec(i)), i.id.clone()));
        let room = max.wave(instances.len()).saturating_sub(in_flight);
        let wave: Vec<String> = behind.into_iter().take(room).map(|i| i.id.clone()).collect();
        (!wave.is_empty()).then_some((progress.generation, wave))
    }

    /// The instances a restart covers: placed, and there when it was asked for.
    fn restarting<'a>(&'a self, app_name: &'a str, progress: RestartProgress) -> impl Iterator<Item = &'a Instance> {
        self.instances
            .values()
            .filter(move |i| i.app == app_name && i.node.is_some() && i.created_at <= progress.requested_at)
    }

    pub(super) fn restart_instances(&mut self, app_name: &str, generation: u32, ids: &[String]) -> Response {
        // A decision made on a stale state (or repeated) may take only what
        // the wave allows now.
        let Some((current, allowed)) = self.restart_wave(app_name) else {
            return Response::Done;
        };
        if current != generation {
            return Response::Done;
        }
        for id in ids.iter().filter(|id| allowed.contains(id)) {
            if let Some(instance) = self.instances.get_mut(id) {
                instance.generation = generation;
                // Not ready until the new container says so.
                instance.state = InstanceState::Starting;
                instance.health = Health::Unknown;
                instance.reason = Some("restarting".into());
            }
        }
        let progress = self.apps.get(app_name).and_then(|a| a.restart);
        let behind = progress.is_some_and(|p| self.restarting(app_name, p).any(|i| i.generation < generation));
        if !behind {
            if let Ok(app) = self.app_mut(app_name) {
                app.restart = None;
            }
        }
        Response::Done
    }

    pub(super) fn set_suspended(&mut self, name: &str, suspended: bool) -> Response {
        let app = match self.changeable(name) {
            Ok(app) => app,
            Err(rejection) => return Response::Rejected(rejection),
        };
        if app.suspended == suspended {
            let state = if suspended { "suspended" } else { "running (not suspended)" };
            return Response::Rejected(Rejection::AlreadyInState { name: name.to_owned(), state: state.into() });
        }
        if let Ok(app) = self.app_mut(name) {
            app.suspended = suspended;
        }
        Response::Done
    }

    /// The resources reserved on each node by the instances placed there.
    pub fn reserved(&self) -> BTreeMap<NodeId, Resources> {
        let mut reserved: BTreeMap<NodeId, Resources> = BTreeMap::new();
        for instance in self.instances.values() {
            let (Some(node), Some(resources)) = (instance.node, self.instance_resources(instance)) else {
                continue;
            };
            let entry = reserved.entry(node).or_default();
            *entry = *entry + resources;
        }
        reserved
    }

    /// What an instance reserves: its group's resources. A suspended app's
    /// instances keep their place and their reservation, so resume finds
    /// room for them.
    pub fn instance_resources(&self, instance: &Instance) -> Option<Resources> {
        let app = self.apps.get(&instance.app)?;
        let release = app.releases.get(&instance.release)?;
        release.spec.groups.get(&instance.group).map(|g| g.resources)
    }
}

fn unknown_group(app: &str, group: &str, spec: &ReleaseSpec) -> Rejection {
    Rejection::UnknownGroup {
        app: app.to_owned(),
        group: group.to_owned(),
        groups: spec.groups.keys().cloned().collect::<Vec<_>>().join(", "),
    }
}

/// A short, stable id from a counter (splitmix64, 48 bits, hex), in the
/// style of fly.io machine ids; the caller skips the rare collision.
fn instance_id(counter: u64) -> String {
    let mut z = counter.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    format!("{:012x}", z & 0xffff_ffff_ffff)
}

/// Releases an app keeps unless its `[deploy] release_history` says
/// otherwise: the newest [`RELEASE_HISTORY`], and in any case the serving
/// one, the one deploying and the one a rollback returns to. Each holds a
/// spec and the app's sealed secrets, so an app deployed every hour must not
/// grow the state without bound.
pub const RELEASE_HISTORY: usize = 10;
/// The most releases an app may ask to keep.
pub const MAX_RELEASE_HISTORY: u32 = 100;

/// How many of the newest releases `app` keeps: its newest release's
/// `release_history`, within 1..=[`MAX_RELEASE_HISTORY`].
fn release_history(app: &App) -> usize {
    let asked = app.releases.values().next_back().and_then(|r| r.spec.release_history);
    asked.map_or(RELEASE_HISTORY, |n| n.clamp(1, MAX_RELEASE_HISTORY) as usize)
}

fn prune_releases(app: &mut App) {
    let history = release_history(app);
    if app.releases.len() <= history {
        return;
    }
    let current = app.current().map(|r| r.version);
    let deploying = app.deploying().map(|r| r.version);
    let rollback = current.and_then(|current| {
        app.releases
            .values()
            .rev()
            .find(|r| r.version < current && r.status == ReleaseStatus::Superseded)
            .map(|r| r.version)
    });
    let oldest_recent = app.releases.keys().rev().nth(history - 1).copied().unwrap_or(0);
    app.releases
        .retain(|&version, _| version >= oldest_recent || [current, deploying, rollback].contains(&Some(version)));
}
