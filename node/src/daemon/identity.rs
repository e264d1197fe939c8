//! A node's identity on disk, and how it comes to exist.
//!
//! The data directory holds:
//! - `node.json`: cluster id, node id, name, advertised address, labels;
//! - `tls/ca.pem`, `tls/node.pem`, `tls/node.key` (0600): the cluster CA
//!   certificate and this node's certificate and key;
//! - `wireguard.key` (0600): the node's WireGuard private key, base64 as `wg`
//!   writes it; only its public half is ever sent to the cluster;
//! - `join.token`, `admin.token` (0600, first node only); the node that
//!   holds `join.token` rewrites it whenever the cluster's join secret
//!   rotates (`roost node remove`), so the file is always the current token;
//! - `bootstrap.json` (first node only, until the cluster's first entry is
//!   committed), so a crash during `init` is finished by the next start;
//! - `raft/`: the RocksDB store.
//!
//! Starting a node on a directory that holds `node.json` resumes that node,
//! whether the command was `init` or `join`: restart is the same command line.
//! A new address is taken as a move (the machine's address changed): it is
//! recorded here and told to the cluster. Other flags that contradict the
//! stored identity (name, labels, cluster) are refused rather than ignored.
//!
//! A directory without `node.json` that holds any key, token or Raft data is
//! refused by `init` and `join` before anything is written: a lost
//! `node.json` must not cost the cluster's secrets key (every sealed secret)
//! by being overwritten with a new one. Every file here is written
//! atomically (temporary file, fsync, rename, fsync of the directory).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use roost_network::mesh::Key;
use roost_network::pki::{self, CaDigest};
use roost_raft::{Command, NodeId};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("could not {action} {}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a valid node identity file", .path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} holds node '{stored}' (id {id}); --{flag} {given} conflicts with it. Drop --{flag}, or use another --data-dir for a new node", .dir.display())]
    Conflict { dir: PathBuf, flag: &'static str, stored: String, given: String, id: NodeId },
    #[error("{} is not a WireGuard private key (base64, as `wg genkey` writes it); restore it from a backup, or remove it to give the node a new key", .path.display())]
    BadKey { path: PathBuf },
    #[error("{} holds no node.json but holds {found} of an earlier node; nothing was changed. Restore node.json from a backup to resume that node, or use another --data-dir for a new one (remove these files only if that node's keys are not needed: the secrets key seals every secret of a cluster made by `node init`)", .dir.display())]
    Leftovers { dir: PathBuf, found: String },
    #[error("{} holds a node of cluster {stored}, but the token is for another cluster (CA {given}). Use that cluster's token, or another --data-dir", .dir.display())]
    OtherCluster { dir: PathBuf, stored: String, given: String },
}

/// What `node.json` records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredIdentity {
    pub cluster_id: String,
    pub node_id: NodeId,
    pub name: String,
    pub address: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Joined with the worker token: the node never votes and holds no
    /// secrets key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub worker: bool,
    /// Digests (hex) of the CAs the cluster had before its CA rotations: a
    /// restart with the join token it was first started with still names
    /// this cluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub former_ca_digests: Vec<String>,
}

/// A node's identity with its credentials loaded.
#[derive(Clone)]
pub struct Identity {
    pub stored: StoredIdentity,
    pub ca_cert_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// The cluster's secrets key (hex), held by every node that may vote,
    /// never in Raft; `None` on a worker.
    pub secrets_key: Option<String>,
    /// This node's WireGuard private key; never leaves the node.
    pub wireguard_key: Key,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys stay out of logs.
        f.debug_struct("Identity").field("stored", &self.stored).finish_non_exhaustive()
    }
}

impl Identity {
    pub fn ca_digest(&self) -> Result<CaDigest, pki::PkiError> {
        Ok(CaDigest::of(&pki::cert_der_from_pem(&self.ca_cert_pem)?))
    }
}

/// Paths inside a data directory.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn identity(&self) -> PathBuf {
        self.root.join("node.json")
    }

    pub fn raft(&self) -> PathBuf {
        self.root.join("raft")
    }

    pub fn join_token(&self) -> PathBuf {
        self.root.join("join.token")
    }

    pub fn admin_token(&self) -> PathBuf {
        self.root.join("admin.token")
    }

    pub fn bootstrap(&self) -> PathBuf {
        self.root.join("bootstrap.json")
    }

    pub fn secrets_key(&self) -> PathBuf {
        self.root.join("secrets.key")
    }

    pub fn wireguard_key(&self) -> PathBuf {
        self.root.join("wireguard.key")
    }

    fn tls(&self, file: &str) -> PathBuf {
        self.root.join("tls").join(file)
    }

    /// The cluster CA's certificate, as the node last knew it.
    pub fn ca_cert(&self) -> PathBuf {
        self.tls("ca.pem")
    }

    /// The node's certificate.
    pub fn node_cert(&self) -> PathBuf {
        self.tls("node.pem")
    }

    /// During a CA rotation, the new CA's certificate and the node's
    /// certificate from it; they replace `ca.pem` and `node.pem` once the
    /// rotation finishes.
    pub fn next_ca_cert(&self) -> PathBuf {
        self.tls("next-ca.pem")
    }

    pub fn next_node_cert(&self) -> PathBuf {
        self.tls("next.pem")
    }

    /// The node's API certificate and its CA's: short-lived, renewed by
    /// `api_cert::run`, presented to the CLI.
    pub fn api_cert(&self) -> PathBuf {
        self.tls("api.pem")
    }

    /// Refuses a directory that holds what an earlier node left: keys,
    /// tokens or Raft data. Called before a new node writes anything.
    pub fn check_fresh(&self) -> Result<(), IdentityError> {
        let files = [
            self.tls("ca.pem"),
            self.tls("node.pem"),
            self.tls("node.key"),
            self.next_ca_cert(),
            self.next_node_cert(),
            self.secrets_key(),
            self.wireguard_key(),
            self.join_token(),
            self.admin_token(),
            self.bootstrap(),
        ];
        let mut found: Vec<String> = files
            .iter()
            .filter(|path| path.exists())
            .filter_map(|path| path.strip_prefix(&self.root).ok().map(|p| p.display().to_string()))
            .collect();
        let raft = self.raft();
        if fs::read_dir(&raft).is_ok_and(|mut entries| entries.next().is_some()) {
            found.push("raft/".to_owned());
        }
        if found.is_empty() {
            Ok(())
        } else {
            Err(IdentityError::Leftovers { dir: self.root.clone(), found: found.join(", ") })
        }
    }

    /// Creates the directory (0700) if needed.
    pub fn create(&self) -> Result<(), IdentityError> {
        fs::create_dir_all(self.root.join("tls")).map_err(|source| io("create", &self.root, source))?;
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
            .map_err(|source| io("set permissions on", &self.root, source))
    }

    /// Loads the node stored here, if there is one.
    pub fn load(&self) -> Result<Option<Identity>, IdentityError> {
        let path = self.identity();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(io("read", &path, source)),
        };
        let stored = serde_json::from_str(&text).map_err(|source| IdentityError::Corrupt { path, source })?;
        // A node made before the mesh has no WireGuard key yet: it gets one.
        let wireguard_key = match fs::read_to_string(self.wireguard_key()) {
            Ok(text) => {
                Key::from_base64(text.trim()).map_err(|_| IdentityError::BadKey { path: self.wireguard_key() })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = generate_wireguard_key();
                write_private(&self.wireguard_key(), &format!("{}\n", key.to_base64()))?;
                key
            }
            Err(source) => return Err(io("read", &self.wireguard_key(), source)),
        };
        let stored: StoredIdentity = stored;
        let secrets_key = if stored.worker { None } else { Some(read(&self.secrets_key())?) };
        Ok(Some(Identity {
            stored,
            ca_cert_pem: read(&self.tls("ca.pem"))?,
            cert_pem: read(&self.tls("node.pem"))?,
            key_pem: read(&self.tls("node.key"))?,
            secrets_key,
            wireguard_key,
        }))
    }

    /// Writes a new node's identity. `node.json` goes last, so a crash part
    /// way leaves a directory that is not yet a node and can be retried.
    pub fn save(&self, identity: &Identity) -> Result<(), IdentityError> {
        self.create()?;
        write_private(&self.tls("ca.pem"), &identity.ca_cert_pem)?;
        write_private(&self.tls("node.pem"), &identity.cert_pem)?;
        write_private(&self.tls("node.key"), &identity.key_pem)?;
        if let Some(secrets_key) = &identity.secrets_key {
            write_private(&self.secrets_key(), secrets_key)?;
        }
        write_private(&self.wireguard_key(), &format!("{}\n", identity.wireguard_key.to_base64()))?;
        self.save_stored(&identity.stored)
    }

    /// Rewrites `node.json` (atomically), as when the node moved.
    /// Records in `node.json` that the cluster's CA had `digest` before a
    /// rotation.
    pub fn add_former_ca(&self, digest: &CaDigest) -> Result<(), IdentityError> {
        let path = self.identity();
        let mut stored: StoredIdentity = serde_json::from_str(&read(&path)?)
            .map_err(|source| IdentityError::Corrupt { path: path.clone(), source })?;
        let digest = digest.to_hex();
        if !stored.former_ca_digests.contains(&digest) {
            stored.former_ca_digests.push(digest);
            self.save_stored(&stored)?;
        }
        Ok(())
    }

    pub fn save_stored(&self, stored: &StoredIdentity) -> Result<(), IdentityError> {
        let json = serde_json::to_string_pretty(stored)
            .map_err(|source| IdentityError::Corrupt { path: self.identity(), source })?;
        write_private(&self.identity(), &json)
    }

    pub fn save_bootstrap(&self, command: &Command) -> Result<(), IdentityError> {
        let json = serde_json::to_string(command)
            .map_err(|source| IdentityError::Corrupt { path: self.bootstrap(), source })?;
        write_private(&self.bootstrap(), &json)
    }

    pub fn load_bootstrap(&self) -> Result<Option<Command>, IdentityError> {
        let path = self.bootstrap();
        match fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map(Some).map_err(|source| IdentityError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(io("read", &path, source)),
        }
    }

    pub fn clear_bootstrap(&self) -> Result<(), IdentityError> {
        match fs::remove_file(self.bootstrap()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(io("remove", &self.bootstrap(), source)),
        }
    }
}

/// Checks that flags given on a restart agree with the stored identity, and
/// returns the node's new address when it moved.
pub fn check_resume(
    dir: &DataDir,
    stored: &StoredIdentity,
    name: Option<&str>,
    address: &str,
    labels: &BTreeMap<String, String>,
) -> Result<Option<String>, IdentityError> {
    let conflict = |flag, stored_value: &str, given: &str| IdentityError::Conflict {
        dir: dir.root().to_owned(),
        flag,
        stored: stored.name.clone(),
        given: format!("{given} (stored: {stored_value})"),
        id: stored.node_id,
    };
    if let Some(name) = name.filter(|n| *n != stored.name) {
        return Err(conflict("name", &stored.name, name));
    }
    if !labels.is_empty() && *labels != stored.labels {
        let show =
            |l: &BTreeMap<String, String>| l.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        return Err(conflict("label", &show(&stored.labels), &show(labels)));
    }
    Ok((address != stored.address).then(|| address.to_owned()))
}

/// Keeps `join.token`, where this node holds one, equal to the cluster's
/// current join token: the secret rotates when a node is removed, and the
/// CA's digest when the CA is rotated.
pub async fn keep_join_token(
    dir: DataDir,
    state: roost_raft::StateReader,
    key: std::sync::Arc<roost_deploy::secrets::SecretsKey>,
    stop: tokio_util::sync::CancellationToken,
) {
    let path = dir.join_token();
    if !path.exists() {
        return;
    }
    let mut changes = state.changes();
    // Said once per distinct failure, not on every change of the state.
    let mut failing: Option<String> = None;
    // The cluster record the file was last made from: nearly every entry
    // leaves it as it is, and opening the secret and reading the file on
    // each would cost every write on every node.
    let mut seen: Option<Option<roost_raft::state::ClusterInfo>> = None;
    loop {
        let changed = state.read(|s| (seen.as_ref() != Some(&s.cluster)).then(|| s.cluster.clone()));
        if let Some(cluster) = changed {
            seen = Some(cluster.clone());
            if !write_join_token(&path, cluster, &key, &mut failing) {
                // Tried again on the next change.
                seen = None;
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}

/// Writes the join token of `cluster` to `path` unless it holds it already;
/// false if writing failed (a secret that cannot be opened is said once).
fn write_join_token(
    path: &std::path::Path,
    cluster: Option<roost_raft::state::ClusterInfo>,
    key: &roost_deploy::secrets::SecretsKey,
    failing: &mut Option<String>,
) -> bool {
    // The token pins the cluster's CA, which a CA rotation changes.
    let secret = cluster.and_then(|cluster| {
        let opened = super::keys::open_join_secret(&cluster, roost_raft::state::NodeRole::Voter, key)
            .and_then(|secret| Ok((secret, super::keys::ca_digest(&cluster.ca_cert_pem)?)));
        match opened {
            Ok(secret) => {
                *failing = None;
                Some(secret)
            }
            Err(error) => {
                let error = error_chain(&error);
                if failing.as_ref() != Some(&error) {
                    tracing::warn!(%error, "cannot read the join token");
                    *failing = Some(error);
                }
                None
            }
        }
    });
    let Some((secret, ca_digest)) = secret else { return true };
    let current = roost_network::Token { kind: roost_network::TokenKind::Join, ca_digest, secret };
    let text = format!("{current}\n");
    if fs::read_to_string(path).ok().as_deref() == Some(text.as_str()) {
        return true;
    }
    match write_private(path, &text) {
        Ok(()) => {
            tracing::info!("the join token rotated; {} holds the new one", path.display());
            true
        }
        Err(error) => {
            tracing::warn!(error = %error_chain(&error), "could not update the join token file");
            false
        }
    }
}

pub(super) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A new WireGuard private key.
pub fn generate_wireguard_key() -> Key {
    roost_network::mesh::wireguard::generate_key()
}

fn io(action: &'static str, path: &Path, source: std::io::Error) -> IdentityError {
    IdentityError::Io { action, path: path.to_owned(), source }
}

/// An I/O error on a file of the data directory.
pub(super) fn io_error(action: &'static str, path: &Path, source: std::io::Error) -> IdentityError {
    io(action, path, source)
}

/// Reads a file of the data directory.
pub(super) fn read(path: &Path) -> Result<String, IdentityError> {
    fs::read_to_string(path).map_err(|source| io("read", path, source))
}

/// Writes a file readable only by its owner, replacing it atomically.
pub fn write_private(path: &Path, contents: &str) -> Result<(), IdentityError> {
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|source| io("write", &tmp, source))?;
    file.write_all(contents.as_bytes()).map_err(|source| io("write", &tmp, source))?;
    file.sync_all().map_err(|source| io("sync", &tmp, source))?;
    fs::rename(&tmp, path).map_err(|source| io("rename", path, source))?;
    // The rename is durable only once the directory entry is.
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::File::open(parent).and_then(|dir| dir.sync_all()).map_err(|source| io("sync", parent, source))
}
