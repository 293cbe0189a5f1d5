//! Node liveness from the node agents' heartbeat Leases (`peersan-node-<node>`).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// Lease duration assumed when a heartbeat Lease does not say (the agent's default).
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(40);

/// Whether a node's agent is alive, as its heartbeat Lease tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// The heartbeat is fresh until `expires`.
    Online {
        /// `renewTime + leaseDurationSeconds`.
        expires: Timestamp,
    },
    /// The heartbeat expired, or its Lease went away after the node had one.
    Offline,
    /// The node never had a heartbeat Lease (its agent has not started yet).
    Pending,
}

impl Liveness {
    /// Whether the node counts as alive.
    pub fn is_online(self) -> bool {
        matches!(self, Liveness::Online { .. })
    }
}

/// Liveness from the heartbeat Lease `lease` (if it exists) at `now`. A node is offline once
/// `renewTime + leaseDurationSeconds < now`; without a Lease it is offline if it was seen
/// before (`seen_before`), else pending. A Lease never renewed counts from `acquireTime`.
pub fn heartbeat(lease: Option<&Lease>, now: Timestamp, seen_before: bool) -> Liveness {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return if seen_before { Liveness::Offline } else { Liveness::Pending };
    };
    let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return if seen_before { Liveness::Offline } else { Liveness::Pending };
    };
    let duration = spec
        .lease_duration_seconds
        .filter(|s| *s > 0)
        .map_or(SignedDuration::try_from(DEFAULT_LEASE_DURATION).unwrap_or(SignedDuration::MAX), |s| {
            SignedDuration::from_secs(i64::from(s))
        });
    let expires = renewed.0.saturating_add(duration).unwrap_or(Timestamp::MAX);
    if expires < now { Liveness::Offline } else { Liveness::Online { expires } }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    use super::*;

    fn lease(renew: Option<Timestamp>, duration: Option<i32>) -> Lease {
        Lease {
            spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                holder_identity: Some("n".into()),
                lease_duration_seconds: duration,
                renew_time: renew.map(MicroTime),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn fresh_expired_and_missing() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let l = lease(Some(t0), Some(2));
        let expires = t0 + SignedDuration::from_secs(2);
        assert_eq!(heartbeat(Some(&l), t0, false), Liveness::Online { expires });
        // Exactly at the expiry it still counts; after it, not.
        assert_eq!(heartbeat(Some(&l), expires, true), Liveness::Online { expires });
        assert_eq!(heartbeat(Some(&l), expires + SignedDuration::from_millis(1), true), Liveness::Offline);
        assert_eq!(heartbeat(None, t0, false), Liveness::Pending);
        assert_eq!(heartbeat(None, t0, true), Liveness::Offline);
        // No renewal ever: pending or offline like a missing Lease.
        assert_eq!(heartbeat(Some(&lease(None, Some(2))), t0, false), Liveness::Pending);
        // No duration: the agent's default.
        let l = lease(Some(t0), None);
        assert!(heartbeat(Some(&l), t0 + SignedDuration::from_secs(39), false).is_online());
        assert_eq!(heartbeat(Some(&l), t0 + SignedDuration::from_secs(41), false), Liveness::Offline);
    }
}
