//! HTTP routing in the model: Gateway API's HTTPRoute (matches, filters, backends, retries,
//! timeouts) as attached to a service, and the anchored patterns its matches use.

use super::key::ObjectKey;

/// A regular expression that must match a whole value (Gateway API and Istio regexes are
/// anchored). It is compiled anchored, `^(?:…)$`, so an alternation matches on any branch that
/// covers the value (searching and checking the found span would miss `a|ab` on `ab`). States
/// compare patterns by their source.
#[derive(Clone, Debug)]
pub struct Pattern {
    source: String,
    anchored: regex_lite::Regex,
}

impl serde::Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}
impl Eq for Pattern {}

impl Pattern {
    /// Compiles `source`; the error says why it is not a valid expression.
    pub fn new(source: &str) -> Result<Self, regex_lite::Error> {
        Ok(Self {
            anchored: regex_lite::Regex::new(&format!("^(?:{source})$"))?,
            source: source.to_string(),
        })
    }

    /// Whether the whole of `value` matches.
    pub fn full_match(&self, value: &str) -> bool {
        self.anchored.is_match(value)
    }
}

/// How a path is matched (Gateway API `HTTPPathMatch`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum PathMatch {
    /// The whole path.
    Exact(String),
    /// Whole path segments: `/api` matches `/api` and `/api/x`, not `/apix`.
    Prefix(String),
    /// An anchored regular expression.
    Regex(Pattern),
}

/// How a header or query value is matched.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum ValueMatch {
    /// Equal.
    Exact(String),
    /// An anchored regular expression.
    Regex(Pattern),
}

impl ValueMatch {
    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(v) => v == value,
            Self::Regex(p) => p.full_match(value),
        }
    }
}

/// One `matches` entry of a route rule: every part that is set must match.
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize)]
pub struct RouteMatch {
    /// Path.
    pub path: Option<PathMatch>,
    /// Headers (lowercase names).
    pub headers: Vec<(String, ValueMatch)>,
    /// Method.
    pub method: Option<String>,
    /// Query parameters.
    pub query: Vec<(String, ValueMatch)>,
}

/// Header edits (Gateway API `HTTPHeaderFilter`).
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize)]
pub struct HeaderModifier {
    /// Replace or add.
    #[serde(serialize_with = "ser::headers")]
    pub set: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Append.
    #[serde(serialize_with = "ser::headers")]
    pub add: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Remove.
    #[serde(serialize_with = "ser::names")]
    pub remove: Vec<http::HeaderName>,
}

/// Serializers for `/config_dump` where the types have no plain form.
mod ser {
    use serde::{Serializer, ser::SerializeSeq};

    pub fn headers<S: Serializer>(
        v: &[(http::HeaderName, http::HeaderValue)],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for (k, val) in v {
            seq.serialize_element(&(k.as_str(), String::from_utf8_lossy(val.as_bytes())))?;
        }
        seq.end()
    }

    pub fn names<S: Serializer>(v: &[http::HeaderName], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(http::HeaderName::as_str))
    }
}

/// A weighted backend of a rule.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BackendRef {
    /// A service in the route's namespace.
    pub service: ObjectKey,
    /// Its port.
    pub port: u16,
    /// Relative weight; 0 receives nothing.
    pub weight: u32,
}

/// When and how often to retry.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    /// Response codes that are retried.
    pub codes: Vec<u16>,
    /// Retry when the upstream connection resets mid-request.
    pub on_reset: bool,
    /// Retry when connecting fails.
    pub on_connect_failure: bool,
    /// Pause before each retry.
    pub backoff: std::time::Duration,
}

/// Fault injection (Istio's shape): percentages of requests delayed or aborted.
#[derive(Clone, Debug, PartialEq, Default, serde::Serialize)]
pub struct Fault {
    /// Delay and the share of requests (0–100) that get it.
    pub delay: Option<(std::time::Duration, f64)>,
    /// Status and the share of requests (0–100) that get it instead of a response.
    pub abort: Option<(u16, f64)>,
}
impl Eq for Fault {}

/// How a rewrite or redirect changes the path (Gateway API `HTTPPathModifier`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum PathModifier {
    /// The whole path becomes this.
    Full(String),
    /// The prefix the rule matched becomes this.
    Prefix(String),
}

/// Gateway API's `URLRewrite` filter: what the backend receives instead.
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize)]
pub struct UrlRewrite {
    /// The Host (or `:authority`) sent on.
    pub hostname: Option<String>,
    /// The path sent on.
    pub path: Option<PathModifier>,
}

/// Gateway API's `RequestRedirect` filter: the proxy answers with a redirect itself.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Redirect {
    /// `http` or `https`; the request's own when unset.
    pub scheme: Option<String>,
    /// The request's Host when unset.
    pub hostname: Option<String>,
    /// The request's path when unset.
    pub path: Option<PathModifier>,
    /// Derived from the scheme, or the request's port, when unset.
    pub port: Option<u16>,
    /// 301 or 302.
    pub status: u16,
}

/// Gateway API's `RequestMirror` filter: a copy of the request goes to another service too, and
/// its answer is dropped.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Mirror {
    /// The service and port copies go to (weight unused).
    pub backend: BackendRef,
    /// The share of requests (0–100) copied.
    pub percent: f64,
}
impl Eq for Mirror {}

/// One rule of an HTTPRoute.
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize)]
pub struct RouteRule {
    /// Its `name` (Gateway API's rule names), for `explain` and the access log.
    pub name: Option<String>,
    /// Where and how requests are changed on the way.
    pub rewrite: Option<UrlRewrite>,
    /// Answered by the proxy with a redirect, not forwarded.
    pub redirect: Option<Redirect>,
    /// Copies sent elsewhere too.
    pub mirrors: Vec<Mirror>,
    /// Any match selects the rule; none matches every request.
    pub matches: Vec<RouteMatch>,
    /// Request header edits.
    pub request_headers: HeaderModifier,
    /// Response header edits.
    pub response_headers: HeaderModifier,
    /// Where requests go; empty means the parent service itself.
    pub backends: Vec<BackendRef>,
    /// Whole-request deadline, retries included.
    pub request_timeout: Option<std::time::Duration>,
    /// Deadline for each try.
    pub backend_timeout: Option<std::time::Duration>,
    /// Retries.
    pub retry: Option<RetryPolicy>,
    /// Faults.
    pub fault: Option<Fault>,
}

/// An HTTPRoute attached to a service (GAMMA): it applies to HTTP sent to the service's address.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HttpRoute {
    /// namespace/name.
    pub key: ObjectKey,
    /// The parent service (same namespace).
    pub service: ObjectKey,
    /// The service port it is bound to; `None` binds every port.
    pub port: Option<u16>,
    /// Hosts the route applies to (the request's Host, port ignored; `*.` matches one or more
    /// labels); empty applies to every host.
    pub hostnames: Vec<String>,
    /// Rules, in order.
    pub rules: Vec<RouteRule>,
}
