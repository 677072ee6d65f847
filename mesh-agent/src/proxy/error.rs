//! Why a proxied connection ended early: the one error type of the handlers.

use std::io;

use crate::{
    authz::Decision,
    route::table::RouteError,
    state::ObjectKey,
    telemetry::flows::{Draft, Verdict},
    transport::error::TransportError,
};

/// Errors on one proxied connection. Each ends that connection only.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The kernel had no original destination for a connection on 15001.
    #[error(
        "no original destination recorded for client port {0}: the connection was not made through the capture hook (or its record was evicted)"
    )]
    NoOrigDst(u16),
    /// Reading the original-destination map failed.
    #[error("reading the original destination: {0}")]
    OrigDstMap(io::Error),
    /// Routing found nowhere to send the connection.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// A connection to one of the proxy's own ports that did not come through capture.
    #[error("refusing a direct connection to proxy port {0}")]
    DirectToProxyPort(u16),
    /// Plaintext reached a STRICT pod's proxy (the kernel normally refuses it first).
    #[error("refused plaintext to {0}: it is STRICT mTLS")]
    StrictPlaintext(ObjectKey),
    /// Authorization refused the connection.
    #[error("connection {0}")]
    Denied(Decision),
    /// A policy change closed a connection it had allowed.
    #[error("closed after a policy change: {0}")]
    Revoked(Decision),
    /// The connection could not be carried.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

impl ProxyError {
    /// Files this error as a connection's outcome in its flow record: the destination's policy
    /// refusing the tunnel is a denial (`RBAC`); no endpoint is `UH`; a failure to connect or
    /// tunnel is `UF`; anything else is an error without a flag.
    pub fn file(&self, draft: &mut Draft) {
        match self {
            Self::Transport(TransportError::TunnelRefused {
                status: http::StatusCode::FORBIDDEN,
                ..
            }) => {
                draft.verdict = Verdict::Deny;
                draft.flags = "RBAC".into();
                draft.reason = Some(format!("{self} (the destination's policy)"));
            }
            Self::Revoked(d) => {
                draft.denied(d);
                draft.reason = Some(self.to_string());
            }
            Self::Route(RouteError::NoEndpoints { .. }) => draft.failed("UH", self.to_string()),
            Self::Transport(_) => draft.failed("UF", self.to_string()),
            _ => draft.failed("-", self.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::labels::{Flow, Peer, Reporter, Security};

    fn filed(e: ProxyError) -> (Verdict, String, String) {
        let mut d = Draft::new(Flow {
            reporter: Reporter::Source,
            src: Peer::unknown(),
            dst: Peer::unknown(),
            service: crate::telemetry::metrics::labels::ServiceLabels::unknown(),
            security: Security::None,
        });
        e.file(&mut d);
        (
            d.verdict,
            d.flags.into_owned(),
            d.reason.unwrap_or_default(),
        )
    }

    fn target() -> std::net::SocketAddr {
        "10.0.0.1:8080".parse().expect("test address")
    }

    #[test]
    fn the_destinations_refusal_is_a_denial_not_an_error() {
        let (v, flags, why) = filed(
            TransportError::TunnelRefused {
                target: target(),
                status: http::StatusCode::FORBIDDEN,
            }
            .into(),
        );
        assert_eq!((v, flags.as_str()), (Verdict::Deny, "RBAC"));
        assert!(why.ends_with("(the destination's policy)"), "{why}");
    }

    #[test]
    fn no_endpoints_is_uh() {
        let e = RouteError::NoEndpoints {
            service: crate::state::testing::key("default", "web"),
            port: 80,
        };
        let (v, flags, _) = filed(e.into());
        assert_eq!((v, flags.as_str()), (Verdict::Error, "UH"));
    }

    #[test]
    fn connect_and_tunnel_failures_are_uf() {
        for e in [
            TransportError::Tunnel {
                target: target(),
                problem: "x".into(),
            },
            TransportError::TunnelRefused {
                target: target(),
                status: http::StatusCode::SERVICE_UNAVAILABLE,
            },
            TransportError::Connect {
                addr: target(),
                source: io::Error::from(io::ErrorKind::ConnectionRefused),
            },
        ] {
            assert_eq!(filed(e.into()).1, "UF");
        }
    }

    #[test]
    fn a_revoked_connection_is_a_denial_that_names_the_policy_change() {
        let key = crate::state::testing::key("default", "deny-web");
        let (v, flags, why) = filed(ProxyError::Revoked(Decision::Denied(key)));
        assert_eq!((v, flags.as_str()), (Verdict::Deny, "RBAC"));
        assert_eq!(
            why,
            "closed after a policy change: denied by DENY policy default/deny-web"
        );
    }

    #[test]
    fn other_errors_carry_no_flag() {
        let (v, flags, why) = filed(ProxyError::NoOrigDst(40000));
        assert_eq!((v, flags.as_str()), (Verdict::Error, "-"));
        assert!(why.contains("40000"));
    }
}
