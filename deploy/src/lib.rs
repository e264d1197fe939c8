//! Roost's workload layer: building images, moving them between nodes,
//! scheduling instances, and running them on Docker.
//!
//! Layout:
//! - [`config`]: `roost.toml`, the per-app configuration a user writes, typed
//!   and validated before anything is proposed to the cluster.
//!
//! Still to come (issue 3): the image builder and node-to-node image
//! transfer, the scheduler (a pure function of the replicated state, like the
//! state machine in `roost-raft`) and the Docker runtime. This crate is the
//! only one that will talk to Docker.

#![forbid(unsafe_code)]

pub mod config;
