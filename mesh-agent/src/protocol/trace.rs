//! Trace context: W3C `traceparent`/`tracestate` and B3 (multi-header `x-b3-*`, or single `b3`).
//!
//! The proxy records no spans; it makes sure every request carries one trace id in both
//! conventions, so the access logs of both nodes and the applications' own tracing agree:
//! - a valid `traceparent` is kept as it is (and `tracestate` with it); B3 headers are added
//!   from it when the request has none;
//! - otherwise a B3 context, if present, becomes the `traceparent`;
//! - otherwise a new trace is started, not sampled (the proxy makes no sampling decision for the
//!   application), in both conventions.
//!
//! A malformed `traceparent` is replaced, and its `tracestate` dropped, as W3C Trace Context
//! requires of a participant that cannot parse it.

use http::{HeaderMap, HeaderValue};

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";
const B3: &str = "b3";
const B3_TRACE: &str = "x-b3-traceid";
const B3_SPAN: &str = "x-b3-spanid";
const B3_SAMPLED: &str = "x-b3-sampled";

/// A parsed trace context.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Context {
    /// 32 lowercase hex digits.
    trace: String,
    /// 16 lowercase hex digits.
    span: String,
    sampled: bool,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && s.bytes().any(|b| b != b'0')
}

/// `traceparent`: `version-traceid-parentid-flags`; a future version may append fields.
fn parse_traceparent(v: &str) -> Option<Context> {
    let mut it = v.trim().split('-');
    let version = it.next()?;
    let (trace, span, flags) = (it.next()?, it.next()?, it.next()?);
    let extra = it.next();
    let version_ok = version.len() == 2
        && u8::from_str_radix(version, 16).is_ok()
        && version != "ff"
        && version == version.to_ascii_lowercase();
    if !version_ok || (version == "00" && extra.is_some()) {
        return None;
    }
    if !is_hex(trace, 32) || !is_hex(span, 16) || flags.len() != 2 {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(Context {
        trace: trace.into(),
        span: span.into(),
        sampled: flags & 1 == 1,
    })
}

/// B3 from `b3: traceid-spanid[-sampled[-parent]]` or the `x-b3-*` headers. A 64-bit trace id
/// is left-padded to 128 bits, as B3 specifies for interoperating with W3C.
fn parse_b3(h: &HeaderMap) -> Option<Context> {
    let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let (trace, span, sampled) = if let Some(single) = text(B3) {
        let mut it = single.split('-');
        let trace = it.next()?;
        let span = it.next()?;
        (
            trace.to_string(),
            span.to_string(),
            it.next().map(str::to_string),
        )
    } else {
        (
            text(B3_TRACE)?.to_string(),
            text(B3_SPAN)?.to_string(),
            text(B3_SAMPLED).map(str::to_string),
        )
    };
    let trace = trace.to_ascii_lowercase();
    let trace = match trace.len() {
        16 => format!("{:0>32}", trace),
        _ => trace,
    };
    let span = span.to_ascii_lowercase();
    if !is_hex(&trace, 32) || !is_hex(&span, 16) {
        return None;
    }
    Some(Context {
        trace,
        span,
        sampled: matches!(sampled.as_deref(), Some("1" | "d" | "true")),
    })
}

fn header(s: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(s).ok()
}

fn set_b3(h: &mut HeaderMap, c: &Context) {
    let sampled = if c.sampled { "1" } else { "0" };
    for (name, value) in [
        (B3_TRACE, c.trace.as_str()),
        (B3_SPAN, c.span.as_str()),
        (B3_SAMPLED, sampled),
    ] {
        if let Some(v) = header(value) {
            h.insert(name, v);
        }
    }
}

fn set_traceparent(h: &mut HeaderMap, c: &Context) {
    let v = format!(
        "00-{}-{}-{}",
        c.trace,
        c.span,
        if c.sampled { "01" } else { "00" }
    );
    if let Some(v) = header(&v) {
        h.insert(TRACEPARENT, v);
    }
}

/// Makes sure `h` carries a trace context in both conventions; returns its trace id.
pub fn ensure(h: &mut HeaderMap) -> String {
    let w3c = h
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent);
    let has_b3 = h.contains_key(B3) || h.contains_key(B3_TRACE);
    if let Some(c) = w3c {
        if !has_b3 {
            set_b3(h, &c);
        }
        return c.trace;
    }
    if h.contains_key(TRACEPARENT) {
        // Malformed: restart, and drop the vendor state that went with it.
        h.remove(TRACEPARENT);
        h.remove(TRACESTATE);
    }
    let c = match parse_b3(h) {
        Some(c) => c,
        None => {
            let c = Context {
                trace: format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..) | 1),
                span: format!("{:016x}", fastrand::u64(..) | 1),
                sampled: false,
            };
            if has_b3 {
                // Unreadable B3: replace it too, so the two conventions agree.
                h.remove(B3);
            }
            set_b3(h, &c);
            c
        }
    };
    set_traceparent(h, &c);
    c.trace
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn valid_traceparent_is_kept_with_its_state_and_mirrored_to_b3() {
        let mut h = headers(&[(TRACEPARENT, TP), (TRACESTATE, "congo=t61rcWkgMzE")]);
        assert_eq!(ensure(&mut h), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(h[TRACEPARENT], TP);
        assert_eq!(h[TRACESTATE], "congo=t61rcWkgMzE");
        assert_eq!(h[B3_TRACE], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(h[B3_SPAN], "b7ad6b7169203331");
        assert_eq!(h[B3_SAMPLED], "1");
    }

    #[test]
    fn b3_becomes_traceparent_and_short_ids_are_padded() {
        let mut h = headers(&[
            (B3_TRACE, "463ac35c9f6413ad"),
            (B3_SPAN, "a2fb4a1d1a96d312"),
            (B3_SAMPLED, "1"),
        ]);
        assert_eq!(ensure(&mut h), "0000000000000000463ac35c9f6413ad");
        assert_eq!(
            h[TRACEPARENT],
            "00-0000000000000000463ac35c9f6413ad-a2fb4a1d1a96d312-01"
        );
        let mut single = headers(&[(B3, "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0")]);
        assert_eq!(ensure(&mut single), "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(
            single[TRACEPARENT],
            "00-80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-00"
        );
    }

    #[test]
    fn missing_context_starts_an_unsampled_trace_in_both_conventions() {
        let mut h = HeaderMap::new();
        let id = ensure(&mut h);
        assert!(is_hex(&id, 32), "{id}");
        let tp = h[TRACEPARENT].to_str().unwrap_or_default().to_string();
        let parsed = parse_traceparent(&tp).unwrap_or_else(|| panic!("unparsable {tp}"));
        assert_eq!(parsed.trace, id);
        assert!(!parsed.sampled);
        assert_eq!(h[B3_TRACE], id.as_str());
        assert_eq!(h[B3_SAMPLED], "0");
        // Two requests get two traces.
        assert_ne!(ensure(&mut HeaderMap::new()), id);
    }

    #[test]
    fn malformed_traceparent_is_replaced_and_its_state_dropped() {
        for bad in [
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "garbage",
        ] {
            let mut h = headers(&[(TRACESTATE, "a=b")]);
            h.insert(TRACEPARENT, HeaderValue::from_static(bad));
            let id = ensure(&mut h);
            assert_ne!(h[TRACEPARENT], bad);
            assert!(!h.contains_key(TRACESTATE), "{bad}");
            assert!(is_hex(&id, 32));
        }
    }

    #[test]
    fn a_future_version_with_extra_fields_is_accepted() {
        let mut h = headers(&[(
            TRACEPARENT,
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-the-future-holds",
        )]);
        assert_eq!(ensure(&mut h), "0af7651916cd43dd8448eb211c80319c");
    }
}
