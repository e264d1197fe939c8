//! Roost's workload layer: building images, moving them between nodes,
//! scheduling instances, and running them on Docker.
//!
//! Nothing lives here yet: the cluster core (Raft, membership, the API) comes
//! first. When it arrives, this crate is the only one that talks to Docker,
//! and its scheduler is a pure function of the replicated state, like the
//! state machine in `roost-raft`.

#![forbid(unsafe_code)]
