//! Agent restarts under load: what a node's pods see while their agent is gone and how soon a new
//! agent serves them. Real agents, real bytes through network namespaces, and the node link
//! captured to prove nothing left the node in plain text meanwhile.

use std::{
    collections::BTreeMap,
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

/// Port of the server pod's `stream-serve`.
const STREAM_PORT: u16 = 9000;

/// client on node 1, server on node 2 serving HTTP on `APP_PORT` and checked streams on
/// `STREAM_PORT`; no agent started yet.
fn streams_pair() -> Result<Cluster> {
    let c = Cluster::new(
        vec![vec![PodSpec::mesh("client")], vec![PodSpec::mesh("server")]],
        vec![],
    )?;
    c.serve("server", APP_PORT)?;
    let app = mesh_tests::artifact("mesh-testapp")?
        .to_string_lossy()
        .into_owned();
    c.spawn(
        "server",
        &[&app, "stream-serve", "--port", &STREAM_PORT.to_string()],
    )?;
    c.wait_listening("server", STREAM_PORT)?;
    Ok(c)
}

/// The ids of every map and link pinned under `/sys/fs/bpf/<pin>`, with each link's program.
type PinnedIds = (BTreeMap<String, u32>, BTreeMap<String, (u32, u32)>);

fn pinned_ids(pin: &str) -> Result<PinnedIds> {
    let root = std::path::Path::new("/sys/fs/bpf").join(pin);
    let mut maps = BTreeMap::new();
    for e in std::fs::read_dir(root.join("maps"))? {
        let e = e?;
        let info = aya::maps::MapInfo::from_pin(e.path())?;
        maps.insert(e.file_name().to_string_lossy().into_owned(), info.id());
    }
    let mut links = BTreeMap::new();
    for e in std::fs::read_dir(root.join("links"))? {
        let e = e?;
        let link = aya::programs::links::FdLink::from(aya::programs::links::PinnedLink::from_pin(
            e.path(),
        )?);
        let info = link.info()?;
        links.insert(
            e.file_name().to_string_lossy().into_owned(),
            (info.id(), info.program_id()),
        );
    }
    Ok((maps, links))
}

/// An upgrade to another build and a downgrade back, on both nodes, under 1000 requests/s (a
/// new connection each) and 100 long-lived streams with per-stream checksums: no request
/// fails, no stream is cut or corrupted, and the kernel side stays the same objects (map and
/// link ids) while the links move onto the other build's programs and back.
#[test]
fn upgrade_and_downgrade_under_load_drop_nothing() -> Result<()> {
    let mut c = streams_pair()?;
    c.start_agent(0)?;
    c.start_agent(1)?;
    let server = c.pod("server").ip;
    assert_eq!(
        c.http_status("client", &format!("http://{server}:{APP_PORT}/"))?,
        Some(200)
    );
    let before: Vec<PinnedIds> = (0..2)
        .map(|i| pinned_ids(&c.nodes[i].pin_name))
        .collect::<Result<_>>()?;
    let default = mesh_tests::artifact("mesh-ebpf.o")?;
    let variant = mesh_tests::artifact("mesh-ebpf-variant.o")?;

    let load = c.load_on("client", (server, APP_PORT).into(), (1000, 24), true, 8)?;
    let streams = c.streams("client", (server, STREAM_PORT).into(), 100, 1 << 20, 16)?;
    std::thread::sleep(Duration::from_secs(2));
    let mut steps = Vec::new();
    for (object, what) in [(&variant, "upgrade"), (&default, "downgrade")] {
        for node in [0, 1] {
            let start = Instant::now();
            c.upgrade_agent(node, object, &[])?;
            let ready = start.elapsed();
            let updates = c.stats(node)?["link_updates"].clone();
            let links = before[node].1.len() as u64;
            assert_eq!(
                updates["updated"].as_u64(),
                Some(links),
                "{what} of node {node}: every adopted link moves onto the new agent's programs: {updates}"
            );
            // The builds differ in connect4 only: one link per pod.
            assert_eq!(
                updates["changed"].as_u64(),
                Some(1),
                "{what} of node {node}: {updates}"
            );
            let after = pinned_ids(&c.nodes[node].pin_name)?;
            assert_eq!(
                after.0, before[node].0,
                "{what} of node {node}: map ids changed"
            );
            let link_ids = |ids: &PinnedIds| -> BTreeMap<String, u32> {
                ids.1.iter().map(|(k, v)| (k.clone(), v.0)).collect()
            };
            assert_eq!(
                link_ids(&after),
                link_ids(&before[node]),
                "{what} of node {node}: link ids changed"
            );
            steps.push(format!(
                "{what} node {node}: ready in {} ms",
                ready.as_millis()
            ));
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let streamed = mesh_tests::load_result(&streams, Duration::from_secs(60))?;
    let result = mesh_tests::load_result(&load, Duration::from_secs(60))?;
    // Each replaced agent exits once what it accepted has finished (the streams, here).
    let mut exits = Vec::new();
    for node in [0, 1] {
        for _ in 0..2 {
            let (status, waited) = c.wait_retired(node, Duration::from_secs(40))?;
            assert!(
                status.success(),
                "a replaced agent of node {node} exited with {status}"
            );
            exits.push(waited.as_millis());
        }
    }
    println!(
        "upgrade + downgrade of both nodes under 1000 req/s and 100 streams: {steps:?}; load {result}; streams {streamed}; replaced agents exited {exits:?} ms after the streams ended"
    );
    assert_eq!(
        result["errors"].as_u64(),
        Some(0),
        "failed requests: {result}"
    );
    assert_eq!(result["requests"].as_u64(), Some(24_000), "{result}");
    assert_eq!(streamed["ok"].as_u64(), Some(100), "streams: {streamed}");
    Ok(())
}

/// Past the drain deadline a replaced agent ends what is left the way TLS means: close_notify,
/// then FIN, seen on the node's link (without it, the process exit would end the connections
/// with a bare FIN, which the peer's TLS reports as a truncation).
#[test]
fn connections_past_the_drain_deadline_end_with_close_notify() -> Result<()> {
    let mut c = streams_pair()?;
    c.start_agent_with(0, &["--drain-timeout", "2s"])?;
    c.wait_ready(0, Duration::from_secs(15))?;
    c.start_agent(1)?;
    let server = c.pod("server").ip;
    let streams = c.streams("client", (server, STREAM_PORT).into(), 5, 1 << 20, 12)?;
    std::thread::sleep(Duration::from_secs(1));
    let node1 = c.nodes[0].netns.clone();
    let cap = Capture::start(&node1, "uplink")?;
    c.upgrade_agent(0, &mesh_tests::artifact("mesh-ebpf.o")?, &[])?;
    let (status, waited) = c.wait_retired(0, Duration::from_secs(15))?;
    std::thread::sleep(Duration::from_millis(300));
    // A TLS 1.3 close_notify on the wire: an encrypted record of 19 bytes (a 2-byte alert, its
    // content type and the 16-byte AEAD tag), which no HTTP/2 frame makes (9 bytes of frame
    // header at least, so 26).
    let close_notify = [0x17, 0x03, 0x03, 0x00, 0x13];
    let notifies = tcp_segments(&cap.stop())
        .iter()
        .filter(|s| s.dst_port == 15008 && s.payload.windows(5).any(|w| w == close_notify))
        .count();
    let streamed = mesh_tests::load_result(&streams, Duration::from_secs(30))?;
    println!(
        "replaced agent exited {status} after {waited:?}; {notifies} close_notify records to 15008; streams {streamed}"
    );
    assert!(
        notifies > 0,
        "the HBONE connection ended without close_notify"
    );
    assert!(status.success(), "{status}");
    assert!(
        waited < Duration::from_secs(6),
        "it exits at the deadline, not with its streams"
    );
    assert!(
        c.agent_log(0).contains("drain deadline passed"),
        "{}",
        c.agent_log(0)
    );
    // The streams outlived the deadline: cut, by the deadline.
    assert_eq!(streamed["ok"].as_u64(), Some(0), "{streamed}");
    Ok(())
}
