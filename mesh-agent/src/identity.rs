//! SPIFFE identities and the certificate checks rustls leaves to us.
//!
//! rustls checks the TLS handshake itself; it knows nothing of URI SANs. Every peer certificate
//! therefore goes through [`verify_svid`], which, in this order:
//! 1. chains the certificate to the trust bundle (expiry and signatures included, via webpki);
//! 2. requires exactly one URI SAN, and that it is a workload SPIFFE ID;
//! 3. requires our trust domain;
//! 4. (clients only) requires the identity the destination is known to have.
//!
//! Servers accept any identity of the trust domain: who may connect is authorization's
//! question, and it is answered with the identity this module extracted.

pub mod ca;
pub mod certs;

use std::{fmt, str::FromStr, sync::Arc};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// Why a certificate or an identity was rejected.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// A string that is not `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    #[error(
        "{0:?} is not a workload SPIFFE ID: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    Malformed(String),
    /// The certificate's DER could not be parsed.
    #[error("the certificate cannot be parsed: {0}")]
    Parse(String),
    /// The chain does not verify against the trust bundle (unknown CA, expired, bad signature...).
    #[error("the certificate does not chain to the mesh's trust bundle: {0}")]
    Chain(String),
    /// Not exactly one URI SAN.
    #[error("the certificate has {0} URI SANs; a SPIFFE certificate must carry exactly one")]
    UriSanCount(usize),
    /// A foreign trust domain.
    #[error("the peer's trust domain is {got:?}, but this mesh trusts only {want:?}")]
    TrustDomain {
        /// The peer's.
        got: String,
        /// Ours.
        want: String,
    },
    /// A valid identity, but not the one the destination has.
    #[error(
        "the peer presented {got}, but the destination's identity is {want}: a workload is answering for an address that is not its own"
    )]
    Mismatch {
        /// What the peer presented.
        got: Box<Identity>,
        /// What the destination should be.
        want: Box<Identity>,
    },
    /// A trust bundle file or response with no usable root.
    #[error("trust bundle: {0}")]
    Bundle(String),
}

/// rustls prints a rejected certificate's cause with `Debug`; make that the operator's message.
impl fmt::Debug for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A workload identity, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// The trust domain, e.g. `cluster.local`.
    pub trust_domain: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
}

impl Identity {
    /// The identity of `namespace/service_account` in `trust_domain`.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// SPIFFE trust-domain characters (lowercase letters, digits, `.`, `-`, `_`).
pub fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// Path segments: SPIFFE allows letters, digits, `.`, `-`, `_`; `.` and `..` are not segments.
fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IdentityError::Malformed(s.to_string());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let (td, path) = rest.split_once('/').ok_or_else(bad)?;
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa]
                if valid_trust_domain(td) && valid_segment(ns) && valid_segment(sa) =>
            {
                Ok(Self::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }
}

/// The root certificates this mesh trusts. During a root rotation it holds the old and the new
/// root, so certificates from either verify.
#[derive(Clone)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<rustls::pki_types::TrustAnchor<'static>>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.roots.len())
            .finish()
    }
}

impl TrustBundle {
    /// A bundle of DER roots; fails if none is a usable trust anchor.
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, IdentityError> {
        if roots.is_empty() {
            return Err(IdentityError::Bundle(
                "no root certificate: the bundle is empty".into(),
            ));
        }
        let anchors = roots
            .iter()
            .map(|r| {
                webpki::anchor_from_trusted_cert(r)
                    .map(|a| a.to_owned())
                    .map_err(|e| IdentityError::Bundle(format!("root is not a usable CA: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { roots, anchors })
    }

    /// Parses every `CERTIFICATE` block of `pem`.
    pub fn from_pem(pem: &str) -> Result<Self, IdentityError> {
        Self::new(parse_pem_certs(pem)?)
    }

    /// The roots, PEM-encoded, in order.
    pub fn to_pem(&self) -> String {
        self.roots.iter().map(|r| der_to_pem(r)).collect()
    }

    /// The roots.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }
}

/// Every `CERTIFICATE` block of `pem`.
pub fn parse_pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::Parse(format!("PEM: {e}")))
}

/// One certificate as PEM.
pub fn der_to_pem(der: &CertificateDer<'_>) -> String {
    to_pem("CERTIFICATE", der)
}

/// A PEM block of `tag` holding `der`, in 64-character lines ending in `\n`.
pub fn to_pem(tag: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(tag, der), config)
}

/// The SPIFFE ID in a certificate: exactly one URI SAN, which must be a workload ID. Does not
/// verify the chain; use [`verify_svid`] for peers.
pub fn svid_identity(cert: &CertificateDer<'_>) -> Result<Identity, IdentityError> {
    let (_, x509) = x509_parser::certificate::X509Certificate::from_der(cert)
        .map_err(|e| IdentityError::Parse(e.to_string()))?;
    let sans = x509
        .subject_alternative_name()
        .map_err(|e| IdentityError::Parse(e.to_string()))?;
    let uris: Vec<&str> = sans
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [one] => one.parse(),
        other => Err(IdentityError::UriSanCount(other.len())),
    }
}

/// Checks a peer's certificate chain and SPIFFE ID; returns the identity policy will see.
pub fn verify_svid(
    bundle: &TrustBundle,
    trust_domain: &str,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: KeyUsage,
) -> Result<Identity, IdentityError> {
    let ee =
        EndEntityCert::try_from(end_entity).map_err(|e| IdentityError::Parse(e.to_string()))?;
    ee.verify_for_usage(
        provider().signature_verification_algorithms.all,
        &bundle.anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(|e| IdentityError::Chain(e.to_string()))?;
    let id = svid_identity(end_entity)?;
    if id.trust_domain != trust_domain {
        return Err(IdentityError::TrustDomain {
            got: id.trust_domain,
            want: trust_domain.to_string(),
        });
    }
    Ok(id)
}

/// The only protocol version any of our TLS configs offers.
pub static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];

/// The one crypto provider (ring), shared by every TLS config.
pub fn provider() -> Arc<CryptoProvider> {
    static P: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

fn to_rustls(e: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The handshake-signature half of a verifier, the same on both sides: TLS 1.3 only (the configs
/// offer nothing else), with the provider's algorithms.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::Tls12NotOffered,
            ))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            algorithms().supported_schemes()
        }
    };
}

/// Client side: the server must be `expected`.
#[derive(Debug)]
pub struct ServerVerifier {
    bundle: Arc<TrustBundle>,
    expected: Identity,
}

impl ServerVerifier {
    /// Accepts only `expected`, chained to `bundle`.
    pub fn new(bundle: Arc<TrustBundle>, expected: Identity) -> Self {
        Self { bundle, expected }
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = verify_svid(
            &self.bundle,
            &self.expected.trust_domain,
            end_entity,
            intermediates,
            now,
            KeyUsage::server_auth(),
        )
        .map_err(to_rustls)?;
        if got != self.expected {
            return Err(to_rustls(IdentityError::Mismatch {
                got: Box::new(got),
                want: Box::new(self.expected.clone()),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!();
}

/// Server side: any identity of the trust domain; authorization decides what it may do.
#[derive(Debug)]
pub struct ClientVerifier {
    bundle: Arc<TrustBundle>,
    trust_domain: String,
}

impl ClientVerifier {
    /// Accepts clients of `trust_domain` chained to `bundle`.
    pub fn new(bundle: Arc<TrustBundle>, trust_domain: &str) -> Self {
        Self {
            bundle,
            trust_domain: trust_domain.to_string(),
        }
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_svid(
            &self.bundle,
            &self.trust_domain,
            end_entity,
            intermediates,
            now,
            KeyUsage::client_auth(),
        )
        .map_err(to_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    signature_checks!();
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a test should stop at the first unexpected error"
)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_workload_ids() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(id, Identity::new("cluster.local", "default", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        for bad in [
            "spiffe://cluster.local/ns/default",
            "spiffe://Cluster.local/ns/a/sa/b",
            "https://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe:///ns/a/sa/b",
            "spiffe://td/ns/../sa/b",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn pem_round_trip() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(der_to_pem(cert.der()), cert.pem().replace("\r\n", "\n"));
    }
}
