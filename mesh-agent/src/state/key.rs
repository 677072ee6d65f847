//! The name of an object in the model.

use std::fmt;

/// `namespace/name`, the identity of a pod or service inside the state model.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Object name.
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl serde::Serialize for ObjectKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl ObjectKey {
    /// A name usable in a bpffs file name: `namespace_name`. bpffs forbids `.` in names, and
    /// `_` cannot occur in the DNS labels that namespaces and names are validated to be.
    pub fn file_stem(&self) -> String {
        format!("{}_{}", self.namespace, self.name)
    }
}
