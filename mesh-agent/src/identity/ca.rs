//! The mesh CA: signs workload certificates for the identities of pods on the asking node.
//!
//! Invariants:
//! - Keys never travel: agents send CSRs, the CA returns certificates.
//! - The CA signs only `spiffe://<td>/ns/<ns>/sa/<sa>` where a pod with that namespace and service
//!   account is on the asking node. A stolen node token yields that node's identities, not the
//!   mesh's.
//! - What a certificate says comes from the CA, never the CSR: only the CSR's public key and its
//!   one URI SAN are read; lifetime, usages and serial are the CA's.
//! - The root directory holds `root-key.pem` (0600), `root-cert.pem` and `bundle.pem`. The bundle
//!   lists every trusted root. Every signing response carries it, which is how agents learn of
//!   it.
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
    #[error(
        "CA directory {path}: {problem} (restore the files, or move the directory away to create a new root)"
    )]
    BadRoot {
        /// The file.
        path: PathBuf,
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
        addr: SocketAddr,
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

/// A certificate authority over one root directory.
pub struct Ca {
    dir: PathBuf,
    trust_domain: String,
    ttl: Duration,
    signer: Mutex<Arc<Signer>>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("dir", &self.dir)
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
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        if !dir.join("root-key.pem").exists() {
            let (key, cert) = new_root(trust_domain)?;
            write_atomic(&dir.join("bundle.pem"), cert.pem().as_bytes(), 0o644)?;
            write_atomic(&dir.join("root-cert.pem"), cert.pem().as_bytes(), 0o644)?;
            write_atomic(
                &dir.join("root-key.pem"),
                key.serialize_pem().as_bytes(),
                0o600,
            )?;
            info!(dir = %dir.display(), "created a new CA root");
        }
        let signer = load_signer(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
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

    /// Re-reads the root directory if it changed (a rotation); returns whether it did.
    pub fn reload(&self) -> Result<bool, CaError> {
        let fp = fingerprint(&self.dir)?;
        if fp == self.signer().fingerprint {
            return Ok(false);
        }
        let signer = load_signer(&self.dir)?;
        *self.signer.lock() = Arc::new(signer);
        info!(dir = %self.dir.display(), "CA root directory changed; now signing with the current root");
        Ok(true)
    }

    /// Signs `csr_pem` if `authorize` accepts the identity it asks for.
    pub fn sign(
        &self,
        csr_pem: &str,
        authorize: impl FnOnce(&Identity) -> Result<(), CaError>,
    ) -> Result<Issued, CaError> {
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
            path: self.dir.clone(),
            problem: e.to_string(),
        })?;
        Ok((vec![cert.der().clone()], der))
    }
}

fn fingerprint(dir: &Path) -> Result<Vec<u8>, CaError> {
    let mut h = Sha256::new();
    for f in ["root-cert.pem", "bundle.pem", "root-key.pem"] {
        let p = dir.join(f);
        h.update(std::fs::read(&p).map_err(io_err(&p))?);
    }
    Ok(h.finalize().to_vec())
}

fn load_signer(dir: &Path) -> Result<Signer, CaError> {
    let read = |f: &str| {
        let p = dir.join(f);
        std::fs::read_to_string(&p).map_err(io_err(&p))
    };
    let bad = |f: &str, problem: String| CaError::BadRoot {
        path: dir.join(f),
        problem,
    };
    let fingerprint = fingerprint(dir)?;
    let key = KeyPair::from_pem(&read("root-key.pem")?)
        .map_err(|e| bad("root-key.pem", format!("not a private key: {e}")))?;
    let cert_pem = read("root-cert.pem")?;
    let root = identity::parse_pem_certs(&cert_pem)?;
    let spki_matches = root.first().is_some_and(|der| {
        use x509_parser::prelude::FromDer;
        x509_parser::certificate::X509Certificate::from_der(der).is_ok_and(|(_, x)| {
            x.public_key().raw == rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        })
    });
    if !spki_matches {
        return Err(bad(
            "root-key.pem",
            "does not belong to root-cert.pem (a rotation half-written?)".into(),
        ));
    }
    let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
        .map_err(|e| bad("root-cert.pem", format!("not a CA certificate: {e}")))?;
    let bundle = TrustBundle::from_pem(&read("bundle.pem")?)
        .map_err(|e| bad("bundle.pem", e.to_string()))?;
    if !root
        .first()
        .is_some_and(|r| bundle.roots().iter().any(|b| b == r))
    {
        return Err(bad(
            "bundle.pem",
            "does not contain root-cert.pem; certificates it signs would not verify".into(),
        ));
    }
    Ok(Signer {
        issuer,
        bundle: Arc::new(bundle),
        fingerprint,
    })
}

const NEXT_KEY: &str = "next-root-key.pem";
const NEXT_CERT: &str = "next-root-cert.pem";

/// `mesh-agent ca rotate-root`: prepares a new root and trusts it beside the current one. Signing
/// goes on with the current root until [`activate_root`]; agents learn the new bundle at their
/// next renewal.
pub fn rotate_root(dir: &Path, trust_domain: &str) -> Result<(), CaError> {
    if dir.join(NEXT_CERT).exists() {
        return Err(CaError::BadRoot {
            path: dir.join(NEXT_CERT),
            problem: "a rotation is already prepared; run `mesh-agent ca activate-root` first"
                .into(),
        });
    }
    let old = std::fs::read_to_string(dir.join("bundle.pem")).map_err(io_err(dir))?;
    let (key, cert) = new_root(trust_domain)?;
    write_atomic(&dir.join(NEXT_KEY), key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&dir.join(NEXT_CERT), cert.pem().as_bytes(), 0o644)?;
    write_atomic(
        &dir.join("bundle.pem"),
        format!("{old}{}", cert.pem()).as_bytes(),
        0o644,
    )
}

/// `mesh-agent ca activate-root`: the prepared root signs from now on. Run it once every agent
/// has renewed since `rotate-root` (half a certificate lifetime), so every verifier trusts it.
pub fn activate_root(dir: &Path) -> Result<(), CaError> {
    let (next_key, next_cert) = (dir.join(NEXT_KEY), dir.join(NEXT_CERT));
    if !next_cert.exists() || !next_key.exists() {
        return Err(CaError::BadRoot {
            path: next_cert,
            problem: "no prepared root: run `mesh-agent ca rotate-root` first".into(),
        });
    }
    // Key, then certificate: between the two renames the pair does not match, and a running CA
    // refuses to load it and keeps the previous root.
    std::fs::rename(&next_key, dir.join("root-key.pem")).map_err(io_err(&next_key))?;
    std::fs::rename(&next_cert, dir.join("root-cert.pem")).map_err(io_err(&next_cert))
}

/// `mesh-agent ca retire-roots`: trusts only the current root. Run it once every workload
/// certificate from the old root has expired (one certificate lifetime after the rotation).
pub fn retire_roots(dir: &Path) -> Result<(), CaError> {
    let p = dir.join("root-cert.pem");
    let current = std::fs::read(&p).map_err(io_err(&p))?;
    write_atomic(&dir.join("bundle.pem"), &current, 0o644)
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
        addr: SocketAddr,
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
            } => remote_sign(*addr, token_file, bundle_file, trust_domain, csr_pem).await,
        }
    }
}

async fn remote_sign(
    addr: SocketAddr,
    token_file: &Path,
    bundle_file: &Path,
    trust_domain: &str,
    csr_pem: String,
) -> Result<Issued, CaError> {
    let remote = |problem: String| CaError::Remote { addr, problem };
    let token = std::fs::read_to_string(token_file).map_err(io_err(token_file))?;
    let bundle_pem = std::fs::read_to_string(bundle_file).map_err(io_err(bundle_file))?;
    let bundle = Arc::new(TrustBundle::from_pem(&bundle_pem)?);
    let verifier = identity::ServerVerifier::new(bundle, ca_identity(trust_domain));
    let config = rustls::ClientConfig::builder_with_provider(identity::provider())
        .with_protocol_versions(&identity::TLS13_ONLY)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| remote("connect timed out after 5 s".into()))?
        .map_err(|e| remote(format!("connect: {e}")))?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
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
        .header(hyper::header::HOST, addr.to_string())
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
