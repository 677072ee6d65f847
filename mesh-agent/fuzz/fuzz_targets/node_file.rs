//! The node-file parser and every policy, route and object parser behind it, as the CA runs them
//! (no filesystem checks): never panics, whatever the YAML.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mesh_agent::discovery::nodefile::parse_remote_text(&String::from_utf8_lossy(data));
});
