//! Checks `roost-raft`'s RocksDB storage against openraft's own storage
//! contract suite, plus the durability behaviour Roost relies on.

mod store;
