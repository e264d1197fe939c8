//! Channels from this node to its peers, over mutual TLS, one per address.
//!
//! tonic channels multiplex calls and reconnect on their own, so one cached
//! channel per peer address serves Raft, forwarding and heartbeats alike.

use std::collections::HashMap;
use std::sync::Mutex;

use roost_network::tls::{ClientTls, TlsError};
use tonic::transport::Channel;

#[derive(Debug)]
pub struct NodeChannels {
    tls: ClientTls,
    cache: Mutex<HashMap<String, Channel>>,
}

impl NodeChannels {
    pub fn new(tls: ClientTls) -> Self {
        Self { tls, cache: Mutex::new(HashMap::new()) }
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
    }
}

impl roost_raft::network::Channels for NodeChannels {
    fn channel(&self, address: &str) -> Result<Channel, String> {
        self.get(address).map_err(|e| e.to_string())
    }
}
