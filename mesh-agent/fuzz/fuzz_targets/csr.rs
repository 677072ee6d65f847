//! The CA's CSR handling on any input: never panics, and never signs an identity other than the
//! one the CSR asks for, in its own trust domain.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mesh_agent::identity::ca::Ca;

fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mesh-fuzz-ca-{}", std::process::id()));
        Ca::open(&dir, "cluster.local", std::time::Duration::from_secs(3600)).expect("a CA root")
    })
}

fuzz_target!(|data: &[u8]| {
    let csr = String::from_utf8_lossy(data);
    let asked = ca().requested(&csr);
    let mut seen = None;
    let signed = ca().sign(&csr, |id| {
        seen = Some(id.clone());
        Ok(())
    });
    if signed.is_ok() {
        let id = seen.expect("authorization ran before signing");
        assert_eq!(asked.ok().as_ref(), Some(&id));
        assert_eq!(id.trust_domain, "cluster.local");
    }
});
