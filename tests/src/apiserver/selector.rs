//! Label and field selectors as the API server reads them from `labelSelector` and
//! `fieldSelector`: `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`.

use serde_json::Value;

use super::store::{ApiError, field};

#[derive(Debug, Clone, PartialEq)]
enum Req {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Missing(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// Both selectors of a request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selector {
    labels: Vec<Req>,
    fields: Vec<Req>,
}

/// Splits at commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

fn parse(s: &str, sets: bool) -> Result<Vec<Req>, ApiError> {
    let bad = |p: &str| {
        ApiError::new(
            400,
            "BadRequest",
            format!("unable to parse requirement: {p:?}"),
        )
    };
    let mut reqs = Vec::new();
    for p in split_top(s) {
        let req = if let Some((k, v)) = p.split_once("!=") {
            Req::Ne(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
            Req::Eq(k.trim().into(), v.trim().into())
        } else if sets && let Some((k, rest)) = p.split_once(" notin ") {
            Req::NotIn(k.trim().into(), set(rest).ok_or_else(|| bad(p))?)
        } else if sets && let Some((k, rest)) = p.split_once(" in ") {
            Req::In(k.trim().into(), set(rest).ok_or_else(|| bad(p))?)
        } else if sets && let Some(k) = p.strip_prefix('!') {
            Req::Missing(k.trim().into())
        } else if sets && !p.contains(char::is_whitespace) {
            Req::Exists(p.into())
        } else {
            return Err(bad(p));
        };
        reqs.push(req);
    }
    Ok(reqs)
}

fn set(s: &str) -> Option<Vec<String>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(inner.split(',').map(|v| v.trim().to_string()).collect())
}

fn holds(req: &Req, get: impl Fn(&str) -> Option<String>) -> bool {
    match req {
        Req::Eq(k, v) => get(k).as_deref() == Some(v),
        Req::Ne(k, v) => get(k).as_deref() != Some(v),
        Req::Exists(k) => get(k).is_some(),
        Req::Missing(k) => get(k).is_none(),
        Req::In(k, vs) => get(k).is_some_and(|x| vs.contains(&x)),
        Req::NotIn(k, vs) => get(k).is_none_or(|x| !vs.contains(&x)),
    }
}

impl Selector {
    /// From a request's `labelSelector` and `fieldSelector`.
    pub fn new(labels: Option<&str>, fields: Option<&str>) -> Result<Self, ApiError> {
        Ok(Self {
            labels: parse(labels.unwrap_or(""), true)?,
            fields: parse(fields.unwrap_or(""), false)?,
        })
    }

    /// Whether `obj` passes both.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        self.labels.iter().all(|r| {
            holds(r, |k| {
                labels.get(k).and_then(Value::as_str).map(String::from)
            })
        }) && self.fields.iter().all(|r| holds(r, |k| field(obj, k)))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn label_and_field_selectors() {
        let pod = json!({"metadata": {"name": "a", "labels": {"app": "web", "tier": "front"}}, "spec": {"nodeName": "n1.example"}});
        let m = |l: &str, f: &str| {
            Selector::new(Some(l), Some(f))
                .expect("parses")
                .matches(&pod)
        };
        assert!(m("", ""));
        assert!(m("app=web", "spec.nodeName=n1.example"));
        assert!(m("app==web,tier", ""));
        assert!(!m("app=web", "spec.nodeName=n2"));
        assert!(m("app in (web, api),!missing", "metadata.name!=b"));
        assert!(!m("app notin (web)", ""));
        assert!(m("env notin (prod)", ""));
        assert!(!m("!app", ""));
        assert!(Selector::new(Some("app in web"), None).is_err());
        assert!(Selector::new(None, Some("spec.nodeName")).is_err());
    }
}
