//! The mesh CA: signs workload certificates for the identities of pods on the asking node.
//!
//! Invariants:
//! - Keys never travel: agents send CSRs, the CA returns certificates.
//! - The CA signs only `spiffe://<td>/ns/<ns>/sa/<sa>` where a pod with that namespace and service
//!   account is on the asking node. A stolen node token yields that node's identities, not the
//!   mesh's.
//! - What a certificate says comes from the CA, never the CSR: only the CSR's public key and its
//!   one URI SAN are read; lifetime, usages and serial are the CA's.
//! - The root is a [`RootSet`]: `root-key.pem`, `root-cert.pem` and `bundle.pem` (and, during a
//!   rotation, `next-root-key.pem` and `next-root-cert.pem`), kept in a directory (mode 0600 for
//!   keys) or, in Kubernetes, in a Secret with those keys. The bundle lists every trusted root.
//!   Every signing response carries it, which is how agents learn of it.
//! - Root rotation has two steps, so that no certificate is ever signed by a root some agent does
//!   not trust yet: `rotate-root` prepares a new root (`next-root-*.pem`) and adds it to the
//!   bundle, while signing goes on with the old one; once every agent has renewed (half a
//!   certificate lifetime), `activate-root` makes it the signing root. Old and new certificates
//!   verify everywhere during the overlap; `retire-roots` ends it.
//! - The signing key must match the signing certificate; a half-written rotation is refused and
//!   the previous root keeps signing.
//!
//! The same [`Ca`] runs embedded in a lone agent (local mode) and as `mesh-agent ca`, a TLS server
//! that authenticates nodes by bearer token (the local stand-in for Kubernetes' TokenReview).

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use parking_lot::Mutex;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::info;

use crate::identity::{self, Identity, IdentityError, TrustBundle};

/// The namespace and service account of the CA's own serving identity.
pub const CA_NAMESPACE: &str = "mesh-system";
/// See [`CA_NAMESPACE`].
pub const CA_SERVICE_ACCOUNT: &str = "mesh-ca";
/// The path agents POST CSRs to.
pub const SIGN_PATH: &str = "/v1/sign";
/// Largest accepted request body; a CSR is well under 2 KiB.
pub const MAX_BODY: usize = 64 * 1024;

/// Everything that can go wrong in the CA, on either side of the wire.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Reading or writing the root directory.
    #[error("CA directory {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The files on disk are not a usable root.
    #[error("CA root {place}: {problem} (restore it; only removing it makes a new root)")]
    BadRoot {
        /// Where: a file, or a Secret and key.
        place: String,
        /// What is wrong.
        problem: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The CSR is not acceptable.
    #[error("bad CSR: {0}")]
    BadCsr(String),
    /// The node may not have this identity.
    #[error("node {node} may not obtain {identity}: {why}")]
    Forbidden {
        /// The asking node.
        node: String,
        /// The identity requested.
        identity: Identity,
        /// Why not.
        why: String,
    },
    /// TokenReview did not accept the bearer token as an agent's (Kubernetes mode).
    #[error("token refused: {0}")]
    TokenRejected(String),
    /// The Kubernetes API could not be asked; the request can be retried.
    #[error("Kubernetes API: {0}")]
    Kubernetes(String),
    /// The bearer token matched no node.
    #[error("unknown node token: the CA has no node with this token (check --ca-token-file)")]
    Unauthenticated,
    /// The CA configuration file.
    #[error("CA config {path}: {problem}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Talking to a remote CA failed.
    #[error("CA {addr}: {problem}")]
    Remote {
        /// The CA's address.
        addr: CaAddr,
        /// What went wrong.
        problem: String,
    },
    /// A certificate or bundle failed identity checks.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// TLS setup.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// Maps an I/O error on `path` to [`CaError::Io`].
pub fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where a remote CA listens: `host:port`, the host a name (the CA's Kubernetes Service) or an
/// IP address (`[v6]:port` for IPv6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaAddr(String);

impl std::str::FromStr for CaAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{s:?} is not host:port ({why})");
        let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        port.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("the port is not 1-65535"))?;
        let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
        let valid = match bracketed {
            Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => {
                !host.is_empty()
                    && !host.contains(':')
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            }
        };
        if !valid {
            return Err(bad("the host is not a DNS name, an IPv4 address or [IPv6]"));
        }
        Ok(Self(s.to_string()))
    }
}

impl std::fmt::Display for CaAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<SocketAddr> for CaAddr {
    fn from(a: SocketAddr) -> Self {
        Self(a.to_string())
    }
}

impl CaAddr {
    fn server_name(&self) -> Result<rustls::pki_types::ServerName<'static>, String> {
        let host = self.0.rsplit_once(':').map_or("", |(h, _)| h);
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(rustls::pki_types::ServerName::IpAddress(ip.into())),
            Err(_) => rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| format!("{host:?} as a TLS server name: {e}")),
        }
    }
}

/// A freshly signed certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Issued {
    /// The leaf, PEM.
    pub certificate: String,
    /// Every root the mesh trusts now, PEM.
    pub trust_bundle: String,
}

struct Signer {
    issuer: Issuer<'static, KeyPair>,
    bundle: Arc<TrustBundle>,
    /// File contents the signer was built from, to notice rotations.
    fingerprint: Vec<u8>,
}

/// The root material by file name: the same names in a directory and in a Secret's data.
pub type RootSet = BTreeMap<String, Vec<u8>>;

/// The signing root's private key.
pub const ROOT_KEY: &str = "root-key.pem";
/// The signing root's certificate.
pub const ROOT_CERT: &str = "root-cert.pem";
/// Every trusted root.
pub const BUNDLE: &str = "bundle.pem";
const NEXT_KEY: &str = "next-root-key.pem";
const NEXT_CERT: &str = "next-root-cert.pem";

/// Where a CA's root lives: read whole on every [`Ca::reload`].
pub trait RootSource: Send + Sync + std::fmt::Debug {
    /// The current root material.
    fn read(&self) -> Result<RootSet, CaError>;
    /// How an operator finds `key` of it (a path, or a Secret and key).
    fn place(&self, key: &str) -> String;
}

/// A root directory (local mode, or a CA outside Kubernetes).
#[derive(Debug, Clone)]
pub struct RootDir(pub PathBuf);

impl RootSource for RootDir {
    fn read(&self) -> Result<RootSet, CaError> {
        let mut set = RootSet::new();
        for f in [ROOT_KEY, ROOT_CERT, BUNDLE, NEXT_KEY, NEXT_CERT] {
            let p = self.0.join(f);
            match std::fs::read(&p) {
                Ok(b) => {
                    set.insert(f.to_string(), b);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&p)(e)),
            }
        }
        Ok(set)
    }
    fn place(&self, key: &str) -> String {
        self.0.join(key).display().to_string()
    }
}

impl RootDir {
    /// Writes the files that differ between `old` and `new` and removes those `new` lacks. Keys
    /// go first, then certificates, then the bundle: between two writes the pair does not
    /// match, and a running CA refuses to load it and keeps signing with the previous root.
    pub fn write(&self, old: &RootSet, new: &RootSet) -> Result<(), CaError> {
        std::fs::create_dir_all(&self.0).map_err(io_err(&self.0))?;
        for f in [ROOT_KEY, NEXT_KEY, ROOT_CERT, NEXT_CERT, BUNDLE] {
            let p = self.0.join(f);
            match new.get(f) {
                Some(b) if old.get(f) != Some(b) => {
                    let mode = if f.ends_with("key.pem") { 0o600 } else { 0o644 };
                    write_atomic(&p, b, mode)?;
                }
                Some(_) => {}
                None if old.contains_key(f) => std::fs::remove_file(&p).map_err(io_err(&p))?,
                None => {}
            }
        }
        Ok(())
    }
}

/// A certificate authority over one root.
pub struct Ca {
    source: Arc<dyn RootSource>,
    trust_domain: String,
    ttl: Duration,
    signer: Mutex<Arc<Signer>>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("source", &self.source)
            .field("trust_domain", &self.trust_domain)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    io::Write::write_all(&mut f, data)
        .and_then(|()| f.sync_all())
        .map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn new_root(trust_domain: &str) -> Result<(KeyPair, rcgen::Certificate), CaError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let now = time::OffsetDateTime::now_utc();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    // A unique name: two roots with one name make verifiers try the wrong key.
    let serial = random_serial();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("mesh root {}", hex::encode(serial.to_bytes())),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(3650);
    params.serial_number = Some(serial);
    let cert = params.self_signed(&key)?;
    Ok((key, cert))
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    // A failure of the system RNG leaves zeros; the serial then still differs by time below.
    let _ = identity::provider().secure_random.fill(&mut b);
    b[0] &= 0x7f; // positive INTEGER
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    for (i, x) in t.to_be_bytes()[8..].iter().enumerate() {
        b[8 + i] ^= x;
    }
    SerialNumber::from_slice(&b)
}

impl Ca {
    /// Opens the root in `dir`, creating a new one (and the directory) on first start.
    pub fn open(dir: &Path, trust_domain: &str, ttl: Duration) -> Result<Self, CaError> {
        let store = RootDir(dir.to_owned());
        let set = store.read()?;
        if !set.contains_key(ROOT_KEY) {
            store.write(&set, &new_root_set(trust_domain)?)?;
            info!(dir = %dir.display(), "created a new CA root");
        }
        Self::with_source(Arc::new(store), trust_domain, ttl)
    }

    /// A CA signing with the root `source` holds now.
    pub fn with_source(
        source: Arc<dyn RootSource>,
        trust_domain: &str,
        ttl: Duration,
    ) -> Result<Self, CaError> {
        let signer = load_signer(&source.read()?, source.as_ref())?;
        Ok(Self {
            source,
            trust_domain: trust_domain.to_string(),
            ttl,
            signer: Mutex::new(Arc::new(signer)),
        })
    }

    fn signer(&self) -> Arc<Signer> {
        self.signer.lock().clone()
    }

    /// How long the certificates it signs live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The trust domain it signs for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The roots agents should trust now.
    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.signer().bundle.clone()
    }

    /// Re-reads the root if it changed (a rotation); returns whether it did.
    pub fn reload(&self) -> Result<bool, CaError> {
        let set = self.source.read()?;
        if fingerprint(&set) == self.signer().fingerprint {
            return Ok(false);
        }
        let signer = load_signer(&set, self.source.as_ref())?;
        *self.signer.lock() = Arc::new(signer);
        info!(root = %self.source.place(ROOT_CERT), "the CA root changed; now signing with the current root");
        Ok(true)
    }

    /// The identity `csr_pem` asks for, if this CA could sign it at all: one SPIFFE URI SAN in
    /// this trust domain.
    pub fn requested(&self, csr_pem: &str) -> Result<Identity, CaError> {
        Ok(self.parse_csr(csr_pem)?.0)
    }

    fn parse_csr(
        &self,
        csr_pem: &str,
    ) -> Result<(Identity, CertificateSigningRequestParams), CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let uris: Vec<&str> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|s| match s {
                SanType::URI(u) => Some(u.as_str()),
                _ => None,
            })
            .collect();
        let [uri] = uris.as_slice() else {
            return Err(CaError::BadCsr(format!(
                "it asks for {} URI SANs; exactly one SPIFFE ID is allowed",
                uris.len()
            )));
        };
        let id: Identity = uri.parse()?;
        if id.trust_domain != self.trust_domain {
            return Err(CaError::BadCsr(format!(
                "trust domain {:?} is not this CA's ({:?})",
                id.trust_domain, self.trust_domain
            )));
        }
        Ok((id, csr))
    }

    /// Signs `csr_pem` if `authorize` accepts the identity it asks for.
    pub fn sign(
        &self,
        csr_pem: &str,
        authorize: impl FnOnce(&Identity) -> Result<(), CaError>,
    ) -> Result<Issued, CaError> {
        let (id, csr) = self.parse_csr(csr_pem)?;
        authorize(&id)?;
        let cert = self.issue(&id, &csr.public_key)?;
        Ok(Issued {
            certificate: cert.pem(),
            trust_bundle: self.bundle().to_pem(),
        })
    }

    fn issue(
        &self,
        id: &Identity,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<rcgen::Certificate, CaError> {
        let now = time::OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            id.to_string()
                .try_into()
                .map_err(|e| CaError::BadCsr(format!("{e}")))?,
        )];
        // Small backdating absorbs clock skew without stretching short test lifetimes much.
        params.not_before = now - time::Duration::seconds(5);
        params.not_after = now + time::Duration::try_from(self.ttl).unwrap_or(time::Duration::DAY);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        Ok(params.signed_by(public_key, &self.signer().issuer)?)
    }

    /// A certificate and key for `id` made here, without a CSR: the CA's own serving identity.
    pub fn self_issue(
        &self,
        id: &Identity,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate()?;
        let cert = self.issue(id, &key)?;
        let der = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| CaError::BadRoot {
            place: "a key made for the CA's own identity".into(),
            problem: e.to_string(),
        })?;
        Ok((vec![cert.der().clone()], der))
    }
}

fn fingerprint(set: &RootSet) -> Vec<u8> {
    let mut h = Sha256::new();
    for f in [ROOT_CERT, BUNDLE, ROOT_KEY] {
        let b = set.get(f).map_or(&[][..], Vec::as_slice);
        h.update((b.len() as u64).to_be_bytes());
        h.update(b);
    }
    h.finalize().to_vec()
}

fn load_signer(set: &RootSet, source: &dyn RootSource) -> Result<Signer, CaError> {
    let bad = |f: &str, problem: String| CaError::BadRoot {
        place: source.place(f),
        problem,
    };
    let read = |f: &str| {
        let b = set.get(f).ok_or_else(|| bad(f, "missing".into()))?;
        String::from_utf8(b.clone()).map_err(|_| bad(f, "not PEM text".into()))
    };
    let key = KeyPair::from_pem(&read(ROOT_KEY)?)
        .map_err(|e| bad(ROOT_KEY, format!("not a private key: {e}")))?;
    let cert_pem = read(ROOT_CERT)?;
    let root = identity::parse_pem_certs(&cert_pem)?;
    let spki_matches = root.first().is_some_and(|der| {
        use x509_parser::prelude::FromDer;
        x509_parser::certificate::X509Certificate::from_der(der).is_ok_and(|(_, x)| {
            x.public_key().raw == rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        })
    });
    if !spki_matches {
        return Err(bad(
            ROOT_KEY,
            format!("does not belong to {ROOT_CERT} (a rotation half-written?)"),
        ));
    }
    let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
        .map_err(|e| bad(ROOT_CERT, format!("not a CA certificate: {e}")))?;
    let bundle = TrustBundle::from_pem(&read(BUNDLE)?).map_err(|e| bad(BUNDLE, e.to_string()))?;
    if !root
        .first()
        .is_some_and(|r| bundle.roots().iter().any(|b| b == r))
    {
        return Err(bad(
            BUNDLE,
            format!("does not contain {ROOT_CERT}; certificates it signs would not verify"),
        ));
    }
    Ok(Signer {
        issuer,
        bundle: Arc::new(bundle),
        fingerprint: fingerprint(set),
    })
}

/// A new root, trusted alone.
pub fn new_root_set(trust_domain: &str) -> Result<RootSet, CaError> {
    let (key, cert) = new_root(trust_domain)?;
    Ok(RootSet::from([
        (BUNDLE.to_string(), cert.pem().into_bytes()),
        (ROOT_CERT.to_string(), cert.pem().into_bytes()),
        (ROOT_KEY.to_string(), key.serialize_pem().into_bytes()),
    ]))
}

/// The first step of a rotation: a new root, trusted beside the current one, not signing yet.
pub fn rotated(
    set: &RootSet,
    trust_domain: &str,
    source: &dyn RootSource,
) -> Result<RootSet, CaError> {
    if set.contains_key(NEXT_CERT) {
        return Err(CaError::BadRoot {
            place: source.place(NEXT_CERT),
            problem: "a rotation is already prepared; run `mesh-agent ca activate-root` first"
                .into(),
        });
    }
    let old = set.get(BUNDLE).ok_or_else(|| CaError::BadRoot {
        place: source.place(BUNDLE),
        problem: "missing".into(),
    })?;
    let (key, cert) = new_root(trust_domain)?;
    let mut new = set.clone();
    let mut bundle = old.clone();
    if !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(cert.pem().as_bytes());
    new.insert(NEXT_KEY.to_string(), key.serialize_pem().into_bytes());
    new.insert(NEXT_CERT.to_string(), cert.pem().into_bytes());
    new.insert(BUNDLE.to_string(), bundle);
    Ok(new)
}

/// The second step: the prepared root signs from now on.
pub fn activated(set: &RootSet, source: &dyn RootSource) -> Result<RootSet, CaError> {
    let mut new = set.clone();
    let (Some(key), Some(cert)) = (new.remove(NEXT_KEY), new.remove(NEXT_CERT)) else {
        return Err(CaError::BadRoot {
            place: source.place(NEXT_CERT),
            problem: "no prepared root: run `mesh-agent ca rotate-root` first".into(),
        });
    };
    new.insert(ROOT_KEY.to_string(), key);
    new.insert(ROOT_CERT.to_string(), cert);
    Ok(new)
}

/// The last step: only the current root is trusted.
pub fn retired(set: &RootSet, source: &dyn RootSource) -> Result<RootSet, CaError> {
    let current = set.get(ROOT_CERT).ok_or_else(|| CaError::BadRoot {
        place: source.place(ROOT_CERT),
        problem: "missing".into(),
    })?;
    let mut new = set.clone();
    new.insert(BUNDLE.to_string(), current.clone());
    Ok(new)
}

/// Applies one rotation step to the root directory `dir`.
pub fn step_dir(
    dir: &Path,
    step: impl FnOnce(&RootSet, &dyn RootSource) -> Result<RootSet, CaError>,
) -> Result<(), CaError> {
    let store = RootDir(dir.to_owned());
    let old = store.read()?;
    if !old.contains_key(ROOT_CERT) {
        return Err(CaError::BadRoot {
            place: store.place(ROOT_CERT),
            problem: "no root here (is --dir the CA's directory?)".into(),
        });
    }
    let new = step(&old, &store)?;
    store.write(&old, &new)
}

/// `mesh-agent ca rotate-root`: prepares a new root and trusts it beside the current one. Signing
/// goes on with the current root until [`activate_root`]; agents learn the new bundle at their
/// next renewal.
pub fn rotate_root(dir: &Path, trust_domain: &str) -> Result<(), CaError> {
    step_dir(dir, |set, src| rotated(set, trust_domain, src))
}

/// `mesh-agent ca activate-root`: the prepared root signs from now on. Run it once every agent
/// has renewed since `rotate-root` (half a certificate lifetime), so every verifier trusts it.
pub fn activate_root(dir: &Path) -> Result<(), CaError> {
    step_dir(dir, activated)
}

/// `mesh-agent ca retire-roots`: trusts only the current root. Run it once every workload
/// certificate from the old root has expired (one certificate lifetime after the rotation).
pub fn retire_roots(dir: &Path) -> Result<(), CaError> {
    step_dir(dir, retired)
}

/// The CA's own identity, which agents check when they connect.
pub fn ca_identity(trust_domain: &str) -> Identity {
    Identity::new(trust_domain, CA_NAMESPACE, CA_SERVICE_ACCOUNT)
}

/// The body of a signing request.
#[derive(Debug, Serialize, Deserialize)]
pub struct SignRequest {
    /// The CSR, PEM.
    pub csr: String,
}

/// The body of a refusal.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Why, for the operator.
    pub error: String,
}

/// Whether the asking node may have an identity: `Err` says why not. Runs on the blocking pool.
pub type AuthorizeFn = dyn Fn(&Identity) -> Result<(), CaError> + Send + Sync;

/// The embedded CA's source of truth for [`AuthorizeFn`] (the node file in local mode).
#[derive(Clone)]
pub struct Authorizer(pub Arc<AuthorizeFn>);

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authorizer")
    }
}

/// An agent's way to its CA.
#[derive(Debug, Clone)]
pub enum CaClient {
    /// The CA runs in this process (local mode with one agent).
    Embedded {
        /// The CA.
        ca: Arc<Ca>,
        /// Whether this node may have an identity: the caller's source of truth (the node file
        /// in local mode).
        authorize: Authorizer,
    },
    /// `mesh-agent ca` over TLS.
    Remote {
        /// Its address.
        addr: CaAddr,
        /// File holding this node's bearer token (re-read on every request, so it can rotate).
        token_file: PathBuf,
        /// The roots to trust when connecting to the CA (re-read on every request).
        bundle_file: PathBuf,
        /// The mesh trust domain (the CA's identity lives in it).
        trust_domain: String,
    },
}

impl CaClient {
    /// Asks for a certificate for the CSR.
    pub async fn sign(&self, csr_pem: String) -> Result<Issued, CaError> {
        match self {
            Self::Embedded { ca, authorize } => {
                let (ca, authorize) = (ca.clone(), authorize.clone());
                tokio::task::spawn_blocking(move || {
                    ca.reload()?;
                    ca.sign(&csr_pem, |id| authorize.0(id))
                })
                .await
                .unwrap_or_else(|e| Err(CaError::BadCsr(format!("signing task failed: {e}"))))
            }
            Self::Remote {
                addr,
                token_file,
                bundle_file,
                trust_domain,
            } => remote_sign(addr, token_file, bundle_file, trust_domain, csr_pem).await,
        }
    }
}

async fn remote_sign(
    addr: &CaAddr,
    token_file: &Path,
    bundle_file: &Path,
    trust_domain: &str,
    csr_pem: String,
) -> Result<Issued, CaError> {
    let remote = |problem: String| CaError::Remote {
        addr: addr.clone(),
        problem,
    };
    let token = std::fs::read_to_string(token_file).map_err(io_err(token_file))?;
    let bundle_pem = std::fs::read_to_string(bundle_file).map_err(io_err(bundle_file))?;
    let bundle = Arc::new(TrustBundle::from_pem(&bundle_pem)?);
    let verifier = identity::ServerVerifier::new(bundle, ca_identity(trust_domain));
    let config = rustls::ClientConfig::builder_with_provider(identity::provider())
        .with_protocol_versions(&identity::TLS13_ONLY)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    // A name (the CA's Service) is resolved on every request: the Service may move.
    let connect = async {
        let mut last = None;
        for a in tokio::net::lookup_host(addr.0.as_str()).await? {
            match tokio::net::TcpStream::connect(a).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("the name resolved to no address")))
    };
    let tcp = tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .map_err(|_| remote("connect timed out after 5 s".into()))?
        .map_err(|e| remote(format!("connect: {e}")))?;
    // The CA is verified by its SPIFFE identity, not by this name.
    let name = addr.server_name().map_err(remote)?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| remote(format!("TLS: {e}")))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| remote(format!("HTTP: {e}")))?;
    tokio::spawn(conn);
    let body = serde_json::to_vec(&SignRequest { csr: csr_pem }).unwrap_or_default();
    let req = Request::post(SIGN_PATH)
        .header(hyper::header::HOST, addr.0.as_str())
        .header(
            hyper::header::AUTHORIZATION,
            format!("Bearer {}", token.trim()),
        )
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| remote(e.to_string()))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .map_err(|_| remote("no answer within 10 s".into()))?
        .map_err(|e| remote(format!("HTTP: {e}")))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| remote(format!("reading the answer: {e}")))?
        .to_bytes();
    if status != StatusCode::OK {
        let msg = serde_json::from_slice::<ErrorBody>(&body)
            .map(|b| b.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        return Err(remote(format!("refused ({status}): {msg}")));
    }
    serde_json::from_slice(&body).map_err(|e| remote(format!("malformed answer: {e}")))
}
