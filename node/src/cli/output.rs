//! How client commands print: aligned tables for people, JSON for scripts.

use std::io::{self, Write};
use std::time::{Duration, UNIX_EPOCH};

use roost_proto::api::{ApiToken, App, AppStatus, Certificate, CreatedToken, Node, NodeDetails, Release, Secret};
use serde_json::json;

fn timestamp(ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}

fn table(out: &mut dyn Write, header: &[&str], rows: &[Vec<String>]) -> io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_owned()
    };
    writeln!(out, "{}", line(header.iter().map(|h| h.to_string()).collect()))?;
    for row in rows {
        writeln!(out, "{}", line(row.clone()))?;
    }
    Ok(())
}

pub fn node_labels(node: &Node) -> String {
    let mut labels: Vec<String> = node.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    labels.join(",")
}

pub fn nodes(out: &mut dyn Write, nodes: &[Node], as_json: bool) -> io::Result<()> {
    if as_json {
        let list: Vec<_> = nodes
            .iter()
            .map(|n| {
                json!({
                    "id": n.id,
                    "name": n.name,
                    "address": n.address,
                    "role": n.role,
                    "state": n.state,
                    "labels": n.labels,
                    "cert_serial": n.cert_serial,
                    "joined_at": timestamp(n.joined_at_ms),
                    "last_seen_ms_ago": n.last_seen_ms_ago,
                    "subnet": n.subnet,
                    "wireguard": wireguard_json(n),
                })
            })
            .collect();
        return writeln!(out, "{}", serde_json::Value::Array(list));
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.id.to_string(),
                n.name.clone(),
                n.address.clone(),
                n.role.clone(),
                n.state.clone(),
                dash(&n.subnet),
                node_labels(n),
            ]
        })
        .collect();
    table(out, &["ID", "NAME", "ADDRESS", "ROLE", "STATE", "MESH SUBNET", "LABELS"], &rows)
}

fn dash(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text.to_owned()
    }
}

fn wireguard_json(node: &Node) -> serde_json::Value {
    if node.wireguard_public_key.is_empty() {
        return serde_json::Value::Null;
    }
    json!({ "public_key": node.wireguard_public_key, "endpoint": node.wireguard_endpoint })
}

fn ago(ms: Option<u64>) -> String {
    match ms {
        None => "never".into(),
        Some(ms) if ms < 1000 => "just now".into(),
        Some(ms) => format!("{} ago", humantime::format_duration(Duration::from_secs(ms / 1000))),
    }
}

fn bytes(count: u64) -> String {
    match count {
        0..1024 => format!("{count} B"),
        1024..1_048_576 => format!("{:.1} KiB", count as f64 / 1024.0),
        _ => format!("{:.1} MiB", count as f64 / 1_048_576.0),
    }
}

/// `roost node show`: the node, its place in the mesh, and its WireGuard
/// peers with their latest handshake as the node itself sees them.
pub fn node_details(out: &mut dyn Write, details: &NodeDetails, as_json: bool) -> io::Result<()> {
    let node = details.node.clone().unwrap_or_default();
    if as_json {
        let peers: Vec<_> = details
            .peers
            .iter()
            .map(|p| {
                json!({
                    "node": p.node,
                    "public_key": p.public_key,
                    "endpoint": p.endpoint,
                    "allowed_ips": p.allowed_ips,
                    "handshake_ms_ago": p.handshake_ms_ago,
                    "rx_bytes": p.rx_bytes,
                    "tx_bytes": p.tx_bytes,
                })
            })
            .collect();
        let value = json!({
            "id": node.id,
            "name": node.name,
            "address": node.address,
            "role": node.role,
            "state": node.state,
            "labels": node.labels,
            "subnet": node.subnet,
            "mesh_address": details.mesh_address,
            "wireguard": details.wireguard,
            "interface": details.interface,
            "public_key": node.wireguard_public_key,
            "endpoint": node.wireguard_endpoint,
            "peers": peers,
            "peers_error": (!details.peers_error.is_empty()).then_some(&details.peers_error),
        });
        return writeln!(out, "{value}");
    }
    writeln!(out, "Node:       {} (id {}), {}, {}", node.name, node.id, node.role, node.state)?;
    writeln!(out, "Address:    {}", node.address)?;
    if !node.labels.is_empty() {
        writeln!(out, "Labels:     {}", node_labels(&node))?;
    }
    writeln!(out, "Mesh:       {} (subnet {})", dash(&details.mesh_address), dash(&node.subnet))?;
    if !details.peers_error.is_empty() {
        return writeln!(out, "WireGuard:  unknown: {}", details.peers_error);
    }
    if !details.wireguard {
        return writeln!(out, "WireGuard:  off (--no-wireguard: nodes share one machine)");
    }
    writeln!(
        out,
        "WireGuard:  {}, listening at {}, public key {}",
        details.interface, node.wireguard_endpoint, node.wireguard_public_key
    )?;
    if details.peers.is_empty() {
        return writeln!(out, "No peers.");
    }
    writeln!(out)?;
    let rows: Vec<Vec<String>> = details
        .peers
        .iter()
        .map(|p| {
            vec![
                dash(&p.node),
                p.public_key.clone(),
                dash(&p.endpoint),
                p.allowed_ips.join(","),
                ago(p.handshake_ms_ago),
                bytes(p.rx_bytes),
                bytes(p.tx_bytes),
            ]
        })
        .collect();
    table(out, &["PEER", "PUBLIC KEY", "ENDPOINT", "ALLOWED IPS", "HANDSHAKE", "RECEIVED", "SENT"], &rows)
}

fn app_json(app: &App) -> serde_json::Value {
    json!({ "name": app.name, "created_at": timestamp(app.created_at_ms) })
}

pub fn apps(out: &mut dyn Write, apps: &[App], as_json: bool) -> io::Result<()> {
    if as_json {
        return writeln!(out, "{}", serde_json::Value::Array(apps.iter().map(app_json).collect()));
    }
    if apps.is_empty() {
        return writeln!(out, "No apps yet. Create one with `roost apps create NAME`.");
    }
    let rows: Vec<Vec<String>> = apps.iter().map(|a| vec![a.name.clone(), timestamp(a.created_at_ms)]).collect();
    table(out, &["NAME", "CREATED"], &rows)
}

pub fn app(out: &mut dyn Write, app: &App, as_json: bool) -> io::Result<()> {
    if as_json {
        return writeln!(out, "{}", app_json(app));
    }
    writeln!(out, "Name:     {}", app.name)?;
    writeln!(out, "Created:  {}", timestamp(app.created_at_ms))
}

pub fn status(out: &mut dyn Write, status: &AppStatus, as_json: bool) -> io::Result<()> {
    if as_json {
        let instances: Vec<_> = status
            .instances
            .iter()
            .map(|i| {
                json!({
                    "id": i.id,
                    "node": i.node,
                    "process_group": i.process_group,
                    "release": i.release,
                    "state": i.state,
                    "health": i.health,
                    "address": i.address,
                    "ip": i.ip,
                    "reason": i.reason,
                    "restarts": i.restarts,
                })
            })
            .collect();
        let value = json!({
            "app": status.app,
            "release": status.release.as_ref().map(|r| r.version),
            "deploying": status.deploying.as_ref().map(|r| r.version),
            "suspended": status.suspended,
            "instances": instances,
        });
        return writeln!(out, "{value}");
    }
    writeln!(out, "App:      {}{}", status.app, if status.suspended { " (suspended)" } else { "" })?;
    match &status.release {
        Some(r) => writeln!(out, "Release:  v{} ({}, image {})", r.version, r.description, r.image)?,
        None => writeln!(out, "Release:  none yet (run `roost deploy`)")?,
    }
    if let Some(r) = &status.deploying {
        writeln!(out, "Deploying: v{} ({}, {} strategy)", r.version, r.description, r.strategy)?;
    }
    if status.instances.is_empty() {
        return writeln!(out, "No instances.");
    }
    writeln!(out)?;
    let rows: Vec<Vec<String>> = status
        .instances
        .iter()
        .map(|i| {
            vec![
                i.id.clone(),
                i.process_group.clone(),
                format!("v{}", i.release),
                if i.node.is_empty() { "-".into() } else { i.node.clone() },
                i.state.clone(),
                i.health.clone(),
                dash(if i.address.is_empty() { &i.ip } else { &i.address }),
                i.restarts.to_string(),
                i.reason.clone(),
            ]
        })
        .collect();
    table(out, &["ID", "GROUP", "RELEASE", "NODE", "STATE", "HEALTH", "ADDRESS", "RESTARTS", "NOTE"], &rows)
}

pub fn releases(out: &mut dyn Write, releases: &[Release], as_json: bool) -> io::Result<()> {
    if as_json {
        let list: Vec<_> = releases
            .iter()
            .map(|r| {
                json!({
                    "version": r.version,
                    "status": r.status,
                    "description": r.description,
                    "reason": r.reason,
                    "image": r.image,
                    "strategy": r.strategy,
                    "created_at": timestamp(r.created_at_ms),
                })
            })
            .collect();
        return writeln!(out, "{}", serde_json::Value::Array(list));
    }
    if releases.is_empty() {
        return writeln!(out, "No releases yet. Make one with `roost deploy`.");
    }
    let rows: Vec<Vec<String>> = releases
        .iter()
        .map(|r| {
            vec![
                format!("v{}", r.version),
                r.status.clone(),
                r.description.clone(),
                r.image.clone(),
                timestamp(r.created_at_ms),
                r.reason.clone(),
            ]
        })
        .collect();
    table(out, &["VERSION", "STATUS", "DESCRIPTION", "IMAGE", "CREATED", "REASON"], &rows)
}

pub fn secrets(out: &mut dyn Write, secrets: &[Secret], as_json: bool) -> io::Result<()> {
    if as_json {
        let list: Vec<_> = secrets
            .iter()
            .map(|s| json!({ "name": s.name, "digest": s.digest, "updated_at": timestamp(s.updated_at_ms) }))
            .collect();
        return writeln!(out, "{}", serde_json::Value::Array(list));
    }
    if secrets.is_empty() {
        return writeln!(out, "No secrets. Set some with `roost secrets set NAME=VALUE`.");
    }
    let rows: Vec<Vec<String>> =
        secrets.iter().map(|s| vec![s.name.clone(), s.digest.clone(), timestamp(s.updated_at_ms)]).collect();
    table(out, &["NAME", "DIGEST", "UPDATED"], &rows)
}

fn certificate_json(c: &Certificate) -> serde_json::Value {
    json!({
        "domain": c.domain,
        "app": c.app,
        "status": c.status,
        "error": (!c.error.is_empty()).then_some(&c.error),
        "expires": c.not_after_ms.map(timestamp),
        "issued_at": c.issued_at_ms.map(timestamp),
        "issuer": (!c.issuer.is_empty()).then_some(&c.issuer),
        "validating": c.validating,
        "retry_at": c.retry_at_ms.map(timestamp),
        "created_at": timestamp(c.created_at_ms),
    })
}

/// `roost certs list`.
pub fn certificates(out: &mut dyn Write, list: &[Certificate], as_json: bool) -> io::Result<()> {
    if as_json {
        return writeln!(out, "{}", serde_json::Value::Array(list.iter().map(certificate_json).collect()));
    }
    if list.is_empty() {
        return writeln!(out, "No certificates. Add one with `roost certs add DOMAIN -a APP`.");
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|c| {
            vec![
                c.domain.clone(),
                c.app.clone(),
                c.status.clone(),
                c.not_after_ms.map_or_else(|| "-".into(), timestamp),
                if c.error.is_empty() { String::new() } else { c.error.clone() },
            ]
        })
        .collect();
    table(out, &["DOMAIN", "APP", "STATUS", "EXPIRES", "ERROR"], &rows)
}

/// `roost certs show`.
pub fn certificate(out: &mut dyn Write, c: &Certificate, as_json: bool) -> io::Result<()> {
    if as_json {
        return writeln!(out, "{}", certificate_json(c));
    }
    writeln!(out, "Domain:   {}", c.domain)?;
    writeln!(out, "App:      {}", c.app)?;
    let validating = if c.validating { " (validating the HTTP-01 challenge now)" } else { "" };
    writeln!(out, "Status:   {}{validating}", c.status)?;
    if let Some(not_after) = c.not_after_ms {
        writeln!(out, "Expires:  {} (renewed 30 days before)", timestamp(not_after))?;
    }
    if !c.issuer.is_empty() {
        writeln!(out, "Issuer:   {}", c.issuer)?;
    }
    if !c.error.is_empty() {
        writeln!(out, "Error:    {}", c.error)?;
        if let Some(retry) = c.retry_at_ms {
            writeln!(out, "Retrying: {}", timestamp(retry))?;
        }
    }
    Ok(())
}

fn token_json(t: &ApiToken) -> serde_json::Value {
    json!({
        "id": t.id,
        "name": t.name,
        "scope": t.scope,
        "created_at": timestamp(t.created_at_ms),
        "expires_at": t.expires_at_ms.map(timestamp),
        "last_used_at": t.last_used_at_ms.map(timestamp),
    })
}

/// A token just made or rotated: the one time its secret is shown.
pub fn created_token(out: &mut dyn Write, created: &CreatedToken, as_json: bool) -> io::Result<()> {
    let Some(token) = &created.token else {
        return writeln!(out, "{}", created.secret);
    };
    if as_json {
        let mut object = token_json(token);
        object["token"] = json!(created.secret);
        return writeln!(out, "{object}");
    }
    let expires = token.expires_at_ms.map_or_else(|| "never".to_owned(), timestamp);
    writeln!(out, "Token {} (id {}, scope {}, expires {expires}):", token.name, token.id, token.scope)?;
    writeln!(out)?;
    writeln!(out, "    {}", created.secret)?;
    writeln!(out)?;
    writeln!(out, "It is shown only now: keep it somewhere safe. Use it with --token or ROOST_TOKEN.")
}

pub fn tokens(out: &mut dyn Write, tokens: &[ApiToken], as_json: bool) -> io::Result<()> {
    if as_json {
        return writeln!(out, "{}", serde_json::Value::Array(tokens.iter().map(token_json).collect()));
    }
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                t.id.clone(),
                t.scope.clone(),
                timestamp(t.created_at_ms),
                t.expires_at_ms.map_or_else(|| "never".to_owned(), timestamp),
                t.last_used_at_ms.map_or_else(|| "-".to_owned(), timestamp),
            ]
        })
        .collect();
    table(out, &["NAME", "ID", "SCOPE", "CREATED", "EXPIRES", "LAST USED"], &rows)
}
