//! The bad-input corpus (`tests/corpus/bad-input.yaml`), sent through real agents: HTTP/1 raw
//! bytes, HTTP/2 frames and HBONE connections, each with the answer it must get. The file says
//! what each entry is; this test only knows how to send the three kinds and check the answers.

use anyhow::{Context, Result, bail};
use mesh_tests::{Cluster, PodSpec};
use serde::Deserialize;
use serde_json::Value;

const APP_PORT: u16 = 8080;
/// The agents' memory may grow this much over the whole corpus (about 60 attacker
/// connections, each closed when its entry ends).
const RSS_GROWTH_CAP_KB: u64 = 16 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    to: String,
    #[serde(default)]
    send: Vec<Value>,
    #[serde(default)]
    frames: Vec<Value>,
    #[serde(default)]
    tls: Option<String>,
    #[serde(default)]
    connect: Vec<String>,
    expect: Expect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    status: Option<u16>,
    goaway: Option<u32>,
    rst: Option<Vec<(u32, u32)>>,
    answered: Option<Vec<u32>>,
    handshake: Option<String>,
    connect: Option<Vec<u16>>,
    /// Requests of the entry that are well-formed and must reach the server (a healthy stream
    /// beside a bad one); every other request must not.
    #[serde(default)]
    reaches: u64,
}

/// The bytes of `parts` (`{text: .., times: n}` or `{hex: .., times: n}`).
fn bytes(parts: &[Value]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for p in parts {
        let times = usize::try_from(p["times"].as_u64().unwrap_or(1))?;
        let one = match (p["text"].as_str(), p["hex"].as_str()) {
            (Some(t), None) => t.as_bytes().to_vec(),
            (None, Some(h)) => hex::decode(h.replace(' ', ""))?,
            _ => bail!("a part is text or hex: {p}"),
        };
        out.extend(one.repeat(times));
    }
    Ok(out)
}

/// Sends `raw` from `from` to `addr` with `mesh-testapp raw`; returns what came back.
fn send_raw(c: &Cluster, from: &str, addr: &str, raw: &[u8], tag: &str) -> Result<String> {
    let file = c.dir().join(format!("corpus-{tag}.bin"));
    std::fs::write(&file, raw)?;
    c.testapp(
        from,
        &["raw", "--addr", addr, "--input", &file.to_string_lossy()],
    )
}

/// The status of an HTTP/1 answer, or 0 for none.
fn status_of(answer: &str) -> u16 {
    answer
        .strip_prefix("HTTP/1.")
        .and_then(|a| a.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Runs one entry; returns what was observed, for the failure message and the log.
fn run(c: &Cluster, e: &Entry, i: usize) -> Result<String> {
    let server = c.pod("server").ip;
    let app = format!("{server}:{APP_PORT}");
    let hbone = format!("{server}:15008");
    match e.to.as_str() {
        "http1" => {
            let raw = bytes(&e.send)?;
            let want = e.expect.status.context("http1 entries expect a status")?;
            let mut seen = Vec::new();
            for from in ["bare", "client"] {
                let out = send_raw(c, from, &app, &raw, &format!("{i}-{from}"))?;
                let status = status_of(&out);
                seen.push(format!("{from}: {status}"));
                if status != want {
                    bail!(
                        "from {from}: got {status}, want {want}: {}",
                        out.lines().next().unwrap_or("(no answer)")
                    );
                }
            }
            Ok(seen.join(", "))
        }
        "http2" => {
            let file = c.dir().join(format!("corpus-{i}.json"));
            std::fs::write(
                &file,
                serde_json::to_vec(&serde_json::json!({"frames": e.frames}))?,
            )?;
            let out = c.testapp(
                "client",
                &[
                    "h2-script",
                    "--addr",
                    &app,
                    "--script",
                    &file.to_string_lossy(),
                ],
            )?;
            let v: Value = serde_json::from_str(out.trim())?;
            let check = || -> Result<()> {
                if let Some(code) = e.expect.goaway {
                    anyhow::ensure!(
                        v["goaway"].as_u64() == Some(code.into()),
                        "want GOAWAY {code}"
                    );
                }
                if let Some(rst) = &e.expect.rst {
                    anyhow::ensure!(
                        v["rst_stream"] == serde_json::json!(rst),
                        "want RST_STREAM {rst:?}"
                    );
                    anyhow::ensure!(
                        v["goaway"].is_null(),
                        "a stream error must not end the connection"
                    );
                }
                if let Some(streams) = &e.expect.answered {
                    for s in streams {
                        let answered = v["answered"]
                            .as_array()
                            .is_some_and(|a| a.contains(&(*s).into()));
                        anyhow::ensure!(answered, "stream {s} must be answered");
                    }
                }
                Ok(())
            };
            check().with_context(|| v.to_string())?;
            Ok(v.to_string())
        }
        "hbone" => {
            if let Some(version) = &e.tls {
                let out = c.testapp(
                    "client",
                    &["tls-probe", "--addr", &hbone, "--version", version],
                )?;
                let v: Value = serde_json::from_str(out.trim())?;
                let want = e
                    .expect
                    .handshake
                    .as_deref()
                    .context("tls entries expect a handshake")?;
                anyhow::ensure!(v["handshake"] == want, "want handshake {want}");
                return Ok(v.to_string());
            }
            if !e.connect.is_empty() {
                let cert = c.workload_cert(0, "client-sa")?;
                let requests: Vec<(&str, &str)> =
                    e.connect.iter().map(|a| ("CONNECT", a.as_str())).collect();
                let (statuses, _) = c.hbone_probe("client", server.into(), cert, &requests)?;
                let want = e
                    .expect
                    .connect
                    .as_ref()
                    .context("connect entries expect statuses")?;
                anyhow::ensure!(&statuses == want, "got {statuses:?}, want {want:?}");
                return Ok(format!("{statuses:?}"));
            }
            let out = send_raw(c, "bare", &hbone, &bytes(&e.send)?, &i.to_string())?;
            let want = e
                .expect
                .status
                .context("raw hbone entries expect a status")?;
            anyhow::ensure!(status_of(&out) == want, "got {out:?}");
            anyhow::ensure!(
                !out.contains("HTTP/"),
                "an HTTP answer in clear text: {out:?}"
            );
            Ok(format!("{} bytes back", out.len()))
        }
        other => bail!("unknown target {other:?}: http1, http2 or hbone"),
    }
}

/// Every corpus entry behaves as the file says, and none reaches the application, crashes an
/// agent or grows its memory past the cap.
#[test]
fn bad_input_corpus() -> Result<()> {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/bad-input.yaml"),
    )?;
    let corpus: Vec<Entry> =
        serde_yaml_ng::from_str(&text).context("tests/corpus/bad-input.yaml")?;
    let mut c = Cluster::new(
        vec![
            vec![PodSpec::mesh("client"), PodSpec::bare("bare")],
            vec![PodSpec::mesh("server")],
        ],
        vec![],
    )?;
    c.serve("server", APP_PORT)?;
    c.start_agent(0)?;
    c.start_agent(1)?;
    // An L7 policy selects the server, so its node parses HTTP even from outside the mesh.
    c.apply_yaml(
        1,
        "authorizationPolicies:\n  - name: no-admin\n    namespace: default\n    selector: {matchLabels: {app: server}}\n    action: DENY\n    rules:\n      - to: [{operation: {paths: [/admin, /admin/*]}}]\n",
        "authorization_policies",
        &["default/no-admin"],
    )?;
    let rss = |c: &Cluster| -> Result<u64> { Ok(c.agent_rss_kb(0)? + c.agent_rss_kb(1)?) };
    let before = rss(&c)?;
    let mut failures = Vec::new();
    for (i, e) in corpus.iter().enumerate() {
        let reached = c.app_requests("server", APP_PORT)?;
        let outcome = run(&c, e, i);
        let after = c.app_requests("server", APP_PORT)?;
        match outcome {
            Ok(seen) if after == reached + e.expect.reaches => {
                println!("ok  {} ({}): {seen}", e.name, e.to);
            }
            Ok(seen) => failures.push(format!(
                "{} ({}): reached the server {} times, not {}: {seen}",
                e.name,
                e.to,
                after - reached,
                e.expect.reaches
            )),
            Err(err) => failures.push(format!("{} ({}): {err:#}", e.name, e.to)),
        }
        for node in [0, 1] {
            if c.agent_pid(node).is_none() || c.agent_get(node, "/healthz").is_err() {
                bail!(
                    "after {:?} the agent of node {node} is gone:\n{}",
                    e.name,
                    c.agent_log(node)
                );
            }
        }
    }
    let grown = rss(&c)?.saturating_sub(before);
    println!(
        "{} entries; agents' RSS grew {grown} kB over the corpus",
        corpus.len()
    );
    // Each refusal says why, in the log of the node that parsed it.
    let log = c.agent_log(1);
    for refusal in [
        "bare LF line ending",
        "HTTP/0.9",
        "invalid method token",
        "HTTP/1.1 request without Host",
        "double percent-encoding",
        "denied by DENY policy default/no-admin",
    ] {
        assert!(log.contains(refusal), "no log line for {refusal}");
    }
    for node in [0, 1] {
        assert!(
            !c.agent_log(node).contains("panicked"),
            "an agent panicked:\n{}",
            c.agent_log(node)
        );
    }
    // Control: an allowed request does reach the server, so the counts above could move.
    let reached = c.app_requests("server", APP_PORT)?;
    let out = send_raw(
        &c,
        "bare",
        &format!("{}:{APP_PORT}", c.pod("server").ip),
        b"GET /public HTTP/1.1\r\nHost: s\r\n\r\n",
        "control",
    )?;
    assert_eq!(status_of(&out), 404, "{out}");
    assert_eq!(c.app_requests("server", APP_PORT)?, reached + 1);
    assert!(
        failures.is_empty(),
        "{} of {} entries failed:\n{}",
        failures.len(),
        corpus.len(),
        failures.join("\n")
    );
    assert!(
        grown < RSS_GROWTH_CAP_KB,
        "the agents grew {grown} kB over the corpus"
    );
    Ok(())
}
