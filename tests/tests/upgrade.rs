//! Agent restarts under load: what a node's pods see while their agent is gone and how soon a new
//! agent serves them. Real agents, real bytes through network namespaces, and the node link
//! captured to prove nothing left the node in plain text meanwhile.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use mesh_tests::{Capture, Cluster, PodSpec, tcp_segments};

const APP_PORT: u16 = 8080;

/// The time from starting an agent until a new connection from `client` to `url` succeeds,
/// trying every 20 ms.
fn time_to_first_connection(c: &mut Cluster, node: usize, url: &str) -> Result<Duration> {
    let started = Instant::now();
    c.start_agent_with(node, &[])?;
    loop {
        let (code, _) = c.curl("client", &["-o", "/dev/null", "--max-time", "0.5", url])?;
        if code == 0 {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(15) {
            bail!(
                "no connection 15 s after the restart:\n{}",
                c.agent_log(node)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// kill -9 of the client's agent under steady load, five times: while it is down the client's
/// connections fail (none leaves the node in plain text: the link is captured throughout), and
/// after each restart the time to the first new connection is measured. The bar is 2 s.
#[test]
fn kill_9_under_load_fails_closed_and_a_restarted_agent_serves_within_2_s() -> Result<()> {
    let mut c = Cluster::new(
        vec![vec![PodSpec::mesh("client")], vec![PodSpec::mesh("server")]],
        vec![],
    )?;
    c.serve("server", APP_PORT)?;
    c.start_agent(0)?;
    c.start_agent(1)?;
    let target: SocketAddr = (c.pod("server").ip, APP_PORT).into();
    let url = format!("http://{target}/");
    assert_eq!(c.http_status("client", &url)?, Some(200));
    let node1 = c.nodes[0].netns.clone();
    let cap = Capture::start(&node1, "uplink")?;
    let load = c.load("client", target, 200, 30, true)?;
    let mut times = Vec::new();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(1500));
        c.kill_agent(0);
        // Down: the kernel still redirects the client's connects, to nothing.
        let (code, _) = c.curl("client", &["-o", "/dev/null", "--max-time", "1", &url])?;
        assert_ne!(
            code, 0,
            "a connection succeeded with no agent on the client's node"
        );
        times.push(time_to_first_connection(&mut c, 0, &url)?);
        c.wait_ready(0, Duration::from_secs(15))?;
    }
    let result = mesh_tests::load_result(&load, Duration::from_secs(60))?;
    let frames = cap.stop();
    let segs = tcp_segments(&frames);
    let plain = segs
        .iter()
        .filter(|s| s.dst_port == APP_PORT || s.src_port == APP_PORT)
        .count();
    let hbone = segs
        .iter()
        .filter(|s| s.dst_port == 15008 || s.src_port == 15008)
        .count();
    times.sort();
    let ms: Vec<u128> = times.iter().map(Duration::as_millis).collect();
    println!(
        "kill -9 x5 under 200 req/s: restart to first new connection {ms:?} ms (median {} ms); load {result}; node link: {plain} segments on the app port, {hbone} on 15008",
        ms[2]
    );
    assert_eq!(
        plain, 0,
        "a connection bypassed the mesh while the agent was down"
    );
    assert!(hbone > 0, "the capture saw the mesh's traffic");
    assert!(
        times[2] <= Duration::from_secs(2),
        "median restart-to-first-connection {} ms is over 2 s",
        ms[2]
    );
    // Requests failed only while the agent was away; most went through.
    let (ok, errors) = (
        result["requests"].as_u64().unwrap_or(0),
        result["errors"].as_u64().unwrap_or(0),
    );
    assert!(ok > errors, "{result}");
    Ok(())
}
