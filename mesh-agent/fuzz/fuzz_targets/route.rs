//! Route matching: a node file (before the first NUL byte) and a request line (`METHOD path`,
//! after it). Every rule's matches are tried against the request: never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (file, request) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b"GET /"[..]),
    };
    let Ok(loaded) =
        mesh_agent::discovery::nodefile::parse_remote_text(&String::from_utf8_lossy(file))
    else {
        return;
    };
    let request = String::from_utf8_lossy(request);
    let (method, path) = request.split_once(' ').unwrap_or(("GET", &request));
    let Ok(req) = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "web.default.svc.cluster.local")
        .body(())
    else {
        return;
    };
    let (parts, ()) = req.into_parts();
    let path = parts.uri.path().to_string();
    for route in &loaded.state.http_routes {
        for rule in &route.rules {
            for m in &rule.matches {
                let _ = mesh_agent::route::rules::matches(m, &parts, &path);
            }
        }
    }
});
