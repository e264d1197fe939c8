//! Two nodes, each in its own container with its own Docker engine: the image
//! built on one node reaches the other only through Roost's node-to-node
//! transfer (`Agent.PullImage`: docker save, streamed over mutual TLS, docker
//! load). This is the case a real cluster has on every deploy, which the
//! single-engine tests cannot show.
//!
//! Each node container runs `dockerd` as its first process, from an "image"
//! that is this machine's `/usr` (see `../shared/notes/environment.md`), and
//! the built `roost` binary is mounted in. Everything the test creates is
//! removed at the end, pass or fail.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use roost_tests::apps::{cli, hello_app, hello_toml, require_docker};
use roost_tests::process::roost_bin;
use roost_tests::wait_until;
use serde_json::Value;

fn docker(args: &[&str]) -> Result<String> {
    let out = Command::new("docker").args(args).output().context("running docker")?;
    if !out.status.success() {
        bail!("docker {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Removes the node containers, their engines' volumes and the host image.
struct Nodes {
    tag: String,
    names: Vec<String>,
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("docker").args(["rm", "-f", "-v", name]).output();
            let _ = Command::new("docker").args(["volume", "rm", "-f", &format!("{name}-docker")]).output();
        }
        let _ = Command::new("docker").args(["rmi", "-f", &self.tag]).output();
    }
}

/// An image whose filesystem is this machine's /usr (mounted at run time).
fn host_image(tag: &str) -> Result<()> {
    let root = tempfile::tempdir()?;
    for dir in ["etc", "var", "run", "tmp", "proc", "sys", "dev", "data"] {
        std::fs::create_dir_all(root.path().join(dir))?;
    }
    for link in ["bin", "lib", "lib64", "sbin"] {
        std::os::unix::fs::symlink(format!("usr/{link}"), root.path().join(link))?;
    }
    std::fs::copy("/etc/passwd", root.path().join("etc/passwd"))?;
    std::fs::copy("/etc/group", root.path().join("etc/group"))?;
    let tar = Command::new("tar").arg("-C").arg(root.path()).args(["-c", "."]).output()?;
    let mut import = Command::new("docker")
        .args(["import", "-", tag])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    use std::io::Write;
    import.stdin.take().context("stdin")?.write_all(&tar.stdout)?;
    if !import.wait()?.success() {
        bail!("docker import failed");
    }
    Ok(())
}

fn start_node_container(name: &str, tag: &str, roost: &Path) -> Result<String> {
    let volume = format!("{name}-docker:/var/lib/docker");
    let binary = format!("{}:/roost:ro", roost.display());
    docker(&[
        "run",
        "-d",
        "--name",
        name,
        "--hostname",
        name,
        "--cap-add",
        "ALL",
        "--cap-drop",
        "SYS_RESOURCE",
        "--security-opt",
        "seccomp=unconfined",
        "--security-opt",
        "apparmor=unconfined",
        "--security-opt",
        "systempaths=unconfined",
        "--cgroupns",
        "host",
        "--device-cgroup-rule",
        "a *:* rwm",
        "--device",
        "/dev/net/tun",
        "-v",
        "/usr:/usr:ro",
        "-v",
        "/etc/alternatives:/etc/alternatives:ro",
        "-v",
        "/sys/fs/cgroup:/sys/fs/cgroup:rw",
        "-v",
        &volume,
        "-v",
        &binary,
        "--tmpfs",
        "/run",
        "--tmpfs",
        "/tmp",
        tag,
        "/usr/sbin/dockerd",
    ])?;
    docker(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", name])
}

async fn file_in(container: &str, path: &str) -> Result<String> {
    let content = std::sync::Mutex::new(String::new());
    wait_until(&format!("{path} in {container}"), Duration::from_secs(30), || {
        let content = &content;
        async move {
            match docker(&["exec", container, "cat", path]) {
                Ok(text) if !text.is_empty() => {
                    *content.lock().unwrap_or_else(|p| p.into_inner()) = text;
                    Ok(true)
                }
                _ => Ok(false),
            }
        }
    })
    .await?;
    Ok(content.into_inner().unwrap_or_else(|p| p.into_inner()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_image_built_on_one_engine_runs_on_another() -> Result<()> {
    require_docker()?;
    let roost = roost_bin()?;
    let id = std::process::id();
    let tag = format!("roost-it-host:{id}");
    let names = vec![format!("roost-it-{id}-n1"), format!("roost-it-{id}-n2")];
    let nodes = Nodes { tag: tag.clone(), names: names.clone() };
    host_image(&tag)?;
    let mut ips = Vec::new();
    for name in &nodes.names {
        ips.push(start_node_container(name, &tag, &roost)?);
    }
    for name in &nodes.names {
        wait_until(&format!("the engine in {name}"), Duration::from_secs(60), || async {
            Ok(docker(&["exec", name, "docker", "version"]).is_ok())
        })
        .await?;
    }
    let (n1, n2) = (&names[0], &names[1]);
    let seed = format!("{}:7000", ips[0]);
    docker(&[
        "exec",
        "-d",
        n1,
        "sh",
        "-c",
        &format!("/roost node init --data-dir /data/node --listen {seed} --name n1 >/data/node.log 2>&1"),
    ])?;
    let admin = file_in(n1, "/data/node/admin.token").await?;
    let join = file_in(n1, "/data/node/join.token").await?;
    docker(&[
        "exec", "-d", n2, "sh", "-c",
        &format!(
            "/roost node join {seed} --token {join} --data-dir /data/node --listen {}:7000 --name n2 >/data/node.log 2>&1",
            ips[1]
        ),
    ])?;
    wait_until("two nodes up", Duration::from_secs(60), || async {
        let list = cli(&seed, &admin, &["node", "list", "--json"]).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let nodes: Value = serde_json::from_str(&list)?;
        Ok(nodes.as_array().is_some_and(|l| l.len() == 2 && l.iter().all(|n| n["state"] == "up")))
    })
    .await?;

    // Built on n1 (the node the CLI talks to); n2 must fetch it from n1.
    let app = hello_app(&hello_toml("far", "[placement]\nmax_per_node = 1\n"))?;
    let path = app.path().to_string_lossy().into_owned();
    let result = async {
        cli(&seed, &admin, &["deploy", &path]).await?;
        cli(&seed, &admin, &["scale", "count", "2", "-a", "far"]).await
    }
    .await;
    let logs = |name: &str| docker(&["exec", name, "cat", "/data/node.log"]).unwrap_or_default();
    if let Err(error) = result {
        bail!("{error}\n--- n1 ---\n{}\n--- n2 ---\n{}", logs(n1), logs(n2));
    }
    // `scale` returns once both run; the checks follow.
    wait_until("the instance on n2 running and passing", Duration::from_secs(30), || async {
        let status: Value = serde_json::from_str(&cli(&seed, &admin, &["status", "-a", "far", "--json"]).await?)?;
        Ok(status["instances"].as_array().is_some_and(|l| {
            l.iter().any(|i| i["node"] == "n2" && i["state"] == "running" && i["health"] == "passing")
        }))
    })
    .await?;
    assert!(logs(n2).contains("image fetched"), "{}", logs(n2));

    // An image only this machine's engine has: the CLI uploads it to n1.
    let image = format!("roost-it-upload:{id}");
    docker(&["build", "-q", "-t", &image, &path])?;
    let uploaded = async {
        let printed = cli(&seed, &admin, &["deploy", &path, "-a", "up", "--image", &image]).await;
        let _ = docker(&["rmi", "-f", &image]);
        printed
    }
    .await;
    let printed = match uploaded {
        Ok(printed) => printed,
        Err(error) => bail!("{error}\n--- n1 ---\n{}", logs(n1)),
    };
    assert!(printed.contains("Uploading image") && printed.contains("v1 is live"), "{printed}");
    drop(nodes);
    Ok(())
}
