//! Running commands and the test app inside pods.

use std::{
    fs::{File, OpenOptions},
    net::TcpStream,
    os::{fd::AsRawFd, unix::process::CommandExt},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::*;

impl Cluster {
    /// How many certificates node `i`'s agent has been issued for `sa` in `default`.
    pub fn issued(&self, i: usize, sa: &str) -> Result<u64> {
        let s = self.stats(i)?;
        s["certificates"][format!("spiffe://cluster.local/ns/default/sa/{sa}")]["issued"]
            .as_u64()
            .with_context(|| format!("no certificate report for {sa}: {s}"))
    }

    /// Starts the rate-limited load generator in `pod` against `target`; returns its output
    /// file, read with [`load_result`]. `reconnect`: a new connection per request; otherwise
    /// two connections held for the whole run (a broken connection then fails the run).
    pub fn load(
        &self,
        pod: &str,
        target: std::net::SocketAddr,
        rate: u64,
        seconds: u64,
        reconnect: bool,
    ) -> Result<std::path::PathBuf> {
        self.load_on(pod, target, (rate, seconds), reconnect, 2)
    }

    /// [`Cluster::load`] with `connections` workers (each a connection, or a series of them
    /// with `reconnect`).
    pub fn load_on(
        &self,
        pod: &str,
        target: std::net::SocketAddr,
        (rate, seconds): (u64, u64),
        reconnect: bool,
        connections: u64,
    ) -> Result<std::path::PathBuf> {
        let app = artifact("mesh-testapp")?;
        let out = self.dir().join(format!("load-{pod}-{seconds}.json"));
        let cmd = format!(
            "{} load --addr {target} --rate {rate} --seconds {seconds} --connections {connections} {} > {}",
            app.display(),
            if reconnect { "--reconnect" } else { "" },
            out.display()
        );
        self.spawn(pod, &["sh", "-c", &cmd])?;
        Ok(out)
    }

    /// Starts `count` long-lived checked streams from `pod` to a `stream-serve`r at `target`,
    /// each sending `send` bytes over `seconds`; returns the output file, read with
    /// [`load_result`].
    pub fn streams(
        &self,
        pod: &str,
        target: std::net::SocketAddr,
        count: usize,
        send: u64,
        seconds: u64,
    ) -> Result<std::path::PathBuf> {
        let app = artifact("mesh-testapp")?;
        let out = self.dir().join(format!("streams-{pod}-{count}.json"));
        let cmd = format!(
            "{} streams --addr {target} --count {count} --send {send} --reply 65536 --seconds {seconds} > {}",
            app.display(),
            out.display()
        );
        self.spawn(pod, &["sh", "-c", &cmd])?;
        Ok(out)
    }

    pub(crate) fn pod_command(&self, pod: &str, args: &[&str]) -> Result<(Command, File, File)> {
        let p = self.pod(pod);
        let ns = File::open(&p.netns)?;
        let cg = OpenOptions::new()
            .write(true)
            .open(p.cgroup.join("cgroup.procs"))?;
        let (ns_fd, cg_fd) = (ns.as_raw_fd(), cg.as_raw_fd());
        let mut cmd = Command::new(args[0]);
        cmd.args(&args[1..]);
        // SAFETY: the closure only makes async-signal-safe syscalls (write, setns) on fds that
        // stay open until spawn returns (they are returned to the caller).
        unsafe {
            cmd.pre_exec(move || {
                // "0" moves the writing process itself into the cgroup.
                if libc::write(cg_fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok((cmd, ns, cg))
    }

    /// Runs a command as a process of pod `pod` (its netns and cgroup) and waits for it.
    pub fn exec(&self, pod: &str, args: &[&str]) -> Result<Output> {
        let (mut cmd, _ns, _cg) = self.pod_command(pod, args)?;
        cmd.stdin(Stdio::null())
            .output()
            .with_context(|| format!("run {args:?} in pod {pod}"))
    }

    /// Starts a long-running process in pod `pod`; it is killed at teardown.
    pub fn spawn(&self, pod: &str, args: &[&str]) -> Result<u32> {
        let (cmd, _ns, _cg) = self.pod_command(pod, args)?;
        self.keep_running(cmd, pod, args)
    }

    /// Starts `cmd` (which runs `args`) logging to a file named after `owner` and `args`, and
    /// keeps it to be killed at teardown. Returns its pid.
    pub(crate) fn keep_running(&self, mut cmd: Command, owner: &str, args: &[&str]) -> Result<u32> {
        let tag: String = args.join("_").replace('/', "_").chars().take(40).collect();
        let log = File::create(self.dir.join(format!("{owner}-{tag}.log")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {args:?} in {owner}"))?;
        let pid = child.id();
        self.procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(child);
        Ok(pid)
    }

    /// Starts a process of pod `pod` with piped standard input and output, owned by the caller
    /// (for a client whose lifetime the caller ends by closing its input).
    pub fn spawn_piped(&self, pod: &str, args: &[&str]) -> Result<Child> {
        let (mut cmd, _ns, _cg) = self.pod_command(pod, args)?;
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawn {args:?} in pod {pod}"))
    }

    /// Starts a long-running process in node `i`'s namespace, outside every pod's cgroup (a
    /// node-level peer proxy, say); it is killed at teardown. Returns its pid.
    pub fn spawn_in_node(&self, i: usize, args: &[&str]) -> Result<u32> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.nodes[i].netns.display()))
            .args(args);
        self.keep_running(cmd, &format!("node{i}"), args)
    }

    /// Node `i`'s agent's pid, while it runs.
    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].agent.as_ref().map(Child::id)
    }

    /// Waits until something listens on `port` on pod `pod`'s loopback.
    pub fn wait_listening(&self, pod: &str, port: u16) -> Result<()> {
        let p = self.pod(pod);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = in_netns(&p.netns, || {
                TcpStream::connect_timeout(
                    &([127, 0, 0, 1], port).into(),
                    Duration::from_millis(200),
                )
                .is_ok()
            })?;
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("nothing listens on port {port} in pod {pod}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the test HTTP server in pod `pod` on `port` and waits for it.
    pub fn serve(&self, pod: &str, port: u16) -> Result<()> {
        self.serve_with(pod, port, &[])
    }

    /// [`Cluster::serve`] with more `mesh-testapp serve` flags (e.g. `--delay-ms`). The server
    /// names itself after the pod.
    pub fn serve_with(&self, pod: &str, port: u16, extra: &[&str]) -> Result<()> {
        let app = artifact("mesh-testapp")?;
        let app = app.to_string_lossy().into_owned();
        let port_s = port.to_string();
        let mut args = vec![app.as_str(), "serve", "--port", &port_s, "--name", pod];
        args.extend_from_slice(extra);
        self.spawn(pod, &args)?;
        self.wait_listening(pod, port)
    }

    /// Starts `mesh-testapp <args>` in pod `pod` with piped standard streams, without waiting.
    pub fn spawn_testapp(&self, pod: &str, args: &[&str]) -> Result<Child> {
        let app = artifact("mesh-testapp")?;
        let app = app.to_string_lossy().into_owned();
        let mut all = vec![app.as_str()];
        all.extend_from_slice(args);
        self.spawn_piped(pod, &all)
    }

    /// Opens one connection from pod `pod` to `addr`, uses it once, and holds it open until the
    /// returned process's stdin is closed. Fails unless the connection was opened.
    pub fn hold_connection(&self, pod: &str, addr: &str) -> Result<Child> {
        use std::io::BufRead;
        let mut hold = self.spawn_testapp(pod, &["hold", "--addr", addr, "--count", "1"])?;
        let mut out = std::io::BufReader::new(hold.stdout.take().context("hold's stdout")?);
        let mut line = String::new();
        out.read_line(&mut line)?;
        if line.trim() != "ready 1" {
            bail!("the held connection was not opened: {line:?}");
        }
        Ok(hold)
    }

    /// Runs `mesh-testapp <args>` in pod `pod` and returns its stdout; fails if it does.
    pub fn testapp(&self, pod: &str, args: &[&str]) -> Result<String> {
        let app = artifact("mesh-testapp")?;
        let app = app.to_string_lossy().into_owned();
        let mut all = vec![app.as_str()];
        all.extend_from_slice(args);
        let out = self.exec(pod, &all)?;
        if !out.status.success() {
            bail!(
                "mesh-testapp {args:?} in {pod} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `curl` from pod `pod`; returns (exit code, stdout).
    pub fn curl(&self, pod: &str, args: &[&str]) -> Result<(i32, String)> {
        let max_time = crate::sys::scaled(Duration::from_secs(10))
            .as_secs()
            .to_string();
        let mut all = vec!["curl", "-sS", "--max-time", &max_time];
        all.extend_from_slice(args);
        let out = self.exec(pod, &all)?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        ))
    }

    /// HTTP status of `GET url` from pod `pod`, or None if the connection failed (5 s limit).
    pub fn http_status(&self, pod: &str, url: &str) -> Result<Option<u16>> {
        let (code, out) = self.curl(
            pod,
            &[
                "--max-time",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                url,
            ],
        )?;
        Ok((code == 0).then(|| out.trim().parse().unwrap_or(0)))
    }
}

/// The result of a [`Cluster::load`] run, once it has written it.
pub fn load_result(
    path: &std::path::Path,
    timeout: std::time::Duration,
) -> Result<serde_json::Value> {
    let deadline = std::time::Instant::now() + crate::sys::scaled(timeout);
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        {
            return Ok(v);
        }
        if std::time::Instant::now() > deadline {
            bail!("load generator produced no result in {}", path.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
