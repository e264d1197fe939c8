//! A cluster of machines on this one: each node in a container of its own,
//! with its own Docker engine, its own network namespace and its own
//! address on a Docker network the test creates. The built `roost` binary is
//! mounted in and run as a user would, one process per node.
//!
//! Each node container runs `dockerd` as its first process, from an "image"
//! that is this machine's `/usr` (see `../shared/notes/environment.md`):
//! whatever is installed here (iptables, wireguard-go, dig, curl, iperf3)
//! is there too. Everything the topology creates is removed when it is
//! dropped, pass or fail.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::process::roost_bin;
use crate::wait_until;

/// Runs `docker ARGS`; the error carries what it printed.
pub fn docker(args: &[&str]) -> Result<String> {
    let out = Command::new("docker").args(args).output().context("running docker")?;
    if !out.status.success() {
        bail!("docker {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// One node's container.
#[derive(Clone, Debug)]
pub struct Machine {
    /// The container's name.
    pub name: String,
    /// Its address on the topology's network.
    pub ip: String,
}

/// The node containers, their network and the host image.
#[derive(Debug)]
pub struct Topology {
    pub machines: Vec<Machine>,
    /// The Docker network joining them.
    pub network: String,
    /// Its subnet (a /24) and the host's address on it.
    pub subnet: String,
    pub gateway: String,
    image: String,
    /// Addresses handed out on the network so far (for moves).
    next_ip: u8,
}

impl Drop for Topology {
    fn drop(&mut self) {
        for machine in &self.machines {
            let _ = Command::new("docker").args(["rm", "-f", "-v", &machine.name]).output();
            let _ = Command::new("docker").args(["volume", "rm", "-f", &format!("{}-docker", machine.name)]).output();
        }
        let _ = Command::new("docker").args(["network", "rm", &self.network]).output();
        let _ = Command::new("docker").args(["rmi", "-f", &self.image]).output();
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

/// A /24 in 172.28.0.0/14 that no Docker network here overlaps and that this
/// process has not handed out before: topologies of one test binary start
/// side by side, and two of them must not pick the same slot before either
/// has created its network.
fn free_subnet() -> Result<(String, String)> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const SLOTS: u32 = 1024;
    let taken = crate::docker_subnets();
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..SLOTS {
        let slot = start.wrapping_add(NEXT.fetch_add(1, Ordering::SeqCst)) % SLOTS;
        let base = u32::from(Ipv4Addr::new(172, 28, 0, 0)) + slot * 256;
        let net = ipnet::Ipv4Net::new(Ipv4Addr::from(base), 24)?;
        if !taken.iter().any(|t| t.contains(&net.network()) || net.contains(&t.network())) {
            return Ok((net.to_string(), Ipv4Addr::from(base + 1).to_string()));
        }
    }
    bail!("no free /24 in 172.28.0.0/14 for the test network")
}

/// Creates the topology's network on a free /24; another process may take the
/// same /24 between the look and the create, so an overlap tries the next.
fn create_network(name: &str) -> Result<(String, String)> {
    let mut attempts = 0;
    loop {
        let (subnet, gateway) = free_subnet()?;
        match docker(&["network", "create", "--subnet", &subnet, name]) {
            Ok(_) => return Ok((subnet, gateway)),
            Err(e) if attempts < 8 && e.to_string().contains("Pool overlaps") => attempts += 1,
            Err(e) => return Err(e),
        }
    }
}

impl Topology {
    /// Starts `count` machines named `<prefix>-n1`… and waits for their engines.
    pub async fn start(prefix: &str, count: usize) -> Result<Topology> {
        crate::apps::require_docker()?;
        let roost = roost_bin()?;
        let image = format!("roost-it-host:{prefix}");
        let network = format!("{prefix}-net");
        host_image(&image)?;
        let (subnet, gateway) = create_network(&network).inspect_err(|_| {
            let _ = docker(&["rmi", "-f", &image]);
        })?;
        let mut topology = Topology { machines: Vec::new(), network, subnet, gateway, image, next_ip: 10 };
        for i in 1..=count {
            let name = format!("{prefix}-n{i}");
            let ip = topology.next_address()?;
            start_machine(&name, &topology.image, &topology.network, &ip, &roost)?;
            topology.machines.push(Machine { name, ip });
        }
        for machine in &topology.machines {
            wait_until(&format!("the engine in {}", machine.name), Duration::from_secs(60), || async {
                Ok(docker(&["exec", &machine.name, "docker", "version"]).is_ok())
            })
            .await?;
        }
        Ok(topology)
    }

    fn next_address(&mut self) -> Result<String> {
        let base: Ipv4Addr = self.gateway.parse()?;
        let ip = Ipv4Addr::from(u32::from(base) - 1 + u32::from(self.next_ip));
        self.next_ip += 1;
        Ok(ip.to_string())
    }

    pub fn machine(&self, index: usize) -> &Machine {
        &self.machines[index]
    }

    /// Runs a command in machine `index` and returns its output.
    pub fn exec(&self, index: usize, command: &str) -> Result<String> {
        docker(&["exec", &self.machines[index].name, "sh", "-c", command])
    }

    /// Starts `roost ARGS` in the background in machine `index`, its output
    /// appended to /data/node.log there.
    pub fn spawn_roost(&self, index: usize, args: &str) -> Result<()> {
        let command = format!("ROOST_LOG=info,openraft=error,boringtun=warn /roost {args} >>/data/node.log 2>&1");
        docker(&["exec", "-d", &self.machines[index].name, "sh", "-c", &command]).map(drop)
    }

    /// `roost node init` in machine `index`, on its address, port 7000.
    pub fn init(&self, index: usize, extra: &str) -> Result<()> {
        let machine = &self.machines[index];
        let name = node_name(index);
        self.spawn_roost(
            index,
            &format!("node init --data-dir /data/node --listen {}:7000 --name {name} {extra}", machine.ip),
        )
    }

    /// `roost node join` in machine `index` through the first machine.
    pub fn join(&self, index: usize, token: &str, extra: &str) -> Result<()> {
        let machine = &self.machines[index];
        let name = node_name(index);
        let seed = self.endpoint(0);
        self.spawn_roost(
            index,
            &format!(
                "node join {seed} --token {token} --data-dir /data/node --listen {}:7000 --name {name} {extra}",
                machine.ip
            ),
        )
    }

    /// HOST:PORT of the node in machine `index`.
    pub fn endpoint(&self, index: usize) -> String {
        format!("{}:7000", self.machines[index].ip)
    }

    /// SIGKILL to the node in machine `index`, and `docker kill` of every
    /// container its engine runs: the machine is as good as dead.
    pub fn kill_machine(&self, index: usize) -> Result<()> {
        self.exec(index, "pkill -KILL -x roost; docker ps -q | xargs -r docker kill >/dev/null; true").map(drop)
    }

    /// The whole of machine `index` dies at once, as a server that loses
    /// power: `docker kill` of its container takes the node process, its
    /// engine and every container in it.
    pub fn crash_machine(&self, index: usize) -> Result<()> {
        docker(&["kill", &self.machines[index].name]).map(drop)
    }

    /// Loads a `docker save` tar (a path on this machine) into the engine of
    /// machine `index`.
    pub fn load_image(&self, index: usize, tar: &Path) -> Result<()> {
        let file = std::fs::File::open(tar).with_context(|| format!("open {}", tar.display()))?;
        let output = Command::new("docker")
            .args(["exec", "-i", &self.machines[index].name, "docker", "load", "-q"])
            .stdin(file)
            .output()?;
        if !output.status.success() {
            bail!("docker load in {}: {}", self.machines[index].name, String::from_utf8_lossy(&output.stderr));
        }
        Ok(())
    }

    /// SIGTERM to the node in machine `index`; waits until it has exited.
    pub async fn stop_roost(&self, index: usize) -> Result<()> {
        self.exec(index, "pkill -TERM -x roost || true")?;
        wait_until(&format!("roost in {} to exit", self.machines[index].name), Duration::from_secs(30), || async {
            Ok(self.exec(index, "pgrep -x roost || echo gone")?.contains("gone"))
        })
        .await
    }

    /// Writes `content` to `path` in machine `index`.
    pub fn write_file(&self, index: usize, path: &str, content: &str) -> Result<()> {
        use std::io::Write;
        let mut child = Command::new("docker")
            .args(["exec", "-i", &self.machines[index].name, "sh", "-c", &format!("cat > {path}")])
            .stdin(std::process::Stdio::piped())
            .spawn()?;
        child.stdin.take().context("stdin")?.write_all(content.as_bytes())?;
        if !child.wait()?.success() {
            bail!("writing {path} in {} failed", self.machines[index].name);
        }
        Ok(())
    }

    /// The peak and current memory (VmHWM, VmRSS, KiB) of the node process
    /// in machine `index`.
    pub fn roost_memory(&self, index: usize) -> Result<(u64, u64)> {
        let status = self.exec(index, "cat /proc/$(pgrep -x roost | head -1)/status")?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        Ok((field("VmHWM:"), field("VmRSS:")))
    }

    /// What the node in machine `index` logged.
    pub fn log(&self, index: usize) -> String {
        self.exec(index, "cat /data/node.log").unwrap_or_default()
    }

    /// Every node's log, for a failing test's message.
    pub fn logs(&self) -> String {
        (0..self.machines.len()).map(|i| format!("--- {} ---\n{}\n", self.machines[i].name, self.log(i))).collect()
    }

    /// A file in machine `index`, once it exists and is not empty.
    pub async fn file(&self, index: usize, path: &str) -> Result<String> {
        let content = std::sync::Mutex::new(String::new());
        wait_until(&format!("{path} in {}", self.machines[index].name), Duration::from_secs(30), || {
            let content = &content;
            async move {
                match self.exec(index, &format!("cat {path}")) {
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

    /// Moves machine `index` to a new address on the network, as when a
    /// server's address changes; returns the new address.
    pub fn move_machine(&mut self, index: usize) -> Result<String> {
        let ip = self.next_address()?;
        let name = self.machines[index].name.clone();
        docker(&["network", "disconnect", &self.network, &name])?;
        docker(&["network", "connect", "--ip", &ip, &self.network, &name])?;
        self.machines[index].ip = ip.clone();
        Ok(ip)
    }

    /// The PID (in its machine) of an instance's container, to enter its
    /// network namespace with `nsenter -t PID -n`.
    pub fn instance_pid(&self, index: usize, instance: &str) -> Result<String> {
        self.exec(index, &format!("docker ps -q --filter label=roost.instance={instance} | head -1 | xargs docker inspect -f '{{{{.State.Pid}}}}'"))
    }

    /// Runs `command` inside an instance's network namespace.
    pub fn in_instance(&self, index: usize, instance: &str, command: &str) -> Result<String> {
        let pid = self.instance_pid(index, instance)?;
        self.exec(index, &format!("nsenter -t {pid} -n {command}"))
    }
}

/// The node name the topology gives machine `index`: n1, n2, …
pub fn node_name(index: usize) -> String {
    format!("n{}", index + 1)
}

fn start_machine(name: &str, image: &str, network: &str, ip: &str, roost: &Path) -> Result<()> {
    let volume = format!("{name}-docker:/var/lib/docker");
    let binary = format!("{}:/roost:ro", roost.display());
    docker(&[
        "run",
        "-d",
        "--name",
        name,
        "--hostname",
        name,
        "--network",
        network,
        "--ip",
        ip,
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
        image,
        "/usr/sbin/dockerd",
    ])
    .map(drop)
}
