//! Checking one object's fields: each problem is an [`ObjectError`] naming the object, its
//! position and the field, and the rest of the file is still applied.

use std::net::IpAddr;

use crate::state::ObjectKey;

/// A problem with one pod or service; the rest of the file is still applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {who} ({position}): field `{field}`: {problem}")]
pub struct ObjectError {
    /// `pod` or `service`.
    pub kind: &'static str,
    /// `namespace/name`, or `<unnamed>` when the name itself is missing.
    pub who: String,
    /// `pods[3]` or `services[0]`.
    pub position: String,
    /// The offending field.
    pub field: &'static str,
    /// What is wrong and what to do.
    pub problem: String,
}

/// Lowercase DNS label rules (RFC 1123), which also makes names safe in bpffs file names.
pub(super) fn check_label(value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{value:?} is not a valid name: use 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"
        ))
    }
}

/// DNS subdomain rules (RFC 1123), which Kubernetes uses for node names: dot-separated labels,
/// 253 characters at most (`ip-10-0-0-1.ec2.internal`).
pub(super) fn check_subdomain(value: &str) -> Result<(), String> {
    let ok =
        !value.is_empty() && value.len() <= 253 && value.split('.').all(|l| check_label(l).is_ok());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{value:?} is not a valid node name: use up to 253 lowercase letters, digits, '-' and '.', each dot-separated part starting and ending with a letter or digit"
        ))
    }
}

pub(super) struct Ctx<'a> {
    pub(super) kind: &'static str,
    pub(super) who: String,
    pub(super) position: String,
    pub(super) errors: &'a mut Vec<ObjectError>,
}

impl Ctx<'_> {
    pub(super) fn fail(&mut self, field: &'static str, problem: impl Into<String>) {
        self.errors.push(ObjectError {
            kind: self.kind,
            who: self.who.clone(),
            position: self.position.clone(),
            field,
            problem: problem.into(),
        });
    }

    pub(super) fn required<'v, T>(
        &mut self,
        field: &'static str,
        value: &'v Option<T>,
    ) -> Option<&'v T> {
        if value.is_none() {
            self.fail(field, "missing (required)");
        }
        value.as_ref()
    }

    /// A required DNS-label field.
    pub(super) fn label(&mut self, field: &'static str, value: &Option<String>) -> Option<String> {
        let v = self.required(field, value)?;
        match check_label(v) {
            Ok(()) => Some(v.clone()),
            Err(e) => {
                self.fail(field, e);
                None
            }
        }
    }

    /// A required node-name field: a DNS subdomain.
    pub(super) fn node(&mut self, field: &'static str, value: &Option<String>) -> Option<String> {
        let v = self.required(field, value)?;
        match check_subdomain(v) {
            Ok(()) => Some(v.clone()),
            Err(e) => {
                self.fail(field, e);
                None
            }
        }
    }

    /// A required IP-address field.
    pub(super) fn ip(&mut self, field: &'static str, value: &Option<String>) -> Option<IpAddr> {
        let v = self.required(field, value)?.clone();
        self.parse_ip(field, &v)
    }

    /// An optional second address (dual-stack), which must be of the other family than
    /// `primary`: Kubernetes gives a pod or service at most one address per family.
    pub(super) fn secondary_ip(
        &mut self,
        field: &'static str,
        value: &Option<String>,
        primary: Option<IpAddr>,
    ) -> Option<IpAddr> {
        let a = self.parse_ip(field, value.as_ref()?)?;
        if let Some(p) = primary
            && p.is_ipv6() == a.is_ipv6()
        {
            self.fail(
                field,
                format!(
                    "{a} is of the same family as the primary address {p}; a dual-stack address must be the other family's"
                ),
            );
            return None;
        }
        Some(a)
    }

    fn parse_ip(&mut self, field: &'static str, v: &str) -> Option<IpAddr> {
        match v.parse() {
            Ok(a) => match unroutable(a) {
                None => Some(a),
                Some(why) => {
                    self.fail(
                        field,
                        format!("{a} is {why}, which cannot be a pod's or a service's address"),
                    );
                    None
                }
            },
            Err(_) => {
                self.fail(field, format!("{v:?} is not an IP address"));
                None
            }
        }
    }
}

/// What a rejected entry without a usable key still tells about the object it describes.
#[derive(Debug)]
pub(super) struct Clue {
    pub(super) name: Option<String>,
    pub(super) namespace: Option<String>,
    pub(super) ip: Option<IpAddr>,
}

impl Clue {
    pub(super) fn of(
        name: &Option<String>,
        namespace: &Option<String>,
        ip: &Option<String>,
    ) -> Self {
        let text = |v: &Option<String>| v.clone().filter(|s| !s.trim().is_empty());
        Self {
            name: text(name),
            namespace: text(namespace),
            ip: ip.as_deref().and_then(|s| s.parse().ok()),
        }
    }

    /// Whether the entry may describe the object `key` at `ip`: any field that still reads
    /// matches, and an entry of which nothing reads may be any object.
    pub(super) fn may_be(&self, key: &ObjectKey, ip: IpAddr) -> bool {
        let nothing = self.name.is_none() && self.namespace.is_none() && self.ip.is_none();
        nothing
            || self.ip == Some(ip)
            || self.name.as_deref() == Some(key.name.as_str())
            || self.namespace.as_deref() == Some(key.namespace.as_str())
    }
}

/// Why `a` can never be a workload's or a service's address, if it cannot: capturing it would
/// redirect the node's own loopback, every interface, a group, or a link's neighbours.
pub(super) fn unroutable(a: IpAddr) -> Option<&'static str> {
    let a = match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match a {
        a if a.is_unspecified() => Some("the unspecified address"),
        a if a.is_loopback() => Some("a loopback address"),
        a if a.is_multicast() => Some("a multicast address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local address"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("a link-local address"),
        _ => None,
    }
}

pub(super) fn who(namespace: &Option<String>, name: &Option<String>) -> String {
    match (namespace, name) {
        (Some(ns), Some(n)) => format!("{ns}/{n}"),
        (None, Some(n)) => format!("?/{n}"),
        _ => "<unnamed>".to_string(),
    }
}
