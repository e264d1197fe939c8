//! Fixtures for tests that run apps on the real Docker engine.
//!
//! - [`hello_app`]: a directory with `examples/hello` built into a static
//!   binary (by `rustc`, once per test run), its `FROM scratch` Dockerfile
//!   and the roost.toml the test gives: a real app, built without a registry.
//! - [`DockerCleanup`]: removes every container and image a test cluster made
//!   (found by the `roost.cluster` label) when dropped, pass or fail.
//! - [`cli`]: runs a `roost` CLI command in this process against a node, as
//!   the binary would, and returns what it printed or the error.
//! - [`http_get`]: one plain HTTP request to an instance.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use roost_node::cli::{run_client, Cli, CliError};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Fails loudly when there is no Docker engine: these tests never skip.
pub fn require_docker() -> Result<()> {
    let output = Command::new("docker").args(["version", "--format", "{{.Server.APIVersion}}"]).output();
    match output {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => bail!(
            "these tests need a running Docker engine; `docker version` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => bail!("these tests need Docker; the docker CLI could not run: {e}"),
    }
}

/// The static `hello` binary, compiled once per test run.
fn hello_binary() -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello/main.rs");
        let dir = std::env::temp_dir().join(format!("roost-hello-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let binary = dir.join("hello");
        let output = Command::new("rustc")
            .args(["-O", "-C", "strip=symbols", "-C", "target-feature=+crt-static"])
            .args(["--target", "x86_64-unknown-linux-gnu", "-o"])
            .arg(&binary)
            .arg(&source)
            .output()
            .map_err(|e| format!("could not run rustc: {e}"))?;
        if !output.status.success() {
            return Err(format!("rustc failed: {}", String::from_utf8_lossy(&output.stderr)));
        }
        Ok(binary)
    });
    built.clone().map_err(|e| anyhow::anyhow!("building the hello app: {e}"))
}

/// A deployable directory: the hello binary, its Dockerfile, and `toml`.
pub fn hello_app(toml: &str) -> Result<TempDir> {
    let dir = tempfile::Builder::new().prefix("roost-app-").tempdir()?;
    std::fs::copy(hello_binary()?, dir.path().join("hello")).context("copying the hello binary")?;
    let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello/Dockerfile");
    std::fs::copy(dockerfile, dir.path().join("Dockerfile")).context("copying the Dockerfile")?;
    std::fs::write(dir.path().join("roost.toml"), toml)?;
    Ok(dir)
}

/// A roost.toml for the hello app with a fast health check.
pub fn hello_toml(app: &str, extra: &str) -> String {
    format!(
        r#"app = "{app}"

[[vm]]
cpus = 0.25
memory = "64mb"

[http_service]
internal_port = 8080

[[http_service.checks]]
path = "/health"
interval = "500ms"
timeout = "400ms"
grace_period = "2s"
{extra}"#
    )
}

/// Removes the containers and images of one cluster when dropped.
#[derive(Debug)]
pub struct DockerCleanup {
    pub cluster: String,
}

impl DockerCleanup {
    /// Containers of the cluster, optionally only those of one node.
    pub fn containers(&self, node: Option<u64>) -> Vec<String> {
        let mut args =
            vec!["ps".to_owned(), "-aq".into(), "--filter".into(), format!("label=roost.cluster={}", self.cluster)];
        if let Some(node) = node {
            args.extend(["--filter".into(), format!("label=roost.node={node}")]);
        }
        docker_lines(&args)
    }

    pub fn images(&self) -> Vec<String> {
        docker_lines(&[
            "images".into(),
            "-q".into(),
            "--filter".into(),
            format!("label=roost.cluster={}", self.cluster),
        ])
    }
}

fn docker_lines(args: &[String]) -> Vec<String> {
    Command::new("docker")
        .args(args)
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

impl Drop for DockerCleanup {
    fn drop(&mut self) {
        let containers = self.containers(None);
        if !containers.is_empty() {
            let _ = Command::new("docker").args(["rm", "-f"]).args(&containers).output();
        }
        let images = self.images();
        if !images.is_empty() {
            let _ = Command::new("docker").args(["rmi", "-f"]).args(&images).output();
        }
        let networks = docker_lines(&[
            "network".into(),
            "ls".into(),
            "-q".into(),
            "--filter".into(),
            format!("label=roost.cluster={}", self.cluster),
        ]);
        if !networks.is_empty() {
            let _ = Command::new("docker").args(["network", "rm"]).args(&networks).output();
        }
        // The mesh's filter rules, through the same code the nodes use. On a
        // thread of its own: this may run inside the test's runtime.
        let tag = roost_network::mesh::cluster_tag(&self.cluster);
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(roost_network::mesh::filter::remove_tagged(&tag)).map_err(std::io::Error::other)
        })
        .join();
    }
}

/// Kills a node's containers as if its machine died (`docker kill`).
pub fn kill_containers(cleanup: &DockerCleanup, node: u64) -> Result<usize> {
    let containers = cleanup.containers(Some(node));
    if !containers.is_empty() {
        let out = Command::new("docker").args(["kill"]).args(&containers).output()?;
        if !out.status.success() {
            bail!("docker kill failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(containers.len())
}

/// Runs `roost ARGS --endpoint ADDRESS --token TOKEN` in this process.
pub async fn cli(address: &str, token: &str, args: &[&str]) -> std::result::Result<String, CliError> {
    let mut argv = vec!["roost"];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--endpoint", address, "--token", token]);
    let parsed = Cli::try_parse_from(&argv).map_err(|e| CliError::Usage(e.to_string()))?;
    let mut out = Vec::new();
    let result = run_client(parsed.command, &mut out).await;
    let printed = String::from_utf8_lossy(&out).into_owned();
    result.map(|()| printed)
}

/// `GET path` on `address` (IP:PORT); returns the status and body.
pub async fn http_get(address: &str, path: &str) -> Result<(u16, String)> {
    http_get_host(address, address, path).await
}

/// [`http_get`] with `host` in the `Host` header: an app through an edge.
pub async fn http_get_host(address: &str, host: &str, path: &str) -> Result<(u16, String)> {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Ok::<_, anyhow::Error>((status, body))
    };
    tokio::time::timeout(Duration::from_secs(3), attempt).await.context("the instance did not answer in 3s")?
}
