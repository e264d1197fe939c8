//! The node's WireGuard interface: boringtun in this process, configured
//! through wireguard-control's userspace backend (the UAPI socket
//! `/var/run/wireguard/<name>.sock`).
//!
//! boringtun's device has sharp edges, each handled here:
//! - `DeviceHandle::new` blocks SIGINT and SIGTERM on the calling thread (and
//!   the threads it spawns) and reads them from a signalfd to stop the
//!   device. It is created on a thread of its own so the rest of the process
//!   keeps its signal handling, but a SIGTERM sent to the process may still
//!   be taken by that signalfd first. So a device that stops without being
//!   asked is reported ([`Tunnel::ended`]): the node treats it as the stop
//!   request it most likely was.
//! - It cannot change an existing peer (it panics while holding the device's
//!   lock, which wedges it), and it carries fields from one peer section to
//!   the next. So a peer is only ever added or removed, one per request; a
//!   changed peer is removed, then added. Every request runs on a blocking
//!   thread under a timeout, so a wedged device cannot stall the node.
//! - It roams: an authenticated packet from a new address moves the peer's
//!   endpoint. An endpoint the device learnt that way is kept; only an
//!   endpoint the state changed is pushed.
//! - Reading the device through wireguard-control prints a line to stdout
//!   (`own_public_key` is unknown to its parser), so status is read from the
//!   UAPI socket here: `get=1`, key=value lines.
//! - It does not configure the link: the caller sets the MTU, brings it up
//!   and routes (see `routes`).
//!
//! The interface goes away with the process (the tun device is not
//! persistent), so a restarted node simply creates it again.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use boringtun::device::{DeviceConfig, DeviceHandle};
use ipnet::Ipv4Net;
use tokio::sync::watch;
use wireguard_control::{Backend, DeviceUpdate, InterfaceName, Key, PeerConfigBuilder};

use super::MeshError;

/// Seconds between keepalives, so peers behind NAT stay reachable.
pub const KEEPALIVE_SECONDS: u16 = 25;
/// How long one configuration request may take before the device is
/// considered wedged.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A peer as the mesh wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredPeer {
    /// Base64, as `wg` prints it.
    pub public_key: String,
    pub endpoint: SocketAddr,
    pub allowed: Ipv4Net,
}

/// A peer as the device reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerStatus {
    /// Base64.
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<String>,
    /// Time since the latest handshake; `None` before the first.
    pub handshake_ago: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// A running boringtun device.
pub struct Tunnel {
    name: String,
    iface: InterfaceName,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The endpoint last pushed for each peer (base64 key).
    pushed: BTreeMap<String, SocketAddr>,
    /// Becomes true when the device's event loops have ended.
    ended: watch::Receiver<bool>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel").field("name", &self.name).finish_non_exhaustive()
    }
}

fn socket_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{name}.sock"))
}

/// Runs a blocking device request on a blocking thread, under a timeout.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    request: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, MeshError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, tokio::task::spawn_blocking(request)).await {
        Ok(Ok(Ok(value))) => Ok(value),
        Ok(Ok(Err(source))) => Err(MeshError::Wireguard { action: what, source }),
        Ok(Err(join)) => Err(MeshError::Wireguard { action: what, source: std::io::Error::other(join.to_string()) }),
        Err(_) => Err(MeshError::Wedged { action: what, waited: REQUEST_TIMEOUT }),
    }
}

impl Tunnel {
    /// Creates interface `name` listening on UDP `port` with `private_key`.
    /// Fails if the interface already exists: another process (another
    /// node on this machine) owns it, and boringtun would silently share it.
    pub async fn start(name: &str, private_key: &Key, port: u16) -> Result<Tunnel, MeshError> {
        let iface: InterfaceName = name.parse().map_err(|_| MeshError::InterfaceName { name: name.to_owned() })?;
        if std::path::Path::new("/sys/class/net").join(name).exists() {
            return Err(MeshError::InterfaceTaken { name: name.to_owned() });
        }
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (ended_tx, ended) = watch::channel(false);
        let thread_name = name.to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("wireguard-{name}"))
            .spawn(move || {
                // One event loop. Measured with mesh-bench on 2 cores: one
                // thread carries a TCP stream at about twice the rate of two
                // (which contend for the device's locks and the cores) and
                // three times that of boringtun's default of four.
                let config =
                    DeviceConfig { n_threads: 1, use_connected_socket: true, use_multi_queue: true, uapi_fd: -1 };
                match DeviceHandle::new(&thread_name, config) {
                    Ok(mut handle) => {
                        let _ = started_tx.send(Ok(()));
                        // Returns once the control socket is removed (`stop`),
                        // or the device took a SIGINT or SIGTERM.
                        handle.wait();
                        drop(handle);
                        let _ = ended_tx.send(true);
                    }
                    Err(error) => {
                        let _ = started_tx.send(Err(error.to_string()));
                    }
                }
            })
            .map_err(|source| MeshError::Wireguard { action: "start the WireGuard thread", source })?;
        match started_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(message)) => {
                return Err(MeshError::Device { name: name.to_owned(), message });
            }
            Err(_) => {
                return Err(MeshError::Device { name: name.to_owned(), message: "the device thread ended".into() });
            }
        }
        let tunnel = Tunnel { name: name.to_owned(), iface, thread: Some(thread), pushed: BTreeMap::new(), ended };
        // The key first: a packet that reaches a device without one panics it.
        let (iface, key) = (tunnel.iface, private_key.clone());
        blocking("set the private key", move || {
            DeviceUpdate::new().set_private_key(key).apply(&iface, Backend::Userspace)
        })
        .await?;
        let iface = tunnel.iface;
        blocking("set the listen port", move || {
            DeviceUpdate::new().set_listen_port(port).apply(&iface, Backend::Userspace)
        })
        .await?;
        Ok(tunnel)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Turns true when the device has stopped, asked or not.
    pub fn ended(&self) -> watch::Receiver<bool> {
        self.ended.clone()
    }

    /// Makes the device's peers exactly `desired`: removes the others, adds
    /// the missing, and replaces those whose allowed range or wanted endpoint
    /// changed.
    pub async fn sync_peers(&mut self, desired: &[DesiredPeer]) -> Result<(), MeshError> {
        let current = self.status().await?;
        let wanted: BTreeMap<&str, &DesiredPeer> = desired.iter().map(|p| (p.public_key.as_str(), p)).collect();
        for peer in &current {
            let keep = wanted.get(peer.public_key.as_str()).is_some_and(|want| {
                peer.allowed_ips == [want.allowed.to_string()]
                    && self.pushed.get(&peer.public_key) == Some(&want.endpoint)
            });
            if !keep {
                tracing::info!(peer = %peer.public_key, "removing a WireGuard peer");
                self.remove_peer(&peer.public_key).await?;
            }
        }
        let present: Vec<&str> = current.iter().map(|p| p.public_key.as_str()).collect();
        for want in desired {
            let kept = present.contains(&want.public_key.as_str()) && self.pushed.contains_key(&want.public_key);
            if !kept {
                tracing::info!(peer = %want.public_key, endpoint = %want.endpoint, allowed = %want.allowed, "adding a WireGuard peer");
                self.add_peer(want).await?;
            }
        }
        self.pushed.retain(|key, _| wanted.contains_key(key.as_str()));
        Ok(())
    }

    async fn add_peer(&mut self, peer: &DesiredPeer) -> Result<(), MeshError> {
        let key = Key::from_base64(&peer.public_key).map_err(|_| MeshError::Key { key: peer.public_key.clone() })?;
        let (iface, endpoint, allowed) = (self.iface, peer.endpoint, peer.allowed);
        blocking("add a peer", move || {
            let builder = PeerConfigBuilder::new(&key)
                .set_endpoint(endpoint)
                .add_allowed_ip(allowed.addr().into(), allowed.prefix_len())
                .set_persistent_keepalive_interval(KEEPALIVE_SECONDS);
            DeviceUpdate::new().add_peer(builder).apply(&iface, Backend::Userspace)
        })
        .await?;
        self.pushed.insert(peer.public_key.clone(), peer.endpoint);
        Ok(())
    }

    async fn remove_peer(&mut self, public_key: &str) -> Result<(), MeshError> {
        let key = Key::from_base64(public_key).map_err(|_| MeshError::Key { key: public_key.to_owned() })?;
        let iface = self.iface;
        blocking("remove a peer", move || {
            DeviceUpdate::new().remove_peer_by_key(&key).apply(&iface, Backend::Userspace)
        })
        .await?;
        self.pushed.remove(public_key);
        Ok(())
    }

    /// The device's peers, read from its control socket.
    pub async fn status(&self) -> Result<Vec<PeerStatus>, MeshError> {
        let path = socket_path(&self.name);
        blocking("read the device", move || {
            let mut socket = UnixStream::connect(&path)?;
            socket.set_read_timeout(Some(REQUEST_TIMEOUT))?;
            socket.write_all(b"get=1\n\n")?;
            let mut reply = String::new();
            socket.read_to_string(&mut reply)?;
            parse_get(&reply)
        })
        .await
    }

    /// Stops the device: removing its control socket makes its timer end
    /// the event loops (within about a second); the interface goes with them.
    pub async fn stop(mut self) {
        let _ = std::fs::remove_file(socket_path(&self.name));
        if let Some(thread) = self.thread.take() {
            let joined = tokio::task::spawn_blocking(move || thread.join());
            if tokio::time::timeout(Duration::from_secs(5), joined).await.is_err() {
                tracing::warn!(interface = %self.name, "the WireGuard device did not stop within 5s");
            }
        }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = std::fs::remove_file(socket_path(&self.name));
        }
    }
}

/// Parses the reply to a UAPI `get=1`: device keys first, then one section
/// per peer starting at `public_key` (hex), ending with `errno=N`.
pub fn parse_get(reply: &str) -> std::io::Result<Vec<PeerStatus>> {
    let invalid =
        |line: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("unexpected line {line:?}"));
    let mut peers: Vec<PeerStatus> = Vec::new();
    let mut seconds: Option<u64> = None;
    for line in reply.lines() {
        let Some((key, value)) = line.split_once('=') else { continue };
        match key {
            "public_key" => {
                let key = Key::from_hex(value).map_err(|_| invalid(line))?;
                peers.push(PeerStatus { public_key: key.to_base64(), ..Default::default() });
                seconds = None;
            }
            "errno" if value != "0" => {
                return Err(std::io::Error::from_raw_os_error(value.parse().map_err(|_| invalid(line))?));
            }
            _ => {
                let Some(peer) = peers.last_mut() else { continue };
                match key {
                    "endpoint" => peer.endpoint = value.parse().ok(),
                    "allowed_ip" => peer.allowed_ips.push(value.to_owned()),
                    // boringtun reports how long ago, not when.
                    "last_handshake_time_sec" => seconds = Some(value.parse().map_err(|_| invalid(line))?),
                    "last_handshake_time_nsec" => {
                        let nanos: u32 = value.parse().map_err(|_| invalid(line))?;
                        peer.handshake_ago = seconds.map(|s| Duration::new(s, nanos));
                    }
                    "rx_bytes" => peer.rx_bytes = value.parse().map_err(|_| invalid(line))?,
                    "tx_bytes" => peer.tx_bytes = value.parse().map_err(|_| invalid(line))?,
                    _ => {}
                }
            }
        }
    }
    Ok(peers)
}

/// A new private key.
pub fn generate_key() -> Key {
    Key::generate_private()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_reply_parses_into_peers_with_their_handshake_age() {
        let key = Key::generate_private().get_public();
        let hex: String = key.0.iter().map(|b| format!("{b:02x}")).collect();
        let reply = format!(
            "own_public_key=00\nlisten_port=51820\npublic_key={hex}\npersistent_keepalive_interval=25\n\
             endpoint=192.0.2.2:51821\nallowed_ip=10.210.1.0/24\nlast_handshake_time_sec=4\n\
             last_handshake_time_nsec=500\nrx_bytes=177\ntx_bytes=93\nerrno=0\n\n"
        );
        let peers = parse_get(&reply).expect("parses");
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].public_key, key.to_base64());
        assert_eq!(peers[0].endpoint, Some("192.0.2.2:51821".parse().expect("addr")));
        assert_eq!(peers[0].allowed_ips, ["10.210.1.0/24"]);
        assert_eq!(peers[0].handshake_ago, Some(Duration::new(4, 500)));
        assert_eq!((peers[0].rx_bytes, peers[0].tx_bytes), (177, 93));
    }

    #[test]
    fn a_peer_without_a_session_has_no_handshake_and_errors_are_reported() {
        let key = Key::generate_private().get_public();
        let hex: String = key.0.iter().map(|b| format!("{b:02x}")).collect();
        let peers = parse_get(&format!("public_key={hex}\nrx_bytes=0\nerrno=0\n")).expect("parses");
        assert_eq!(peers[0].handshake_ago, None);
        assert!(parse_get("errno=22\n").is_err());
        assert!(parse_get("public_key=zz\n").is_err());
    }
}
