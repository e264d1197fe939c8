//! The directory: which instances answer for which app, derived from the
//! replicated state.
//!
//! [`Directory::from_state`] is a pure function of the state, rebuilt on each
//! change; `.internal` DNS ([`crate::dns`]) answers from it and, later, the
//! edge proxy picks backends from it. Only instances that run, have a mesh
//! address and pass their checks (or have none) are listed, so a failing
//! check takes an instance out of every answer as soon as its node reports
//! it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use roost_raft::workload::Instance;
use roost_raft::{NodeId, State};

/// One instance that can take traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub instance: String,
    pub group: String,
    pub node: NodeId,
    pub ip: Ipv4Addr,
    /// The group's internal port, if it serves one.
    pub port: Option<u16>,
}

/// The healthy instances of every app, by app name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Directory {
    apps: BTreeMap<String, AppEntry>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct AppEntry {
    /// The process groups of its releases, healthy or not, so that a group
    /// with no healthy instance is an empty answer rather than no name.
    groups: BTreeSet<String>,
    endpoints: Vec<Endpoint>,
}

/// What a name under `internal.` stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A name that exists, with the addresses of its healthy instances
    /// (possibly none).
    Addresses(Vec<Ipv4Addr>),
    /// `_apps.internal`: the apps with at least one healthy instance.
    Apps(Vec<String>),
    /// No such app, group or instance.
    NoSuchName,
}

impl Directory {
    pub fn from_state(state: &State) -> Directory {
        let mut apps: BTreeMap<String, AppEntry> = state
            .apps
            .iter()
            // An app never deployed has no name yet: creating one changes
            // nothing the directory holds.
            .filter(|(_, app)| !app.suspended && app.has_release())
            .map(|(name, app)| {
                let groups = [app.current(), app.deploying()]
                    .into_iter()
                    .flatten()
                    .flat_map(|release| release.spec.groups.keys().cloned())
                    .collect();
                (name.clone(), AppEntry { groups, endpoints: Vec::new() })
            })
            .collect();
        for instance in state.instances.values() {
            let Some(entry) = apps.get_mut(&instance.app) else { continue };
            if let Some(endpoint) = endpoint(state, instance) {
                entry.endpoints.push(endpoint);
            }
        }
        Directory { apps }
    }

    /// The healthy instances of `app`; empty for an unknown app.
    pub fn endpoints(&self, app: &str) -> &[Endpoint] {
        self.apps.get(app).map_or(&[], |entry| entry.endpoints.as_slice())
    }

    /// Resolves a name under `internal.` (lowercase, without the trailing
    /// dot and without `.internal`): `APP`, `GROUP.APP`, `ID.vm.APP`, or
    /// `_apps`.
    pub fn resolve(&self, name: &str) -> Answer {
        let labels: Vec<&str> = name.split('.').collect();
        let addresses = |app: &str, keep: &dyn Fn(&Endpoint) -> bool| {
            let endpoints = self.endpoints(app);
            Answer::Addresses(endpoints.iter().filter(|e| keep(e)).map(|e| e.ip).collect())
        };
        match labels.as_slice() {
            ["_apps"] => Answer::Apps(
                self.apps.iter().filter(|(_, entry)| !entry.endpoints.is_empty()).map(|(app, _)| app.clone()).collect(),
            ),
            [app] if self.apps.contains_key(*app) => addresses(app, &|_| true),
            [id, "vm", app] => match self.endpoints(app).iter().find(|e| e.instance == *id) {
                Some(endpoint) => Answer::Addresses(vec![endpoint.ip]),
                None => Answer::NoSuchName,
            },
            [group, app] if self.has_group(app, group) => addresses(app, &|e| e.group == *group),
            _ => Answer::NoSuchName,
        }
    }

    fn has_group(&self, app: &str, group: &str) -> bool {
        self.apps.get(app).is_some_and(|entry| entry.groups.contains(group))
    }
}

/// The instance as an endpoint, when it runs, passes and has a mesh address.
fn endpoint(state: &State, instance: &Instance) -> Option<Endpoint> {
    let release = state.apps.get(&instance.app)?.releases.get(&instance.release)?;
    let group = release.spec.groups.get(&instance.group)?;
    if !instance.ready(Some(group)) {
        return None;
    }
    Some(Endpoint {
        instance: instance.id.clone(),
        group: instance.group.clone(),
        node: instance.node?,
        ip: instance.ip?,
        port: group.internal_port,
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use roost_raft::testkit::{apply, cluster, small, spec};
    use roost_raft::workload::{Health, InstanceReport, InstanceState, Outcome, Placement};
    use roost_raft::Command;

    use super::*;

    /// Deploys `app` with groups web and worker (checks on), one instance
    /// each, placed on n1 and n2.
    fn deployed(app: &str) -> (State, Vec<String>) {
        let mut state = cluster(2, |_| Vec::new());
        let spec = spec(&["web", "worker"], small(), true);
        apply(&mut state, Command::Deploy { app: app.into(), spec, description: "deploy".into() });
        let ids: Vec<String> = state.instances.keys().cloned().collect();
        let placements = ids
            .iter()
            .enumerate()
            .map(|(i, id)| Placement::Place { instance: id.clone(), node: i as u64 + 1 })
            .collect();
        apply(&mut state, Command::Place { placements });
        (state, ids)
    }

    fn report(state: &mut State, id: &str, health: Health, last_octet: u8) {
        let node = state.instances[id].node.expect("placed");
        let report = InstanceReport {
            id: id.to_owned(),
            state: InstanceState::Running,
            health,
            address: None,
            ip: Some(Ipv4Addr::new(10, 210, node as u8 - 1, last_octet)),
            reason: None,
            restarts: 0,
            generation: None,
        };
        apply(state, Command::ReportInstances { node, reports: vec![report] });
    }

    fn group_of(state: &State, id: &str) -> String {
        state.instances[id].group.clone()
    }

    #[test]
    fn names_answer_with_passing_instances_only() {
        let (mut state, ids) = deployed("shop");
        let directory = Directory::from_state(&state);
        assert_eq!(directory.resolve("shop"), Answer::Addresses(vec![]), "nothing passes yet");
        assert_eq!(directory.resolve("_apps"), Answer::Apps(vec![]));

        report(&mut state, &ids[0], Health::Passing, 2);
        report(&mut state, &ids[1], Health::Failing, 3);
        let directory = Directory::from_state(&state);
        let passing = Ipv4Addr::new(10, 210, 0, 2);
        assert_eq!(directory.resolve("shop"), Answer::Addresses(vec![passing]));
        let (good_group, bad_group) = (group_of(&state, &ids[0]), group_of(&state, &ids[1]));
        assert_eq!(directory.resolve(&format!("{good_group}.shop")), Answer::Addresses(vec![passing]));
        assert_eq!(directory.resolve(&format!("{bad_group}.shop")), Answer::Addresses(vec![]), "a known group");
        assert_eq!(directory.resolve(&format!("{}.vm.shop", ids[0])), Answer::Addresses(vec![passing]));
        assert_eq!(directory.resolve(&format!("{}.vm.shop", ids[1])), Answer::NoSuchName, "failing");
        assert_eq!(directory.resolve("_apps"), Answer::Apps(vec!["shop".into()]));
        assert_eq!(directory.endpoints("shop").len(), 1);
        assert_eq!(directory.endpoints("shop")[0].port, Some(8080));

        // The failing one recovers; the passing one starts failing.
        report(&mut state, &ids[1], Health::Passing, 3);
        report(&mut state, &ids[0], Health::Failing, 2);
        let directory = Directory::from_state(&state);
        assert_eq!(directory.resolve("shop"), Answer::Addresses(vec![Ipv4Addr::new(10, 210, 1, 3)]));
    }

    /// What lets reconcilers skip a pass for entries that do not touch
    /// workloads (`Command::touches_workloads`): an app created without a
    /// release, or tokens used, changes no name, route or mesh plan.
    #[test]
    fn creating_an_app_or_using_tokens_changes_no_name_route_or_plan() {
        let (mut state, ids) = deployed("shop");
        report(&mut state, &ids[0], Health::Passing, 2);
        let built = |state: &State| {
            let directory = Directory::from_state(state);
            let routes = crate::edge::routes::Routes::new(state, &directory);
            (directory, routes, crate::mesh::plan(state, 1))
        };
        let before = built(&state);
        let quiet = [
            Command::CreateApp { name: "fresh".into() },
            Command::TokensUsed { used: [("admin".to_owned(), 5)].into() },
            Command::Batch {
                proposals: vec![roost_raft::Proposal::new(Command::CreateApp { name: "batched".into() }, 1)],
            },
        ];
        for command in quiet {
            assert!(!command.touches_workloads(), "{command}");
            apply(&mut state, command);
            assert_eq!(built(&state), before);
        }
        assert_eq!(Directory::from_state(&state).resolve("fresh"), Answer::NoSuchName);
        assert_eq!(
            crate::edge::routes::Routes::new(&state, &before.0).host("fresh.localhost"),
            crate::edge::routes::HostMatch::Unknown
        );

        // Its first deploy touches them, and it has a name from then on.
        let deploy =
            Command::Deploy { app: "fresh".into(), spec: spec(&["web"], small(), true), description: "d".into() };
        assert!(deploy.touches_workloads());
        apply(&mut state, deploy);
        assert_eq!(Directory::from_state(&state).resolve("fresh"), Answer::Addresses(vec![]));
        let batch = Command::Batch {
            proposals: vec![
                roost_raft::Proposal::new(Command::CreateApp { name: "other".into() }, 1),
                roost_raft::Proposal::new(Command::SuspendApp { name: "fresh".into() }, 1),
            ],
        };
        assert!(batch.touches_workloads(), "a batch touches them if one of its commands does");
    }

    #[test]
    fn unknown_and_suspended_apps_are_no_such_name() {
        let (mut state, ids) = deployed("shop");
        report(&mut state, &ids[0], Health::Passing, 2);
        let directory = Directory::from_state(&state);
        for name in ["nope", "web.nope", "nothing.shop", "abc.vm.shop", "a.b.c.d", ""] {
            assert_eq!(directory.resolve(name), Answer::NoSuchName, "{name}");
        }
        let live = Outcome::Active;
        apply(&mut state, Command::FinishRelease { app: "shop".into(), version: 1, outcome: live });
        assert_eq!(
            Directory::from_state(&state).resolve("shop"),
            Answer::Addresses(vec![Ipv4Addr::new(10, 210, 0, 2)])
        );
        apply(&mut state, Command::SuspendApp { name: "shop".into() });
        assert_eq!(Directory::from_state(&state).resolve("shop"), Answer::NoSuchName);
    }
}
