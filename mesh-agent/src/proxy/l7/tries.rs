//! The retry decisions of one request, apart from the I/O: whether its body is held so a retry
//! can resend it, and what a try that got no usable answer means (the reply, its response flag,
//! and whether the rule retries it).

use http::StatusCode;

use crate::{
    state::RetryPolicy,
    transport::{error::TransportError, upstream::UpstreamError},
};

/// Largest request body held so that a retry can resend it; larger ones go once.
pub const MAX_RETRY_BODY: u64 = 64 * 1024;

/// How many retries a request gets: the rule's, when its body can be resent (its size is known
/// to be at most [`MAX_RETRY_BODY`]); none otherwise.
pub fn retries(retry: Option<&RetryPolicy>, body_upper: Option<u64>) -> u32 {
    match retry {
        Some(r) if body_upper.is_some_and(|n| n <= MAX_RETRY_BODY) => r.attempts,
        _ => 0,
    }
}

/// Whether a response status is one the rule retries.
pub fn retries_status(retry: Option<&RetryPolicy>, status: StatusCode) -> bool {
    retry.is_some_and(|r| r.codes.contains(&status.as_u16()))
}

/// A try that got no usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The reply if no try follows.
    pub status: StatusCode,
    /// Its response flag.
    pub flags: &'static str,
    /// What happened, for the reply and the flow record.
    pub message: String,
    /// Whether the rule retries it.
    pub retriable: bool,
    /// Whether it counts against the endpoint (outlier detection); a refusal by the
    /// destination's policy or a full connection pool does not.
    pub endpoint_failed: bool,
}

/// What a failed try means: `error` is what sending returned, `None` for the per-try timeout.
pub fn classify(error: Option<&UpstreamError>, retry: Option<&RetryPolicy>) -> Failure {
    let fail = |status, flags, message: String, retriable| Failure {
        status,
        flags,
        message,
        retriable,
        endpoint_failed: true,
    };
    match error {
        Some(UpstreamError::Overflow) => Failure {
            endpoint_failed: false,
            ..fail(
                StatusCode::SERVICE_UNAVAILABLE,
                "UO",
                "circuit breaker: connection limit reached".into(),
                false,
            )
        },
        Some(UpstreamError::Connect(TransportError::TunnelRefused {
            status: StatusCode::FORBIDDEN,
            ..
        })) => Failure {
            endpoint_failed: false,
            ..fail(
                StatusCode::FORBIDDEN,
                "RBAC",
                "RBAC: access denied by the destination's policy".into(),
                false,
            )
        },
        Some(e @ UpstreamError::Connect(_)) => fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "UF",
            format!("upstream connect failure: {e}"),
            retry.is_some_and(|r| r.on_connect_failure),
        ),
        Some(e @ (UpstreamError::Reset(_) | UpstreamError::Unsent(_))) => fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "UC",
            format!("upstream reset: {e}"),
            retry.is_some_and(|r| r.on_reset),
        ),
        // A per-try timeout answers 504, so it is retried when 504 is (as `5xx` says).
        None => fail(
            StatusCode::GATEWAY_TIMEOUT,
            "UT",
            "per-try timeout".into(),
            retries_status(retry, StatusCode::GATEWAY_TIMEOUT),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{net::SocketAddr, time::Duration};

    fn policy(on_reset: bool, on_connect_failure: bool, codes: &[u16]) -> RetryPolicy {
        RetryPolicy {
            attempts: 2,
            codes: codes.to_vec(),
            on_reset,
            on_connect_failure,
            backoff: Duration::ZERO,
        }
    }

    fn target() -> SocketAddr {
        "10.0.0.1:8080".parse().expect("test address")
    }

    #[test]
    fn a_small_known_body_gets_the_rules_retries() {
        let p = policy(true, true, &[503]);
        assert_eq!(retries(Some(&p), Some(0)), 2);
        assert_eq!(retries(Some(&p), Some(MAX_RETRY_BODY)), 2);
    }

    #[test]
    fn a_large_or_streaming_body_goes_once() {
        let p = policy(true, true, &[503]);
        assert_eq!(retries(Some(&p), Some(MAX_RETRY_BODY + 1)), 0);
        assert_eq!(
            retries(Some(&p), None),
            0,
            "no upper bound: chunked or a stream"
        );
        assert_eq!(retries(None, Some(0)), 0, "no retry policy");
    }

    #[test]
    fn statuses_are_retried_only_when_listed() {
        let p = policy(false, false, &[503]);
        assert!(retries_status(Some(&p), StatusCode::SERVICE_UNAVAILABLE));
        assert!(!retries_status(Some(&p), StatusCode::INTERNAL_SERVER_ERROR));
        assert!(!retries_status(None, StatusCode::SERVICE_UNAVAILABLE));
    }

    #[test]
    fn a_full_pool_is_503_uo_final_and_not_the_endpoints_fault() {
        let f = classify(
            Some(&UpstreamError::Overflow),
            Some(&policy(true, true, &[503])),
        );
        assert_eq!((f.status, f.flags), (StatusCode::SERVICE_UNAVAILABLE, "UO"));
        assert!(!f.retriable && !f.endpoint_failed);
    }

    #[test]
    fn the_destinations_policy_refusal_is_403_rbac_and_never_retried() {
        let e = UpstreamError::Connect(TransportError::TunnelRefused {
            target: target(),
            status: StatusCode::FORBIDDEN,
        });
        let f = classify(Some(&e), Some(&policy(true, true, &[403, 503])));
        assert_eq!((f.status, f.flags), (StatusCode::FORBIDDEN, "RBAC"));
        assert!(!f.retriable && !f.endpoint_failed);
    }

    #[test]
    fn a_connect_failure_is_uf_and_retried_when_the_rule_says_so() {
        let e = UpstreamError::Connect(TransportError::Tunnel {
            target: target(),
            problem: "refused".into(),
        });
        let f = classify(Some(&e), Some(&policy(false, true, &[])));
        assert_eq!((f.status, f.flags), (StatusCode::SERVICE_UNAVAILABLE, "UF"));
        assert!(f.retriable && f.endpoint_failed);
        assert!(!classify(Some(&e), Some(&policy(true, false, &[]))).retriable);
    }

    #[test]
    fn another_tunnel_refusal_is_a_connect_failure() {
        let e = UpstreamError::Connect(TransportError::TunnelRefused {
            target: target(),
            status: StatusCode::SERVICE_UNAVAILABLE,
        });
        assert_eq!(classify(Some(&e), None).flags, "UF");
    }

    #[test]
    fn a_reset_is_uc_and_retried_when_the_rule_says_so() {
        let e = UpstreamError::Unsent(http::Request::new(crate::protocol::body::full("")));
        let f = classify(Some(&e), Some(&policy(true, false, &[])));
        assert_eq!((f.status, f.flags), (StatusCode::SERVICE_UNAVAILABLE, "UC"));
        assert!(f.retriable);
        assert!(!classify(Some(&e), Some(&policy(false, true, &[]))).retriable);
    }

    #[test]
    fn a_per_try_timeout_is_504_ut_and_retried_when_504_is() {
        let f = classify(None, Some(&policy(false, false, &[504])));
        assert_eq!((f.status, f.flags), (StatusCode::GATEWAY_TIMEOUT, "UT"));
        assert!(f.retriable);
        assert!(!classify(None, Some(&policy(true, true, &[503]))).retriable);
    }
}
