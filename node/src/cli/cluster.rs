//! `roost cluster`: cluster-wide settings and keys.

use std::io::Write;
use std::time::{Duration, Instant};

use clap::Subcommand;
use roost_network::pki::{self, CaDigest};
use roost_network::Token;
use roost_proto::api::{CaRotationStatus, GetCaRotationRequest, RotateCaRequest};
use serde_json::json;

use super::{connect_api, CliError, ClientArgs, Control};

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Show the cluster CA's digest (what tokens pin) and any rotation under way.
    Ca {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Replace the cluster CA, as `docker swarm ca --rotate` does: every node gets a certificate
    /// from a new CA, then the new CA becomes the cluster's, without downtime. Certificates the
    /// old CA's key could still make (a removed voter holds it) are trusted by no client or
    /// joining node afterwards. Tokens keep their secrets but pin the new CA: this prints yours.
    RotateCa {
        /// Start the rotation and return without waiting for it to finish.
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// How often `rotate-ca` asks how far the rotation got.
const POLL: Duration = Duration::from_millis(500);
/// How long without progress before `rotate-ca` says what it waits for.
const STALLED: Duration = Duration::from_secs(30);

pub async fn run(command: ClusterCommand, out: &mut dyn Write) -> Result<(), CliError> {
    let io = |e: std::io::Error| CliError::Other(format!("could not write output: {e}"));
    match command {
        ClusterCommand::Ca { json, client } => {
            let status = client.connect().await?.get_ca_rotation(GetCaRotationRequest {}).await?.into_inner();
            let status = checked(status)?;
            if json {
                let value = json!({
                    "ca_digest": status.ca_digest,
                    "rotating_to": (!status.next_ca_digest.is_empty()).then_some(&status.next_ca_digest),
                    "renewed": status.renewed,
                    "pending": status.pending,
                });
                return writeln!(out, "{value:#}").map_err(io);
            }
            writeln!(out, "CA digest: {}", status.ca_digest).map_err(io)?;
            if !status.next_ca_digest.is_empty() {
                writeln!(out, "Rotating to: {}\n  {}", status.next_ca_digest, progress(&status)).map_err(io)?;
            }
            Ok(())
        }
        ClusterCommand::RotateCa { detach, client } => rotate(&client, detach, out).await,
    }
}

async fn rotate(client: &ClientArgs, detach: bool, out: &mut dyn Write) -> Result<(), CliError> {
    let io = |e: std::io::Error| CliError::Other(format!("could not write output: {e}"));
    let (endpoint, token) = client.parts()?;
    let mut api = connect_api(&endpoint, &token).await?;
    let status = checked(api.rotate_ca(RotateCaRequest {}).await?.into_inner())?;
    if status.next_ca_digest.is_empty() {
        return Err(CliError::Other("the node started no CA rotation and reports none under way".into()));
    }
    // Learned over a connection the token's own pin vouched for.
    let new_digest = status.next_ca_digest.clone();
    writeln!(out, "Rotating the cluster CA to {new_digest}.").map_err(io)?;
    if detach {
        if status.ca_digest == new_digest {
            writeln!(out, "It has finished already.").map_err(io)?;
        } else {
            writeln!(out, "{}; `roost cluster ca` shows how far it got.", progress(&status)).map_err(io)?;
        }
        return Ok(());
    }
    let repinned = Token { ca_digest: digest_of(&new_digest)?, ..token.clone() };
    let mut said = String::new();
    let mut since = Instant::now();
    let mut hinted = false;
    loop {
        let status = match poll(&mut api).await {
            Ok(status) => status,
            // Nodes present their new certificates once the rotation has
            // finished: a new connection may need the new pin.
            Err(_) => {
                api = match connect_api(&endpoint, &repinned).await {
                    Ok(api) => api,
                    Err(_) => connect_api(&endpoint, &token).await?,
                };
                poll(&mut api).await?
            }
        };
        if status.next_ca_digest.is_empty() {
            if status.ca_digest != new_digest {
                return Err(CliError::Other(format!(
                    "the rotation to {} was cancelled (a node was removed during it, and may hold the new CA's key); \
                     the cluster's CA is still {}: run `roost cluster rotate-ca` again",
                    short(&new_digest),
                    short(&status.ca_digest)
                )));
            }
            break;
        }
        if status.next_ca_digest != new_digest {
            return Err(CliError::Other(format!(
                "another CA rotation ({}) is under way; `roost cluster ca` shows it",
                short(&status.next_ca_digest)
            )));
        }
        let now = progress(&status);
        if now != said {
            writeln!(out, "  {now}").map_err(io)?;
            said = now;
            since = Instant::now();
        } else if !hinted && since.elapsed() >= STALLED {
            writeln!(
                out,
                "  still waiting for {}: is it down? The rotation finishes once every node has a certificate from the new CA. \
                 Stopping this command leaves it running. Removing a node cancels it (the node may hold the new CA's key): \
                 remove nodes that are gone for good, then run `roost cluster rotate-ca` again.",
                status.pending.join(", ")
            )
            .map_err(io)?;
            hinted = true;
        }
        tokio::time::sleep(POLL).await;
    }
    writeln!(out, "The cluster's CA is now {new_digest}.").map_err(io)?;
    writeln!(out, "Tokens keep their secrets and pin the new CA; yours is now:\n  {repinned}").map_err(io)?;
    writeln!(
        out,
        "Other token holders need theirs with the new digest (the 64 hex characters after ROOST-…-1-). \
         The join tokens (`roost node token`) and DATA_DIR/admin.token on the first node pin it already."
    )
    .map_err(io)
}

async fn poll(api: &mut Control) -> Result<CaRotationStatus, CliError> {
    checked(api.get_ca_rotation(GetCaRotationRequest {}).await?.into_inner())
}

/// The status, once its certificates are checked against the digests it
/// names (a node cannot slip in another CA than it says).
fn checked(status: CaRotationStatus) -> Result<CaRotationStatus, CliError> {
    let pairs = [(&status.ca_cert_pem, &status.ca_digest), (&status.next_ca_cert_pem, &status.next_ca_digest)];
    for (pem, digest) in pairs {
        if pem.is_empty() && digest.is_empty() {
            continue;
        }
        let der = pki::cert_der_from_pem(pem).map_err(|e| CliError::Other(format!("the node sent a bad CA: {e}")))?;
        if CaDigest::of(&der).to_hex() != *digest {
            return Err(CliError::Other(
                "the node sent a CA certificate that does not have the digest it names".into(),
            ));
        }
    }
    Ok(status)
}

fn progress(status: &CaRotationStatus) -> String {
    let total = status.renewed.len() + status.pending.len();
    if status.pending.is_empty() {
        format!("{total} of {total} nodes have a certificate from the new CA; finishing")
    } else {
        format!(
            "{} of {total} nodes have a certificate from the new CA (waiting for {})",
            status.renewed.len(),
            status.pending.join(", ")
        )
    }
}

fn digest_of(hex: &str) -> Result<CaDigest, CliError> {
    CaDigest::from_hex(hex).ok_or_else(|| CliError::Other(format!("the node named a malformed CA digest '{hex}'")))
}

fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}
