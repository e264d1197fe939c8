//! Roost's multi-node tests: one binary, so the heavy stack links once.
//!
//! - `cluster`: in-process clusters (formation, forwarding, linearizable
//!   reads, leader loss, restart and catch-up, snapshots, membership).
//! - `elections`: the leader killed twenty times in a row.
//! - `inputs`: wrong tokens, bad names, duplicates, unreachable endpoints.
//! - `apps`: apps on the real Docker engine (deploy, heal, roll back, scale,
//!   secrets, suspend/resume/destroy, a dead node's instances replaced).
//! - `engines`: two nodes with their own Docker engines; an image moves
//!   between them through Roost.
//! - `mesh`: nodes in containers of their own, joined by WireGuard:
//!   instances reach each other by mesh address and `.internal` name,
//!   through restarts, moves and removals; wireguard-go interoperates.
//! - `edge`: every node's HTTP, HTTPS and TCP ports reach healthy
//!   instances anywhere; WebSocket, HTTP/2, 100 MiB bodies, limits, a
//!   killed node under load, and a certificate from pebble served and renewed.
//! - `tokens`: scoped API tokens at each boundary, on every node; revoked,
//!   rotated and expired tokens refused.
//! - `binary`: the built `roost` binary driven as a user drives it.
//! - `ca`: `roost cluster rotate-ca` on real processes, while an app answers.
//! - `api_cert`: nodes' short-lived API certificates renewed, and a removed
//!   worker's last one expiring, on real processes.

mod api_cert;
mod apps;
mod binary;
mod ca;
mod cluster;
mod edge;
mod elections;
mod engines;
mod inputs;
mod mesh;
mod tokens;
