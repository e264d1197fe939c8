//! Roost's multi-node tests: one binary, so the heavy stack links once.
//!
//! - `cluster`: in-process clusters (formation, forwarding, linearizable
//!   reads, leader loss, restart and catch-up, snapshots, membership).
//! - `elections`: the leader killed twenty times in a row.
//! - `inputs`: wrong tokens, bad names, duplicates, unreachable endpoints.
//! - `binary`: the built `roost` binary driven as a user drives it.

mod binary;
mod cluster;
mod elections;
mod inputs;
