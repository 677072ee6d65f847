//! Flow records: one per connection relayed at L4 and one per request handled at L7, with the
//! decision that let it through or refused it (and, for a denial, the policy).
//!
//! Every record goes two ways:
//! - to the access log on stdout, as `key=value` text or JSON (`--access-log`);
//! - into a ring of the most recent records, which `/debug/flows` and `mesh-agent flows` read.
//!
//! Invariants:
//! - the proxy's tasks never wait on the log: lines are formatted and written by one thread fed
//!   through a bounded queue, and a line that finds the queue full is counted in
//!   `mesh_access_log_dropped_total` rather than stalling traffic;
//! - a record does not wake the writer unless the writer has nothing queued: the writer then
//!   gathers for [`GATHER`] and writes everything in one call. Woken per record, the writer
//!   cost two context switches and a write per request, which on a two-core node were the
//!   L7 path's largest single cost after the proxying itself;
//! - at shutdown, [`FlowLog::close`] writes what is queued;
//! - identities in a record are the proved ones (see `metrics.rs`), never taken from a header.

use std::{
    borrow::Cow,
    collections::VecDeque,
    fmt,
    io::Write,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use parking_lot::Mutex;

use serde::{Deserialize, Serialize};

use crate::{
    authz::Decision,
    telemetry::metrics::{Flow, Peer},
};

/// How many recent records `/debug/flows` can return.
pub const HISTORY: usize = 2048;
/// Lines the writer thread may fall behind by before lines are dropped.
const QUEUE: usize = 16 * 1024;
/// How long the writer, once woken, lets records gather before it writes them: a line reaches
/// stdout at most this late, and a busy node writes a batch where it would write a line.
pub const GATHER: Duration = Duration::from_millis(5);

/// The access log's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AccessLogFormat {
    /// No access log (flows are still kept for `/debug/flows`).
    Off,
    /// One `key=value` line per flow.
    Text,
    /// One JSON object per line.
    Json,
}

/// One side of a flow, as the record names it. Its strings are the [`Peer`]'s, shared.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Side {
    /// The pod's name (`unknown` outside the mesh).
    #[serde(default)]
    pub pod: Arc<str>,
    /// What owns the pod, as metrics name it (`unknown` outside the mesh).
    pub workload: Arc<str>,
    /// Its namespace.
    pub namespace: Arc<str>,
    /// Its proved SPIFFE ID, or `unknown`.
    pub principal: Arc<str>,
    /// The address, where the proxy knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<SocketAddr>,
}

impl Side {
    fn of(p: Peer, addr: Option<SocketAddr>) -> Self {
        Self {
            pod: p.pod,
            workload: p.workload,
            namespace: p.namespace,
            principal: p.principal,
            addr,
        }
    }
}

/// What happened to the flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Authorized and relayed (whatever the application answered).
    Allow,
    /// Refused by authorization.
    Deny,
    /// Failed for another reason (no route, upstream unreachable...).
    Error,
}

/// The HTTP part of a request's record.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HttpInfo {
    /// Method.
    pub method: Cow<'static, str>,
    /// Path as the client sent it (with the query).
    pub path: String,
    /// `:authority` or `Host`.
    pub authority: String,
    /// `http` or `grpc`.
    pub protocol: Cow<'static, str>,
    /// The status the client got.
    pub code: u16,
    /// W3C trace id (32 hex digits) the request carried or was given.
    pub trace_id: String,
}

/// One flow.
///
/// A kept record allocates nothing of its own beyond itself (what varies per flow is a value,
/// a shared string, or a static one), because records outlive the burst of connections that
/// wrote them, and each small string kept from a burst pinned a page of the allocator's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FlowRecord {
    /// Position in this agent's record stream (for `/debug/flows?since=`).
    pub seq: u64,
    /// When the flow started.
    pub start: Started,
    /// `tcp` (a connection) or `http` (a request).
    pub kind: Cow<'static, str>,
    /// `source` or `destination`: which end's proxy wrote this.
    pub reporter: Cow<'static, str>,
    /// The client.
    pub src: Side,
    /// The server.
    pub dst: Side,
    /// `destination_service` (FQDN) or `unknown`.
    pub service: Arc<str>,
    /// `mutual_tls` or `none`.
    pub security: Cow<'static, str>,
    /// Allowed, denied or failed.
    pub verdict: Verdict,
    /// The policy that denied it (`namespace/name`; several when no ALLOW policy matched).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// Why it was denied or failed, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Envoy's response flags, `-` for none.
    pub flags: Cow<'static, str>,
    /// Bytes from the client.
    pub bytes_received: u64,
    /// Bytes to the client.
    pub bytes_sent: u64,
    /// How long it lasted, in milliseconds.
    pub duration_ms: f64,
    /// The request, for an HTTP record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpInfo>,
}

/// A flow being described; [`FlowLog::record`] stamps and files it.
#[derive(Clone, Debug)]
pub struct Draft {
    /// When it started.
    pub started: SystemTime,
    /// Labels (who, to whom, how secured).
    pub flow: Flow,
    /// The client's address.
    pub src_addr: Option<SocketAddr>,
    /// The server's address.
    pub dst_addr: Option<SocketAddr>,
    /// The outcome.
    pub verdict: Verdict,
    /// Denying policies.
    pub policies: Vec<String>,
    /// Why it was denied or failed.
    pub reason: Option<String>,
    /// Response flags.
    pub flags: Cow<'static, str>,
    /// Bytes from the client.
    pub bytes_received: u64,
    /// Bytes to the client.
    pub bytes_sent: u64,
    /// The request, at L7.
    pub http: Option<HttpInfo>,
}

impl Draft {
    /// A flow of `flow` starting now, allowed until said otherwise.
    pub fn new(flow: Flow) -> Self {
        Self {
            started: SystemTime::now(),
            flow,
            src_addr: None,
            dst_addr: None,
            verdict: Verdict::Allow,
            policies: Vec::new(),
            reason: None,
            flags: "-".into(),
            bytes_received: 0,
            bytes_sent: 0,
            http: None,
        }
    }

    /// Marks the flow refused by `decision`.
    pub fn denied(&mut self, decision: &Decision) {
        self.verdict = Verdict::Deny;
        self.policies = decision_policies(decision);
        self.reason = Some(decision.to_string());
        self.flags = "RBAC".into();
    }

    /// Marks the flow failed for `why`.
    pub fn failed(&mut self, flags: impl Into<Cow<'static, str>>, why: String) {
        self.verdict = Verdict::Error;
        self.reason = Some(why);
        self.flags = flags.into();
    }
}

/// The policies a decision names.
pub fn decision_policies(d: &Decision) -> Vec<String> {
    match d {
        Decision::Allow => Vec::new(),
        Decision::Denied(p) => vec![p.to_string()],
        Decision::NotAllowed(ps) => ps.iter().map(ToString::to_string).collect(),
    }
}

/// The node's flow records: the access log and the recent history.
#[derive(Debug)]
pub struct FlowLog {
    next: AtomicU64,
    recent: Mutex<VecDeque<Arc<FlowRecord>>>,
    out: Option<Writer>,
    /// `mesh_access_log_dropped_total`.
    dropped: prometheus::IntCounter,
}

/// The access log's queue and the thread that empties it.
#[derive(Debug)]
struct Writer {
    queue: Arc<Mutex<Vec<Arc<FlowRecord>>>>,
    thread: std::thread::Thread,
    format: AccessLogFormat,
}

impl FlowLog {
    /// A log writing `format` lines to stdout; registers its counter in `registry`.
    pub fn new(
        format: AccessLogFormat,
        registry: &crate::telemetry::metrics::Metrics,
    ) -> Result<Arc<Self>, crate::telemetry::metrics::MetricsError> {
        let dropped = prometheus::IntCounter::new(
            "mesh_access_log_dropped_total",
            "Access-log lines dropped because the writer fell behind",
        )?;
        registry.register(Box::new(dropped.clone()))?;
        let out = (format != AccessLogFormat::Off).then(|| {
            let queue = Arc::new(Mutex::new(Vec::new()));
            let q = queue.clone();
            std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || write_lines(&q, format))
                .map(|h| Writer {
                    queue,
                    thread: h.thread().clone(),
                    format,
                })
        });
        let out = match out {
            Some(Ok(w)) => Some(w),
            Some(Err(e)) => {
                tracing::error!("cannot start the access-log writer: {e}; access log is off");
                None
            }
            None => None,
        };
        Ok(Arc::new(Self {
            next: AtomicU64::new(1),
            recent: Mutex::new(VecDeque::with_capacity(HISTORY)),
            out,
            dropped,
        }))
    }

    /// Stamps `d` and files it.
    pub fn record(&self, d: Draft) {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let elapsed = d.started.elapsed().unwrap_or_default();
        let f = d.flow;
        let rec = Arc::new(FlowRecord {
            seq,
            start: Started::at(d.started),
            kind: if d.http.is_some() { "http" } else { "tcp" }.into(),
            reporter: f.reporter.as_str().into(),
            src: Side::of(f.src, d.src_addr),
            dst: Side::of(f.dst, d.dst_addr),
            service: f.service.fqdn,
            security: f.security.as_str().into(),
            verdict: d.verdict,
            policies: d.policies,
            reason: d.reason,
            flags: d.flags,
            bytes_received: d.bytes_received,
            bytes_sent: d.bytes_sent,
            duration_ms: millis(elapsed),
            http: d.http,
        });
        {
            let mut recent = self.recent.lock();
            if recent.len() == HISTORY {
                recent.pop_front();
            }
            recent.push_back(rec.clone());
        }
        if let Some(w) = &self.out {
            let first = {
                let mut q = w.queue.lock();
                if q.len() >= QUEUE {
                    self.dropped.inc();
                    return;
                }
                q.push(rec);
                q.len() == 1
            };
            if first {
                w.thread.unpark();
            }
        }
    }

    /// Writes what the access log still holds, at shutdown, after any batch the writer is
    /// writing (both take stdout's lock before the queue, so batches keep their order).
    pub fn close(&self) {
        if let Some(w) = &self.out {
            let mut out = std::io::stdout().lock();
            let batch = std::mem::take(&mut *w.queue.lock());
            let _ = write_batch(&mut out, &batch, w.format);
        }
    }

    /// Records after `since`, oldest first, at most `limit`.
    pub fn since(&self, since: u64, limit: usize) -> Vec<Arc<FlowRecord>> {
        let recent = self.recent.lock();
        recent
            .iter()
            .filter(|r| r.seq > since)
            .take(limit)
            .cloned()
            .collect()
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0
}

/// When a flow started, to the millisecond: written and read as RFC 3339, kept as a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Started(time::OffsetDateTime);

impl Started {
    /// `t`, to the millisecond.
    pub fn at(t: SystemTime) -> Self {
        let t = time::OffsetDateTime::from(t);
        let ms = t.millisecond();
        Self(t.replace_nanosecond(u32::from(ms) * 1_000_000).unwrap_or(t))
    }

    /// The time of day in UTC, `HH:MM:SS.mmm`, as `mesh-agent flows` shows it.
    pub fn clock(&self) -> String {
        let t = self.0.to_offset(time::UtcOffset::UTC);
        format!(
            "{:02}:{:02}:{:02}.{:03}",
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        )
    }
}

impl fmt::Display for Started {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Formatted on the stack: the access-log writer shows every record's start.
        // The length is what the cursor moved: `format_into`'s count leaves out the digits of
        // the fraction of a second.
        let mut buf = [0u8; 64];
        let n = {
            let mut out = &mut buf[..];
            self.0
                .format_into(&mut out, &time::format_description::well_known::Rfc3339)
                .map_err(|_| fmt::Error)?;
            64 - out.len()
        };
        f.write_str(std::str::from_utf8(&buf[..n]).map_err(|_| fmt::Error)?)
    }
}

impl Serialize for Started {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Started {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <Cow<'de, str>>::deserialize(d)?;
        time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
            .map(Self)
            .map_err(|e| serde::de::Error::custom(format!("start {text:?}: {e}")))
    }
}

/// The writer thread: sleeps until a record finds the queue empty, lets more gather for
/// [`GATHER`], then formats the batch and writes it in one call.
fn write_lines(queue: &Mutex<Vec<Arc<FlowRecord>>>, format: AccessLogFormat) {
    let mut batch = Vec::new();
    loop {
        std::thread::park();
        std::thread::sleep(GATHER);
        let mut out = std::io::stdout().lock();
        std::mem::swap(&mut batch, &mut *queue.lock());
        if write_batch(&mut out, &batch, format).is_err() {
            return;
        }
        batch.clear();
    }
}

/// Formats `batch` and writes it to `out` in one call.
fn write_batch(
    out: &mut impl Write,
    batch: &[Arc<FlowRecord>],
    format: AccessLogFormat,
) -> std::io::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut text = String::with_capacity(batch.len() * 400);
    for rec in batch {
        match format {
            AccessLogFormat::Json => {
                text.push_str(&serde_json::to_string(&**rec).unwrap_or_default())
            }
            _ => write_text_line(&mut text, rec),
        }
        text.push('\n');
    }
    out.write_all(text.as_bytes())
}

/// One record's text line on its own, as the writer appends it.
#[cfg(test)]
fn text_line(r: &FlowRecord) -> String {
    let mut line = String::new();
    write_text_line(&mut line, r);
    line
}

/// A value as the text line shows it: quoted (Rust string syntax) when empty or when it holds a
/// space, a quote or `=`, so `key=value` pairs split unambiguously.
struct Value<'a>(&'a str);

impl Value<'_> {
    /// Characters that would split or end a `key=value` pair.
    fn has_separator(s: &str) -> bool {
        s.contains([' ', '"', '='])
    }

    fn needs_quotes(s: &str) -> bool {
        s.is_empty() || Self::has_separator(s)
    }
}

impl std::fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if Self::needs_quotes(self.0) {
            write!(f, "{:?}", self.0)
        } else {
            f.write_str(self.0)
        }
    }
}

/// A side as `namespace/workload`, quoted as [`Value`] would quote it.
struct SideName<'a>(&'a Side);

impl std::fmt::Display for SideName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Side { namespace, pod, .. } = self.0;
        // Never empty (it holds the `/`), so only separators call for quotes.
        if Value::has_separator(namespace) || Value::has_separator(pod) {
            write!(f, "{:?}", format!("{namespace}/{pod}"))
        } else {
            write!(f, "{namespace}/{pod}")
        }
    }
}

/// An address, or `-`.
struct Addr(Option<SocketAddr>);

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => f.write_str("-"),
        }
    }
}

/// Appends `r` to `line` as a `key=value` line (values quoted as [`Value`] says), with no
/// allocation per field: the writer thread formats every L7 request, and did so with a dozen
/// small strings each.
fn write_text_line(line: &mut String, r: &FlowRecord) {
    use std::fmt::Write as _;
    let _ = write!(
        line,
        "{} kind={} reporter={} verdict={} src={} src_principal={} src_addr={} dst={} dst_principal={} dst_addr={} service={} security={} flags={} received={} sent={} duration_ms={}",
        r.start,
        r.kind,
        r.reporter,
        match r.verdict {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Error => "error",
        },
        SideName(&r.src),
        Value(&r.src.principal),
        Addr(r.src.addr),
        SideName(&r.dst),
        Value(&r.dst.principal),
        Addr(r.dst.addr),
        Value(&r.service),
        r.security,
        Value(&r.flags),
        r.bytes_received,
        r.bytes_sent,
        r.duration_ms,
    );
    if let Some(h) = &r.http {
        let _ = write!(
            line,
            " method={} path={} authority={} protocol={} code={} trace_id={}",
            Value(&h.method),
            Value(&h.path),
            Value(&h.authority),
            h.protocol,
            h.code,
            Value(&h.trace_id),
        );
    }
    if !r.policies.is_empty() {
        let _ = write!(line, " policy={}", Value(&r.policies.join(",")));
    }
    if let Some(reason) = &r.reason {
        let _ = write!(line, " reason={}", Value(reason));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FlowRecord {
        FlowRecord {
            seq: 7,
            start: Started::at(SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600)),
            kind: "http".into(),
            reporter: "destination".into(),
            src: Side {
                pod: "client".into(),
                workload: "client".into(),
                namespace: "default".into(),
                principal: "spiffe://td/ns/default/sa/c".into(),
                addr: Some("10.0.0.1:4000".parse().unwrap_or_else(|_| unreachable!())),
            },
            dst: Side {
                pod: "server".into(),
                workload: "server".into(),
                namespace: "default".into(),
                principal: "spiffe://td/ns/default/sa/s".into(),
                addr: None,
            },
            service: "unknown".into(),
            security: "mutual_tls".into(),
            verdict: Verdict::Deny,
            policies: vec!["default/deny-admin".into()],
            reason: Some("denied by DENY policy default/deny-admin".into()),
            flags: "RBAC".into(),
            bytes_received: 0,
            bytes_sent: 19,
            duration_ms: 0.25,
            http: Some(HttpInfo {
                method: "GET".into(),
                path: "/admin x".into(),
                authority: "server".into(),
                protocol: "http".into(),
                code: 403,
                trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
            }),
        }
    }

    #[test]
    fn text_line_quotes_values_with_spaces_and_names_the_policy() {
        let line = text_line(&sample());
        assert!(line.contains(" verdict=deny "), "{line}");
        assert!(line.contains(r#" path="/admin x" "#), "{line}");
        assert!(line.contains(" policy=default/deny-admin "), "{line}");
        assert!(
            line.ends_with(r#"reason="denied by DENY policy default/deny-admin""#),
            "{line}"
        );
        assert!(line.contains(" dst_addr=- "), "{line}");
        assert!(line.contains(" src=default/client "), "{line}");
        assert!(line.contains(" src_addr=10.0.0.1:4000 "), "{line}");
    }

    /// A side whose name has a space is quoted whole, and an empty value shows as `""`; a side
    /// with an empty part is not empty, so it stays bare, as it always was.
    #[test]
    fn text_line_quotes_a_side_and_an_empty_value() {
        let mut r = sample();
        r.dst.pod = "my server".into();
        r.flags = "".into();
        let line = text_line(&r);
        assert!(line.contains(r#" dst="default/my server" "#), "{line}");
        assert!(line.contains(r#" flags="" "#), "{line}");
        r.src.namespace = "".into();
        let line = text_line(&r);
        assert!(line.contains(" src=/client "), "{line}");
    }

    #[test]
    fn json_round_trips() {
        let s = serde_json::to_string(&sample()).unwrap_or_default();
        assert!(s.contains(r#""start":"2026-01-01T00:00:00Z""#), "{s}");
        let back: FlowRecord = serde_json::from_str(&s).unwrap_or_else(|e| panic!("{e}: {s}"));
        assert_eq!(back.start, sample().start);
        assert_eq!(back.policies, vec!["default/deny-admin".to_string()]);
        assert_eq!(back.http.map(|h| h.code), Some(403));
        let bad = s.replace("2026-01-01T00:00:00Z", "yesterday");
        let e = serde_json::from_str::<FlowRecord>(&bad)
            .err()
            .map(|e| e.to_string());
        assert!(
            e.is_some_and(|e| e.contains("\"yesterday\"")),
            "a bad start is named"
        );
    }

    /// A start keeps its milliseconds, and `flows` shows the time of day at a fixed width.
    #[test]
    fn a_start_is_written_to_the_millisecond() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_767_225_600_250_999);
        let s = Started::at(t);
        assert_eq!(s.to_string(), "2026-01-01T00:00:00.25Z");
        assert_eq!(s.clock(), "00:00:00.250");
        assert!(
            text_line(&FlowRecord {
                start: s,
                ..sample()
            })
            .starts_with("2026-01-01T00:00:00.25Z ")
        );
    }

    /// A kept record holds the flow's labels, not copies of them: each string a record made for
    /// itself during a burst of connections pinned an allocator page after the burst.
    #[test]
    fn a_kept_record_shares_the_flows_strings() {
        use crate::telemetry::metrics::labels::{Peer, Reporter, Security, ServiceLabels};
        let metrics = crate::telemetry::metrics::Metrics::new(Duration::from_secs(60), "c")
            .unwrap_or_else(|e| panic!("{e}"));
        let log = FlowLog::new(AccessLogFormat::Off, &metrics).unwrap_or_else(|e| panic!("{e}"));
        let peer = Peer {
            workload: "server".into(),
            principal: "spiffe://td/ns/default/sa/s".into(),
            ..Peer::unknown()
        };
        let service = ServiceLabels {
            fqdn: "web.default.svc.cluster.local".into(),
            ..ServiceLabels::unknown()
        };
        log.record(Draft::new(Flow {
            reporter: Reporter::Destination,
            src: Peer::unknown(),
            dst: peer.clone(),
            service: service.clone(),
            security: Security::MutualTls,
        }));
        let kept = log.since(0, 10);
        let [r] = kept.as_slice() else {
            panic!("one record, got {}", kept.len())
        };
        assert!(Arc::ptr_eq(&r.dst.workload, &peer.workload));
        assert!(Arc::ptr_eq(&r.dst.principal, &peer.principal));
        assert!(Arc::ptr_eq(&r.service, &service.fqdn));
        assert!(matches!(
            (&r.kind, &r.reporter, &r.security, &r.flags),
            (
                Cow::Borrowed("tcp"),
                Cow::Borrowed("destination"),
                Cow::Borrowed("mutual_tls"),
                Cow::Borrowed("-")
            )
        ));
    }
}
