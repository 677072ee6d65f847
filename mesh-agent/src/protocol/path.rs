//! Path normalization, done once per request before routing and authorization; the normalized
//! path is also what the backend receives, so a policy can never see one path while the
//! application serves another.
//!
//! Every mode first refuses what is not a valid encoding, and never rewrites it: a malformed
//! escape, an escaped control character, raw bytes outside printable ASCII, escapes that decode to
//! invalid UTF-8 (overlong forms such as `%C0%AF` for `/` included), and double encoding (`%25`
//! followed by two hex digits, raw or themselves escaped, which a second decoder would turn into
//! another character).
//!
//! Then, by the mesh-wide mode (Istio's `meshConfig.pathNormalization`):
//! - `NONE`: nothing more;
//! - `BASE`: RFC 3986 normalization: unreserved escapes decoded (`%61` → `a`), other escapes in
//!   uppercase hex, `\` taken as `/`, path parameters (`;jsessionid=…` on a segment) removed, dot
//!   segments resolved (`..` never climbs above the root);
//! - `MERGE_SLASHES`: `BASE`, and runs of `/` merged;
//! - `DECODE_AND_MERGE_SLASHES` (the default): `%2F` and `%5C` decoded to `/` first, then
//!   `MERGE_SLASHES`.
//!
//! DENY rules are also matched against [`deny_form`], which folds every spelling a backend may
//! treat as the same path into one: everything decoded, compatibility forms folded (NFKC: a
//! fullwidth `／` is `/`), trailing dots and spaces of each segment dropped (as Windows file
//! systems do), parameters removed, slashes merged, dots resolved and, by default, letter case
//! folded. The backend still receives the normalized path; the deny form only widens what DENY
//! catches, so it cannot break traffic that no DENY rule names.

use unicode_normalization::UnicodeNormalization;

use crate::state::PathNormalization;

/// Why a path was refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// `%` not followed by two hex digits.
    #[error("malformed percent-escape in the request path")]
    BadEscape,
    /// `%00`–`%1F` or `%7F`.
    #[error("escaped control character in the request path")]
    Control,
    /// A raw byte outside printable ASCII.
    #[error("raw non-ASCII or control byte in the request path; percent-encode it")]
    RawByte,
    /// The decoded bytes are not UTF-8 (overlong encodings of `/` or `.` included).
    #[error("the request path decodes to invalid UTF-8 (an overlong or broken encoding)")]
    InvalidUtf8,
    /// `%25` followed by two hex digits.
    #[error("double percent-encoding in the request path")]
    DoubleEncoding,
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

/// The escape at `i` (`bytes[i] == b'%'`), decoded.
fn escape_at(bytes: &[u8], i: usize) -> Result<u8, PathError> {
    match (
        bytes.get(i + 1).copied().and_then(hex),
        bytes.get(i + 2).copied().and_then(hex),
    ) {
        (Some(h), Some(l)) => Ok(h * 16 + l),
        _ => Err(PathError::BadEscape),
    }
}

/// Whether the two characters at `j`, each as one decoder reads it (a byte, or an escape),
/// are hex digits: after `%25` they make an escape for the next decoder. `%25%34%31` is as
/// double encoded as `%2541`; checking raw bytes alone missed it (found by fuzzing).
fn escapes_hex_pair(bytes: &[u8], mut j: usize) -> bool {
    for _ in 0..2 {
        let c = match bytes.get(j) {
            Some(b'%') => match escape_at(bytes, j) {
                Ok(c) => {
                    j += 3;
                    c
                }
                Err(_) => return false,
            },
            Some(b) => {
                j += 1;
                *b
            }
            None => return false,
        };
        if hex(c).is_none() {
            return false;
        }
    }
    true
}

/// Refuses every invalid encoding (see the module docs) without changing anything.
pub fn validate(path: &str) -> Result<(), PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let c = escape_at(bytes, i)?;
            if c < 0x20 || c == 0x7f {
                return Err(PathError::Control);
            }
            if c == b'%' && escapes_hex_pair(bytes, i + 3) {
                return Err(PathError::DoubleEncoding);
            }
            decoded.push(c);
            i += 3;
        } else {
            if !(0x21..0x7f).contains(&b) {
                return Err(PathError::RawByte);
            }
            decoded.push(b);
            i += 1;
        }
    }
    std::str::from_utf8(&decoded).map_err(|_| PathError::InvalidUtf8)?;
    Ok(())
}

/// Normalizes `path` (no query string) in `mode`; see the module docs.
pub fn normalize(path: &str, mode: PathNormalization) -> Result<String, PathError> {
    validate(path)?;
    if mode == PathNormalization::None {
        return Ok(path.to_string());
    }
    let decode_slashes = mode == PathNormalization::DecodeAndMergeSlashes;
    let merge = mode != PathNormalization::Base;
    let bytes = path.as_bytes();
    // Step 1: decode, producing the path with '/' as the only separator.
    let mut decoded: Vec<u8> = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let c = escape_at(bytes, i)?;
            if unreserved(c) {
                decoded.push(c);
            } else if decode_slashes && (c == b'/' || c == b'\\') {
                decoded.push(b'/');
            } else {
                decoded.extend([b'%', HEX[usize::from(c >> 4)], HEX[usize::from(c & 15)]]);
            }
            i += 3;
        } else {
            decoded.push(if b == b'\\' { b'/' } else { b });
            i += 1;
        }
    }
    let out = resolve(&decoded, merge);
    // Validation proved the decoded form is UTF-8, and only ASCII bytes were changed here.
    String::from_utf8(out).map_err(|_| PathError::InvalidUtf8)
}

/// Drops path parameters, resolves dot segments (RFC 3986 §5.2.4) and, with `merge`, empty
/// segments; `path` starts with `/`.
fn resolve(path: &[u8], merge: bool) -> Vec<u8> {
    let segments: Vec<&[u8]> = path[1..]
        .split(|b| *b == b'/')
        .map(|s| s.split(|b| *b == b';').next().unwrap_or_default())
        .collect();
    let trailing = segments
        .last()
        .is_some_and(|s| matches!(*s, b"" | b"." | b".."));
    let mut out: Vec<&[u8]> = Vec::new();
    let last = segments.len() - 1;
    for (i, seg) in segments.into_iter().enumerate() {
        match seg {
            b"." => {}
            b".." => {
                out.pop();
            }
            b"" if merge || i == last => {}
            s => out.push(s),
        }
    }
    let mut normalized = Vec::with_capacity(path.len());
    for seg in &out {
        normalized.push(b'/');
        normalized.extend_from_slice(seg);
    }
    if normalized.is_empty() || (trailing && !out.is_empty()) {
        normalized.push(b'/');
    }
    normalized
}

/// The form DENY rules are also matched against (see the module docs). `path` is a normalized
/// path; `fold_case` lowercases it.
pub fn deny_form(path: &str, fold_case: bool) -> String {
    // Decode every escape (validation already refused what would not decode to UTF-8).
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], escape_at(bytes, i)) {
            (b'%', Ok(c)) => {
                decoded.push(c);
                i += 3;
            }
            (b, _) => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    let text = String::from_utf8_lossy(&decoded);
    let mut folded: String = text
        .nfkc()
        .map(|c| if c == '\\' { '/' } else { c })
        .collect();
    if fold_case {
        folded = folded.to_lowercase();
    }
    // Trailing dots and spaces of a segment are dropped, but `.` and `..` keep their meaning.
    let trimmed: Vec<String> = folded
        .split('/')
        .map(|s| {
            let s = s.split(';').next().unwrap_or_default();
            if matches!(s, "." | "..") {
                s.to_string()
            } else {
                s.trim_end_matches(['.', ' ']).to_string()
            }
        })
        .collect();
    let joined = trimmed.join("/");
    let absolute = if joined.starts_with('/') {
        joined
    } else {
        format!("/{joined}")
    };
    String::from_utf8(resolve(absolute.as_bytes(), true)).unwrap_or(absolute)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: PathNormalization = PathNormalization::DecodeAndMergeSlashes;

    fn norm(p: &str) -> Result<String, PathError> {
        normalize(p, DEFAULT)
    }

    /// What a DENY on `/admin` compares with, as the proxy computes it by default.
    fn denied_as(p: &str) -> Result<String, PathError> {
        norm(p).map(|n| deny_form(&n, true))
    }

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
            // Path parameters are removed, on any segment.
            "/admin;jsessionid=1234",
            "/admin;a=b;c=d",
            "/public/..;/admin",
            "/public;x/../admin",
        ] {
            assert_eq!(norm(p).as_deref(), Ok("/admin"), "{p}");
        }
    }

    #[test]
    fn forms_a_backend_folds_are_denied_as_admin() {
        for p in [
            // Letter case, raw and through an escape.
            "/ADMIN",
            "/Admin",
            "/%41dmin",
            "/%41DMIN",
            // Trailing encoded space and trailing dots.
            "/admin%20",
            "/admin.",
            "/admin..",
            "/admin.%20.",
            // A fullwidth solidus (U+FF0F), and fullwidth letters.
            "/%EF%BC%8Fadmin",
            "/%EF%BD%81dmin",
            // Parameters with case.
            "/ADMIN;JSESSIONID=1",
        ] {
            assert_eq!(denied_as(p).as_deref(), Ok("/admin"), "{p}");
        }
        // Below a denied prefix too.
        assert_eq!(denied_as("/Admin./secret").as_deref(), Ok("/admin/secret"));
        assert_eq!(
            denied_as("/x%EF%BC%8F..%EF%BC%8Fadmin").as_deref(),
            Ok("/admin")
        );
        // Case folding is an option.
        assert_eq!(
            norm("/ADMIN").map(|n| deny_form(&n, false)).as_deref(),
            Ok("/ADMIN")
        );
        // The backend still receives the path as normalized, not the deny form.
        assert_eq!(norm("/Admin%20").as_deref(), Ok("/Admin%20"));
    }

    #[test]
    fn invalid_encodings_are_refused_in_every_mode() {
        use PathNormalization::*;
        let cases = [
            ("/%zz", PathError::BadEscape),
            ("/%4", PathError::BadEscape),
            ("/a%00", PathError::Control),
            ("/a%0d%0aX", PathError::Control),
            ("/a%7f", PathError::Control),
            // Overlong UTF-8 for '/' and '.', two- and three-byte forms.
            ("/%C0%AFadmin", PathError::InvalidUtf8),
            ("/%c0%ae%c0%ae/admin", PathError::InvalidUtf8),
            ("/%E0%80%AFadmin", PathError::InvalidUtf8),
            // Invalid UTF-8 after decoding: a lone continuation byte, a truncated sequence.
            ("/%80", PathError::InvalidUtf8),
            ("/%E2%82", PathError::InvalidUtf8),
            // Double encoding of 'a' and of '/'.
            ("/%2561dmin", PathError::DoubleEncoding),
            ("/%252Fadmin", PathError::DoubleEncoding),
            // The same with the hex digits escaped themselves (fuzzing found these: unreserved
            // decoding turned them into `%25` and two hex digits, which normalized again failed).
            ("/%25%65CXaCXa%3dn", PathError::DoubleEncoding),
            ("/%25%34%31dmin", PathError::DoubleEncoding),
            ("/%25%32F", PathError::DoubleEncoding),
            ("/a b", PathError::RawByte),
            ("/caf\u{e9}", PathError::RawByte),
            ("admin", PathError::NotAbsolute),
        ];
        for mode in [None, Base, MergeSlashes, DecodeAndMergeSlashes] {
            for (p, e) in cases {
                assert_eq!(normalize(p, mode), Err(e), "{p} in {mode:?}");
            }
        }
    }

    #[test]
    fn modes_differ_as_istio_documents() {
        use PathNormalization::*;
        let p = "/a//b/%2e/c%2Fd/%61;x";
        assert_eq!(normalize(p, None).as_deref(), Ok(p));
        assert_eq!(normalize(p, Base).as_deref(), Ok("/a//b/c%2Fd/a"));
        assert_eq!(normalize(p, MergeSlashes).as_deref(), Ok("/a/b/c%2Fd/a"));
        assert_eq!(
            normalize(p, DecodeAndMergeSlashes).as_deref(),
            Ok("/a/b/c/d/a")
        );
        // The deny form decodes %2F whatever the mode, so DENY catches it in every mode.
        for mode in [Base, MergeSlashes, DecodeAndMergeSlashes] {
            let n = normalize("/x/..%2F%2Fadmin", mode).unwrap_or_default();
            assert_eq!(deny_form(&n, true), "/admin", "{mode:?}: {n}");
        }
    }

    #[test]
    fn keeps_what_changes_meaning_and_valid_traffic() {
        assert_eq!(norm("/").as_deref(), Ok("/"));
        assert_eq!(norm("/a/b/").as_deref(), Ok("/a/b/"));
        assert_eq!(norm("/a/b/..").as_deref(), Ok("/a/"));
        assert_eq!(norm("/a%3fb").as_deref(), Ok("/a%3Fb"));
        assert_eq!(norm("/a%20b").as_deref(), Ok("/a%20b"));
        assert_eq!(
            norm("/a%3Bb").as_deref(),
            Ok("/a%3Bb"),
            "an escaped ';' is data"
        );
        assert_eq!(norm("/caf%C3%A9").as_deref(), Ok("/caf%C3%A9"));
        assert_eq!(norm("/100%25").as_deref(), Ok("/100%25"));
        assert_eq!(norm("/v1.2/x.json").as_deref(), Ok("/v1.2/x.json"));
        // Idempotent: normalizing twice changes nothing.
        for p in [
            "/a//b/../c/%2e/",
            "/x%2fy%5cz",
            "/%41%42",
            "/a;b/c;d/",
            "/%C3%A9",
        ] {
            let once = norm(p).unwrap_or_default();
            assert_eq!(norm(&once).as_deref(), Ok(once.as_str()), "{p}");
        }
        // The deny form of an ordinary path is the path, lowercased.
        assert_eq!(deny_form("/api/v1.2/Items", true), "/api/v1.2/items");
    }
}
