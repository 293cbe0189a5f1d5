//! Leader election over a `coordination.k8s.io/v1` Lease (`peersan-operator` in the
//! operator's namespace), so that of several operator processes one reconciles and the
//! others stand by.
//!
//! The holder renews the Lease every [`RENEW_EVERY`]; a Lease not renewed for
//! [`LEASE_DURATION`] may be taken by another process. A holder that cannot renew for
//! [`LEASE_DURATION`] stops (the process exits and is restarted), so two processes never
//! reconcile for longer than that at once, and every write they make is a server-side
//! apply or guarded by a resourceVersion. A holder that shuts down releases the Lease.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};

use crate::MANAGER;
use crate::error::is_conflict;
use crate::liveness::{self, Liveness};

/// Name of the election Lease.
pub const LEADER_LEASE: &str = "peersan-operator";
/// How long a Lease not renewed stays with its holder.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews it, and a standby process tries to take it.
pub const RENEW_EVERY: Duration = Duration::from_secs(4);

/// The Lease spec after `me` claims it at `now`, or `None` while another holder's Lease is
/// fresh. Renewing keeps `acquireTime` and `leaseTransitions`; taking it over sets both.
pub fn claim(current: Option<&LeaseSpec>, me: &str, now: Timestamp, duration: Duration) -> Option<LeaseSpec> {
    let holder = current.and_then(|s| s.holder_identity.as_deref()).filter(|h| !h.is_empty());
    let mine = holder == Some(me);
    if !mine && holder.is_some() {
        let lease = Lease { spec: current.cloned(), ..Default::default() };
        if liveness::heartbeat(Some(&lease), now, true) != Liveness::Offline {
            return None;
        }
    }
    let seconds = i32::try_from(duration.as_secs()).unwrap_or(i32::MAX).max(1);
    let transitions = current.and_then(|s| s.lease_transitions).unwrap_or(0);
    Some(LeaseSpec {
        holder_identity: Some(me.to_owned()),
        lease_duration_seconds: Some(seconds),
        acquire_time: if mine { current.and_then(|s| s.acquire_time.clone()) } else { Some(MicroTime(now)) },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if mine || current.is_none() { transitions } else { transitions.saturating_add(1) }),
        ..Default::default()
    })
}

/// Takes part in the election as `identity`.
#[derive(Clone)]
pub struct Elector {
    api: Api<Lease>,
    identity: String,
}

impl Elector {
    /// An elector in `namespace`.
    pub fn new(client: Client, namespace: &str, identity: String) -> Elector {
        Elector { api: Api::namespaced(client, namespace), identity }
    }

    /// This process's identity in the Lease.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Takes or renews the Lease: `Ok(true)` when this process holds it now, `Ok(false)`
    /// when another one does (or won a race for it).
    pub async fn try_lead(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let params = PostParams { field_manager: Some(MANAGER.to_owned()), ..Default::default() };
        let result = match self.api.get_opt(LEADER_LEASE).await? {
            None => {
                let Some(spec) = claim(None, &self.identity, now, LEASE_DURATION) else { return Ok(false) };
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(LEADER_LEASE.to_owned()), ..Default::default() },
                    spec: Some(spec),
                };
                self.api.create(&params, &lease).await
            }
            Some(mut lease) => {
                let Some(spec) = claim(lease.spec.as_ref(), &self.identity, now, LEASE_DURATION) else {
                    return Ok(false);
                };
                lease.spec = Some(spec);
                lease.managed_fields_mut().clear();
                self.api.replace(LEADER_LEASE, &params, &lease).await
            }
        };
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up if this process holds it, so that a standby takes over at once.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(LEADER_LEASE).await? else { return Ok(()) };
        let Some(spec) = lease.spec.as_mut() else { return Ok(()) };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease.managed_fields_mut().clear();
        let params = PostParams { field_manager: Some(MANAGER.to_owned()), ..Default::default() };
        match self.api.replace(LEADER_LEASE, &params, &lease).await {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The identity of this process: `POD_NAME` if set, else `<hostname>-<pid>`.
pub fn default_identity() -> String {
    if let Ok(name) = std::env::var("POD_NAME")
        && !name.is_empty()
    {
        return name;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    format!("{}-{}", if host.is_empty() { "peersan-operator" } else { host }, std::process::id())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::SignedDuration;

    use super::*;

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn free_expired_own_and_taken_leases() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let first = claim(None, "a", t0, D).unwrap();
        assert_eq!(first.holder_identity.as_deref(), Some("a"));
        assert_eq!((first.lease_duration_seconds, first.lease_transitions), (Some(15), Some(0)));

        // Another process while a's Lease is fresh: no; a renews: same acquireTime.
        let t1 = t0 + SignedDuration::from_secs(10);
        assert_eq!(claim(Some(&first), "b", t1, D), None);
        let renewed = claim(Some(&first), "a", t1, D).unwrap();
        assert_eq!(renewed.acquire_time, first.acquire_time);
        assert_eq!(renewed.renew_time, Some(MicroTime(t1)));
        assert_eq!(renewed.lease_transitions, Some(0));

        // Expired: b takes it, one more transition.
        let t2 = t1 + SignedDuration::from_secs(16);
        let taken = claim(Some(&renewed), "b", t2, D).unwrap();
        assert_eq!(taken.holder_identity.as_deref(), Some("b"));
        assert_eq!(taken.acquire_time, Some(MicroTime(t2)));
        assert_eq!(taken.lease_transitions, Some(1));

        // Released (no holder): taken at once.
        let released = LeaseSpec { holder_identity: None, ..taken.clone() };
        assert_eq!(claim(Some(&released), "a", t2, D).unwrap().holder_identity.as_deref(), Some("a"));
        let empty = LeaseSpec { holder_identity: Some(String::new()), ..taken };
        assert!(claim(Some(&empty), "a", t2, D).is_some());
    }
}
