//! Roost's workload layer: building images, moving them between nodes,
//! scheduling instances, and running them on Docker.
//!
//! Layout:
//! - [`config`]: `roost.toml`, the per-app configuration a user writes, typed
//!   and validated before anything is proposed to the cluster.
//! - [`spec`]: turns a validated config into the `ReleaseSpec` the cluster
//!   records.
//! - [`scheduler`] and [`controller`]: the leader's decisions (placements,
//!   moving instances off dead nodes, ending deploys), pure functions of the
//!   replicated state that return commands.
//! - [`engine`]: the Docker engine through bollard, and the only module that
//!   speaks to it.
//! - [`agent`]: the loop on every node that makes Docker run what the state
//!   places on that node, with [`checks`] for health.
//! - [`pack`]: the build context a CLI sends; [`dockerfile`]: the images a
//!   build reads besides it; [`secrets`]: sealing secret values so the
//!   state holds only ciphertext.
//!
//! This crate is the only one that talks to Docker.

#![forbid(unsafe_code)]

pub mod agent;
pub mod checks;
pub mod config;
pub mod controller;
pub mod dockerfile;
pub mod engine;
pub mod pack;
pub mod scheduler;
pub mod secrets;
pub mod spec;
