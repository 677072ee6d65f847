//! `cargo xtask layers`: the import check of mesh-agent's library. It reads every source file
//! with `syn`, resolves each `crate::`, `super::` and `self::` path (in `use` items and in code)
//! to the file that defines the module it names, and fails on:
//! - an import cycle between files (a face file's `pub mod` is not an import; a `pub use` is);
//! - an import that points up the layer order below, between top-level modules;
//! - a top-level module the order does not name.
//!
//! Test modules (`#[cfg(test)]`) are not read: a test may use anything.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use syn::visit::Visit;

/// mesh-agent's top-level modules, lowest first: each may import only those before it. This
/// is the map at the top of ARCHITECTURE.md.
pub const LAYERS: &[&str] = &[
    "state",     // the model: pods, services, routes, policies
    "identity",  // SPIFFE identities, certificates, the CA
    "capture",   // eBPF programs and maps, netns, cgroups
    "protocol",  // HTTP detection, framing guards, path normalization, bodies
    "authz",     // authorization policy evaluation
    "telemetry", // metrics and flow records
    "config",    // the agent's settings and their parsing
    "discovery", // where the state comes from (node file)
    "ca_server", // `mesh-agent ca`: the CA as a server, authorizing from discovery
    "route",     // the routing table, rules, balancing, limits
    "pods",      // the enrolled pods as the proxy sees them
    "view",      // the published snapshot: routes and pods
    "transport", // hop, dial, HBONE, kTLS, relay, splice, upstream pools
    "proxy",     // the handlers: listeners, L4 and L7, inbound and outbound
    "explain",   // answers "why" from a snapshot
    "admin",     // the admin endpoints
    "app",       // wires every subsystem
    "cli",       // operator commands against the admin endpoint
    "install",   // the Kubernetes install, printed as YAML
    "command",   // the binary's entry point
];

/// One source file as a module.
struct Module {
    path: Vec<String>,
    file: PathBuf,
}

/// Collects the module paths a file refers to.
struct Refs<'a> {
    /// The module being read: the file's, and inside an inline `mod`, that module's.
    here: Vec<String>,
    /// Every file module, to resolve a path that starts at a child module (`routes::x`).
    known: &'a BTreeSet<Vec<String>>,
    found: Vec<(Vec<String>, String)>,
}

fn is_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.parse_args::<syn::Meta>()
                .is_ok_and(|m| m.path().is_ident("test"))
    })
}

impl Refs<'_> {
    /// Resolves a path's leading segments against this file's module; `None` for paths that
    /// do not start at `crate`, `super` or `self`.
    fn resolve(&self, segs: &[String]) -> Option<Vec<String>> {
        let first = segs.first()?;
        let child = || {
            let mut c = self.here.to_vec();
            c.push(first.clone());
            c
        };
        let (mut out, mut rest): (Vec<String>, &[String]) = match first.as_str() {
            "crate" => (Vec::new(), &segs[1..]),
            "self" => (self.here.to_vec(), &segs[1..]),
            "super" => (
                self.here[..self.here.len().saturating_sub(1)].to_vec(),
                &segs[1..],
            ),
            // A path through a child module declared here.
            _ if self.known.contains(&child()) => (self.here.to_vec(), segs),
            _ => return None,
        };
        while rest.first().is_some_and(|s| s == "super") {
            out.pop();
            rest = &rest[1..];
        }
        out.extend(rest.iter().cloned());
        Some(out)
    }

    fn add(&mut self, segs: &[String], name: &str) {
        if let Some(p) = self.resolve(segs) {
            self.found.push((p, name.to_string()));
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                let name = n.ident.to_string();
                if name == "self" {
                    self.add(prefix, prefix.last().map_or("", String::as_str));
                } else {
                    prefix.push(name.clone());
                    self.add(prefix, &name);
                    prefix.pop();
                }
            }
            syn::UseTree::Rename(r) => {
                prefix.push(r.ident.to_string());
                self.add(prefix, &r.ident.to_string());
                prefix.pop();
            }
            syn::UseTree::Glob(_) => self.add(prefix, "*"),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }
}

impl<'ast> Visit<'ast> for Refs<'_> {
    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        if is_test(&u.attrs) {
            return;
        }
        self.use_tree(&mut Vec::new(), &u.tree);
    }
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if is_test(&m.attrs) {
            return;
        }
        self.here.push(m.ident.to_string());
        syn::visit::visit_item_mod(self, m);
        self.here.pop();
    }
    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if !is_test(&f.attrs) {
            syn::visit::visit_item_fn(self, f);
        }
    }
    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if !is_test(&f.attrs) {
            syn::visit::visit_impl_item_fn(self, f);
        }
    }
    fn visit_visibility(&mut self, _: &'ast syn::Visibility) {
        // `pub(super)` names who may see an item, not an import.
    }
    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segs: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        let name = segs.last().cloned().unwrap_or_default();
        self.add(&segs, &name);
        syn::visit::visit_path(self, p);
    }
}

fn modules(src: &Path) -> Result<Vec<Module>> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src)?.with_extension("");
            let mut segs: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            match segs.last().map(String::as_str) {
                // The binary is its own crate; the library's root only declares modules.
                Some("main") if segs.len() == 1 => continue,
                Some("lib") if segs.len() == 1 => continue,
                Some("mod") => {
                    segs.pop();
                }
                _ => {}
            }
            out.push(Module {
                path: segs,
                file: path,
            });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Strongly connected components of more than one file (Tarjan).
fn cycles(n: usize, edges: &BTreeMap<(usize, usize), BTreeSet<String>>) -> Vec<Vec<usize>> {
    struct T<'a> {
        adj: Vec<Vec<usize>>,
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: &'a mut Vec<Vec<usize>>,
    }
    fn strong(t: &mut T<'_>, v: usize) {
        t.index[v] = Some(t.next);
        t.low[v] = t.next;
        t.next += 1;
        t.stack.push(v);
        t.on[v] = true;
        for w in t.adj[v].clone() {
            match t.index[w] {
                None => {
                    strong(t, w);
                    t.low[v] = t.low[v].min(t.low[w]);
                }
                Some(i) if t.on[w] => t.low[v] = t.low[v].min(i),
                Some(_) => {}
            }
        }
        if Some(t.low[v]) == t.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on[w] = false;
                scc.push(w);
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort_unstable();
                t.out.push(scc);
            }
        }
    }
    let mut adj = vec![Vec::new(); n];
    for &(a, b) in edges.keys() {
        adj[a].push(b);
    }
    let mut out = Vec::new();
    let mut t = T {
        adj,
        index: vec![None; n],
        low: vec![0; n],
        on: vec![false; n],
        stack: Vec::new(),
        next: 0,
        out: &mut out,
    };
    for v in 0..n {
        if t.index[v].is_none() {
            strong(&mut t, v);
        }
    }
    out
}

/// Runs the check on the library under `src`; prints the top-level import graph.
pub fn check(src: &Path) -> Result<()> {
    let mods = modules(src)?;
    let index: BTreeMap<&[String], usize> = mods
        .iter()
        .enumerate()
        .map(|(i, m)| (m.path.as_slice(), i))
        .collect();
    let known: BTreeSet<Vec<String>> = mods.iter().map(|m| m.path.clone()).collect();
    let mut edges: BTreeMap<(usize, usize), BTreeSet<String>> = BTreeMap::new();
    for (i, m) in mods.iter().enumerate() {
        let text = std::fs::read_to_string(&m.file)?;
        let file =
            syn::parse_file(&text).with_context(|| format!("parsing {}", m.file.display()))?;
        let mut refs = Refs {
            here: m.path.clone(),
            known: &known,
            found: Vec::new(),
        };
        refs.visit_file(&file);
        for (path, name) in refs.found {
            // The longest prefix that names a file module.
            let target = (1..=path.len())
                .rev()
                .find_map(|k| index.get(&path[..k]).copied());
            if let Some(j) = target.filter(|&j| j != i) {
                edges.entry((i, j)).or_default().insert(name);
            }
        }
    }
    let name = |i: usize| mods[i].path.join("::");
    let mut problems = String::new();
    for scc in cycles(mods.len(), &edges) {
        let _ = writeln!(
            problems,
            "import cycle between: {}",
            scc.iter().map(|&i| name(i)).collect::<Vec<_>>().join(", ")
        );
        for (&(a, b), names) in &edges {
            if scc.contains(&a) && scc.contains(&b) {
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                let _ = writeln!(
                    problems,
                    "  {} -> {}: {}",
                    name(a),
                    name(b),
                    names.join(", ")
                );
            }
        }
    }
    let layer = |i: usize| -> Option<usize> { LAYERS.iter().position(|l| *l == mods[i].path[0]) };
    let mut top: BTreeMap<(usize, usize), BTreeSet<String>> = BTreeMap::new();
    for m in &mods {
        if !LAYERS.contains(&m.path[0].as_str()) {
            let _ = writeln!(
                problems,
                "module `{}` is in no layer: add it to xtask/src/layers.rs (and ARCHITECTURE.md's map)",
                m.path[0]
            );
        }
    }
    for (&(a, b), names) in &edges {
        let (Some(la), Some(lb)) = (layer(a), layer(b)) else {
            continue;
        };
        if la == lb {
            continue;
        }
        top.entry((la, lb))
            .or_default()
            .extend(names.iter().cloned());
        if la < lb {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let _ = writeln!(
                problems,
                "upward import: {} (layer {}) -> {} (layer {}): {}",
                name(a),
                LAYERS[la],
                name(b),
                LAYERS[lb],
                names.join(", ")
            );
        }
    }
    println!("mesh-agent layers, lowest first, with what each imports:");
    for (l, layer_name) in LAYERS.iter().enumerate() {
        let below: Vec<&str> = top
            .keys()
            .filter(|(a, _)| *a == l)
            .map(|&(_, b)| LAYERS[b])
            .collect();
        println!(
            "  {layer_name:<10} -> {}",
            if below.is_empty() {
                "-".to_string()
            } else {
                below.join(", ")
            }
        );
    }
    println!("{} files, {} file-to-file imports", mods.len(), edges.len());
    if !problems.is_empty() {
        bail!("mesh-agent's module layering is broken:\n{problems}");
    }
    println!("no import cycles; every import points down the layers");
    Ok(())
}
