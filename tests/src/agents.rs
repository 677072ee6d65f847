//! Starting, stopping and asking the agents: admin endpoint, CLI, logs, metrics.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::*;

impl Cluster {
    /// Runs `mesh-agent <args>` in node `i`'s namespace (where its admin endpoint listens) and
    /// returns its stdout; fails with its stderr if it fails.
    pub fn agent_cli(&self, i: usize, args: &[&str]) -> Result<String> {
        let agent = artifact("mesh-agent")?;
        let mut all = vec![agent.to_str().context("agent path")?];
        all.extend(args);
        self.node_exec(i, &all)
    }

    /// Runs a command in node `i`'s namespace and returns its stdout; fails with its stderr if
    /// it fails.
    pub fn node_exec(&self, i: usize, args: &[&str]) -> Result<String> {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.nodes[i].netns.display()))
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "{args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts node `i`'s agent and waits until it reports ready.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        self.start_agent_with(i, &[])?;
        self.wait_ready(i, Duration::from_secs(15))
    }

    /// Starts node `i`'s agent with extra flags, without waiting. Unless `extra` chooses the
    /// embedded CA (`--ca-dir`), the agent uses the harness's CA, which is started (1 h
    /// certificates) if it never was (a test that stopped it keeps it stopped).
    pub fn start_agent_with(&mut self, i: usize, extra: &[&str]) -> Result<()> {
        self.spawn_agent(i, &artifact("mesh-ebpf.o")?, extra)
    }

    /// Upgrades node `i`'s agent as the DaemonSet's rollout does: a new agent with `object`
    /// starts beside the running one and takes over its sockets; the old one drains (see
    /// [`Cluster::wait_retired`]). Waits until the new one is ready.
    pub fn upgrade_agent(&mut self, i: usize, object: &Path, extra: &[&str]) -> Result<()> {
        let old = self.nodes[i].agent.take().context("no agent to upgrade")?;
        self.nodes[i].retiring.push(old);
        self.spawn_agent(i, object, extra)?;
        let pid = self.agent_pid(i).context("the new agent's pid")?;
        // Both answer on the shared admin socket until the new one serves; then only it does.
        // So `/ready` alone may be the old agent's answer: wait for the new one to say it is
        // ready itself.
        wait_until("the new agent to serve", Duration::from_secs(30), || {
            Ok(self.any_stats(i).ok().is_some_and(|s| {
                s["pid"].as_u64() == Some(u64::from(pid)) && s["not_ready"].is_null()
            }))
        })
        .with_context(|| self.agent_log(i))
    }

    /// Waits for the oldest retiring agent of node `i` to exit; returns its status and how long
    /// the wait took.
    pub fn wait_retired(
        &mut self,
        i: usize,
        timeout: Duration,
    ) -> Result<(std::process::ExitStatus, Duration)> {
        let start = Instant::now();
        anyhow::ensure!(!self.nodes[i].retiring.is_empty(), "no retiring agent");
        loop {
            if let Some(st) = self.nodes[i].retiring[0].try_wait()? {
                // Exited (try_wait reaped it); the handle is done with.
                let _ = self.nodes[i].retiring.remove(0).wait();
                return Ok((st, start.elapsed()));
            }
            if start.elapsed() > timeout {
                bail!(
                    "the retired agent of node {i} still runs after {timeout:?}:\n{}",
                    self.agent_log(i)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether node `i`'s oldest retiring agent still runs.
    pub fn retired_running(&mut self, i: usize) -> Result<bool> {
        let c = self.nodes[i]
            .retiring
            .first_mut()
            .context("no retiring agent")?;
        Ok(c.try_wait()?.is_none())
    }

    /// Stops node `i`'s oldest retiring agent as the kubelet does (SIGTERM) and waits up to 10 s
    /// for it.
    pub fn stop_retired(&mut self, i: usize) -> Result<std::process::ExitStatus> {
        let c = self.nodes[i]
            .retiring
            .first()
            .context("no retiring agent")?;
        let pid = i32::try_from(c.id())?;
        // SAFETY: a signal to a child this harness started and has not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        Ok(self.wait_retired(i, Duration::from_secs(10))?.0)
    }

    /// The handover socket of node `i`'s agents.
    pub fn handover_socket(&self, i: usize) -> std::path::PathBuf {
        self.dir()
            .join(format!("{}-handover.sock", self.nodes[i].name))
    }

    fn spawn_agent(&mut self, i: usize, object: &Path, extra: &[&str]) -> Result<()> {
        // Kubernetes mode: state from the API server, certificates from the CA Deployment.
        let kube = match &self.kube {
            Some(_) => {
                if !self.kube_bundle_file().exists() {
                    self.start_kube_ca("1h")?;
                }
                Some(self.kube_agent_args(i)?)
            }
            None => None,
        };
        let embedded = extra.contains(&"--ca-dir") || kube.is_some();
        if !embedded && !self.ca_dir().join("bundle.pem").exists() {
            self.start_ca("1h")?;
        }
        let agent = artifact("mesh-agent")?;
        let handover = self.handover_socket(i);
        let token = self.token_file(i);
        let bundle = self.ca_dir().join("bundle.pem");
        // Its own cgroup, as a DaemonSet pod has: the loopback bypass watches the agent's cgroup.
        let cgroup = self
            .cgroup_dir
            .join(format!("agent-{}", self.nodes[i].name));
        std::fs::create_dir_all(&cgroup).with_context(|| format!("create {}", cgroup.display()))?;
        let node = &mut self.nodes[i];
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", node.netns.display()));
        if kube.is_some() {
            // As the DaemonSet runs it: no capability beyond the install's list.
            cmd.arg("setpriv")
                .arg("--inh-caps=-all")
                .arg(format!("--bounding-set=-all,{}", agent_capabilities()))
                .arg("--");
        }
        let cmd = cmd
            .arg(&agent)
            .arg("run")
            .args(match &kube {
                Some(args) => args.clone(),
                None => vec![
                    "--node-file".into(),
                    node.node_file.clone().into_os_string(),
                ],
            })
            .arg("--pin-name")
            .arg(&node.pin_name)
            .arg("--bpf-object")
            .arg(object)
            .arg("--handover-socket")
            .arg(&handover)
            .arg("--poll-interval-ms")
            .arg("200")
            .arg("--cgroup")
            .arg(&cgroup)
            .args(if kube.is_some() {
                // The kubelet root (the default with --kubernetes).
                vec![]
            } else {
                vec![
                    "--pod-cgroup-root".into(),
                    self.cgroup_dir.clone().into_os_string(),
                ]
            })
            .args(if embedded {
                vec![]
            } else {
                vec![
                    "--ca-addr".into(),
                    CA_ADDR.into(),
                    "--ca-token-file".into(),
                    token.into_os_string(),
                    "--ca-bundle".into(),
                    bundle.into_os_string(),
                ]
            })
            .args(extra);
        let child = spawn_logged(cmd, &node.log, "agent")?;
        node.agent = Some(child);
        Ok(())
    }

    /// Polls node `i`'s `/ready` until 200, or fails with the agent's log.
    pub fn wait_ready(&mut self, i: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + crate::sys::scaled(timeout);
        loop {
            if let Ok((200, _)) = self.agent_get(i, "/ready") {
                return Ok(());
            }
            if let Some(c) = self.nodes[i].agent.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!(
                    "agent on {} exited ({status}):\n{}",
                    self.nodes[i].name,
                    self.agent_log(i)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent on {} not ready after {timeout:?}:\n{}",
                    self.nodes[i].name,
                    self.agent_log(i)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops node `i`'s agent as the kubelet does (SIGTERM) and waits for it to exit.
    pub fn stop_agent(&mut self, i: usize) -> Result<std::process::ExitStatus> {
        let mut c = self.nodes[i]
            .agent
            .take()
            .context("the agent is not running")?;
        let pid = i32::try_from(c.id())?;
        // SAFETY: a signal to a child this harness started and has not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = c.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                bail!("the agent on node {i} ignored SIGTERM for 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs node `i`'s agent, and any it replaced that still drain (a crash: no cleanup
    /// runs).
    pub fn kill_agent(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        for mut c in node.agent.take().into_iter().chain(node.retiring.drain(..)) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// GET on node `i`'s admin endpoint.
    pub fn agent_get(&self, i: usize, path: &str) -> Result<(u16, String)> {
        let addr: SocketAddr = ([127, 0, 0, 1], 15000).into();
        in_netns(&self.nodes[i].netns, || http_get(addr, path))?
    }

    /// Node `i`'s `/metrics`, parsed by the Prometheus project's own Python parser
    /// (`prometheus_client`, the Debian package `cargo xtask setup` installs), so a format
    /// error fails the test. Returns every sample.
    pub fn scrape(&self, i: usize) -> Result<Vec<Sample>> {
        let addr: SocketAddr = ([127, 0, 0, 1], 15020).into();
        let (code, text) = in_netns(&self.nodes[i].netns, || http_get(addr, "/metrics"))??;
        if code != 200 {
            bail!("/metrics answered {code}: {text}");
        }
        parse_metrics(&text)
    }

    /// Sets node `i`'s log filter with `POST /logging?level=<filter>` (curl in the node's
    /// network, as an operator would); returns what it printed, ending in the HTTP status.
    pub fn set_log_filter(&self, i: usize, filter: &str) -> Result<String> {
        self.node_exec(
            i,
            &[
                "curl",
                "-s",
                "-X",
                "POST",
                "-w",
                " %{http_code}",
                &format!("http://127.0.0.1:15000/logging?level={filter}"),
            ],
        )
    }

    /// Node `i`'s `/stats`, parsed.
    /// Node `i`'s current agent's `/stats`. Right after an upgrade the replaced agent may
    /// still answer on the shared admin socket for a moment, until it has stopped accepting:
    /// such answers are skipped.
    pub fn stats(&self, i: usize) -> Result<serde_json::Value> {
        let Some(pid) = self.agent_pid(i) else {
            return self.any_stats(i);
        };
        let deadline = Instant::now() + crate::sys::scaled(Duration::from_secs(10));
        loop {
            let stats = self.any_stats(i)?;
            if stats["pid"].as_u64() == Some(u64::from(pid)) {
                return Ok(stats);
            }
            if Instant::now() > deadline {
                bail!(
                    "/stats of node {i} still answered by pid {} (a replaced agent), not {pid}",
                    stats["pid"]
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `/stats` from whichever agent of node `i` answers.
    pub fn any_stats(&self, i: usize) -> Result<serde_json::Value> {
        let (code, body) = self.agent_get(i, "/stats")?;
        if code != 200 {
            bail!("/stats answered {code}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// Node `i`'s agent's anonymous resident memory in kB ([`crate::proc_rss_anon`]).
    pub fn agent_anon_kb(&self, i: usize) -> Result<u64> {
        let pid = self.agent_pid(i).context("the agent is not running")?;
        crate::sys::proc_rss_anon(pid)
            .map(|bytes| bytes / 1024)
            .with_context(|| format!("RssAnon of pid {pid}"))
    }

    /// Node `i`'s agent's resident memory in kB, from /proc/<pid>/status.
    pub fn agent_rss_kb(&self, i: usize) -> Result<u64> {
        let pid = self.agent_pid(i).context("the agent is not running")?;
        proc_rss(pid)
            .map(|bytes| bytes / 1024)
            .with_context(|| format!("VmRSS of pid {pid}"))
    }

    /// Starts `mesh-testapp hold --half-head` in `pod`: `count` connections to `target`, each
    /// holding half a request head. Returns the process (close its stdin to release them) and its
    /// output, past the `ready N` line, which is returned too.
    pub fn hold_half_heads(
        &self,
        pod: &str,
        target: &str,
        count: usize,
    ) -> Result<(
        std::process::Child,
        std::io::BufReader<std::process::ChildStdout>,
        String,
    )> {
        let mut hold = self.spawn_testapp(
            pod,
            &[
                "hold",
                "--addr",
                target,
                "--count",
                &count.to_string(),
                "--parallel",
                "16",
                "--half-head",
            ],
        )?;
        let mut out = std::io::BufReader::new(hold.stdout.take().context("hold's stdout")?);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line)?;
        Ok((hold, out, line))
    }

    /// CPU time (user + system, all threads) node `i`'s agent has used so far, from
    /// /proc/<pid>/stat; `None` when it is not running.
    pub fn agent_cpu(&self, i: usize) -> Option<Duration> {
        proc_cpu(self.agent_pid(i)?)
    }

    /// One counter of one pod from node `i`'s `/stats`, e.g. `("client", "kernel.captured_v4")`.
    pub fn counter(&self, i: usize, pod: &str, field: &str) -> Result<u64> {
        let s = self.stats(i)?;
        let mut v = &s["pods"][format!("default/{pod}")];
        for part in field.split('.') {
            v = &v[part];
        }
        v.as_u64()
            .with_context(|| format!("no counter {field} for pod {pod} in {s}"))
    }

    /// Node `i`'s agent log so far.
    pub fn agent_log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// The first line of node `i`'s log that `pred` accepts, waiting up to 5 s for it: the
    /// access log reaches stdout in batches, a few milliseconds after its flow.
    pub fn wait_log_line(
        &self,
        i: usize,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let mut found = None;
        wait_until(what, Duration::from_secs(5), || {
            found = self
                .agent_log(i)
                .lines()
                .find(|l| pred(l))
                .map(str::to_string);
            Ok(found.is_some())
        })
        .with_context(|| format!("node {} log:\n{}", i + 1, self.agent_log(i)))?;
        found.context("found above")
    }
}

/// The install's capability list as setpriv spells it (`+bpf,+net_admin,…`).
fn agent_capabilities() -> String {
    mesh_agent::install::AGENT_CAPABILITIES
        .iter()
        .map(|(c, _)| format!("+{}", c.to_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}
