//! The node's heartbeat: the Lease `peersan-node-<node>` in the agent's namespace, held by the
//! node and renewed every quarter of its duration from process start, independent of
//! everything else the agent does. The operator counts the node offline when
//! `renewTime + leaseDurationSeconds` has passed.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};

use super::NODE_MANAGER;

/// The heartbeat Lease as this node writes it at `now`.
pub fn node_lease(name: &str, namespace: &str, node: &str, duration: Duration, acquired: Timestamp) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.to_owned()),
            lease_duration_seconds: Some(i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX)),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..Default::default()
        }),
    }
}

/// Creates and renews the heartbeat Lease forever (the caller aborts the task). A failed
/// renewal is logged (once until it works again) and tried again at the next period.
pub async fn run(client: Client, namespace: String, node: String, duration: Duration) {
    let name = match peersan_crds::lease::node_lease_name(&node) {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(error = %e, "no heartbeat Lease for this node name");
            return;
        }
    };
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let every = (duration / 4).max(Duration::from_millis(100));
    let acquired = Timestamp::now();
    let params = PatchParams::apply(NODE_MANAGER).force();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing: Option<String> = None;
    loop {
        tick.tick().await;
        let lease = node_lease(&name, &namespace, &node, duration, acquired);
        let renewed =
            tokio::time::timeout(every.max(Duration::from_secs(1)), api.patch(&name, &params, &Patch::Apply(&lease)))
                .await
                .map_err(|_| "no answer from the API server in time".to_owned())
                .and_then(|r| r.map(|_| ()).map_err(|e| e.to_string()));
        match renewed {
            Ok(()) => {
                if failing.take().is_some() {
                    tracing::info!(lease = %name, "heartbeat renewed again");
                } else {
                    tracing::trace!(lease = %name, "heartbeat renewed");
                }
            }
            Err(e) => {
                if failing.as_ref() != Some(&e) {
                    tracing::warn!(lease = %name, namespace = %namespace, error = %e, "cannot renew the heartbeat Lease; trying again");
                }
                failing = Some(e);
            }
        }
    }
}
