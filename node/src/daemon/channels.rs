//! Channels from this node to its peers, over mutual TLS, one per address.
//!
//! tonic channels multiplex calls and reconnect on their own, so one cached
//! channel per peer address serves Raft, forwarding and heartbeats alike.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use roost_network::tls::{ClientTls, TlsError};
use tonic::transport::Channel;

#[derive(Debug)]
pub struct NodeChannels {
    tls: ClientTls,
    cache: Mutex<HashMap<String, Channel>>,
    /// Moves at each [`NodeChannels::reset`], so Raft streams reopen too.
    generation: AtomicU64,
}

impl NodeChannels {
    pub fn new(tls: ClientTls) -> Self {
        Self { tls, cache: Mutex::new(HashMap::new()), generation: AtomicU64::new(0) }
    }

    pub fn get(&self, address: &str) -> Result<Channel, TlsError> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(channel) = cache.get(address) {
            return Ok(channel.clone());
        }
        let channel = self.tls.channel(address)?;
        cache.insert(address.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Forgets every channel, so that calls from now on open new
    /// connections (with the certificate the node presents now); calls on
    /// the old ones finish.
    pub fn reset(&self) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

impl roost_raft::network::Channels for NodeChannels {
    fn channel(&self, address: &str) -> Result<Channel, String> {
        self.get(address).map_err(|e| e.to_string())
    }

    fn connect_stream(&self, address: &str) -> Option<roost_raft::network::StreamConnect> {
        let tls = self.tls.clone();
        let address = address.to_owned();
        Some(Box::pin(async move {
            match tls.connect_raft_stream(&address).await {
                Ok(Some(stream)) => Ok(Some(Box::new(stream) as Box<dyn roost_raft::stream::RaftIo>)),
                Ok(None) => Ok(None),
                Err(e) => Err(e.to_string()),
            }
        }))
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
}
