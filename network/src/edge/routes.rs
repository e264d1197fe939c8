//! The edge's routing table: which app a host name or a public TCP port
//! leads to, and the healthy instances behind it. A pure function of the
//! replicated state (and the [`Directory`] derived from it), rebuilt on
//! every change; the proxy only reads it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use roost_raft::workload::Concurrency;
use roost_raft::{NodeId, State};

use crate::directory::Directory;
use crate::mesh::Reach;

/// How often the edge probes a backend when its app's checks say nothing.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// The fastest the edge probes a backend, whatever the checks say.
const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// One instance the edge may send traffic to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    pub instance: String,
    pub node: NodeId,
    pub addr: SocketAddr,
}

/// An app served over HTTP(S).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppRoute {
    pub app: String,
    pub force_https: bool,
    pub concurrency: Concurrency,
    pub backends: Vec<Backend>,
    /// How often each edge probes the backends: the app's shortest check
    /// interval, so a dead instance leaves within one interval.
    pub probe_every: Duration,
}

/// A public TCP port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpRoute {
    pub app: String,
    pub backends: Vec<Backend>,
    pub probe_every: Duration,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes {
    domain: String,
    /// Apps with an `[http_service]`, by name.
    http: HashMap<String, AppRoute>,
    /// Every deployed app's name, to tell "no such app" from "no HTTP service".
    apps: HashSet<String>,
    /// Custom domains (with a certificate record), and their app.
    domains: HashMap<String, String>,
    tcp: BTreeMap<u16, TcpRoute>,
    /// ACME HTTP-01 tokens and their key authorizations.
    challenges: HashMap<String, String>,
    /// Whether these routes come from a state that has caught up with the
    /// cluster. Until then a host the edge does not know may well be an app
    /// this node has not heard of yet: it is [`HostMatch::Starting`], not
    /// [`HostMatch::Unknown`]. The default (before any state) has not.
    caught_up: bool,
}

/// Where a host name leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostMatch<'a> {
    App(&'a AppRoute),
    /// An app without `[http_service]`.
    NotHttp(&'a str),
    Unknown,
    /// No route, and this node has not caught up with the cluster yet (it
    /// has just started or joined): the app may exist all the same.
    Starting,
}

impl Routes {
    pub fn new(state: &State, directory: &Directory) -> Routes {
        let domain = state.cluster_domain().to_ascii_lowercase();
        let mut http = HashMap::new();
        let mut tcp = BTreeMap::new();
        for (name, app) in &state.apps {
            // The serving release says how the app is exposed; a first
            // deploy's release until then.
            let Some(release) = app.current().or(app.deploying()) else { continue };
            let probe_every = release
                .spec
                .groups
                .values()
                .flat_map(|group| group.checks.iter().map(|check| Duration::from_millis(check.interval_ms)))
                .min()
                .unwrap_or(DEFAULT_PROBE_INTERVAL)
                .max(MIN_PROBE_INTERVAL);
            let endpoints = directory.endpoints(name);
            if let Some(spec) = &release.spec.http {
                let backends = endpoints
                    .iter()
                    .filter(|e| spec.groups.contains(&e.group))
                    .filter_map(|e| {
                        let port = e.port?;
                        Some(Backend {
                            instance: e.instance.clone(),
                            node: e.node,
                            addr: SocketAddr::new(IpAddr::V4(e.ip), port),
                        })
                    })
                    .collect();
                let route = AppRoute {
                    app: name.clone(),
                    force_https: spec.force_https,
                    concurrency: spec.concurrency,
                    backends,
                    probe_every,
                };
                http.insert(name.clone(), route);
            }
            for service in &release.spec.services {
                let backends: Vec<Backend> = endpoints
                    .iter()
                    .filter(|e| service.groups.contains(&e.group))
                    .map(|e| Backend {
                        instance: e.instance.clone(),
                        node: e.node,
                        addr: SocketAddr::new(IpAddr::V4(e.ip), service.internal_port),
                    })
                    .collect();
                for port in &service.ports {
                    tcp.insert(*port, TcpRoute { app: name.clone(), backends: backends.clone(), probe_every });
                }
            }
        }
        let domains = state.certificates.values().map(|c| (c.domain.clone(), c.app.clone())).collect::<HashMap<_, _>>();
        let challenges = state
            .certificates
            .values()
            .filter_map(|c| c.challenge.as_ref())
            .map(|c| (c.token.clone(), c.key_authorization.clone()))
            .collect();
        // An app never deployed is unknown here, as it is to the directory:
        // creating one changes nothing the edge builds.
        let apps = state.apps.iter().filter(|(_, app)| app.has_release()).map(|(name, _)| name.clone()).collect();
        Routes { domain, http, apps, domains, tcp, challenges, caught_up: true }
    }

    /// These routes come from a state that has not caught up with the
    /// cluster yet: hosts they do not know are [`HostMatch::Starting`].
    pub fn catching_up(mut self) -> Routes {
        self.caught_up = false;
        self
    }

    /// Keeps only the backends on nodes this node's mesh reaches now: an
    /// instance on a node that has just joined gets traffic from here once
    /// its WireGuard peer is in place, not before.
    pub fn reachable(mut self, reach: &Reach) -> Routes {
        for route in self.http.values_mut() {
            route.backends.retain(|b| reach.allows(b.node));
        }
        for route in self.tcp.values_mut() {
            route.backends.retain(|b| reach.allows(b.node));
        }
        self
    }

    /// The cluster domain (`APP.DOMAIN`).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The app `name` serves as `APP.DOMAIN`, if it is one.
    pub fn cluster_app(&self, name: &str) -> Option<&str> {
        let app = name.strip_suffix(self.domain.as_str())?.strip_suffix('.')?;
        (!app.contains('.')).then_some(())?;
        self.apps.get(app).map(String::as_str)
    }

    /// The app a `Host` (lowercase, without port) leads to.
    pub fn host(&self, host: &str) -> HostMatch<'_> {
        let app = self.cluster_app(host).or_else(|| self.domains.get(host).map(String::as_str));
        let unknown = if self.caught_up { HostMatch::Unknown } else { HostMatch::Starting };
        let Some(app) = app else { return unknown };
        match self.http.get(app) {
            Some(route) => HostMatch::App(route),
            None => match self.apps.get(app) {
                Some(name) => HostMatch::NotHttp(name),
                None => unknown,
            },
        }
    }

    pub fn challenge(&self, token: &str) -> Option<&str> {
        self.challenges.get(token).map(String::as_str)
    }

    pub fn tcp(&self, port: u16) -> Option<&TcpRoute> {
        self.tcp.get(&port)
    }

    /// The public TCP ports the edge listens on.
    pub fn tcp_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.tcp.keys().copied()
    }

    /// Every backend of every route, with how often to probe it.
    pub fn probes(&self) -> HashMap<SocketAddr, Duration> {
        let mut probes: HashMap<SocketAddr, Duration> = HashMap::new();
        let routes = self
            .http
            .values()
            .flat_map(|r| r.backends.iter().map(move |b| (b.addr, r.probe_every)))
            .chain(self.tcp.values().flat_map(|r| r.backends.iter().map(move |b| (b.addr, r.probe_every))));
        for (addr, every) in routes {
            let entry = probes.entry(addr).or_insert(every);
            *entry = (*entry).min(every);
        }
        probes
    }
}

#[cfg(test)]
mod tests;
