//! Decisions about one MirrorVolume: its health from its replicas' states and its nodes'
//! liveness, where write priority goes when its holder is offline, and the new fencing
//! epoch.

use std::collections::BTreeMap;

use peersan_crds::mirrorvolume::{ReplicaState, ReplicaStatus, VolumeHealth};

/// The state a replica counts with: its entry's state, `Disconnected` when its node is
/// offline whatever the entry says, `None` when its agent has not created it yet (no entry).
pub fn effective_state(entry: Option<&ReplicaStatus>, node_online: bool) -> Option<ReplicaState> {
    let entry = entry?;
    Some(if node_online { entry.state } else { ReplicaState::Disconnected })
}

/// Health of a volume whose spec places replicas on `replicas`, from the agents' entries
/// `entries` and the nodes' liveness `online`:
///
/// - any replica in split brain → `SplitBrain`;
/// - every replica in sync on an online node → `Healthy`;
/// - no replica in sync on an online node → `Unavailable`;
/// - every replica not in sync is catching up (on an online node) → `Resyncing`;
/// - otherwise (some replica disconnected, outdated, diskless or not created) → `Degraded`,
///   even while another one catches up: a missing replica weighs more than a copy under way.
///
/// A replica without an entry is not created yet and counts as not in sync.
pub fn health(replicas: &[String], entries: &[ReplicaStatus], online: impl Fn(&str) -> bool) -> VolumeHealth {
    let states: Vec<Option<ReplicaState>> =
        replicas.iter().map(|node| effective_state(entry_of(entries, node), online(node))).collect();
    let count = |s: ReplicaState| states.iter().filter(|x| **x == Some(s)).count();
    if count(ReplicaState::SplitBrain) > 0 {
        VolumeHealth::SplitBrain
    } else if !replicas.is_empty() && count(ReplicaState::InSync) == replicas.len() {
        VolumeHealth::Healthy
    } else if count(ReplicaState::InSync) == 0 {
        VolumeHealth::Unavailable
    } else if count(ReplicaState::InSync) + count(ReplicaState::CatchingUp) == replicas.len() {
        VolumeHealth::Resyncing
    } else {
        VolumeHealth::Degraded
    }
}

/// The entry of `node` in a volume's `status.replicas`.
pub fn entry_of<'a>(entries: &'a [ReplicaStatus], node: &str) -> Option<&'a ReplicaStatus> {
    entries.iter().find(|e| e.node == node)
}

/// Where write priority goes when its holder `holder` is offline: a replica of the spec,
/// other than the holder, whose entry says in sync and whose node is online; the lowest
/// name among them, so that every decision is the same. `None` when there is none.
pub fn failover_target(
    replicas: &[String],
    entries: &[ReplicaStatus],
    holder: &str,
    online: impl Fn(&str) -> bool,
) -> Option<String> {
    replicas
        .iter()
        .filter(|node| node.as_str() != holder && online(node))
        .filter(|node| entry_of(entries, node).is_some_and(|e| e.state == ReplicaState::InSync))
        .min()
        .cloned()
}

/// The fencing epoch of a change of holder: above the Lease's epoch and above every epoch a
/// replica reports, so that no engine has seen it before.
pub fn next_epoch(lease_epoch: Option<u64>, entries: &[ReplicaStatus]) -> u64 {
    let reported = entries.iter().filter_map(|e| e.epoch).filter_map(|e| u64::try_from(e).ok()).max();
    lease_epoch.into_iter().chain(reported).max().unwrap_or(0).saturating_add(1)
}

/// How many of a volume's replicas are in each effective state, for messages:
/// `in-sync: a, b; disconnected: c; missing: d`.
pub fn describe(replicas: &[String], entries: &[ReplicaStatus], online: impl Fn(&str) -> bool) -> String {
    let mut by_state: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for node in replicas {
        let state = match effective_state(entry_of(entries, node), online(node)) {
            None => "not created",
            Some(s) => s.as_str(),
        };
        by_state.entry(state).or_default().push(node);
    }
    by_state.iter().map(|(s, nodes)| format!("{s}: {}", nodes.join(", "))).collect::<Vec<_>>().join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReplicaState::*;

    fn entry(node: &str, state: ReplicaState, epoch: Option<i64>) -> ReplicaStatus {
        ReplicaStatus {
            node: node.into(),
            state,
            out_of_sync_bytes: None,
            resync_done_bytes: None,
            resync_total_bytes: None,
            size_bytes: None,
            epoch,
            writer: None,
            detail: None,
        }
    }

    fn abc() -> Vec<String> {
        ["a", "b", "c"].map(String::from).to_vec()
    }

    fn all_online(_: &str) -> bool {
        true
    }

    #[test]
    fn health_from_states_and_liveness() {
        let r = abc();
        let in_sync = [entry("a", InSync, None), entry("b", InSync, None), entry("c", InSync, None)];
        assert_eq!(health(&r, &in_sync, all_online), VolumeHealth::Healthy);
        // An offline node's replica is disconnected whatever its entry says.
        assert_eq!(health(&r, &in_sync, |n| n != "a"), VolumeHealth::Degraded);
        assert_eq!(health(&r, &in_sync, |n| n == "c"), VolumeHealth::Degraded);
        assert_eq!(health(&r, &in_sync, |_| false), VolumeHealth::Unavailable);
        // A missing entry is not in sync.
        assert_eq!(health(&r, &in_sync[..2], all_online), VolumeHealth::Degraded);
        assert_eq!(health(&r, &[], all_online), VolumeHealth::Unavailable);
        let resync = [entry("a", InSync, None), entry("b", CatchingUp, None), entry("c", InSync, None)];
        assert_eq!(health(&r, &resync, all_online), VolumeHealth::Resyncing);
        // A replica that is neither in sync nor copying makes the volume degraded, even
        // while another catches up (a node lost during a resync).
        let lost = [entry("a", InSync, None), entry("b", CatchingUp, None), entry("c", Outdated, None)];
        assert_eq!(health(&r, &lost, all_online), VolumeHealth::Degraded);
        assert_eq!(health(&r, &resync, |n| n != "c"), VolumeHealth::Degraded);
        // Catching up on an offline node is not resyncing.
        assert_eq!(health(&r, &resync, |n| n != "b"), VolumeHealth::Degraded);
        let split = [entry("a", InSync, None), entry("b", SplitBrain, None), entry("c", InSync, None)];
        assert_eq!(health(&r, &split, all_online), VolumeHealth::SplitBrain);
        let diskless = [entry("a", Diskless, None), entry("b", InSync, None), entry("c", InSync, None)];
        assert_eq!(health(&r, &diskless, all_online), VolumeHealth::Degraded);
        // Entries of nodes outside the spec do not count.
        let extra = [entry("a", InSync, None), entry("b", InSync, None), entry("z", Outdated, None)];
        assert_eq!(health(&r[..2], &extra, all_online), VolumeHealth::Healthy);
    }

    #[test]
    fn failover_goes_to_the_lowest_in_sync_online_replica() {
        let r = ["c", "b", "a", "d"].map(String::from).to_vec();
        let e = [
            entry("a", InSync, Some(3)),
            entry("b", InSync, Some(3)),
            entry("c", InSync, Some(3)),
            entry("d", Outdated, Some(2)),
        ];
        assert_eq!(failover_target(&r, &e, "a", all_online).as_deref(), Some("b"));
        assert_eq!(failover_target(&r, &e, "a", |n| n != "b").as_deref(), Some("c"));
        assert_eq!(failover_target(&r, &e, "c", all_online).as_deref(), Some("a"));
        // Not outdated replicas, not offline nodes, not nodes without an entry.
        assert_eq!(failover_target(&r, &e, "a", |n| n == "a" || n == "d"), None);
        assert_eq!(failover_target(&r, &e[..1], "a", all_online), None);
        // Not an in-sync entry of a node outside the spec.
        assert_eq!(failover_target(&r[..1], &e, "c", all_online), None);
    }

    #[test]
    fn epoch_rises_above_every_known_one() {
        assert_eq!(next_epoch(Some(1), &[entry("a", InSync, Some(1)), entry("b", InSync, Some(1))]), 2);
        assert_eq!(next_epoch(Some(1), &[entry("a", InSync, Some(5)), entry("b", InSync, None)]), 6);
        assert_eq!(next_epoch(Some(9), &[entry("a", InSync, Some(5))]), 10);
        assert_eq!(next_epoch(None, &[]), 1);
        assert_eq!(next_epoch(Some(u64::MAX), &[]), u64::MAX);
    }

    #[test]
    fn description_groups_nodes_by_state() {
        let r = abc();
        let e = [entry("a", InSync, None), entry("b", InSync, None)];
        assert_eq!(describe(&r, &e, |n| n != "b"), "disconnected: b; in-sync: a; not created: c");
    }
}
