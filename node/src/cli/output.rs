//! How client commands print: aligned tables for people, JSON for scripts.

use std::io::{self, Write};
use std::time::{Duration, UNIX_EPOCH};

use roost_proto::api::{App, Node};
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

fn labels(node: &Node) -> String {
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
                })
            })
            .collect();
        return writeln!(out, "{}", serde_json::Value::Array(list));
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| vec![n.id.to_string(), n.name.clone(), n.address.clone(), n.role.clone(), n.state.clone(), labels(n)])
        .collect();
    table(out, &["ID", "NAME", "ADDRESS", "ROLE", "STATE", "LABELS"], &rows)
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
