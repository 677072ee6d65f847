//! The stand-in API server's objects: one resourceVersion counter for everything, as etcd's
//! revision is, a history of changes for watches to resume from, and compaction on demand so a
//! test can make an old resourceVersion answer 410 Gone.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::{resources::Resource, selector::Selector};

/// An API error, as the real server words it (`Status` objects).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub code: u16,
    /// Kubernetes' machine-readable reason (`NotFound`, `AlreadyExists`, `Conflict`, `Expired`…).
    pub reason: &'static str,
    /// For people.
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    /// The `Status` object the real server sends.
    pub fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

/// A watch event as the wire carries it.
#[derive(Debug, Clone)]
pub struct Change {
    /// The resourceVersion the change made.
    pub rv: u64,
    /// Which resource type.
    pub resource: &'static Resource,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub kind: &'static str,
    /// The object after the change (before it, for a deletion, with the new resourceVersion).
    pub object: Value,
}

type Key = (&'static Resource, String, String);

/// All objects, and the changes since the last compaction.
#[derive(Debug)]
pub struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    uid: u64,
    live: broadcast::Sender<Change>,
}

impl Default for Store {
    fn default() -> Self {
        Self {
            rv: 1,
            objects: BTreeMap::new(),
            history: Vec::new(),
            compacted: 0,
            uid: 0,
            live: broadcast::channel(65_536).0,
        }
    }
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

/// A field selector's view of an object: `metadata.name`, `metadata.namespace`, `spec.nodeName`,
/// `status.phase` and so on, by dotted path.
pub fn field(obj: &Value, path: &str) -> Option<String> {
    let mut v = obj;
    for part in path.split('.') {
        v = v.get(part)?;
    }
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl Store {
    /// The current resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// Live changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.live.subscribe()
    }

    /// Forgets the history: any watch that resumes from before now gets 410 Gone.
    pub fn compact(&mut self) {
        self.compacted = self.rv;
        self.history.clear();
    }

    fn record(&mut self, resource: &'static Resource, kind: &'static str, object: Value) {
        let change = Change {
            rv: self.rv,
            resource,
            kind,
            object,
        };
        self.history.push(change.clone());
        // Receivers that fell behind see a lag error and end their watch, as a real server
        // closes a slow watcher.
        let _ = self.live.send(change);
    }

    fn key(resource: &'static Resource, ns: &str, name: &str) -> Key {
        let ns = if resource.namespaced { ns } else { "" };
        (resource, ns.to_string(), name.to_string())
    }

    /// One object.
    pub fn get(
        &self,
        resource: &'static Resource,
        ns: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        self.objects
            .get(&Self::key(resource, ns, name))
            .cloned()
            .ok_or_else(|| not_found(resource, name))
    }

    /// Objects of `resource` in `ns` (every namespace when `None`) that `selector` matches.
    pub fn list(
        &self,
        resource: &'static Resource,
        ns: Option<&str>,
        selector: &Selector,
    ) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((r, n, _), obj)| {
                *r == resource && ns.is_none_or(|want| want == n) && selector.matches(obj)
            })
            .map(|(_, obj)| obj.clone())
            .collect()
    }

    /// Changes after `since` for a watch that resumes there; 410 Gone when they were compacted.
    pub fn since(&self, since: u64) -> Result<Vec<Change>, ApiError> {
        if since < self.compacted {
            return Err(ApiError::new(
                410,
                "Expired",
                format!("too old resource version: {since} ({})", self.compacted),
            ));
        }
        Ok(self
            .history
            .iter()
            .filter(|c| c.rv > since)
            .cloned()
            .collect())
    }

    /// Stores a new object: names it from `generateName` if asked, sets uid, resourceVersion and
    /// creationTimestamp.
    pub fn create(
        &mut self,
        resource: &'static Resource,
        ns: &str,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        check_kind(resource, &mut obj)?;
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        if meta_str(&obj, "name").is_none_or(str::is_empty) {
            let Some(prefix) = meta_str(&obj, "generateName").map(String::from) else {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    "metadata.name: Required value: name or generateName is required",
                ));
            };
            self.uid += 1;
            obj["metadata"]["name"] = json!(format!("{prefix}{:05x}", self.uid));
        }
        let name = meta_str(&obj, "name").unwrap_or_default().to_string();
        if resource.namespaced {
            let ns = match meta_str(&obj, "namespace") {
                Some(n) if n != ns && !ns.is_empty() => {
                    return Err(ApiError::new(
                        400,
                        "BadRequest",
                        format!(
                            "the namespace of the object ({n}) does not match the namespace on the request ({ns})"
                        ),
                    ));
                }
                Some(n) => n.to_string(),
                None if ns.is_empty() => "default".to_string(),
                None => ns.to_string(),
            };
            obj["metadata"]["namespace"] = json!(ns);
        }
        let key = Self::key(resource, meta_str(&obj, "namespace").unwrap_or(""), &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", resource.plural),
            ));
        }
        self.rv += 1;
        self.uid += 1;
        let meta = &mut obj["metadata"];
        if meta.get("uid").is_none_or(Value::is_null) {
            meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.uid));
        }
        meta["resourceVersion"] = json!(self.rv.to_string());
        meta["creationTimestamp"] = json!(now());
        meta["generation"] = json!(1);
        self.objects.insert(key, obj.clone());
        self.record(resource, "ADDED", obj.clone());
        Ok(obj)
    }

    /// Replaces an object; a resourceVersion in the new one must match the stored one.
    pub fn update(
        &mut self,
        resource: &'static Resource,
        ns: &str,
        name: &str,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        check_kind(resource, &mut obj)?;
        let key = Self::key(resource, ns, name);
        let Some(old) = self.objects.get(&key) else {
            return Err(not_found(resource, name));
        };
        if let Some(rv) = meta_str(&obj, "resourceVersion")
            && Some(rv) != meta_str(old, "resourceVersion")
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                    resource.plural
                ),
            ));
        }
        if meta_str(&obj, "name").is_some_and(|n| n != name) {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "the name of the object does not match the name on the URL",
            ));
        }
        let old_meta = old["metadata"].clone();
        let changed_spec = old.get("spec") != obj.get("spec");
        self.rv += 1;
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        let meta = &mut obj["metadata"];
        meta["name"] = json!(name);
        if resource.namespaced {
            meta["namespace"] = old_meta["namespace"].clone();
        }
        for kept in ["uid", "creationTimestamp"] {
            meta[kept] = old_meta[kept].clone();
        }
        let generation = old_meta["generation"].as_u64().unwrap_or(1);
        meta["generation"] = json!(generation + u64::from(changed_spec));
        meta["resourceVersion"] = json!(self.rv.to_string());
        self.objects.insert(key, obj.clone());
        self.record(resource, "MODIFIED", obj.clone());
        Ok(obj)
    }

    /// Applies a JSON merge patch (RFC 7386); kubectl's strategic merge patches of labels and
    /// annotations are merge patches too.
    pub fn patch(
        &mut self,
        resource: &'static Resource,
        ns: &str,
        name: &str,
        patch: &Value,
    ) -> Result<Value, ApiError> {
        let mut obj = self.get(resource, ns, name)?;
        merge(&mut obj, patch);
        // A patch applies to the current version unless it names one.
        if patch["metadata"]["resourceVersion"].is_null() {
            let current = self.get(resource, ns, name)?;
            obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
        }
        self.update(resource, ns, name, obj)
    }

    /// Deletes an object at once (no finalizers, no graceful period).
    pub fn delete(
        &mut self,
        resource: &'static Resource,
        ns: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let key = Self::key(resource, ns, name);
        let Some(mut obj) = self.objects.remove(&key) else {
            return Err(not_found(resource, name));
        };
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(resource, "DELETED", obj.clone());
        Ok(obj)
    }
}

fn not_found(resource: &Resource, name: &str) -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        format!("{} \"{name}\" not found", resource.plural),
    )
}

/// Fills in or checks `apiVersion` and `kind`.
fn check_kind(resource: &Resource, obj: &mut Value) -> Result<(), ApiError> {
    if !obj.is_object() {
        return Err(ApiError::new(
            400,
            "BadRequest",
            "the body is not a JSON object",
        ));
    }
    let want = resource.api_version();
    match (
        obj.get("apiVersion").and_then(Value::as_str),
        obj.get("kind").and_then(Value::as_str),
    ) {
        (None, None) => {
            obj["apiVersion"] = json!(want);
            obj["kind"] = json!(resource.kind);
            Ok(())
        }
        (Some(v), Some(k)) if v == want && k == resource.kind => Ok(()),
        (v, k) => Err(ApiError::new(
            400,
            "BadRequest",
            format!(
                "the object's apiVersion/kind ({}/{}) is not {want}/{} as the URL says",
                v.unwrap_or("-"),
                k.unwrap_or("-"),
                resource.kind
            ),
        )),
    }
}

/// RFC 7386: objects merge key by key, `null` removes, anything else replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// Seconds-precision RFC 3339, as Kubernetes writes timestamps.
fn now() -> String {
    let t = time::OffsetDateTime::now_utc();
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::resources::find;

    fn pods() -> &'static Resource {
        find("", "v1", "pods").expect("pods")
    }

    #[test]
    fn create_update_patch_delete_bump_one_resource_version() {
        let mut s = Store::default();
        let p = s
            .create(
                pods(),
                "default",
                json!({"metadata": {"name": "a", "labels": {"x": "1"}}}),
            )
            .expect("create");
        assert_eq!(p["kind"], "Pod");
        assert_eq!(p["metadata"]["namespace"], "default");
        let rv1 = s.rv();
        assert!(
            s.create(pods(), "default", json!({"metadata": {"name": "a"}}))
                .is_err()
        );
        let p = s
            .patch(
                pods(),
                "default",
                "a",
                &json!({"metadata": {"labels": {"x": null, "y": "2"}}}),
            )
            .expect("patch");
        assert_eq!(p["metadata"]["labels"], json!({"y": "2"}));
        assert_eq!(s.rv(), rv1 + 1);
        // A stale resourceVersion conflicts.
        let mut stale = p.clone();
        stale["metadata"]["resourceVersion"] = json!(rv1.to_string());
        assert_eq!(
            s.update(pods(), "default", "a", stale)
                .expect_err("stale")
                .code,
            409
        );
        s.delete(pods(), "default", "a").expect("delete");
        let kinds: Vec<_> = s
            .since(0)
            .expect("history")
            .iter()
            .map(|c| c.kind)
            .collect();
        assert_eq!(kinds, ["ADDED", "MODIFIED", "DELETED"]);
        s.compact();
        assert_eq!(s.since(rv1).expect_err("compacted").code, 410);
        assert!(s.since(s.rv()).expect("current").is_empty());
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let t = now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }
}
