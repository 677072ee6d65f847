//! Certificate and identity parsing: a DER certificate's SPIFFE identity, a PEM trust bundle, a
//! SPIFFE ID. Never panics; an ID that parses prints back to the same ID.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_agent::identity::{self, Identity, TrustBundle};
use rustls::pki_types::CertificateDer;

fuzz_target!(|data: &[u8]| {
    let _ = identity::svid_identity(&CertificateDer::from(data.to_vec()));
    let text = String::from_utf8_lossy(data);
    let _ = TrustBundle::from_pem(&text);
    let _ = identity::parse_pem_certs(&text);
    if let Ok(id) = text.parse::<Identity>() {
        assert_eq!(id.to_string().parse::<Identity>().ok(), Some(id));
    }
});
