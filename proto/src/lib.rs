//! Roost's gRPC definitions, generated from `proto/` by `tonic-prost-build`.
//!
//! Layout:
//! - [`cluster`]: node-to-node services (Raft, liveness, join). Only nodes call
//!   them, over mutual TLS.
//! - [`api`]: the public API that the `roost` CLI drives against any node.
//!
//! Conversions between these wire types and the domain types live beside the
//! code that owns the domain (for example `roost-node`'s API module), so this
//! crate stays a pure description of the wire.

#![forbid(unsafe_code)]
#![allow(clippy::all, missing_docs)]

pub mod cluster {
    tonic::include_proto!("roost.cluster.v1");
}

pub mod api {
    tonic::include_proto!("roost.api.v1");
}

/// The metadata key that carries the admin token on public API calls.
pub const AUTHORIZATION: &str = "authorization";

/// The metadata key that names what an API call changes, `KIND:NAME`
/// (`app:web`, `node:n2`, `domain:shop.example.com`, `token:ci`). A signed
/// call signs it too, so its grant is good for that alone.
pub const TARGET: &str = "roost-target";

/// Metadata a node sets on a deploy it refuses because its Docker engine
/// lacks the image: the CLI can upload the image from its own engine.
pub const IMAGE_MISSING: &str = "roost-image-missing";
