//! Path normalization, done once per request before routing and authorization; the normalized
//! path is also what the backend receives, so a policy can never see one path while the
//! application serves another.
//!
//! Steps, in order (the strictest of Istio's options, `DECODE_AND_MERGE_SLASHES`):
//! 1. percent-decode unreserved characters (`%61` → `a`, `%2e` → `.`), and `%2F`, `%5C` (and a
//!    raw `\`) to `/`; any other escape is kept, with uppercase hex;
//! 2. merge runs of `/`;
//! 3. resolve `.` and `..` segments (RFC 3986 §5.2.4); `..` never climbs above the root.
//!
//! A malformed escape, or an escaped control character, is refused.

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// `%` not followed by two hex digits.
    #[error("malformed percent-escape in the request path")]
    BadEscape,
    /// `%00`–`%1F` or `%7F`.
    #[error("escaped control character in the request path")]
    Control,
    /// The path does not start with `/`.
    #[error("the request path must start with '/'")]
    NotAbsolute,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Normalizes `path` (no query string).
pub fn normalize(path: &str) -> Result<String, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let bytes = path.as_bytes();
    // Step 1: decode, producing the path with '/' as the only separator.
    let mut decoded: Vec<u8> = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadEscape);
            };
            let c = h * 16 + l;
            if c < 0x20 || c == 0x7f {
                return Err(PathError::Control);
            }
            if unreserved(c) {
                decoded.push(c);
            } else if c == b'/' || c == b'\\' {
                decoded.push(b'/');
            } else {
                decoded.extend([b'%', HEX[usize::from(h)], HEX[usize::from(l)]]);
            }
            i += 3;
        } else {
            decoded.push(if b == b'\\' { b'/' } else { b });
            i += 1;
        }
    }
    // Steps 2 and 3: split on '/', which drops empty segments (merging slashes), then resolve
    // dot segments.
    let mut out: Vec<&[u8]> = Vec::new();
    let segments: Vec<&[u8]> = decoded.split(|b| *b == b'/').collect();
    let trailing = segments
        .last()
        .is_some_and(|s| matches!(*s, b"" | b"." | b".."));
    for seg in segments {
        match seg {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut normalized = Vec::with_capacity(decoded.len());
    for seg in &out {
        normalized.push(b'/');
        normalized.extend_from_slice(seg);
    }
    if normalized.is_empty() || (trailing && !out.is_empty()) {
        normalized.push(b'/');
    }
    // Only ASCII bytes were changed, so multi-byte UTF-8 sequences are intact.
    String::from_utf8(normalized).map_err(|_| PathError::BadEscape)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_admin_becomes_admin() {
        for p in [
            "/admin",
            "//admin",
            "/./admin",
            "/public/../admin",
            "/public/%2e%2e/admin",
            "/public/%2E%2E/admin",
            "/%2e%2e/admin",
            "/%2Fadmin",
            "/public%2F..%2Fadmin",
            "/%5Cadmin",
            "/public\\..\\admin",
            "/%61dmin",
            "/../../admin",
        ] {
            assert_eq!(normalize(p).as_deref(), Ok("/admin"), "{p}");
        }
    }

    #[test]
    fn keeps_what_changes_meaning_and_refuses_garbage() {
        assert_eq!(normalize("/").as_deref(), Ok("/"));
        assert_eq!(normalize("/a/b/").as_deref(), Ok("/a/b/"));
        assert_eq!(normalize("/a/b/..").as_deref(), Ok("/a/"));
        assert_eq!(normalize("/a%3fb").as_deref(), Ok("/a%3Fb"));
        assert_eq!(normalize("/a%20b").as_deref(), Ok("/a%20b"));
        assert_eq!(normalize("/%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize("/%4"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%00"), Err(PathError::Control));
        assert_eq!(normalize("admin"), Err(PathError::NotAbsolute));
        // Idempotent: normalizing twice changes nothing.
        for p in ["/a//b/../c/%2e/", "/x%2fy%5cz", "/%41%42"] {
            let once = normalize(p).unwrap_or_default();
            assert_eq!(normalize(&once).as_deref(), Ok(once.as_str()), "{p}");
        }
    }
}
