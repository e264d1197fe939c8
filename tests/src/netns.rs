//! Nodes on this machine with networks of their own, for partitions made
//! of real dropped packets.
//!
//! Each node gets a network namespace with one address on a /24. The
//! namespaces meet at a bridge that lives in a namespace of its own too
//! (so the engine's `FORWARD` policy and filter rules on this machine
//! never see their packets), and this process reaches every node through a
//! veth to that bridge. A partition is a packet filter in the nodes'
//! namespaces: a node drops whatever arrives from the nodes it is cut off
//! from. Established connections stall as they would on a real network;
//! nothing in Roost knows it is being tested. This process (the clients of
//! a test) is never cut off.
//!
//! Everything is removed when the [`Network`] is dropped, pass or fail.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

/// Runs a command; the error carries what it printed.
fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub struct Network {
    /// Prefix of every name this network made.
    id: String,
    /// The /24 is 10.126.<subnet>.0.
    subnet: u8,
    nodes: usize,
}

impl Network {
    /// Namespaces for `nodes` nodes (at most 200), joined by a bridge.
    pub fn create(nodes: usize) -> Result<Network> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        if nodes == 0 || nodes > 200 {
            bail!("a test network holds 1 to 200 nodes, not {nodes}");
        }
        let taken = run("ip", &["-4", "-o", "addr", "show"])?;
        let start = std::process::id().wrapping_mul(7919);
        let (id, subnet) = (0..256)
            .map(|n| {
                let slot = start.wrapping_add(NEXT.fetch_add(1, Ordering::SeqCst)).wrapping_add(n);
                (format!("rq{:05x}", slot & 0xfffff), (slot % 256) as u8)
            })
            .find(|(_, subnet)| !taken.contains(&format!(" 10.126.{subnet}.")))
            .context("every 10.126.x.0/24 is in use on this machine")?;
        let network = Network { id, subnet, nodes };
        network.build().with_context(|| format!("building test network {}", network.id))?;
        Ok(network)
    }

    fn build(&self) -> Result<()> {
        let hub = self.hub();
        run("ip", &["netns", "add", &hub])?;
        run("ip", &["-n", &hub, "link", "set", "lo", "up"])?;
        run("ip", &["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", &hub, "link", "set", "br0", "up"])?;
        for node in 0..self.nodes {
            let namespace = self.namespace(node);
            let port = format!("p{node}");
            run("ip", &["netns", "add", &namespace])?;
            run("ip", &["link", "add", "eth0", "netns", &namespace, "type", "veth", "peer", &port, "netns", &hub])?;
            run("ip", &["-n", &hub, "link", "set", &port, "master", "br0", "up"])?;
            run("ip", &["-n", &namespace, "addr", "add", &format!("{}/24", self.ip(node)), "dev", "eth0"])?;
            run("ip", &["-n", &namespace, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", &namespace, "link", "set", "lo", "up"])?;
        }
        let host = self.host_link();
        run("ip", &["link", "add", &host, "type", "veth", "peer", "host", "netns", &hub])?;
        run("ip", &["-n", &hub, "link", "set", "host", "master", "br0", "up"])?;
        run("ip", &["addr", "add", &format!("10.126.{}.254/24", self.subnet), "dev", &host])?;
        run("ip", &["link", "set", &host, "up"])?;
        Ok(())
    }

    fn hub(&self) -> String {
        format!("{}-hub", self.id)
    }

    fn host_link(&self) -> String {
        format!("{}h", self.id)
    }

    /// The namespace of node `index`.
    pub fn namespace(&self, index: usize) -> String {
        format!("{}-n{index}", self.id)
    }

    /// The address of node `index`.
    pub fn ip(&self, index: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 126, self.subnet, index as u8 + 1)
    }

    /// Cuts the network into `groups`: each node drops packets from every
    /// node outside its own group. Nodes in no group are cut off from all.
    pub fn partition(&self, groups: &[Vec<usize>]) -> Result<()> {
        let group_of = |n: usize| groups.iter().position(|g| g.contains(&n));
        let mut cuts = Vec::new();
        for a in 0..self.nodes {
            for b in (a + 1)..self.nodes {
                if group_of(a).is_none() || group_of(a) != group_of(b) {
                    cuts.push((a, b));
                }
            }
        }
        self.cut(&cuts)
    }

    /// Cuts each pair off from each other, in both directions; every other
    /// path stays (a node linked to both sides of a cut is a bridge).
    pub fn cut(&self, pairs: &[(usize, usize)]) -> Result<()> {
        for (a, b) in pairs {
            for (from, to) in [(a, b), (b, a)] {
                let source = self.ip(*from).to_string();
                let namespace = self.namespace(*to);
                let rule = ["-w", "-A", "INPUT", "-s", &source, "-j", "DROP"];
                run("ip", &[&["netns", "exec", &namespace, "iptables"][..], &rule[..]].concat())?;
            }
        }
        Ok(())
    }

    /// Removes every cut (in every namespace, even if one fails).
    pub fn heal(&self) -> Result<()> {
        let mut failed = None;
        for node in 0..self.nodes {
            if let Err(error) = run("ip", &["netns", "exec", &self.namespace(node), "iptables", "-w", "-F", "INPUT"]) {
                failed = Some(error);
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = run("ip", &["link", "del", &self.host_link()]);
        for node in 0..self.nodes {
            let _ = run("ip", &["netns", "del", &self.namespace(node)]);
        }
        let _ = run("ip", &["netns", "del", &self.hub()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `from`'s namespace reaches `to` on a TCP port `to` listens on.
    fn reaches(network: &Network, from: usize, to: usize, port: u16) -> bool {
        let script = format!("timeout 1 bash -c '</dev/tcp/{}/{port}'", network.ip(to));
        Command::new("ip")
            .args(["netns", "exec", &network.namespace(from), "bash", "-c", &script])
            .status()
            .is_ok_and(|s| s.success())
    }

    #[test]
    fn a_cut_drops_packets_between_its_pair_alone_and_heal_restores_them() -> Result<()> {
        let network = Network::create(3)?;
        let port = 7345;
        let mut listeners = Vec::new();
        for node in 0..3 {
            let address = format!("{}:{port}", network.ip(node));
            let namespace = network.namespace(node);
            // A listener inside each namespace (bash cannot listen; python can).
            let script = format!(
                "import socket,time\ns=socket.socket()\ns.bind(('{}',{port}))\ns.listen(64)\ntime.sleep(60)",
                network.ip(node)
            );
            let child = Command::new("ip").args(["netns", "exec", &namespace, "python3", "-c", &script]).spawn()?;
            listeners.push(child);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while std::net::TcpStream::connect(&address).is_err() {
                if std::time::Instant::now() > deadline {
                    bail!("the listener in {namespace} did not start");
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        assert!(reaches(&network, 0, 1, port) && reaches(&network, 1, 2, port) && reaches(&network, 0, 2, port));
        // Node 2 bridges a cut between 0 and 1.
        network.cut(&[(0, 1)])?;
        assert!(!reaches(&network, 0, 1, port), "0 still reaches 1 across the cut");
        assert!(!reaches(&network, 1, 0, port), "1 still reaches 0 across the cut");
        assert!(reaches(&network, 0, 2, port) && reaches(&network, 1, 2, port) && reaches(&network, 2, 0, port));
        network.heal()?;
        assert!(reaches(&network, 0, 1, port), "0 does not reach 1 after heal");
        // This process reaches every node whatever the cuts.
        network.partition(&[vec![0], vec![1, 2]])?;
        assert!(!reaches(&network, 0, 2, port) && reaches(&network, 1, 2, port));
        for node in 0..3 {
            let address = format!("{}:{port}", network.ip(node));
            assert!(std::net::TcpStream::connect(&address).is_ok(), "this process lost {address}");
        }
        for mut child in listeners {
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(())
    }
}
