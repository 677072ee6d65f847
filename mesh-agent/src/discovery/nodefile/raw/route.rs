//! The node file's `httpRoutes` and `destinationRules` as serde reads and writes them: Gateway
//! API's HTTPRoute spec (with its name and namespace beside it) and Istio's DestinationRule
//! `trafficPolicy`, plus a local rate limit and a retry budget. Every field is optional so that
//! validation (`routes.rs`) can name what is wrong.

use serde::{Deserialize, Serialize};

/// A Gateway API HTTPRoute attached to a Service (`parentRefs` of kind Service, as GAMMA does).
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawHttpRoute {
    pub name: Option<String>,
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parent_refs: Vec<RawParentRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RawRouteRule>,
    /// Where the object came from when not the node file's own list (a YAML document, an API
    /// object), for messages.
    #[serde(skip)]
    pub position: Option<String>,
}

/// The Service (and optionally port) a route attaches to.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawParentRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: Option<String>,
    pub port: Option<u16>,
}

/// One rule: what it matches, what it changes, where it sends, and how it retries.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawRouteRule {
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RawMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<RawFilter>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<RawBackendRef>,
    pub timeouts: Option<RawTimeouts>,
    pub retry: Option<RawRetry>,
    pub fault: Option<RawFault>,
}

/// One match; every condition in it must hold.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawMatch {
    pub path: Option<RawPathMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<RawValueMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<RawValueMatch>,
    pub method: Option<String>,
}

/// `Exact`, `PathPrefix` (the default) or `RegularExpression`.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPathMatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub value: Option<String>,
}

/// A header or query parameter match: `Exact` (the default) or `RegularExpression`.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawValueMatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub name: Option<String>,
    pub value: Option<String>,
}

/// A request or response header modifier.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawFilter {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub request_header_modifier: Option<RawHeaderModifier>,
    pub response_header_modifier: Option<RawHeaderModifier>,
    pub url_rewrite: Option<RawUrlRewrite>,
    pub request_redirect: Option<RawRedirect>,
    pub request_mirror: Option<RawMirror>,
}

/// `URLRewrite`: the host and path the backend receives.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawUrlRewrite {
    pub hostname: Option<String>,
    pub path: Option<RawPathModifier>,
}

/// `ReplaceFullPath` or `ReplacePrefixMatch`, with its value.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPathModifier {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub replace_full_path: Option<String>,
    pub replace_prefix_match: Option<String>,
}

/// `RequestRedirect`: the proxy answers with a redirect.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawRedirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<RawPathModifier>,
    pub port: Option<u16>,
    pub status_code: Option<u16>,
}

/// `RequestMirror`: a copy of requests to another service.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawMirror {
    pub backend_ref: Option<RawBackendRef>,
    pub percent: Option<u32>,
    pub fraction: Option<RawFraction>,
}

/// A share as `numerator / denominator` (denominator 100 when unset).
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFraction {
    pub numerator: Option<u32>,
    pub denominator: Option<u32>,
}

/// Headers to set, add and remove.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderModifier {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<RawHeader>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<RawHeader>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// One header name and value.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeader {
    pub name: String,
    pub value: String,
}

/// A Service backend and its weight.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackendRef {
    pub kind: Option<String>,
    pub name: Option<String>,
    pub port: Option<u16>,
    pub weight: Option<u32>,
}

/// The whole request's deadline and each try's.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawTimeouts {
    pub request: Option<String>,
    pub backend_request: Option<String>,
}

/// How many tries, on which failures, with what backoff.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<u16>,
    /// `5xx`, `reset`, `connect-failure`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<String>,
    pub backoff: Option<String>,
}

/// Injected delays and aborts, for testing callers.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFault {
    pub delay: Option<RawDelay>,
    pub abort: Option<RawAbort>,
}

/// A fixed delay added to a share of requests.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawDelay {
    pub fixed_delay: Option<String>,
    pub percentage: Option<f64>,
}

/// A status returned instead of forwarding, for a share of requests.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawAbort {
    pub http_status: Option<u16>,
    pub percentage: Option<f64>,
}

/// Istio's DestinationRule for one service, in its namespace.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawDestinationRule {
    pub name: Option<String>,
    pub namespace: Option<String>,
    /// The service's name, in the rule's namespace.
    pub host: Option<String>,
    #[serde(default)]
    pub traffic_policy: RawTrafficPolicy,
    /// Where the object came from when not the node file's own list (a YAML document, an API
    /// object), for messages.
    #[serde(skip)]
    pub position: Option<String>,
}

/// How requests to the service are balanced, limited and ejected.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawTrafficPolicy {
    pub load_balancer: Option<RawLoadBalancer>,
    pub connection_pool: Option<RawConnectionPool>,
    pub outlier_detection: Option<RawOutlier>,
    pub local_rate_limit: Option<RawRateLimit>,
    pub retry_budget: Option<RawRetryBudget>,
}

/// `ROUND_ROBIN`, `LEAST_REQUEST`, `RANDOM` or `PEAK_EWMA`.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLoadBalancer {
    pub simple: Option<String>,
}

/// Circuit-breaker limits.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConnectionPool {
    pub tcp: Option<RawTcpPool>,
    pub http: Option<RawHttpPool>,
}

/// The most connections open to the service, and how long making one may take.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawTcpPool {
    pub max_connections: Option<u32>,
    pub connect_timeout: Option<String>,
}

/// The most requests waiting for, or in flight to, the service.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawHttpPool {
    pub http1_max_pending_requests: Option<u32>,
    pub http2_max_requests: Option<u32>,
}

/// When an endpoint is ejected, for how long, and how often ejections are swept.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawOutlier {
    #[serde(rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<u32>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_percent: Option<u32>,
    pub interval: Option<String>,
}

/// A token bucket for the service, per source pod if asked.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawRateLimit {
    pub requests_per_second: Option<u32>,
    pub burst: Option<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_source: bool,
}

/// The share of extra requests retries may add.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawRetryBudget {
    pub percent: Option<u32>,
    pub min_retries_per_second: Option<u32>,
}
