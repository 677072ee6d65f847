//! What the kernel offers, probed once at start: each program type, map type and helper the
//! eBPF object uses, and the optional paths. A missing must-have stops the start with the
//! feature's name and the first kernel that has it, before anything is loaded or pinned (a
//! verifier error deep in a load says neither). A missing nice-to-have turns its path off and
//! says so in the log, `/config_dump` and `mesh_kernel_feature`.
//!
//! Helpers are probed per program type: the kernel grants them per type, and the last one we
//! came to need, `bpf_get_netns_cookie` from `sock_ops`, is what sets the minimum (5.15).

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};
use serde::Serialize;
use tracing::{info, warn};

/// The oldest kernel with every must-have below.
pub const MINIMUM_KERNEL: &str = "5.15";

/// Whether the agent can run without a feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Need {
    /// The agent refuses to start without it.
    Required,
    /// Its path is turned off without it.
    Optional,
}

/// How a feature is asked of the kernel.
#[derive(Clone, Copy, Debug)]
enum Check {
    Program(ProgramType),
    Map(MapType),
    Helper(ProgramType, BpfHelper),
    /// Answered by the subsystem that uses it ([`KernelFeatures::record`]): the kTLS probe
    /// lives with kTLS.
    Elsewhere,
}

/// One feature the agent probes.
#[derive(Debug)]
pub struct Feature {
    /// Its name in logs, `/config_dump`, metrics and `--pretend-missing-kernel-feature`.
    pub name: &'static str,
    /// Required or optional.
    pub need: Need,
    /// The first Linux release that has it.
    pub since: &'static str,
    /// What uses it, or (optional) what turns off without it.
    pub why: &'static str,
    check: Check,
}

/// The optional kTLS upper-layer protocol, probed by `transport::ktls`.
pub const TLS_ULP: &str = "tls_ulp";
/// The name of the tracing probe: the loopback bypass's reader counter needs it.
pub const PROG_TRACING: &str = "prog_tracing";

/// Every probed feature, must-haves first.
pub const FEATURES: &[Feature] = &[
    Feature {
        name: "prog_cgroup_sock_addr",
        need: Need::Required,
        since: "4.17",
        why: "connect4/connect6 capture of enrolled pods' outbound connections",
        check: Check::Program(ProgramType::CgroupSockAddr),
    },
    Feature {
        name: "prog_sock_ops",
        need: Need::Required,
        since: "4.13",
        why: "recording each captured socket's original destination",
        check: Check::Program(ProgramType::SockOps),
    },
    Feature {
        name: "prog_sk_lookup",
        need: Need::Required,
        since: "5.9",
        why: "steering connections to enrolled pods into the proxy's listeners",
        check: Check::Program(ProgramType::SkLookup),
    },
    Feature {
        name: "prog_sk_msg",
        need: Need::Required,
        since: "4.17",
        why: "the loopback bypass between pods and the proxy",
        check: Check::Program(ProgramType::SkMsg),
    },
    Feature {
        name: "prog_sk_skb",
        need: Need::Required,
        since: "4.14",
        why: "the same-node splice",
        check: Check::Program(ProgramType::SkSkb),
    },
    Feature {
        name: "map_sockhash",
        need: Need::Required,
        since: "4.18",
        why: "the listener, splice and loopback socket maps",
        check: Check::Map(MapType::SockHash),
    },
    Feature {
        name: "map_lru_hash",
        need: Need::Required,
        since: "4.10",
        why: "original destinations that age out",
        check: Check::Map(MapType::LruHash),
    },
    Feature {
        name: "map_percpu_hash",
        need: Need::Required,
        since: "4.6",
        why: "per-pod counters without contention",
        check: Check::Map(MapType::PerCpuHash),
    },
    Feature {
        name: "helper_netns_cookie_sock_addr",
        need: Need::Required,
        since: "5.7",
        why: "keying a captured connect by its pod's network namespace",
        check: Check::Helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_netns_cookie,
        ),
    },
    Feature {
        name: "helper_netns_cookie_sock_ops",
        need: Need::Required,
        since: "5.15",
        why: "matching the established socket to its pod's network namespace",
        check: Check::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_get_netns_cookie),
    },
    Feature {
        name: "helper_sk_assign_sk_lookup",
        need: Need::Required,
        since: "5.9",
        why: "handing an arriving connection to the proxy's listener",
        check: Check::Helper(ProgramType::SkLookup, BpfHelper::BPF_FUNC_sk_assign),
    },
    Feature {
        name: "helper_sock_hash_update_sock_ops",
        need: Need::Required,
        since: "4.18",
        why: "putting sockets into the socket maps",
        check: Check::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_sock_hash_update),
    },
    Feature {
        name: "helper_msg_redirect_hash",
        need: Need::Required,
        since: "4.18",
        why: "moving a message to its peer socket (loopback bypass)",
        check: Check::Helper(ProgramType::SkMsg, BpfHelper::BPF_FUNC_msg_redirect_hash),
    },
    Feature {
        name: "helper_sk_redirect_hash",
        need: Need::Required,
        since: "4.18",
        why: "moving bytes to the spliced peer socket",
        check: Check::Helper(ProgramType::SkSkb, BpfHelper::BPF_FUNC_sk_redirect_hash),
    },
    Feature {
        name: TLS_ULP,
        need: Need::Optional,
        since: "5.1 (TLS 1.3; CONFIG_TLS)",
        why: "without it HBONE stays on rustls: no kTLS hand-over",
        check: Check::Elsewhere,
    },
    Feature {
        name: PROG_TRACING,
        need: Need::Optional,
        since: "5.5 (BTF)",
        why: "without it the loopback bypass cannot be paced by its reader",
        check: Check::Program(ProgramType::Tracing),
    },
];

/// One probe's answer.
#[derive(Clone, Debug, Serialize)]
pub struct Probed {
    /// The feature's name.
    pub name: &'static str,
    /// Required or optional.
    pub need: Need,
    /// The first Linux release that has it.
    pub since: &'static str,
    /// What uses it.
    pub why: &'static str,
    /// Whether this kernel has it.
    pub available: bool,
    /// Why not, when the probe itself failed, or "pretended" under
    /// `--pretend-missing-kernel-feature`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A must-have the kernel lacks.
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    /// The first missing must-have.
    #[error(
        "this kernel ({release}) lacks {name}, needed for {why}: it came in Linux {since}, and the agent needs Linux {MINIMUM_KERNEL} or newer with BPF enabled (CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF, CONFIG_BPF_STREAM_PARSER){}",
        detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default()
    )]
    Missing {
        /// The feature.
        name: &'static str,
        /// What needs it.
        why: &'static str,
        /// Its first release.
        since: &'static str,
        /// `uname -r`.
        release: String,
        /// The probe's own error, if it had one.
        detail: Option<String>,
    },
}

/// Every probe's answer, in [`FEATURES`] order.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KernelFeatures {
    /// The answers.
    pub features: Vec<Probed>,
}

impl KernelFeatures {
    /// Probes every feature the agent can ask the kernel itself; those named in `pretend` are
    /// reported missing without asking (for tests of the refusals and the fallbacks).
    /// [`Check::Elsewhere`] features start missing until [`KernelFeatures::record`].
    pub fn probe(pretend: &[String]) -> Self {
        let features = FEATURES
            .iter()
            .map(|f| {
                let answer = if pretend.iter().any(|p| p == f.name) {
                    Err("pretended".to_string())
                } else {
                    ask(f.check)
                };
                probed(f, answer)
            })
            .collect();
        Self { features }
    }

    /// Records what another subsystem found for `name`, unless `pretend` names it.
    pub fn record(&mut self, name: &str, answer: Result<(), String>, pretend: &[String]) {
        let answer = if pretend.iter().any(|p| p == name) {
            Err("pretended".to_string())
        } else {
            answer.map(|()| true)
        };
        if let Some(f) = FEATURES.iter().find(|f| f.name == name)
            && let Some(slot) = self.features.iter_mut().find(|p| p.name == name)
        {
            *slot = probed(f, answer);
        }
    }

    /// Whether the kernel has `name`.
    pub fn has(&self, name: &str) -> bool {
        self.features.iter().any(|p| p.name == name && p.available)
    }

    /// The first missing must-have, as the error that stops the start.
    pub fn require(&self) -> Result<(), FeatureError> {
        match self
            .features
            .iter()
            .find(|p| p.need == Need::Required && !p.available)
        {
            None => Ok(()),
            Some(p) => Err(FeatureError::Missing {
                name: p.name,
                why: p.why,
                since: p.since,
                release: release(),
                detail: p.detail.clone(),
            }),
        }
    }

    /// Logs the answers: one line when everything is there, a line per missing feature.
    pub fn log(&self) {
        let missing: Vec<&Probed> = self.features.iter().filter(|p| !p.available).collect();
        info!(
            kernel = %release(),
            probed = self.features.len(),
            missing = missing.len(),
            "kernel features probed"
        );
        for p in missing {
            match p.need {
                Need::Required => {
                    warn!(feature = p.name, since = p.since, detail = ?p.detail, "missing kernel feature: {}", p.why)
                }
                Need::Optional => {
                    info!(feature = p.name, since = p.since, detail = ?p.detail, "optional kernel feature missing: {}", p.why)
                }
            }
        }
    }
}

/// A probe's answer as a report line.
fn probed(f: &Feature, answer: Result<bool, String>) -> Probed {
    let (available, detail) = match answer {
        Ok(a) => (a, None),
        Err(e) => (false, Some(e)),
    };
    Probed {
        name: f.name,
        need: f.need,
        since: f.since,
        why: f.why,
        available,
        detail,
    }
}

/// Asks the kernel (loads a trivial program or creates a map, and drops it).
fn ask(check: Check) -> Result<bool, String> {
    match check {
        Check::Program(t) => is_program_supported(t).map_err(|e| e.to_string()),
        Check::Map(t) => is_map_supported(t).map_err(|e| e.to_string()),
        Check::Helper(t, h) => is_helper_supported(t, h).map_err(|e| e.to_string()),
        Check::Elsewhere => Err("not probed yet".to_string()),
    }
}

/// `uname -r`.
fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown release".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_present() -> KernelFeatures {
        KernelFeatures {
            features: FEATURES.iter().map(|f| probed(f, Ok(true))).collect(),
        }
    }

    #[test]
    fn names_are_unique_and_must_haves_come_first() {
        let mut names: Vec<&str> = FEATURES.iter().map(|f| f.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FEATURES.len());
        let first_optional = FEATURES
            .iter()
            .position(|f| f.need == Need::Optional)
            .expect("an optional feature");
        assert!(
            FEATURES[first_optional..]
                .iter()
                .all(|f| f.need == Need::Optional)
        );
    }

    #[test]
    fn the_minimum_kernel_is_the_newest_must_have() {
        let version = |s: &str| -> (u32, u32) {
            let (a, b) = s.split_once('.').expect("major.minor");
            (a.parse().expect("major"), b.parse().expect("minor"))
        };
        let newest = FEATURES
            .iter()
            .filter(|f| f.need == Need::Required)
            .map(|f| version(f.since))
            .max()
            .expect("a must-have");
        assert_eq!(newest, version(MINIMUM_KERNEL));
    }

    /// The README's "Kernel requirements" table is this table: a feature added here without a
    /// line there (or a changed release) fails.
    #[test]
    fn the_readme_lists_every_feature_with_its_release() {
        let readme = include_str!("../../../README.md");
        assert!(readme.contains(&format!("**Minimum: Linux {MINIMUM_KERNEL}**")));
        for f in FEATURES {
            let need = match f.need {
                Need::Required => "required",
                Need::Optional => "optional",
            };
            let since = f.since.replace("CONFIG_TLS", "`CONFIG_TLS`");
            let row = format!("| `{}` | {need} | {since} | {}", f.name, f.why);
            assert!(readme.contains(&row), "README lacks the row {row:?}");
        }
    }

    #[test]
    fn a_missing_must_have_refuses_naming_it_and_the_minimum() {
        let mut f = all_present();
        assert!(f.require().is_ok());
        f.features[2].available = false;
        f.features[2].detail = Some("pretended".into());
        let e = f.require().expect_err("a must-have is missing").to_string();
        assert!(e.contains("prog_sk_lookup"), "{e}");
        assert!(e.contains("Linux 5.9"), "{e}");
        assert!(
            e.contains(&format!("Linux {MINIMUM_KERNEL} or newer")),
            "{e}"
        );
    }

    #[test]
    fn a_missing_optional_feature_only_turns_its_path_off() {
        let mut f = all_present();
        f.record(TLS_ULP, Err("ENOENT".into()), &[]);
        assert!(!f.has(TLS_ULP));
        assert!(f.require().is_ok());
        f.record(TLS_ULP, Ok(()), &[]);
        assert!(f.has(TLS_ULP));
        f.record(TLS_ULP, Ok(()), &[TLS_ULP.to_string()]);
        assert!(!f.has(TLS_ULP), "pretending wins over the probe");
    }
}
