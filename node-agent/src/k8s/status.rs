//! What the node agent reports: its SANNode's status (addresses, version, pool, the `Ready`
//! condition) and its entry in each MirrorVolume's `status.replicas`.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use peersan_crds::mirrorvolume::{ReplicaState as CrdState, ReplicaStatus};
use peersan_crds::sannode::{InterfaceAddress, PoolUsage, condition};
use peersan_crds::{Condition, ConditionStatus, SANNode, SANNodeStatus};

use super::{KubeError, NODE_MANAGER, bounded};
use crate::agent::Node;
use crate::daemon::DaemonError;
use crate::engine::{ReplicaState, Volume};

/// Version of this node agent, as reported in `status.agentVersion`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A change of only the pool's numbers is written at most this often: the free space of the
/// pool's filesystem moves with every write anyone makes to it.
const POOL_ONLY_EVERY: Duration = Duration::from_secs(30);

/// Why the node does not run (the `Ready` condition's reason and message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady {
    pub reason: &'static str,
    pub message: String,
}

impl NotReady {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        NotReady { reason, message: message.into() }
    }
}

/// What the SANNode's status says, apart from what is measured when it is written
/// (addresses).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeReport {
    observed_generation: Option<i64>,
    ready: ConditionStatus,
    reason: &'static str,
    message: String,
    pool: Option<PoolUsage>,
    volumes: Option<i32>,
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl NodeReport {
    /// The node does not run yet.
    pub fn not_ready(nr: NotReady) -> Self {
        NodeReport {
            observed_generation: None,
            ready: ConditionStatus::False,
            reason: nr.reason,
            message: nr.message,
            pool: None,
            volumes: None,
        }
    }

    /// The node failed to start.
    pub fn failed(e: &KubeError) -> Self {
        let reason = match e {
            KubeError::Daemon(DaemonError::Node(_)) => "PoolUnavailable",
            KubeError::Daemon(DaemonError::Bind { .. } | DaemonError::Socket { .. }) => "BindFailed",
            _ => "StartFailed",
        };
        Self::not_ready(NotReady::new(reason, e.to_string()))
    }

    /// The node runs the spec of `generation`.
    pub fn running(generation: Option<i64>, node: &Node) -> Self {
        let (pool, ready, reason, message) = match node.pool_space() {
            Ok(s) => (
                Some(PoolUsage {
                    capacity_bytes: to_i64(s.capacity),
                    allocated_bytes: to_i64(s.allocated),
                    free_bytes: to_i64(s.free),
                }),
                ConditionStatus::True,
                "Running",
                format!(
                    "serving the replication link on {} and the pool {}",
                    node.config.listen.peer,
                    node.config.pool.path.display()
                ),
            ),
            Err(e) => (None, ConditionStatus::False, "PoolUnavailable", e.to_string()),
        };
        NodeReport {
            observed_generation: generation,
            ready,
            reason,
            message,
            pool,
            volumes: Some(i32::try_from(node.volumes().len()).unwrap_or(i32::MAX)),
        }
    }
}

/// The node's interface addresses, loopback included, IPv4 and IPv6 (without a zone), in
/// the order the kernel lists them, each once.
pub fn interface_addresses() -> Vec<InterfaceAddress> {
    let addrs = match nix::ifaddrs::getifaddrs() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the interface addresses");
            return Vec::new();
        }
    };
    let mut out: Vec<InterfaceAddress> = Vec::new();
    for a in addrs {
        let Some(sa) = a.address else { continue };
        let ip = if let Some(v4) = sa.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = sa.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        let entry = InterfaceAddress { interface: a.interface_name, ip: ip.to_string() };
        if !out.contains(&entry) {
            out.push(entry);
        }
    }
    out
}

/// Now, to the second (the precision the API server keeps of a condition's time, so that a
/// status read back compares equal to the one written).
fn now() -> Time {
    let t = Timestamp::now();
    Time(Timestamp::from_second(t.as_second()).unwrap_or(t))
}

/// Builds the status of `report`; the `Ready` condition keeps its transition time from
/// `current` while its status stays.
pub fn node_status(report: &NodeReport, current: Option<&SANNodeStatus>) -> SANNodeStatus {
    let previous = current.and_then(|s| s.conditions.iter().find(|c| c.type_ == condition::READY));
    let last_transition_time =
        previous.filter(|c| c.status == report.ready).map(|c| c.last_transition_time.clone()).unwrap_or_else(now);
    SANNodeStatus {
        observed_generation: report.observed_generation,
        addresses: interface_addresses(),
        pool: report.pool.clone(),
        agent_version: Some(AGENT_VERSION.to_owned()),
        volumes: report.volumes,
        conditions: vec![Condition {
            type_: condition::READY.to_owned(),
            status: report.ready,
            reason: report.reason.to_owned(),
            message: report.message.clone(),
            last_transition_time,
            observed_generation: report.observed_generation,
        }],
    }
}

/// Writes the SANNode's status (server-side apply, manager `peersan-node-agent`) when it
/// differs from what the object shows.
pub struct NodeReporter {
    api: Api<SANNode>,
    node: String,
    /// When the status was last written, and what was written.
    last: Option<(Instant, SANNodeStatus)>,
    last_error: Option<String>,
}

impl NodeReporter {
    pub fn new(api: Api<SANNode>, node: &str) -> Self {
        NodeReporter { api, node: node.to_owned(), last: None, last_error: None }
    }

    /// Writes the status of `report` unless the SANNode `current` (as last seen) already
    /// shows it. A change of only the pool's numbers waits [`POOL_ONLY_EVERY`].
    pub async fn report(&mut self, report: &NodeReport, current: &SANNode) {
        let shown = current.status.as_ref();
        let status = node_status(report, shown);
        if shown == Some(&status) {
            return;
        }
        let pool_only = |s: &SANNodeStatus| SANNodeStatus { pool: status.pool.clone(), ..s.clone() } == status;
        if self.last.as_ref().is_some_and(|(at, _)| at.elapsed() < POOL_ONLY_EVERY) && shown.is_some_and(pool_only) {
            return;
        }
        let body = serde_json::json!({
            "apiVersion": format!("{}/{}", peersan_crds::API_GROUP, peersan_crds::API_VERSION),
            "kind": "SANNode",
            "metadata": { "name": self.node },
            "status": status,
        });
        let params = PatchParams::apply(NODE_MANAGER).force();
        match bounded(self.api.patch_status(&self.node, &params, &Patch::Apply(&body))).await {
            Ok(_) => {
                if self.last_error.take().is_some() {
                    tracing::info!(sannode = %self.node, "SANNode status written again");
                }
                self.last = Some((Instant::now(), status));
            }
            Err(msg) => {
                if self.last_error.as_ref() != Some(&msg) {
                    tracing::warn!(sannode = %self.node, error = %msg, "cannot write the SANNode status; retrying");
                }
                self.last_error = Some(msg);
            }
        }
    }
}

/// The API's spelling of an engine replica state.
pub fn crd_state(s: ReplicaState) -> CrdState {
    match s {
        ReplicaState::InSync => CrdState::InSync,
        ReplicaState::CatchingUp => CrdState::CatchingUp,
        ReplicaState::Outdated => CrdState::Outdated,
        ReplicaState::Diskless => CrdState::Diskless,
        ReplicaState::Disconnected => CrdState::Disconnected,
        ReplicaState::SplitBrain => CrdState::SplitBrain,
    }
}

/// This node's entry in the MirrorVolume's `status.replicas`: the local replica as the
/// engine sees it. `problem` (why the volume does not match its MirrorVolume) is the
/// detail when given.
pub fn replica_entry(node: &str, v: &Volume, problem: Option<&str>) -> ReplicaStatus {
    let local = v.report().into_iter().find(|r| r.local);
    let prio = v.priority();
    let (state, detail, oos) = match local {
        Some(r) => (r.state, r.detail, r.out_of_sync_bytes),
        None => (ReplicaState::Diskless, String::new(), 0),
    };
    let resyncing = state == ReplicaState::CatchingUp;
    let progress = v.resync_progress();
    let detail = problem.map(str::to_owned).unwrap_or(detail);
    ReplicaStatus {
        node: node.to_owned(),
        state: crd_state(state),
        out_of_sync_bytes: Some(to_i64(oos)),
        resync_done_bytes: resyncing.then(|| to_i64(progress.done_bytes)),
        resync_total_bytes: resyncing.then(|| to_i64(progress.total_bytes)),
        size_bytes: Some(to_i64(v.size())),
        epoch: Some(to_i64(prio.epoch)),
        // Before any epoch, the engine's holder is a placeholder, not a writer.
        writer: (prio.epoch > 0).then_some(prio.holder),
        detail: (!detail.is_empty()).then_some(detail),
    }
}

/// The entry of a replica this node could not create: diskless, with the reason.
pub fn missing_entry(node: &str, problem: &str) -> ReplicaStatus {
    ReplicaStatus {
        node: node.to_owned(),
        state: CrdState::Diskless,
        out_of_sync_bytes: None,
        resync_done_bytes: None,
        resync_total_bytes: None,
        size_bytes: None,
        epoch: None,
        writer: None,
        detail: Some(problem.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_listed() {
        let a = interface_addresses();
        assert!(a.iter().any(|a| a.ip == "127.0.0.1"), "{a:?}");
        assert!(a.iter().all(|a| !a.ip.contains('%') && !a.interface.is_empty()), "{a:?}");
    }

    #[test]
    fn ready_keeps_its_transition_time_while_its_status_stays() {
        let r = NodeReport::not_ready(NotReady::new("WaitingForAddress", "no address"));
        let mut first = node_status(&r, None);
        let old = Time(Timestamp::from_second(1_000_000).unwrap());
        first.conditions[0].last_transition_time = old.clone();
        let again = node_status(&NodeReport::not_ready(NotReady::new("UnsupportedPool", "device")), Some(&first));
        assert_eq!(again.conditions[0].last_transition_time, old);
        assert_eq!(again.conditions[0].reason, "UnsupportedPool");
        let running = NodeReport { ready: ConditionStatus::True, ..r };
        let changed = node_status(&running, Some(&first));
        assert_ne!(changed.conditions[0].last_transition_time, old);
        assert_eq!(changed.agent_version.as_deref(), Some(AGENT_VERSION));
    }
}
