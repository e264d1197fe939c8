//! The `roost` binary, run as a user runs it.
//!
//! [`NodeProcess`] starts `roost node init|join` with a fixed command line,
//! can SIGKILL it and start it again with the same command line. [`roost`]
//! runs a CLI command and returns what it printed and its exit code.
//! Each process writes its stdout and stderr to files beside its data
//! directory, which a failing test prints.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::wait_until;

/// The `roost` binary this test run uses: `ROOST_BIN`, or the one cargo built
/// beside the test binary (`cargo test` builds it for `roost-node`'s own
/// integration tests).
pub fn roost_bin() -> Result<PathBuf> {
    if let Ok(path) = std::env::var("ROOST_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    // Tests run from target/<profile>/deps/, bench binaries from target/<profile>/.
    let candidates = [exe.parent().and_then(Path::parent), exe.parent()];
    let found = candidates.into_iter().flatten().map(|dir| dir.join("roost")).find(|bin| bin.exists());
    let bin = found.unwrap_or_else(|| PathBuf::from("target/release/roost"));
    if !bin.exists() {
        bail!(
            "{} does not exist: build it with `cargo build --release -p roost-node` (or run the whole workspace's tests), or set ROOST_BIN",
            bin.display()
        );
    }
    Ok(bin)
}

/// Picks a free port on loopback. The port is free when this returns; a
/// test that restarts a process reuses it.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Where a node process runs.
pub enum Host {
    /// This machine's loopback, on free ports.
    Loopback,
    /// A network namespace of its own (see [`crate::netns`]), listening on
    /// `ip` at fixed ports: 7100 for the API, 8080 and 8443 for the edge.
    Namespace { namespace: String, ip: std::net::Ipv4Addr },
}

pub struct NodeProcess {
    pub name: String,
    pub data_dir: PathBuf,
    pub address: String,
    /// Where its edge takes HTTP and HTTPS.
    pub http: std::net::SocketAddr,
    pub https: std::net::SocketAddr,
    args: Vec<String>,
    /// The network namespace it runs in (`ip netns exec`), if not this one.
    namespace: Option<String>,
    /// Environment the process starts with beyond `ROOST_LOG`.
    env: Vec<(String, String)>,
    child: Option<Child>,
    log_dir: PathBuf,
    starts: u32,
    /// This node created the cluster: dropping it cleans the cluster up.
    creator: bool,
}

impl NodeProcess {
    /// `roost node init` in `root/<name>`, on a mesh range of its own. When
    /// this node is dropped, its cluster's containers, images, networks and
    /// filter rules go too.
    pub fn init(root: &Path, name: &str) -> Result<Self> {
        Self::init_at(root, name, &Host::Loopback)
    }

    /// `roost node join SEED --token T` in `root/<name>`.
    pub fn join(root: &Path, name: &str, seed: &str, token: &str) -> Result<Self> {
        Self::join_at(root, name, seed, token, &Host::Loopback)
    }

    /// [`NodeProcess::init`] on the given host.
    pub fn init_at(root: &Path, name: &str, host: &Host) -> Result<Self> {
        let range = crate::mesh_range().to_string();
        let mut node = Self::spawn(root, name, &["node", "init", "--mesh-range", &range], host)?;
        node.creator = true;
        Ok(node)
    }

    /// [`NodeProcess::init`] with more flags for `node init`.
    pub fn init_with(root: &Path, name: &str, flags: &[&str]) -> Result<Self> {
        let range = crate::mesh_range().to_string();
        let mut command = vec!["node", "init", "--mesh-range", &range];
        command.extend_from_slice(flags);
        let mut node = Self::spawn(root, name, &command, &Host::Loopback)?;
        node.creator = true;
        Ok(node)
    }

    /// [`NodeProcess::join`], the process's wall clock `seconds` behind this
    /// machine's (libfaketime, preloaded; its monotonic clock is left alone).
    pub fn join_with_clock_behind(root: &Path, name: &str, seed: &str, token: &str, seconds: u32) -> Result<Self> {
        let library = faketime_library()?;
        let env = [
            ("LD_PRELOAD".to_owned(), library),
            ("FAKETIME".to_owned(), format!("-{seconds}")),
            ("FAKETIME_DONT_FAKE_MONOTONIC".to_owned(), "1".to_owned()),
        ];
        Self::spawn_with(root, name, &["node", "join", seed, "--token", token], &Host::Loopback, env.into())
    }

    /// [`NodeProcess::join`] with more flags for `node join`.
    pub fn join_with(root: &Path, name: &str, seed: &str, token: &str, flags: &[&str]) -> Result<Self> {
        let mut command = vec!["node", "join", seed, "--token", token];
        command.extend_from_slice(flags);
        Self::spawn(root, name, &command, &Host::Loopback)
    }

    /// [`NodeProcess::join`] on the given host.
    pub fn join_at(root: &Path, name: &str, seed: &str, token: &str, host: &Host) -> Result<Self> {
        Self::spawn(root, name, &["node", "join", seed, "--token", token], host)
    }

    /// Runs `roost COMMAND --data-dir root/<name> --listen <host>:<port>
    /// --name <name> --no-wireguard` (the nodes share this machine), with the
    /// edge on ports of its own.
    fn spawn(root: &Path, name: &str, command: &[&str], host: &Host) -> Result<Self> {
        Self::spawn_with(root, name, command, host, Vec::new())
    }

    fn spawn_with(root: &Path, name: &str, command: &[&str], host: &Host, env: Vec<(String, String)>) -> Result<Self> {
        let data_dir = root.join(name);
        let mut args: Vec<String> = command.iter().map(|a| a.to_string()).collect();
        let dir = data_dir.display().to_string();
        let (address, http, https, namespace) = match host {
            Host::Loopback => {
                let free = || Ok::<_, anyhow::Error>(format!("127.0.0.1:{}", free_port()?));
                (free()?, free()?, free()?, None)
            }
            Host::Namespace { namespace, ip } => {
                (format!("{ip}:7100"), format!("{ip}:8080"), format!("{ip}:8443"), Some(namespace.clone()))
            }
        };
        let edge = ["--http-listen", &http, "--https-listen", &https];
        for flag in ["--data-dir", &dir, "--listen", &address, "--name", name, "--no-wireguard"].into_iter().chain(edge)
        {
            args.push(flag.to_owned());
        }
        let mut node = Self {
            name: name.into(),
            data_dir,
            http: http.parse()?,
            https: https.parse()?,
            address,
            args,
            namespace,
            env,
            child: None,
            log_dir: root.to_owned(),
            starts: 0,
            creator: false,
        };
        node.start()?;
        Ok(node)
    }

    /// Starts the process with its original command line.
    pub fn start(&mut self) -> Result<()> {
        self.starts += 1;
        let stdout = std::fs::File::create(self.log_dir.join(format!("{}.{}.stdout", self.name, self.starts)))?;
        let stderr = std::fs::File::create(self.log_dir.join(format!("{}.{}.stderr", self.name, self.starts)))?;
        let mut command = match &self.namespace {
            Some(namespace) => {
                // `ip netns exec` execs the binary: the child is roost itself.
                let mut command = Command::new("ip");
                command.args(["netns", "exec", namespace]).arg(roost_bin()?);
                command
            }
            None => Command::new(roost_bin()?),
        };
        let child = command
            .args(&self.args)
            .env("ROOST_LOG", "info,openraft=error")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What the latest start printed on stdout.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.log_dir.join(format!("{}.{}.stdout", self.name, self.starts))).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.log_dir.join(format!("{}.{}.stderr", self.name, self.starts))).unwrap_or_default()
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGSTOP: the process is paused, not dead; its sockets stay open and
    /// nothing it was sent is answered until [`NodeProcess::resume`].
    pub fn pause(&self) -> Result<()> {
        self.signal("-STOP")
    }

    /// SIGCONT after [`NodeProcess::pause`].
    pub fn resume(&self) -> Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> Result<()> {
        let Some(pid) = self.pid() else { bail!("{} is not running", self.name) };
        let status = Command::new("kill").args([signal, &pid.to_string()]).status()?;
        if !status.success() {
            bail!("kill {signal} {pid} ({}) failed", self.name);
        }
        Ok(())
    }

    /// SIGTERM, then waits up to `timeout` for a clean exit; returns the code.
    pub async fn terminate(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let Some(mut child) = self.child.take() else { return Ok(None) };
        let pid = child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.code());
            }
            if tokio::time::Instant::now() >= deadline {
                child.kill()?;
                bail!("{} did not exit within {timeout:?} of SIGTERM", self.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the process has exited, and with what code.
    pub fn exited(&mut self) -> Result<Option<Option<i32>>> {
        match &mut self.child {
            Some(child) => Ok(child.try_wait()?.map(|s| s.code())),
            None => Ok(Some(None)),
        }
    }

    /// Waits until the process has exited; its exit code (`None`: killed
    /// by a signal).
    pub async fn wait_for_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let what = format!("{} to exit", self.name);
        wait_until(&what, timeout, || {
            let exited = self.exited().map(|e| e.is_some());
            async move { exited }
        })
        .await?;
        Ok(self.exited()?.flatten())
    }

    /// What removes the containers and images of this node's cluster when
    /// dropped, read off its `node.json`.
    ///
    /// `node init` writes the token files before `node.json` (which goes
    /// last, so a crash part way can be retried), so a test that has read a
    /// token may still be ahead of it: this waits for `node.json`.
    pub async fn docker_cleanup(&self) -> Result<crate::apps::DockerCleanup> {
        let path = self.data_dir.join("node.json");
        wait_until(&format!("node.json of {}", self.name), Duration::from_secs(30), || async { Ok(path.exists()) })
            .await?;
        let identity: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        let cluster = identity["cluster_id"].as_str().context("node.json names no cluster")?.to_owned();
        Ok(crate::apps::DockerCleanup { cluster })
    }

    pub fn read_token(&self, file: &str) -> Result<String> {
        Ok(std::fs::read_to_string(self.data_dir.join(file))?.trim().to_owned())
    }

    /// A token file, once the node has written it.
    pub async fn read_token_when_ready(&self, file: &str) -> Result<String> {
        wait_until(&format!("{file} of {}", self.name), Duration::from_secs(30), || async {
            Ok(self.read_token(file).is_ok_and(|t| !t.is_empty()))
        })
        .await?;
        self.read_token(file)
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.kill();
        if !self.creator {
            return;
        }
        let identity = std::fs::read_to_string(self.data_dir.join("node.json")).unwrap_or_default();
        let cluster = serde_json::from_str::<serde_json::Value>(&identity)
            .ok()
            .and_then(|v| v["cluster_id"].as_str().map(str::to_owned));
        if let Some(cluster) = cluster {
            drop(crate::apps::DockerCleanup { cluster });
        }
    }
}

/// libfaketime's preload library (Debian's `faketime` package).
fn faketime_library() -> Result<String> {
    const PATHS: [&str; 2] =
        ["/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1", "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1"];
    PATHS
        .iter()
        .find(|p| Path::new(p).exists())
        .map(|p| p.to_string())
        .context("libfaketime is not installed: `apt-get install faketime` (scripts/install-deps does)")
}

/// What a CLI command printed.
#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `roost ARGS` with `ROOST_ENDPOINT` / `ROOST_TOKEN` set as given.
pub async fn roost(args: &[&str], endpoint: Option<&str>, token: Option<&str>) -> Result<Output> {
    let mut command = tokio::process::Command::new(roost_bin()?);
    command.args(args).env_remove("ROOST_ENDPOINT").env_remove("ROOST_TOKEN").stdin(Stdio::null());
    if let Some(endpoint) = endpoint {
        command.env("ROOST_ENDPOINT", endpoint);
    }
    if let Some(token) = token {
        command.env("ROOST_TOKEN", token);
    }
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .with_context(|| format!("roost {args:?} did not finish within 60s"))??;
    Ok(Output {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// Waits until `roost node list` through `endpoint` succeeds and `check`
/// accepts its JSON.
pub async fn wait_for_nodes(
    endpoint: &str,
    token: &str,
    timeout: Duration,
    what: &str,
    check: impl Fn(&[serde_json::Value]) -> bool,
) -> Result<()> {
    wait_until(what, timeout, || async {
        let out = roost(&["node", "list", "--json"], Some(endpoint), Some(token)).await?;
        if out.code != 0 {
            bail!("node list exited {}: {}", out.code, out.stderr.trim());
        }
        let nodes: Vec<serde_json::Value> = serde_json::from_str(&out.stdout)?;
        Ok(check(&nodes))
    })
    .await
}
