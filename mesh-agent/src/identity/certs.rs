//! Workload certificates: one per identity with a pod on this node, renewed at half-life.
//!
//! Invariants:
//! - Private keys are made here and never leave the process; the CA sees only CSRs. Nothing here
//!   logs or prints a key ([`WorkloadCert`]'s `Debug` leaves it out).
//! - A certificate is used until it expires, even while renewal fails; renewal retries with
//!   exponential backoff capped at a quarter of the lifetime (and at 30 s; at 5 s while there is
//!   no valid certificate, as connections are waiting).
//! - After expiry the identity has no certificate: connections that need it wait or fail.
//!   Nothing falls back to plaintext.
//! - Every CA answer carries the trust bundle. The newest bundle is used for every identity, so a
//!   root rotation reaches all verifiers at the first renewal after it.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use parking_lot::{Mutex, RwLock};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    identity::ca::{CaClient, CaError},
    identity::{self, ClientVerifier, Identity, IdentityError, ServerVerifier, TrustBundle},
};

/// The ALPN both HBONE ends speak.
pub const ALPN_H2: &[u8] = b"h2";
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// While an identity has no valid certificate its pods' connections are waiting, so retries stay
/// frequent.
const MAX_BACKOFF_WITHOUT_CERT: Duration = Duration::from_secs(5);
const MIN_BACKOFF: Duration = Duration::from_millis(100);

/// Why a certificate is not available.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// This node does not manage the identity (no local pod has it).
    #[error("no local pod runs as {0}, so this node holds no certificate for it")]
    NotManaged(Identity),
    /// Still waiting for the first certificate, or the last one expired and renewal fails.
    #[error("no valid certificate for {identity} yet: {why}")]
    NotReady {
        /// The identity.
        identity: Identity,
        /// The last renewal error, or that the first request is in flight.
        why: String,
    },
    /// Building a CSR or a TLS config.
    #[error("certificate for {identity}: {problem}")]
    Build {
        /// The identity.
        identity: Identity,
        /// What failed.
        problem: String,
    },
}

/// The next [`WorkloadCert::generation`].
static NEXT_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A certificate with its key, and the bundle to verify peers with.
pub struct WorkloadCert {
    /// Whose.
    pub identity: Identity,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// Expiry.
    pub not_after: SystemTime,
    /// Certificate serial, hex (for `/stats`; identifies a rotation).
    pub serial: String,
    /// The issuing root's name (for `/stats`; changes when a new root is activated).
    pub issuer: String,
    /// Unique among this process's certificates (from 1): a cheap key for "made with this
    /// certificate", e.g. for upstream pools, where comparing serials would cost an allocation.
    pub generation: u64,
    /// Roots to verify peers against.
    pub bundle: Arc<TrustBundle>,
    server: Arc<rustls::ServerConfig>,
    /// Whether the TLS configs let the secrets out, for connections handed to kernel TLS.
    secret_extraction: bool,
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl WorkloadCert {
    fn new(
        identity: Identity,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        bundle: Arc<TrustBundle>,
        secret_extraction: bool,
    ) -> Result<Self, CertError> {
        let build = |e: &dyn std::fmt::Display| CertError::Build {
            identity: identity.clone(),
            problem: e.to_string(),
        };
        let leaf = chain
            .first()
            .ok_or_else(|| build(&"the CA returned no certificate"))?;
        let (not_after, serial, issuer) = validity(leaf).map_err(|e| build(&e))?;
        let got = identity::svid_identity(leaf).map_err(|e| build(&e))?;
        if got != identity {
            return Err(build(&format!("the CA returned a certificate for {got}")));
        }
        let verifier = ClientVerifier::new(bundle.clone(), &identity.trust_domain);
        let mut server = rustls::ServerConfig::builder_with_provider(identity::provider())
            .with_protocol_versions(&identity::TLS13_ONLY)
            .map_err(|e| build(&e))?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| build(&e))?;
        server.alpn_protocols = vec![ALPN_H2.to_vec()];
        // A connection handed to the kernel needs its secrets out of rustls, and no tickets
        // after the handshake (they would reach the peer's kernel as records to skip).
        server.enable_secret_extraction = secret_extraction;
        if secret_extraction {
            server.send_tls13_tickets = 0;
        }
        Ok(Self {
            identity,
            chain,
            key,
            not_after,
            serial,
            issuer,
            generation: NEXT_GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            bundle,
            server: Arc::new(server),
            secret_extraction,
        })
    }

    /// The same certificate, verifying peers with a newer bundle.
    fn with_bundle(&self, bundle: Arc<TrustBundle>) -> Result<Self, CertError> {
        Self::new(
            self.identity.clone(),
            self.chain.clone(),
            self.key.clone_key(),
            bundle,
            self.secret_extraction,
        )
    }

    /// Whether it is still valid now.
    pub fn is_valid(&self) -> bool {
        SystemTime::now() < self.not_after
    }

    /// The server side of HBONE: present this certificate, require a client certificate of the
    /// trust domain.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server.clone()
    }

    /// The client side of HBONE: present this certificate, accept only `peer`.
    pub fn client_config(&self, peer: &Identity) -> Result<Arc<rustls::ClientConfig>, CertError> {
        let build = |e: rustls::Error| CertError::Build {
            identity: self.identity.clone(),
            problem: e.to_string(),
        };
        let verifier = ServerVerifier::new(self.bundle.clone(), peer.clone());
        let mut config = rustls::ClientConfig::builder_with_provider(identity::provider())
            .with_protocol_versions(&identity::TLS13_ONLY)
            .map_err(build)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(build)?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.enable_secret_extraction = self.secret_extraction;
        Ok(Arc::new(config))
    }
}

/// A certificate's expiry, serial (hex) and issuer name.
pub(crate) fn validity(
    der: &CertificateDer<'_>,
) -> Result<(SystemTime, String, String), IdentityError> {
    use x509_parser::prelude::FromDer;
    let (_, x) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| IdentityError::Parse(e.to_string()))?;
    let secs = x.validity().not_after.timestamp();
    let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    Ok((
        not_after,
        hex::encode(x.raw_serial()),
        x.issuer().to_string(),
    ))
}

/// Makes a key and a CSR for `id`; the key stays here.
fn make_csr(id: &Identity) -> Result<(String, PrivateKeyDer<'static>), CertError> {
    let build = |e: rcgen::Error| CertError::Build {
        identity: id.clone(),
        problem: e.to_string(),
    };
    let key = KeyPair::generate().map_err(build)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(build)?)];
    let csr = params.serialize_request(&key).map_err(build)?;
    let pem = csr.pem().map_err(build)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((pem, der))
}

/// One identity's state in `/stats`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct CertReport {
    /// Current certificate's serial, if any.
    pub serial: Option<String>,
    /// Its issuer.
    pub issuer: Option<String>,
    /// Seconds until it expires (negative: expired).
    pub expires_in_secs: Option<i64>,
    /// When it expires, in seconds since the Unix epoch.
    pub not_after_unix: Option<i64>,
    /// Certificates received so far.
    pub issued: u64,
    /// Failed requests so far.
    pub failures: u64,
    /// The last failure, if the last request failed.
    pub last_error: Option<String>,
}

#[derive(Debug)]
struct Entry {
    tx: watch::Sender<Option<Arc<WorkloadCert>>>,
    task: JoinHandle<()>,
    report: Arc<Mutex<CertReport>>,
}

/// Keeps a certificate for every identity of a local pod.
#[derive(Debug)]
pub struct CertManager {
    ca: CaClient,
    entries: Mutex<HashMap<Identity, Entry>>,
    bundle: RwLock<Option<Arc<TrustBundle>>>,
    bundle_generation: AtomicU64,
    /// `mesh_ca_errors_total`: failed certificate requests, for every identity ever managed.
    ca_errors: prometheus::IntCounter,
    /// `mesh_certificates_issued_total`.
    issued: prometheus::IntCounter,
    /// Whether certificates' TLS configs let secrets out for kernel TLS (`--ktls`, when the
    /// kernel has it).
    secret_extraction: bool,
}

impl CertManager {
    /// A manager getting certificates from `ca`.
    pub fn new(ca: CaClient, secret_extraction: bool) -> Arc<Self> {
        Arc::new(Self {
            ca,
            secret_extraction,
            entries: Mutex::new(HashMap::new()),
            bundle: RwLock::new(None),
            bundle_generation: AtomicU64::new(0),
            ca_errors: prometheus::IntCounter::new(
                "mesh_ca_errors_total",
                "Certificate requests that failed (CA unreachable, refused, or a bad answer)",
            )
            .expect("static metric options are valid"),
            issued: prometheus::IntCounter::new(
                "mesh_certificates_issued_total",
                "Workload certificates received from the CA",
            )
            .expect("static metric options are valid"),
        })
    }

    /// Makes the managed set exactly `ids`: starts renewal for new ones, stops the rest.
    pub fn set_wanted(self: &Arc<Self>, ids: impl IntoIterator<Item = Identity>) {
        let want: std::collections::BTreeSet<Identity> = ids.into_iter().collect();
        let mut entries = self.entries.lock();
        entries.retain(|id, e| {
            let keep = want.contains(id);
            if !keep {
                e.task.abort();
                info!(identity = %id, "no local pod has this identity any more; dropped its certificate");
            }
            keep
        });
        for id in want {
            if entries.contains_key(&id) {
                continue;
            }
            let (tx, _) = watch::channel(None);
            let report = Arc::new(Mutex::new(CertReport::default()));
            let task = tokio::spawn(renew_loop(
                Arc::downgrade(self),
                id.clone(),
                tx.clone(),
                report.clone(),
            ));
            entries.insert(id, Entry { tx, task, report });
        }
    }

    /// The identity's valid certificate now, if it has one.
    pub fn get(&self, id: &Identity) -> Result<Arc<WorkloadCert>, CertError> {
        let entries = self.entries.lock();
        let e = entries
            .get(id)
            .ok_or_else(|| CertError::NotManaged(id.clone()))?;
        let current = e.tx.borrow().clone();
        match current {
            Some(c) if c.is_valid() => Ok(c),
            _ => Err(CertError::NotReady {
                identity: id.clone(),
                why: e
                    .report
                    .lock()
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "the first request to the CA is in flight".into()),
            }),
        }
    }

    /// Waits up to `timeout` for a valid certificate: a pod enrolled before its certificate
    /// exists waits here rather than being passed in plaintext.
    pub async fn wait(
        &self,
        id: &Identity,
        timeout: Duration,
    ) -> Result<Arc<WorkloadCert>, CertError> {
        let mut rx = {
            let entries = self.entries.lock();
            entries
                .get(id)
                .ok_or_else(|| CertError::NotManaged(id.clone()))?
                .tx
                .subscribe()
        };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(c) = self.get(id) {
                return Ok(c);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return self.get(id);
            }
        }
    }

    /// Why not every managed identity has a valid certificate, if so.
    pub fn not_ready_reason(&self) -> Option<String> {
        let ids: Vec<Identity> = self.entries.lock().keys().cloned().collect();
        let missing: Vec<String> = ids
            .iter()
            .filter_map(|id| self.get(id).err().map(|e| e.to_string()))
            .collect();
        (!missing.is_empty()).then(|| missing.join("; "))
    }

    /// Per identity, for `/stats`.
    pub fn report(&self) -> BTreeMap<String, CertReport> {
        let now = SystemTime::now();
        self.entries
            .lock()
            .iter()
            .map(|(id, e)| {
                let mut r = e.report.lock().clone();
                if let Some(c) = e.tx.borrow().as_ref() {
                    r.serial = Some(c.serial.clone());
                    r.issuer = Some(c.issuer.clone());
                    r.expires_in_secs = Some(match c.not_after.duration_since(now) {
                        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
                    });
                    r.not_after_unix = c
                        .not_after
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .ok()
                        .and_then(|d| i64::try_from(d.as_secs()).ok());
                }
                (id.to_string(), r)
            })
            .collect()
    }

    /// How many roots the agent trusts now (2 during a root rotation's overlap).
    pub fn trust_roots(&self) -> usize {
        self.bundle.read().as_ref().map_or(0, |b| b.roots().len())
    }

    /// Publishes `cert`; if its bundle is new, re-publishes every other certificate with it.
    fn publish(&self, cert: WorkloadCert) {
        let bundle = cert.bundle.clone();
        let changed = {
            let mut b = self.bundle.write();
            let changed = b.as_ref().is_none_or(|old| old.roots() != bundle.roots());
            if changed {
                *b = Some(bundle.clone());
                self.bundle_generation.fetch_add(1, Ordering::Relaxed);
            }
            changed
        };
        let entries = self.entries.lock();
        if let Some(e) = entries.get(&cert.identity) {
            e.tx.send_replace(Some(Arc::new(cert)));
        }
        if changed {
            info!(roots = bundle.roots().len(), "trust bundle changed");
            for e in entries.values() {
                let current = e.tx.borrow().clone();
                if let Some(c) = current
                    && c.bundle.roots() != bundle.roots()
                {
                    match c.with_bundle(bundle.clone()) {
                        Ok(n) => {
                            e.tx.send_replace(Some(Arc::new(n)));
                        }
                        Err(err) => warn!("{err}"),
                    }
                }
            }
        }
    }

    async fn request(&self, id: &Identity) -> Result<WorkloadCert, String> {
        let (csr, key) = make_csr(id).map_err(|e| e.to_string())?;
        let issued = self
            .ca
            .sign(csr)
            .await
            .map_err(|e: CaError| e.to_string())?;
        let chain = identity::parse_pem_certs(&issued.certificate).map_err(|e| e.to_string())?;
        let bundle = TrustBundle::from_pem(&issued.trust_bundle).map_err(|e| e.to_string())?;
        WorkloadCert::new(
            id.clone(),
            chain,
            key,
            Arc::new(bundle),
            self.secret_extraction,
        )
        .map_err(|e| e.to_string())
    }
}

async fn renew_loop(
    mgr: std::sync::Weak<CertManager>,
    id: Identity,
    tx: watch::Sender<Option<Arc<WorkloadCert>>>,
    report: Arc<Mutex<CertReport>>,
) {
    let mut backoff = MIN_BACKOFF;
    let mut lifetime = MAX_BACKOFF * 4;
    loop {
        let Some(m) = mgr.upgrade() else { return };
        let result = m.request(&id).await;
        drop(m);
        let now = SystemTime::now();
        let wait = match result {
            Ok(cert) => {
                let left = cert.not_after.duration_since(now).unwrap_or_default();
                lifetime = left;
                {
                    let mut r = report.lock();
                    r.issued += 1;
                    r.last_error = None;
                }
                if let Some(m) = mgr.upgrade() {
                    m.issued.inc();
                }
                info!(identity = %id, serial = %cert.serial, valid_for = ?left, "workload certificate issued");
                if let Some(m) = mgr.upgrade() {
                    m.publish(cert);
                }
                backoff = MIN_BACKOFF;
                (left / 2).max(MIN_BACKOFF)
            }
            Err(e) => {
                {
                    let mut r = report.lock();
                    r.failures += 1;
                    r.last_error = Some(e.clone());
                }
                if let Some(m) = mgr.upgrade() {
                    m.ca_errors.inc();
                }
                let still_valid = tx.borrow().as_ref().is_some_and(|c| c.is_valid());
                warn!(
                    identity = %id,
                    retry_in = ?backoff,
                    still_valid,
                    "certificate request failed: {e}"
                );
                let wait = backoff;
                let cap = if still_valid {
                    MAX_BACKOFF
                } else {
                    MAX_BACKOFF_WITHOUT_CERT
                };
                backoff = (backoff * 2).min(cap).min((lifetime / 4).max(MIN_BACKOFF));
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// The certificates' part of `/metrics`: `mesh_certificate_expiry_timestamp_seconds{identity}`
/// (read at scrape time, so an identity no local pod has any more disappears),
/// `mesh_certificates_issued_total` and `mesh_ca_errors_total`.
#[derive(Debug)]
pub struct CertCollector {
    mgr: Arc<CertManager>,
    expiry: prometheus::IntGaugeVec,
    scrape: Mutex<()>,
}

impl CertCollector {
    /// A collector over `mgr`'s certificates.
    pub fn new(mgr: Arc<CertManager>) -> Result<Self, prometheus::Error> {
        Ok(Self {
            mgr,
            expiry: prometheus::IntGaugeVec::new(
                prometheus::Opts::new(
                    "mesh_certificate_expiry_timestamp_seconds",
                    "When each local identity's current certificate expires (Unix time)",
                ),
                &["identity"],
            )?,
            scrape: Mutex::new(()),
        })
    }
}

impl prometheus::core::Collector for CertCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut d = self.expiry.desc();
        d.extend(self.mgr.ca_errors.desc());
        d.extend(self.mgr.issued.desc());
        d
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let _one = self.scrape.lock();
        self.expiry.reset();
        for (id, r) in self.mgr.report() {
            if let Some(t) = r.not_after_unix {
                self.expiry.with_label_values(&[id.as_str()]).set(t);
            }
        }
        let mut out = self.expiry.collect();
        out.extend(self.mgr.ca_errors.collect());
        out.extend(self.mgr.issued.collect());
        out
    }
}

/// One request as a node would make it, for `mesh-agent ca request`.
pub async fn request_once(
    addr: crate::identity::ca::CaAddr,
    token_file: std::path::PathBuf,
    bundle_file: std::path::PathBuf,
    identity: &str,
    key_out: Option<&std::path::Path>,
) -> Result<crate::identity::ca::Issued, CaError> {
    let id: Identity = identity.parse()?;
    let (csr, key) = make_csr(&id).map_err(|e| CaError::BadCsr(e.to_string()))?;
    let client = CaClient::Remote {
        addr,
        token_file,
        bundle_file,
        trust_domain: id.trust_domain.clone(),
    };
    let issued = client.sign(csr).await?;
    if let Some(path) = key_out {
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        let pem = identity::to_pem("PRIVATE KEY", key.secret_der());
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut f| f.write_all(pem.as_bytes()))
            .map_err(|source| CaError::Io {
                path: path.to_owned(),
                source,
            })?;
    }
    Ok(issued)
}

/// Real TLS 1.3 handshakes over an in-memory pipe, with certificates from a real CA root on disk.
/// Each bad certificate must fail the handshake for the reason named.
#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a test should stop at the first unexpected error"
)]
pub(crate) mod tests {
    use std::path::Path;

    use rcgen::{Issuer, KeyPair};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::identity::ca::Ca;

    const TD: &str = "cluster.local";

    fn tempdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "mesh-certs-test-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// A certificate signed by `ca` for `id` (the same path agents use).
    fn issue(ca: &Ca, id: &Identity) -> WorkloadCert {
        let (csr, key) = make_csr(id).unwrap();
        let issued = ca.sign(&csr, |_| Ok(())).unwrap();
        let chain = identity::parse_pem_certs(&issued.certificate).unwrap();
        let bundle = TrustBundle::from_pem(&issued.trust_bundle).unwrap();
        WorkloadCert::new(id.clone(), chain, key, Arc::new(bundle), false).unwrap()
    }

    /// A certificate with arbitrary contents, signed by the root in `dir` (or self-signed).
    fn forge(
        dir: Option<&Path>,
        uris: &[&str],
        not_after: time::OffsetDateTime,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(2);
        params.not_after = not_after;
        let cert = match dir {
            Some(dir) => {
                let root_key =
                    KeyPair::from_pem(&std::fs::read_to_string(dir.join("root-key.pem")).unwrap())
                        .unwrap();
                let issuer = Issuer::from_ca_cert_pem(
                    &std::fs::read_to_string(dir.join("root-cert.pem")).unwrap(),
                    root_key,
                )
                .unwrap();
                params.signed_by(&key, &issuer).unwrap()
            }
            None => params.self_signed(&key).unwrap(),
        };
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (vec![cert.der().clone()], der)
    }

    fn raw_client(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        bundle: Arc<TrustBundle>,
        expect: &Identity,
    ) -> Arc<rustls::ClientConfig> {
        let mut c = rustls::ClientConfig::builder_with_provider(identity::provider())
            .with_protocol_versions(&identity::TLS13_ONLY)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServerVerifier::new(bundle, expect.clone())))
            .with_client_auth_cert(chain, key)
            .unwrap();
        c.alpn_protocols = vec![ALPN_H2.to_vec()];
        Arc::new(c)
    }

    fn raw_server(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        bundle: Arc<TrustBundle>,
    ) -> Arc<rustls::ServerConfig> {
        let verifier = ClientVerifier::new(bundle, TD);
        Arc::new(
            rustls::ServerConfig::builder_with_provider(identity::provider())
                .with_protocol_versions(&identity::TLS13_ONLY)
                .unwrap()
                .with_client_cert_verifier(Arc::new(verifier))
                .with_single_cert(chain, key)
                .unwrap(),
        )
    }

    /// Runs a handshake plus one byte each way; returns (client error, server error, identity
    /// the server saw).
    async fn handshake(
        client: Arc<rustls::ClientConfig>,
        server: Arc<rustls::ServerConfig>,
    ) -> (Option<String>, Option<String>, Option<Identity>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let name = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let c = async move {
            let mut s = tokio_rustls::TlsConnector::from(client)
                .connect(name, a)
                .await
                .map_err(|e| e.to_string())?;
            s.write_all(b"x").await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 1];
            s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        };
        let s = async move {
            let mut s = tokio_rustls::TlsAcceptor::from(server)
                .accept(b)
                .await
                .map_err(|e| e.to_string())?;
            let id = s
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| identity::svid_identity(c).map_err(|e| e.to_string()))
                .transpose()?;
            let mut buf = [0u8; 1];
            s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            s.write_all(b"y").await.map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(id)
        };
        let (cr, sr) = tokio::join!(c, s);
        let seen = sr.clone().ok().flatten();
        (cr.err(), sr.err(), seen)
    }

    /// A CA on disk and two workloads' certificates from it.
    pub(crate) struct Fixture {
        pub(crate) dir: std::path::PathBuf,
        ca: Ca,
        pub(crate) server_id: Identity,
        client_id: Identity,
        pub(crate) server: WorkloadCert,
        pub(crate) client: WorkloadCert,
    }

    pub(crate) fn fixture(tag: &str) -> Fixture {
        let dir = tempdir(tag);
        let ca = Ca::open(&dir, TD, Duration::from_secs(3600)).unwrap();
        let server_id = Identity::new(TD, "default", "server");
        let client_id = Identity::new(TD, "default", "client");
        let server = issue(&ca, &server_id);
        let client = issue(&ca, &client_id);
        Fixture {
            dir,
            ca,
            server_id,
            client_id,
            server,
            client,
        }
    }

    fn expect_fail(r: &(Option<String>, Option<String>, Option<Identity>), side: &str, why: &str) {
        let err = if side == "server" { &r.1 } else { &r.0 };
        let msg = err.as_deref().unwrap_or_else(|| {
            panic!("the handshake succeeded; {side} should have refused ({why})")
        });
        assert!(
            msg.contains(why),
            "{side} failed, but not for {why:?}: {msg}"
        );
    }

    #[tokio::test]
    async fn good_certificates_handshake_and_server_sees_client_identity() {
        let f = fixture("good");
        let r = handshake(
            f.client.client_config(&f.server_id).unwrap(),
            f.server.server_config(),
        )
        .await;
        assert_eq!(r.0, None, "client: {r:?}");
        assert_eq!(r.1, None, "server: {r:?}");
        assert_eq!(r.2, Some(f.client_id.clone()));
        let _ = std::fs::remove_dir_all(&f.dir);
    }

    #[tokio::test]
    async fn wrong_trust_domain_fails() {
        let f = fixture("td");
        // Same root, other trust domain: the chain verifies, the SPIFFE check must not.
        let other = Ca::open(&f.dir, "evil.example", Duration::from_secs(3600)).unwrap();
        let bad = issue(&other, &Identity::new("evil.example", "default", "client"));
        let r = handshake(
            raw_client(
                bad.chain.clone(),
                bad.key.clone_key(),
                f.client.bundle.clone(),
                &f.server_id,
            ),
            f.server.server_config(),
        )
        .await;
        expect_fail(&r, "server", "trust domain is \"evil.example\"");
        let _ = std::fs::remove_dir_all(&f.dir);
    }

    #[tokio::test]
    async fn expired_certificate_fails() {
        let f = fixture("expired");
        let past = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        let (chain, key) = forge(
            Some(&f.dir),
            &["spiffe://cluster.local/ns/default/sa/client"],
            past,
        );
        let r = handshake(
            raw_client(chain, key, f.client.bundle.clone(), &f.server_id),
            f.server.server_config(),
        )
        .await;
        expect_fail(&r, "server", "CertExpired");
        let _ = std::fs::remove_dir_all(&f.dir);
    }

    #[tokio::test]
    async fn self_signed_certificate_fails() {
        let f = fixture("selfsigned");
        let later = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
        let (chain, key) = forge(
            None,
            &["spiffe://cluster.local/ns/default/sa/client"],
            later,
        );
        let r = handshake(
            raw_client(chain, key, f.client.bundle.clone(), &f.server_id),
            f.server.server_config(),
        )
        .await;
        expect_fail(&r, "server", "UnknownIssuer");
        let _ = std::fs::remove_dir_all(&f.dir);
    }

    #[tokio::test]
    async fn two_uri_sans_fail() {
        let f = fixture("twosans");
        let later = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
        let (chain, key) = forge(
            Some(&f.dir),
            &[
                "spiffe://cluster.local/ns/default/sa/client",
                "spiffe://cluster.local/ns/default/sa/admin",
            ],
            later,
        );
        let r = handshake(
            raw_client(chain, key, f.client.bundle.clone(), &f.server_id),
            f.server.server_config(),
        )
        .await;
        expect_fail(&r, "server", "has 2 URI SANs");
        let _ = std::fs::remove_dir_all(&f.dir);
    }

    #[tokio::test]
    async fn server_with_another_identity_fails() {
        let f = fixture("impostor");
        // A perfectly valid certificate, but for a workload other than the destination.
        let impostor = issue(&f.ca, &Identity::new(TD, "default", "impostor"));
        let r = handshake(
            f.client.client_config(&f.server_id).unwrap(),
            impostor.server_config(),
        )
        .await;
        expect_fail(
            &r,
            "client",
            "presented spiffe://cluster.local/ns/default/sa/impostor",
        );
        let _ = std::fs::remove_dir_all(&f.dir);
    }

    #[tokio::test]
    async fn unknown_ca_fails_both_ways() {
        let f = fixture("unknownca");
        let dir2 = tempdir("unknownca2");
        let other = Ca::open(&dir2, TD, Duration::from_secs(3600)).unwrap();
        let foreign_client = issue(&other, &f.client_id);
        let r = handshake(
            raw_client(
                foreign_client.chain.clone(),
                foreign_client.key.clone_key(),
                f.client.bundle.clone(),
                &f.server_id,
            ),
            f.server.server_config(),
        )
        .await;
        expect_fail(&r, "server", "UnknownIssuer");
        let foreign_server = issue(&other, &f.server_id);
        let r = handshake(
            f.client.client_config(&f.server_id).unwrap(),
            raw_server(
                foreign_server.chain.clone(),
                foreign_server.key.clone_key(),
                f.server.bundle.clone(),
            ),
        )
        .await;
        expect_fail(&r, "client", "UnknownIssuer");
        let _ = std::fs::remove_dir_all(&f.dir);
        let _ = std::fs::remove_dir_all(&dir2);
    }

    #[tokio::test]
    async fn rotated_root_is_trusted_beside_the_old_one() {
        let f = fixture("rotate");
        crate::identity::ca::rotate_root(&f.dir, TD).unwrap();
        assert!(f.ca.reload().unwrap());
        // Prepared: trusted, not yet signing.
        let prepared = issue(&f.ca, &f.server_id);
        assert_eq!(prepared.bundle.roots().len(), 2);
        let r = handshake(
            f.client.client_config(&f.server_id).unwrap(),
            prepared.server_config(),
        )
        .await;
        assert_eq!(
            (r.0.clone(), r.1.clone()),
            (None, None),
            "still the old root: {r:?}"
        );
        crate::identity::ca::activate_root(&f.dir).unwrap();
        assert!(f.ca.reload().unwrap());
        // New certificates come from the new root; the bundle carries both.
        let new_server = issue(&f.ca, &f.server_id);
        assert_eq!(new_server.bundle.roots().len(), 2);
        // An old-root client against a new-root server verifies with the new bundle, and only
        // with it.
        let r = handshake(
            f.client.client_config(&f.server_id).unwrap(),
            new_server.server_config(),
        )
        .await;
        expect_fail(&r, "client", "UnknownIssuer");
        let old_client = f.client.with_bundle(new_server.bundle.clone()).unwrap();
        let r = handshake(
            old_client.client_config(&f.server_id).unwrap(),
            new_server.server_config(),
        )
        .await;
        assert_eq!((r.0.clone(), r.1.clone()), (None, None), "{r:?}");
        // After retiring, the old root's certificates no longer verify.
        crate::identity::ca::retire_roots(&f.dir).unwrap();
        f.ca.reload().unwrap();
        let newest = issue(&f.ca, &f.server_id);
        assert_eq!(newest.bundle.roots().len(), 1);
        let r = handshake(
            f.client.client_config(&f.server_id).unwrap(),
            newest.server_config(),
        )
        .await;
        expect_fail(&r, "client", "UnknownIssuer");
        let _ = std::fs::remove_dir_all(&f.dir);
    }

    #[test]
    fn ca_refuses_csr_with_two_sans_or_foreign_domain() {
        let f = fixture("csr");
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI("spiffe://cluster.local/ns/a/sa/b".try_into().unwrap()),
            SanType::URI("spiffe://cluster.local/ns/a/sa/c".try_into().unwrap()),
        ];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let e = f.ca.sign(&csr, |_| Ok(())).unwrap_err().to_string();
        assert!(e.contains("2 URI SANs"), "{e}");
        let (csr, _) = make_csr(&Identity::new("other.td", "a", "b")).unwrap();
        let e = f.ca.sign(&csr, |_| Ok(())).unwrap_err().to_string();
        assert!(e.contains("trust domain"), "{e}");
        let _ = std::fs::remove_dir_all(&f.dir);
    }
}
