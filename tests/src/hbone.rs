//! HBONE from the outside: a workload certificate from the harness's CA, and raw CONNECTs sent
//! with it, to probe what the HBONE listener accepts.

use std::process::Command;

use anyhow::Result;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::*;

/// A certificate chain and its key.
pub type WorkloadCert = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

impl Cluster {
    /// A real certificate for `sa` in `default`, requested from the harness's CA as node `i`'s
    /// agent would.
    pub fn workload_cert(&self, i: usize, sa: &str) -> Result<WorkloadCert> {
        let key_file = self.dir().join(format!("probe-{sa}.key"));
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.nodes[i].netns.display()))
            .arg(artifact("mesh-agent")?)
            .args(["ca", "request", "--ca-addr", CA_ADDR, "--ca-token-file"])
            .arg(self.token_file(i))
            .arg("--ca-bundle")
            .arg(self.ca_dir().join("bundle.pem"))
            .arg("--key-out")
            .arg(&key_file)
            .arg(format!("spiffe://cluster.local/ns/default/sa/{sa}"))
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "certificate request: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let chain = CertificateDer::pem_slice_iter(&out.stdout).collect::<Result<_, _>>()?;
        Ok((chain, PrivateKeyDer::from_pem_file(&key_file)?))
    }

    /// Sends `requests` (method, authority) from pod `from` to `server`'s HBONE port over one
    /// mTLS connection made with `cert`; returns each answer's status and the certificate the
    /// listener presented.
    pub fn hbone_probe(
        &self,
        from: &str,
        server: std::net::IpAddr,
        cert: WorkloadCert,
        requests: &[(&str, &str)],
    ) -> Result<(Vec<u16>, Vec<u8>)> {
        let netns = self.pod(from).netns.clone();
        in_netns(&netns, || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(probe(server, cert.0, cert.1, requests)))
        })?
    }
}

/// Accepts any server certificate: this client exists to probe the *server's* checks, and
/// reads the server's identity itself.
#[derive(Debug)]
pub struct AnyServer(pub std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Sends raw CONNECTs to `server`'s HBONE port with a real client certificate; returns the
/// status of each request (method, authority), or the error.
async fn probe(
    server: std::net::IpAddr,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    requests: &[(&str, &str)],
) -> Result<(Vec<u16>, Vec<u8>)> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyServer(provider)))
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect((server, 15008)).await?;
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(rustls::pki_types::ServerName::IpAddress(server.into()), tcp)
        .await?;
    let server_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await?;
    tokio::spawn(conn);
    let mut out = Vec::new();
    for (method, authority) in requests {
        let req = hyper::Request::builder()
            .method(*method)
            .uri(if *method == "CONNECT" {
                authority.to_string()
            } else {
                format!("https://{authority}/")
            })
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        send.ready().await?;
        out.push(send.send_request(req).await?.status().as_u16());
    }
    Ok((out, server_cert))
}
