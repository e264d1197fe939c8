//! A real ACME server for tests: Debian's `pebble`, with
//! `pebble-challtestsrv` as its DNS, on an address of a network the test
//! made (the topology's side on this machine). The test writes pebble's
//! configuration and makes its HTTPS certificate; `add_a` points a name at
//! nodes, so pebble validates HTTP-01 against them. Stopped when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tempfile::TempDir;

use crate::wait_until;

#[derive(Debug)]
pub struct Pebble {
    dir: TempDir,
    host: String,
    children: Vec<Child>,
    /// The ACME directory URL.
    pub directory: String,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Pebble {
    /// Starts challtestsrv and pebble on `host`, validating HTTP-01 on
    /// `http_port` and issuing certificates valid for `validity`.
    pub async fn start(host: &str, http_port: u16, validity: Duration) -> Result<Pebble> {
        for tool in ["pebble", "pebble-challtestsrv"] {
            let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output()?;
            if !found.status.success() {
                bail!("this test needs {tool}: apt-get install pebble");
            }
        }
        let dir = tempfile::Builder::new().prefix("roost-pebble-").tempdir()?;
        // Pebble's own HTTPS: a CA of the test's, and a certificate for `host`.
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::new())?;
        ca_params.distinguished_name.push(DnType::CommonName, "roost test ACME server CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key)?;
        let leaf_key = KeyPair::generate()?;
        let leaf =
            CertificateParams::new(vec![host.to_owned()])?.signed_by(&leaf_key, &Issuer::new(ca_params, ca_key))?;
        std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
        std::fs::write(dir.path().join("cert.pem"), leaf.pem())?;
        std::fs::write(dir.path().join("key.pem"), leaf_key.serialize_pem())?;
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("{host}:14000"),
                "managementListenAddress": format!("{host}:15000"),
                "certificate": dir.path().join("cert.pem"),
                "privateKey": dir.path().join("key.pem"),
                "httpPort": http_port,
                "tlsPort": 5001,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": validity.as_secs(),
            }
        });
        std::fs::write(dir.path().join("pebble.json"), config.to_string())?;
        let log = |name: &str| -> Result<Stdio> { Ok(std::fs::File::create(dir.path().join(name))?.into()) };
        let mut children = Vec::new();
        children.push(
            Command::new("pebble-challtestsrv")
                .args(["-management", &format!("{host}:8055"), "-dns01", &format!("{host}:8053")])
                .args(["-http01", "", "-https01", "", "-tlsalpn01", "", "-defaultIPv4", "", "-defaultIPv6", ""])
                .stdout(log("challtestsrv.log")?)
                .stderr(log("challtestsrv.err")?)
                .spawn()
                .context("starting pebble-challtestsrv")?,
        );
        children.push(
            Command::new("pebble")
                .arg("-config")
                .arg(dir.path().join("pebble.json"))
                .args(["-dnsserver", &format!("{host}:8053")])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .env("PEBBLE_AUTHZREUSE", "0")
                .stdout(log("pebble.log")?)
                .stderr(log("pebble.err")?)
                .spawn()
                .context("starting pebble")?,
        );
        let pebble = Pebble { dir, host: host.to_owned(), children, directory: format!("https://{host}:14000/dir") };
        wait_until("pebble to answer", Duration::from_secs(20), || async {
            Ok(pebble.curl(&["-sf", &pebble.directory]).is_ok())
        })
        .await?;
        Ok(pebble)
    }

    /// The CA that signed pebble's own HTTPS certificate (for `--acme-ca`).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn curl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("curl").arg("--cacert").arg(self.ca_path()).args(args).output()?;
        if !out.status.success() {
            bail!("curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Makes `name` resolve to `addresses` for pebble's validation.
    pub fn add_a(&self, name: &str, addresses: &[&str]) -> Result<()> {
        let body = serde_json::json!({ "host": name, "addresses": addresses }).to_string();
        let out =
            Command::new("curl").args(["-sf", "-d", &body, &format!("http://{}:8055/add-a", self.host)]).output()?;
        if !out.status.success() {
            bail!("challtestsrv refused add-a: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// The root that pebble's issued certificates chain to (PEM).
    pub fn issuing_root(&self) -> Result<String> {
        self.curl(&["-sf", &format!("https://{}:15000/roots/0", self.host)])
    }

    /// What pebble logged, for a failing test.
    pub fn logs(&self) -> String {
        ["pebble.log", "pebble.err"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}
