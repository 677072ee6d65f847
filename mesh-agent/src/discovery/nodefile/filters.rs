//! The filters of an HTTPRoute rule (Gateway API): header modifiers, URLRewrite,
//! RequestRedirect and RequestMirror, validated as Gateway API forbids (a redirect with backends
//! or a rewrite, a prefix rewrite without PathPrefix matches, repeated filters).

use super::{
    fields::Ctx,
    raw::route::{
        RawBackendRef, RawFilter, RawFraction, RawHeader, RawHeaderModifier, RawMirror,
        RawPathModifier, RawRedirect, RawRouteRule,
    },
};
use crate::state::{
    BackendRef, HeaderModifier, Mirror, ObjectKey, PathModifier, Redirect, RouteRule, UrlRewrite,
};

fn header_modifier(cx: &mut Ctx<'_>, raw: &RawHeaderModifier) -> HeaderModifier {
    let mut header = |list: &[RawHeader]| {
        let mut out = Vec::new();
        for h in list {
            match (
                http::HeaderName::try_from(h.name.as_str()),
                http::HeaderValue::try_from(h.value.as_str()),
            ) {
                (Ok(n), Ok(v)) => out.push((n, v)),
                _ => cx.fail(
                    "rules.filters",
                    format!("{}: {:?} is not a valid header", h.name, h.value),
                ),
            }
        }
        out
    };
    let set = header(&raw.set);
    let add = header(&raw.add);
    let mut remove = Vec::new();
    for n in &raw.remove {
        match http::HeaderName::try_from(n.as_str()) {
            Ok(n) => remove.push(n),
            Err(_) => cx.fail("rules.filters", format!("{n:?} is not a valid header name")),
        }
    }
    HeaderModifier { set, add, remove }
}

/// A rule's filters, each of Gateway API's core and extended types but `ExtensionRef`. As in
/// Gateway API, a type appears once per rule (`RequestMirror` may repeat), a redirect goes with
/// neither a rewrite nor backends, and a prefix rewrite needs every match to be a path prefix.
pub(super) fn filters(cx: &mut Ctx<'_>, namespace: &str, raw: &RawRouteRule, rule: &mut RouteRule) {
    const FIELD: &str = "rules.filters";
    let mut seen: Vec<&str> = Vec::new();
    for f in &raw.filters {
        let kind = f.kind.as_deref().unwrap_or_default();
        let set = [
            f.request_header_modifier.is_some(),
            f.response_header_modifier.is_some(),
            f.url_rewrite.is_some(),
            f.request_redirect.is_some(),
            f.request_mirror.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if set != 1 {
            cx.fail(FIELD, format!("filter type {kind:?} needs exactly its own settings (for example `type: URLRewrite` with `urlRewrite`)"));
            continue;
        }
        if kind != "RequestMirror" && seen.contains(&kind) {
            cx.fail(FIELD, format!("{kind} appears twice in one rule"));
        }
        seen.push(kind);
        match (kind, f) {
            ("RequestHeaderModifier", RawFilter { request_header_modifier: Some(m), .. }) => {
                rule.request_headers = header_modifier(cx, m);
            }
            ("ResponseHeaderModifier", RawFilter { response_header_modifier: Some(m), .. }) => {
                rule.response_headers = header_modifier(cx, m);
            }
            ("URLRewrite", RawFilter { url_rewrite: Some(r), .. }) => {
                rule.rewrite = Some(UrlRewrite {
                    hostname: r.hostname.as_ref().and_then(|h| hostname(cx, "rules.filters.urlRewrite.hostname", h, false)),
                    path: r.path.as_ref().and_then(|p| path_modifier(cx, "rules.filters.urlRewrite.path", p)),
                });
            }
            ("RequestRedirect", RawFilter { request_redirect: Some(r), .. }) => {
                rule.redirect = redirect(cx, r);
            }
            ("RequestMirror", RawFilter { request_mirror: Some(m), .. }) => {
                if let Some(m) = mirror(cx, namespace, m) {
                    rule.mirrors.push(m);
                }
            }
            _ => cx.fail(
                FIELD,
                format!(
                    "filter type {kind:?} with its settings is not supported: use RequestHeaderModifier, ResponseHeaderModifier, URLRewrite, RequestRedirect or RequestMirror, each with its own settings"
                ),
            ),
        }
    }
    if rule.redirect.is_some() && (rule.rewrite.is_some() || !raw.backend_refs.is_empty()) {
        cx.fail(
            FIELD,
            "a RequestRedirect answers the request itself: it goes with neither URLRewrite nor backendRefs",
        );
    }
    let prefix = |p: &Option<PathModifier>| matches!(p, Some(PathModifier::Prefix(_)));
    let by_prefix = rule.rewrite.as_ref().is_some_and(|r| prefix(&r.path))
        || rule.redirect.as_ref().is_some_and(|r| prefix(&r.path));
    if by_prefix
        && (raw.matches.is_empty()
            || raw.matches.iter().any(|m| {
                m.path
                    .as_ref()
                    .is_none_or(|p| !matches!(p.kind.as_deref(), None | Some("PathPrefix")))
            }))
    {
        cx.fail(
            FIELD,
            "ReplacePrefixMatch replaces the prefix a rule matched: every match of the rule needs a PathPrefix path",
        );
    }
}

/// A hostname as Gateway API takes it: a lowercase DNS name, not an IP; `*.` may lead when
/// `wildcard`.
pub(super) fn hostname(
    cx: &mut Ctx<'_>,
    field: &'static str,
    h: &str,
    wildcard: bool,
) -> Option<String> {
    let name = match h.strip_prefix("*.") {
        Some(rest) if wildcard => rest,
        _ => h,
    };
    let ok = !name.is_empty()
        && h.len() <= 253
        && name.parse::<std::net::IpAddr>().is_err()
        && name
            .split('.')
            .all(|l| super::fields::check_label(l).is_ok());
    if ok {
        Some(h.to_string())
    } else {
        let also = if wildcard { " (`*.` may lead)" } else { "" };
        cx.fail(
            field,
            format!(
                "{h:?} is not a hostname: lowercase DNS labels joined by dots, not an IP{also}"
            ),
        );
        None
    }
}

/// A path modifier; its value is a path as the backend should receive it.
fn path_modifier(
    cx: &mut Ctx<'_>,
    field: &'static str,
    raw: &RawPathModifier,
) -> Option<PathModifier> {
    let (value, make): (_, fn(String) -> PathModifier) = match (
        raw.kind.as_deref(),
        &raw.replace_full_path,
        &raw.replace_prefix_match,
    ) {
        (Some("ReplaceFullPath"), Some(v), None) => (v, PathModifier::Full),
        (Some("ReplacePrefixMatch"), None, Some(v)) => (v, PathModifier::Prefix),
        (kind, ..) => {
            cx.fail(field, format!("type {kind:?} is not ReplaceFullPath (with replaceFullPath) or ReplacePrefixMatch (with replacePrefixMatch)"));
            return None;
        }
    };
    let normal =
        crate::protocol::path::normalize(value, crate::state::PathNormalization::default());
    if !value.starts_with('/') || normal.as_deref() != Ok(value.as_str()) || value.contains('?') {
        cx.fail(
            field,
            format!("{value:?} must be a normalized absolute path without a query (like /v2/api)"),
        );
        return None;
    }
    Some(make(value.clone()))
}

fn redirect(cx: &mut Ctx<'_>, raw: &RawRedirect) -> Option<Redirect> {
    let before = cx.errors.len();
    if let Some(s) = raw.scheme.as_deref()
        && !matches!(s, "http" | "https")
    {
        cx.fail(
            "rules.filters.requestRedirect.scheme",
            format!("{s:?} is not http or https"),
        );
    }
    let status = raw.status_code.unwrap_or(302);
    if !matches!(status, 301 | 302) {
        cx.fail(
            "rules.filters.requestRedirect.statusCode",
            format!("{status} is not 301 or 302"),
        );
    }
    if raw.port == Some(0) {
        cx.fail("rules.filters.requestRedirect.port", "must be 1-65535");
    }
    let redirect = Redirect {
        scheme: raw.scheme.clone(),
        hostname: raw
            .hostname
            .as_ref()
            .and_then(|h| hostname(cx, "rules.filters.requestRedirect.hostname", h, false)),
        path: raw
            .path
            .as_ref()
            .and_then(|p| path_modifier(cx, "rules.filters.requestRedirect.path", p)),
        port: raw.port,
        status,
    };
    (cx.errors.len() == before).then_some(redirect)
}

fn mirror(cx: &mut Ctx<'_>, namespace: &str, raw: &RawMirror) -> Option<Mirror> {
    const FIELD: &str = "rules.filters.requestMirror";
    let Some(RawBackendRef {
        kind,
        name: Some(name),
        port: Some(port),
        ..
    }) = &raw.backend_ref
    else {
        cx.fail(FIELD, "needs a `backendRef` with a `name` and a `port`");
        return None;
    };
    if kind.as_deref().is_some_and(|k| k != "Service") {
        cx.fail(FIELD, "only Service backends are supported");
        return None;
    }
    let percent = match (raw.percent, &raw.fraction) {
        (None, None) => 100.0,
        (Some(p), None) if p <= 100 => f64::from(p),
        (
            None,
            Some(RawFraction {
                numerator: Some(n),
                denominator,
            }),
        ) => {
            let d = denominator.unwrap_or(100);
            if d == 0 || *n > d {
                cx.fail(
                    FIELD,
                    "fraction must be numerator <= denominator, denominator > 0",
                );
                return None;
            }
            f64::from(*n) * 100.0 / f64::from(d)
        }
        _ => {
            cx.fail(FIELD, "give `percent` (0-100) or `fraction`, not both");
            return None;
        }
    };
    Some(Mirror {
        backend: BackendRef {
            service: ObjectKey {
                namespace: namespace.to_string(),
                name: name.clone(),
            },
            port: *port,
            weight: 0,
        },
        percent,
    })
}

#[cfg(test)]
mod tests {
    use crate::{
        discovery::nodefile::load_text,
        state::{HttpRoute, PathModifier},
    };

    /// The routes and error messages of a node file with one HTTPRoute whose spec is `spec`.
    fn load(spec: &str) -> (Vec<HttpRoute>, Vec<String>) {
        let text = format!(
            "node: n1\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\nspec:\n  parentRefs: [{{kind: Service, name: web}}]\n{spec}"
        );
        let l = load_text(std::path::Path::new("n.yaml"), &text, None, None).expect("loads");
        let errors = l.errors.iter().map(ToString::to_string).collect();
        (l.state.http_routes, errors)
    }

    #[test]
    fn hostnames_rule_names_rewrites_redirects_and_mirrors_are_read() {
        let (routes, errors) = load(
            "  hostnames: [web.shop.io, '*.example.com']
  rules:
  - name: api
    matches: [{path: {type: PathPrefix, value: /api/}}]
    filters:
    - {type: URLRewrite, urlRewrite: {hostname: backend.shop, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}, percent: 25}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: shadow2, port: 80}, fraction: {numerator: 1, denominator: 3}}}
  - name: old
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}}]
",
        );
        assert!(errors.is_empty(), "{errors:?}");
        let r = &routes[0];
        assert_eq!(r.hostnames, ["web.shop.io", "*.example.com"]);
        assert_eq!(r.rules[0].name.as_deref(), Some("api"));
        let rw = r.rules[0].rewrite.as_ref().expect("rewrite");
        assert_eq!(rw.hostname.as_deref(), Some("backend.shop"));
        assert_eq!(rw.path, Some(PathModifier::Prefix("/v2".into())));
        let m = &r.rules[0].mirrors;
        assert_eq!(
            (m[0].backend.service.name.as_str(), m[0].percent),
            ("shadow", 25.0)
        );
        assert!((m[1].percent - 100.0 / 3.0).abs() < 1e-9);
        let red = r.rules[1].redirect.as_ref().expect("redirect");
        assert_eq!((red.scheme.as_deref(), red.status), (Some("https"), 301));
        assert_eq!(red.path, Some(PathModifier::Full("/new".into())));
    }

    #[test]
    fn destination_rules_read_the_sweep_interval_and_the_connect_timeout() {
        let load = |policy: &str| {
            let text = format!(
                "node: n1\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: shop}}\nspec:\n  host: web.shop.svc.cluster.local\n  trafficPolicy: {policy}\n"
            );
            let l = load_text(std::path::Path::new("n.yaml"), &text, None, None).expect("loads");
            let e: Vec<String> = l.errors.iter().map(ToString::to_string).collect();
            (l.state.traffic_policies, e)
        };
        let (p, e) = load(
            "{connectionPool: {tcp: {connectTimeout: 250ms}}, outlierDetection: {interval: 2s}}",
        );
        assert!(e.is_empty(), "{e:?}");
        let p = p.values().next().expect("applied");
        assert_eq!(
            p.connect_timeout,
            Some(std::time::Duration::from_millis(250))
        );
        assert_eq!(
            p.outlier.as_ref().map(|o| o.interval),
            Some(std::time::Duration::from_secs(2))
        );
        let (_, e) = load("{outlierDetection: {}}");
        assert!(e.is_empty(), "{e:?}");
        for bad in [
            "{connectionPool: {tcp: {connectTimeout: 0s}}}",
            "{outlierDetection: {interval: soon}}",
        ] {
            let (p, e) = load(bad);
            assert!(p.is_empty() && !e.is_empty(), "{bad}: {e:?}");
        }
    }

    #[test]
    fn filters_gateway_api_forbids_are_refused_naming_the_field() {
        for (spec, says) in [
            ("  hostnames: [10.0.0.1]\n", "not a hostname"),
            ("  hostnames: ['a.*.io']\n", "not a hostname"),
            ("  rules: [{name: a}, {name: a}]\n", "names two rules"),
            ("  rules: [{name: Bad_Name}]\n", "rules.name"),
            (
                "  rules: [{filters: [{type: RequestRedirect, requestRedirect: {}}, {type: URLRewrite, urlRewrite: {hostname: x}}]}]\n",
                "neither URLRewrite nor backendRefs",
            ),
            (
                "  rules: [{backendRefs: [{name: v1, port: 80}], filters: [{type: RequestRedirect, requestRedirect: {statusCode: 307}}]}]\n",
                "not 301 or 302",
            ),
            (
                "  rules: [{matches: [{path: {type: Exact, value: /a}}], filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}]\n",
                "every match of the rule needs a PathPrefix",
            ),
            (
                "  rules: [{filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /a/../b}}}]}]\n",
                "normalized absolute path",
            ),
            (
                "  rules: [{filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replacePrefixMatch: /b}}}]}]\n",
                "is not ReplaceFullPath",
            ),
            (
                "  rules: [{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: s}}}]}]\n",
                "needs a `backendRef` with a `name` and a `port`",
            ),
            (
                "  rules: [{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: s, port: 80}, percent: 5, fraction: {numerator: 1}}}]}]\n",
                "not both",
            ),
            (
                "  rules: [{filters: [{type: URLRewrite, requestMirror: {backendRef: {name: s, port: 80}}}]}]\n",
                "not supported",
            ),
            (
                "  rules: [{filters: [{type: URLRewrite, urlRewrite: {hostname: a}}, {type: URLRewrite, urlRewrite: {hostname: b}}]}]\n",
                "appears twice",
            ),
        ] {
            let (routes, errors) = load(spec);
            assert!(routes.is_empty(), "{spec}: applied");
            assert!(
                errors.iter().any(|e| e.contains(says)),
                "{spec}: {errors:?}"
            );
        }
    }
}
