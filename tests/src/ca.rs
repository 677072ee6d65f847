//! The mesh CA the harness runs (`mesh-agent ca`) and each node's token.

use std::{
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::*;

impl Cluster {
    /// The CA's root directory.
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    /// Node `i`'s CA token file.
    pub fn token_file(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{}.token", self.nodes[i].name))
    }

    /// Starts the CA with certificates of lifetime `ttl` (e.g. `1h`, `4s`) and waits until it
    /// has written its root. Restarting keeps the root (it lives on disk).
    pub fn start_ca(&mut self, ttl: &str) -> Result<()> {
        self.stop_ca();
        let mut cfg = String::from("nodes:\n");
        for (i, n) in self.nodes.iter().enumerate() {
            let token = self.token_file(i);
            if !token.exists() {
                std::fs::write(
                    &token,
                    format!("token-{}-{}-0123456789abcdef\n", self.prefix, n.name),
                )?;
            }
            cfg.push_str(&format!(
                "  - {{name: {}, tokenFile: {}, nodeFile: {}}}\n",
                n.name,
                token.display(),
                n.node_file.display()
            ));
        }
        let cfg_path = self.dir.join("ca.yaml");
        std::fs::write(&cfg_path, cfg)?;
        let child = spawn_logged(
            Command::new("nsenter")
                .arg(format!("--net={}", self.fabric.display()))
                .arg(artifact("mesh-agent")?)
                .args(["ca", "--listen", CA_ADDR, "--cert-ttl", ttl, "--dir"])
                .arg(self.ca_dir())
                .arg("--config")
                .arg(&cfg_path),
            &self.dir.join("ca.log"),
            "CA",
        )?;
        self.ca = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr: SocketAddr = CA_ADDR.parse()?;
        loop {
            let up = in_netns(&self.fabric, || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })?;
            if up && self.ca_dir().join("bundle.pem").exists() {
                return Ok(());
            }
            if let Some(Ok(Some(st))) = self.ca.as_mut().map(Child::try_wait) {
                bail!("CA exited ({st}):\n{}", self.ca_log());
            }
            if Instant::now() > deadline {
                bail!("CA not up after 10 s:\n{}", self.ca_log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the CA (agents keep their certificates until they expire).
    pub fn stop_ca(&mut self) {
        if let Some(mut c) = self.ca.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The CA's log so far.
    pub fn ca_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("ca.log")).unwrap_or_default()
    }
}
