//! From a validated `roost.toml` to the [`ReleaseSpec`] the cluster records.
//!
//! The spec resolves everything per process group (its command, size, restart
//! policy, port and checks), so the nodes that run instances never need the
//! file, and a rollback replays exactly what ran before.

use std::collections::BTreeMap;
use std::time::Duration;

use roost_raft::workload::{
    CheckKind, CheckSpec, Concurrency, GroupSpec, HttpServiceSpec, MaxUnavailable, PlacementSpec, ReleaseSpec,
    Resources, RestartPolicy as SpecRestartPolicy, RestartSpec, Strategy as SpecStrategy, TcpServiceSpec,
    DEFAULT_KILL_TIMEOUT_SECONDS,
};
use roost_raft::NodeId;

use crate::config::{AppConfig, Check, CheckKind as ConfigCheckKind, ConcurrencyKind, RestartPolicy, Strategy};

/// The size an instance gets when `[[vm]]` says nothing.
pub const DEFAULT_RESOURCES: Resources = Resources { cpu_millis: 1000, memory_bytes: 256 << 20 };

/// The image a release runs, once built or found.
#[derive(Clone, Debug)]
pub struct ImageChoice {
    pub id: String,
    pub reference: String,
    pub source: NodeId,
}

/// Builds the release spec. `config` must have passed `validate()`, which is
/// why unreadable durations or sizes here fall back to defaults rather than
/// fail.
pub fn release_spec(config: &AppConfig, image: ImageChoice, strategy: Option<SpecStrategy>) -> ReleaseSpec {
    let all_groups = config.process_groups();
    let groups = all_groups
        .iter()
        .map(|group| {
            let spec = group_spec(config, group);
            (group.clone(), spec)
        })
        .collect();
    let served = |listed: &[String]| -> Vec<String> {
        all_groups.iter().filter(|group| applies(listed, group)).cloned().collect()
    };
    let http = config.http_service.as_ref().map(|http| HttpServiceSpec {
        internal_port: http.internal_port,
        force_https: http.force_https,
        concurrency: http
            .concurrency
            .as_ref()
            .map(|c| Concurrency {
                connections: c.kind == ConcurrencyKind::Connections,
                soft_limit: c.soft_limit,
                hard_limit: c.hard_limit,
            })
            .unwrap_or_default(),
        groups: served(&http.processes),
    });
    let services = config
        .services
        .iter()
        .map(|service| TcpServiceSpec {
            internal_port: service.internal_port,
            ports: service.ports.iter().map(|p| p.port).collect(),
            groups: served(&service.processes),
        })
        .collect();
    ReleaseSpec {
        image: image.id,
        image_ref: image.reference,
        image_source: image.source,
        env: config.env.clone(),
        groups,
        strategy: strategy.unwrap_or(match config.deploy.strategy {
            Strategy::Rolling => SpecStrategy::Rolling,
            Strategy::Immediate => SpecStrategy::Immediate,
            Strategy::Bluegreen => SpecStrategy::Bluegreen,
            Strategy::Canary => SpecStrategy::Canary,
        }),
        max_unavailable: config.deploy.max_unavailable.map(|max| {
            if max >= 1.0 {
                MaxUnavailable::Count(max.round() as u32)
            } else {
                MaxUnavailable::Percent((max * 100.0).round().max(1.0) as u32)
            }
        }),
        initial_count: config.deploy.initial_count,
        release_history: config.deploy.release_history,
        placement: PlacementSpec {
            constraints: config.placement.constraints.clone(),
            max_per_node: config.placement.max_per_node,
        },
        http,
        services,
    }
}

fn applies(listed: &[String], group: &str) -> bool {
    listed.is_empty() || listed.iter().any(|g| g == group)
}

fn group_spec(config: &AppConfig, group: &str) -> GroupSpec {
    let command = config.processes.get(group).map(|c| crate::config::split_command(c)).unwrap_or_default();
    let resources = config
        .vm
        .iter()
        .rev()
        .find(|vm| applies(&vm.processes, group))
        .map(|vm| Resources {
            cpu_millis: (vm.cpus * 1000.0).round() as u64,
            memory_bytes: vm.memory.bytes().unwrap_or(DEFAULT_RESOURCES.memory_bytes),
        })
        .unwrap_or(DEFAULT_RESOURCES);
    let restart = config
        .restart
        .iter()
        .rev()
        .find(|r| applies(&r.processes, group))
        .map(|r| RestartSpec {
            policy: match r.policy {
                RestartPolicy::Always => SpecRestartPolicy::Always,
                RestartPolicy::OnFailure => SpecRestartPolicy::OnFailure,
                RestartPolicy::Never => SpecRestartPolicy::Never,
            },
            max_retries: r.max_retries,
        })
        .unwrap_or_default();
    let http = config.http_service.as_ref().filter(|http| applies(&http.processes, group));
    let internal_port = http.map(|http| http.internal_port);
    let mut checks = Vec::new();
    if let Some(http) = http {
        for (i, check) in http.checks.iter().enumerate() {
            checks.push(check_spec(&format!("http-{i}"), check, internal_port));
        }
    }
    let named: BTreeMap<&String, &Check> = config.checks.iter().collect();
    let service_port = config.http_service.as_ref().map(|http| http.internal_port);
    for (name, check) in named {
        let checked = if check.processes.is_empty() {
            config.http_service.as_ref().is_none_or(|service| applies(&service.processes, group))
        } else {
            applies(&check.processes, group)
        };
        if checked {
            checks.push(check_spec(name, check, service_port));
        }
    }
    let kill_timeout_seconds = config
        .kill_timeout
        .as_ref()
        .and_then(|k| k.duration().ok())
        .map_or(DEFAULT_KILL_TIMEOUT_SECONDS, |d| d.as_secs() as u32);
    GroupSpec { command, resources, restart, internal_port, checks, kill_timeout_seconds }
}

fn millis(text: &str, default: u64) -> u64 {
    humantime::parse_duration(text).map_or(default, |d: Duration| d.as_millis() as u64)
}

fn check_spec(name: &str, check: &Check, internal_port: Option<u16>) -> CheckSpec {
    CheckSpec {
        name: name.to_owned(),
        kind: match check.kind {
            ConfigCheckKind::Http => CheckKind::Http,
            ConfigCheckKind::Tcp => CheckKind::Tcp,
        },
        port: check.port.or(internal_port).unwrap_or(80),
        path: check.path.clone(),
        method: check.method.clone(),
        interval_ms: millis(&check.interval, 10_000),
        timeout_ms: millis(&check.timeout, 2_000),
        grace_period_ms: millis(&check.grace_period, 5_000),
        failure_threshold: check.failure_threshold.unwrap_or(roost_raft::workload::DEFAULT_FAILURE_THRESHOLD),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageChoice {
        ImageChoice { id: "sha256:abc".into(), reference: "hello:latest".into(), source: 1 }
    }

    #[test]
    fn groups_get_their_own_size_command_and_checks() {
        let config = AppConfig::parse(
            r#"
            app = "hello"
            [processes]
            web = "/app serve --port 8080"
            worker = "/app work"
            [[vm]]
            cpus = 0.5
            memory = "128mb"
            [[vm]]
            processes = ["worker"]
            memory = "1gb"
            [http_service]
            internal_port = 8080
            processes = ["web"]
            [[http_service.checks]]
            path = "/health"
            interval = "1s"
            timeout = "500ms"
            "#,
        )
        .expect("parses");
        assert!(config.validate().is_empty(), "{:?}", config.validate());
        let spec = release_spec(&config, image(), None);
        let web = &spec.groups["web"];
        assert_eq!(web.command, ["/app", "serve", "--port", "8080"]);
        assert_eq!(web.resources, Resources { cpu_millis: 500, memory_bytes: 128 << 20 });
        assert_eq!(web.internal_port, Some(8080));
        assert_eq!(web.checks.len(), 1);
        assert_eq!((web.checks[0].port, web.checks[0].interval_ms, web.checks[0].timeout_ms), (8080, 1000, 500));
        let worker = &spec.groups["worker"];
        assert_eq!(worker.resources, Resources { cpu_millis: 1000, memory_bytes: 1 << 30 });
        assert_eq!(worker.internal_port, None);
        assert!(worker.checks.is_empty());
    }

    #[test]
    fn named_checks_go_to_the_served_groups_unless_they_name_theirs() {
        let config = AppConfig::parse(
            r#"
            app = "hello"
            [processes]
            web = "/app serve"
            worker = "/app work"
            [http_service]
            internal_port = 8080
            processes = ["web"]
            [checks.alive]
            path = "/health"
            [checks.queue]
            type = "tcp"
            port = 9000
            processes = ["worker"]
            "#,
        )
        .expect("parses");
        assert!(config.validate().is_empty(), "{:?}", config.validate());
        let spec = release_spec(&config, image(), None);
        let names = |g: &str| spec.groups[g].checks.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
        assert_eq!(names("web"), ["alive"]);
        assert_eq!(names("worker"), ["queue"]);
    }

    #[test]
    fn a_bare_file_runs_one_app_group_with_defaults() {
        let config = AppConfig::parse("app = \"hello\"").expect("parses");
        let spec = release_spec(&config, image(), Some(SpecStrategy::Immediate));
        assert_eq!(spec.groups.keys().collect::<Vec<_>>(), ["app"]);
        assert_eq!(spec.groups["app"].resources, DEFAULT_RESOURCES);
        assert!(spec.groups["app"].command.is_empty());
        assert_eq!(spec.strategy, SpecStrategy::Immediate);
    }
}
