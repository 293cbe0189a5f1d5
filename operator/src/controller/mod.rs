//! The VirtualSAN controller: a `kube::runtime::Controller` over VirtualSANs, triggered by
//! the objects each one depends on, and its reconciliation.
//!
//! Every related kind is watched once, into a local cache (a reflector store) that the
//! reconciliation reads; the watch events are mapped to the VirtualSANs concerned:
//!
//! | kind | namespace | triggers |
//! |---|---|---|
//! | Node | cluster | every VirtualSAN (labels and addresses decide membership) |
//! | SANNode | cluster | its `spec.virtualSAN` |
//! | MirrorVolume | cluster | its `spec.virtualSAN` |
//! | Lease `peersan-node-<node>` | `--namespace` | the SAN of that node's SANNode, when the node was not known to be online (renewals of a live node do not trigger; its expiry is a requeue) |
//! | Lease `peersan-vol-<volume>` | `--namespace` | the SAN of that volume |
//! | StorageClass | cluster | the VirtualSAN of the same name |
//!
//! So the API load does not grow with I/O: agents write their status when it changes, and
//! the reconciliation writes only what differs from the cache.
//!
//! This module holds the watches, the context and the entry points (`reconcile`,
//! `error_policy`); `san` carries a VirtualSAN out and writes its status, `objects` writes
//! its SANNodes and StorageClass, `volumes` looks after each of its MirrorVolumes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use peersan_crds::mirrorvolume::{ReplicaState, VolumeHealth, condition as volume_condition};
use peersan_crds::sannode::{Peer, SANNodeSpec, condition as san_node_condition};
use peersan_crds::virtualsan::{MemberNode, MemberState, NodeSelection, condition as san_condition};
use peersan_crds::{ConditionStatus, MirrorVolume, SANNode, VirtualSAN, VirtualSANStatus, lease};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::conditions::{self, Desired};
use crate::error::{self, BLOCKED_RETRY, CONFLICT_RETRY, INVALID_SPEC_RETRY, is_conflict, is_not_found};
use crate::events::{EventType, Recorder, Reporter};
use crate::liveness::{self, Liveness};
use crate::metrics::Metrics;
use crate::volume::{self, describe};
use crate::{Error, ErrorKind, FINALIZER, MANAGER, address, members};

mod objects;
mod san;
mod volumes;

use objects::*;
use san::*;
use volumes::*;

/// Label the operator puts on the StorageClasses it makes, and looks for before changing one.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Requeue when no heartbeat expires sooner.
pub const RESYNC_PERIOD: Duration = Duration::from_secs(60);
/// Slack after a heartbeat's expiry before looking at it, so that it has expired.
const EXPIRY_SLACK: Duration = Duration::from_millis(200);
/// How often a waiter for a cache looks again.
const READY_POLL: Duration = Duration::from_millis(250);

/// Event reasons (on the VirtualSAN, or on the MirrorVolume for volume events).
pub mod reason {
    /// A node became a member.
    pub const NODE_JOINED: &str = "NodeJoined";
    /// A member's heartbeat expired.
    pub const NODE_OFFLINE: &str = "NodeOffline";
    /// An offline member's heartbeat is fresh again.
    pub const NODE_ONLINE: &str = "NodeOnline";
    /// A healthy volume lost an in-sync replica.
    pub const VOLUME_DEGRADED: &str = "VolumeDegraded";
    /// A resync finished: every replica is in sync again.
    pub const RESYNC_DONE: &str = "ResyncDone";
    /// Write priority moved away from an offline node.
    pub const WRITE_PRIORITY_MOVED: &str = "WritePriorityMoved";
    /// Deletion waits for the SAN's volumes to be deleted.
    pub const DELETION_BLOCKED: &str = "DeletionBlocked";
}

/// The local caches the reconciliation reads.
#[derive(Clone)]
pub struct Stores {
    /// VirtualSANs (the controller's own cache).
    pub virtual_sans: Store<VirtualSAN>,
    /// Kubernetes nodes (without their image lists and managed fields).
    pub nodes: Store<Node>,
    /// SANNodes.
    pub san_nodes: Store<SANNode>,
    /// MirrorVolumes.
    pub volumes: Store<MirrorVolume>,
    /// Leases of the operator's namespace.
    pub leases: Store<Lease>,
    /// StorageClasses.
    pub storage_classes: Store<StorageClass>,
}

impl Stores {
    /// Waits until every cache holds its initial list.
    pub async fn wait_ready(&self) -> Result<(), Error> {
        wait_store(&self.virtual_sans, "VirtualSANs").await?;
        wait_store(&self.nodes, "Nodes").await?;
        wait_store(&self.san_nodes, "SANNodes").await?;
        wait_store(&self.volumes, "MirrorVolumes").await?;
        wait_store(&self.leases, "Leases").await?;
        wait_store(&self.storage_classes, "StorageClasses").await
    }
}

/// Waits until `store` holds its initial list. A store wakes only the last of several
/// waiters, so every waiter polls again now and then; once filled, a store answers at once.
async fn wait_store<K>(store: &Store<K>, what: &'static str) -> Result<(), Error>
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        match tokio::time::timeout(READY_POLL, store.wait_until_ready()).await {
            Ok(result) => return result.map_err(|_| Error::CacheUnavailable(what)),
            Err(_) => continue,
        }
    }
}

/// What the operator remembers between reconciliations.
#[derive(Debug, Default)]
struct Memory {
    /// Last backoff after a transient error, by VirtualSAN.
    backoff: HashMap<String, Duration>,
    /// When the last reconciliation wanted to look again (the next heartbeat expiry), by
    /// VirtualSAN; bounds the retry after an invalid spec.
    next_check: HashMap<String, Duration>,
    /// Nodes whose heartbeat Lease was seen, and whether they were online at the last look.
    heartbeats: HashMap<String, bool>,
    /// Replica entries (volume, node) set to `disconnected` during their node's current
    /// offline period. They are not set again until the node was seen online: an agent
    /// that returns writes its entry once, possibly before its renewed heartbeat reaches
    /// the cache, and must not be overwritten then.
    disconnected: HashSet<(String, String)>,
    /// The last status written for each VirtualSAN (by name), newer than the cache until
    /// the watch brings the write back: transitions and transition times are computed
    /// from it, so that no event is published twice.
    san_status: HashMap<String, Written<VirtualSANStatus>>,
    /// The same for the operator's part of each MirrorVolume's status.
    volume_status: HashMap<String, Written<VolumeStatusPart>>,
}

/// A value this process wrote to an object: the object's uid and the resourceVersion the
/// write produced.
#[derive(Clone, Debug)]
struct Written<T> {
    uid: String,
    resource_version: String,
    value: T,
}

impl<T> Written<T> {
    fn of<K: Resource>(written: &K, value: T) -> Written<T> {
        Written {
            uid: written.meta().uid.clone().unwrap_or_default(),
            resource_version: written.meta().resource_version.clone().unwrap_or_default(),
            value,
        }
    }
}

/// The fields of a MirrorVolume's status the operator writes.
#[derive(Clone, Debug, PartialEq)]
struct VolumeStatusPart {
    observed_generation: Option<i64>,
    health: Option<VolumeHealth>,
    epoch: Option<i64>,
    writer: Option<String>,
    conditions: Vec<peersan_crds::Condition>,
}

impl VolumeStatusPart {
    fn of(status: &peersan_crds::MirrorVolumeStatus) -> VolumeStatusPart {
        VolumeStatusPart {
            observed_generation: status.observed_generation,
            health: status.health,
            epoch: status.epoch,
            writer: status.writer.clone(),
            conditions: status.conditions.clone(),
        }
    }
}

/// The newest known value for `cached`: what this process last wrote to it, unless the
/// cache already holds that write or a later one (same uid, resourceVersion at least the
/// written one), or the object was made anew (another uid).
fn newest<K: Resource, T: Clone>(written: Option<&Written<T>>, cached: &K, value: impl FnOnce() -> T) -> T {
    let meta = cached.meta();
    let caught_up = |w: &Written<T>| match (meta.resource_version.as_deref(), w.resource_version.parse::<u64>()) {
        (Some(rv), Ok(written)) => rv.parse::<u64>().is_ok_and(|rv| rv >= written),
        (Some(rv), Err(_)) => rv == w.resource_version,
        (None, _) => false,
    };
    match written {
        Some(w) if Some(w.uid.as_str()) == meta.uid.as_deref() && !caught_up(w) => w.value.clone(),
        _ => value(),
    }
}

/// Everything a reconciliation needs.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Publishes Events (events.k8s.io/v1; about cluster-scoped objects in `kube-system`).
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Namespace of the Leases.
    pub namespace: String,
    /// Port of the agents' replication listeners.
    pub peer_port: u16,
    /// The caches.
    pub stores: Stores,
    memory: Arc<Mutex<Memory>>,
    /// Held while a SANNode is created, so that two VirtualSANs cannot both claim a node.
    claims: tokio::sync::Mutex<()>,
}

impl Context {
    fn memory(&self) -> MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn leases(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }
}

/// Builds the controller and its context: the watches of every related kind, each feeding a
/// cache and mapped to the VirtualSANs it concerns. Run it with
/// `controller.run(reconcile, error_policy, context)`.
pub fn build(
    client: Client,
    namespace: &str,
    peer_port: u16,
    metrics: Arc<Metrics>,
    reporter: Reporter,
) -> (Controller<VirtualSAN>, Arc<Context>) {
    let cfg = watcher::Config::default;
    let controller = Controller::new(Api::<VirtualSAN>::all(client.clone()), cfg());
    let virtual_sans = controller.store();

    let (nodes, nodes_writer) = reflector::store::<Node>();
    let node_events = watcher(Api::<Node>::all(client.clone()), cfg())
        .default_backoff()
        .modify(|node: &mut Node| {
            node.managed_fields_mut().clear();
            if let Some(status) = node.status.as_mut() {
                status.images = None;
            }
        })
        .reflect(nodes_writer)
        .touched_objects();
    let (san_nodes, san_nodes_writer) = reflector::store::<SANNode>();
    let san_node_events = watcher(Api::<SANNode>::all(client.clone()), cfg())
        .default_backoff()
        .reflect(san_nodes_writer)
        .touched_objects();
    let (volumes, volumes_writer) = reflector::store::<MirrorVolume>();
    let volume_events = watcher(Api::<MirrorVolume>::all(client.clone()), cfg())
        .default_backoff()
        .reflect(volumes_writer)
        .touched_objects();
    let (leases, leases_writer) = reflector::store::<Lease>();
    let lease_events = watcher(Api::<Lease>::namespaced(client.clone(), namespace), cfg())
        .default_backoff()
        .modify(|l: &mut Lease| l.managed_fields_mut().clear())
        .reflect(leases_writer)
        .touched_objects();
    let (storage_classes, storage_classes_writer) = reflector::store::<StorageClass>();
    let storage_class_events = watcher(Api::<StorageClass>::all(client.clone()), cfg())
        .default_backoff()
        .reflect(storage_classes_writer)
        .touched_objects();

    let stores = Stores {
        virtual_sans: virtual_sans.clone(),
        nodes,
        san_nodes: san_nodes.clone(),
        volumes: volumes.clone(),
        leases: leases.clone(),
        storage_classes,
    };
    let memory = Arc::new(Mutex::new(Memory::default()));

    let all_sans = virtual_sans.clone();
    let by_name = virtual_sans.clone();
    let lease_memory = memory.clone();
    let controller = controller
        .watches_stream(node_events, move |_: Node| {
            all_sans.state().iter().map(|v| ObjectRef::from_obj(&**v)).collect::<Vec<_>>()
        })
        .watches_stream(san_node_events, |sn: SANNode| Some(ObjectRef::new(&sn.spec.virtual_san)))
        .watches_stream(volume_events, |v: MirrorVolume| Some(ObjectRef::new(&v.spec.virtual_san)))
        .watches_stream(lease_events, move |l: Lease| lease_trigger(&l, &leases, &san_nodes, &volumes, &lease_memory))
        .watches_stream(storage_class_events, move |sc: StorageClass| {
            by_name.get(&ObjectRef::new(&sc.name_any())).map(|v| ObjectRef::from_obj(&*v))
        });

    let context = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        metrics,
        namespace: namespace.to_owned(),
        peer_port,
        stores,
        memory,
        claims: tokio::sync::Mutex::new(()),
    });
    (controller, context)
}

/// The VirtualSAN a Lease event concerns. A heartbeat triggers only when its node was not
/// known to be online (or the Lease was deleted): the expiry of a live node's heartbeat is
/// found by the requeue at that time, so renewals cost no reconciliation.
fn lease_trigger(
    l: &Lease,
    leases: &Store<Lease>,
    san_nodes: &Store<SANNode>,
    volumes: &Store<MirrorVolume>,
    memory: &Mutex<Memory>,
) -> Option<ObjectRef<VirtualSAN>> {
    let name = l.name_any();
    if let Some(node) = lease::node_of_lease(&name) {
        let deleted = leases.get(&ObjectRef::from_obj(l)).is_none();
        let known_online = memory.lock().unwrap_or_else(|e| e.into_inner()).heartbeats.get(node) == Some(&true);
        if deleted || !known_online {
            return san_nodes.get(&ObjectRef::new(node)).map(|sn| ObjectRef::new(&sn.spec.virtual_san));
        }
        None
    } else if let Some(volume) = lease::volume_of_lease(&name) {
        volumes.get(&ObjectRef::new(volume)).map(|v| ObjectRef::new(&v.spec.virtual_san))
    } else {
        None
    }
}

/// Runs `controller` until `shutdown` completes and the reconciliations under way have
/// finished, logging every outcome.
pub fn run(
    controller: Controller<VirtualSAN>,
    context: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> impl Stream<Item = ()> {
    controller.graceful_shutdown_on(shutdown).run(reconcile, error_policy, context).map(|result| match result {
        Ok((obj, _)) => debug!(virtualsan = %obj.name, "reconciled"),
        Err(e) => debug!(error = %e, "reconciliation failed"),
    })
}

/// Reconciles one VirtualSAN (see the crate documentation of what it writes).
pub async fn reconcile(vsan: Arc<VirtualSAN>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.stores.wait_ready().await?;
    ctx.metrics.reconciles.inc();
    let name = vsan.metadata.name.clone().ok_or(Error::Unnamed)?;
    let result = reconcile_object(vsan, &ctx, &name).await;
    if result.is_ok() {
        ctx.memory().backoff.remove(&name);
    }
    result
}

async fn reconcile_object(vsan: Arc<VirtualSAN>, ctx: &Context, name: &str) -> Result<Action, Error> {
    let deleting = vsan.metadata.deletion_timestamp.is_some();
    if deleting && vsan.finalizers().iter().any(|f| f == FINALIZER) {
        let volumes = volumes_of(ctx, name);
        if !volumes.is_empty() {
            // The volumes still serve: keep watching their nodes and moving write priority.
            let names: Vec<String> = volumes.iter().map(|v| v.name_any()).collect();
            let next = apply(&vsan, ctx, Some(&names)).await?;
            return Ok(Action::requeue(next.min(BLOCKED_RETRY)));
        }
    }
    let api = Api::<VirtualSAN>::all(ctx.client.clone());
    finalizer(&api, FINALIZER, vsan, |event| async move {
        match event {
            FinalizerEvent::Apply(v) => apply(&v, ctx, None).await.map(Action::requeue),
            FinalizerEvent::Cleanup(v) => cleanup(&v, ctx).await,
        }
    })
    .await
    .map_err(Error::from_finalizer)
}

/// Retry policy by error kind: conflict → 1 s; invalid spec → 5 min (sooner when a
/// heartbeat expires before); blocked deletion → 15 s; transient → exponential per
/// VirtualSAN, 1 s doubling to 5 min, reset by a success.
pub fn error_policy(vsan: Arc<VirtualSAN>, error: &Error, ctx: Arc<Context>) -> Action {
    let name = vsan.name_any();
    let kind = error.kind();
    ctx.metrics.error(kind);
    let mut memory = ctx.memory();
    let delay = match kind {
        ErrorKind::Conflict => CONFLICT_RETRY,
        ErrorKind::InvalidSpec => {
            memory.next_check.get(&name).map_or(INVALID_SPEC_RETRY, |d| (*d).min(INVALID_SPEC_RETRY))
        }
        ErrorKind::Blocked => BLOCKED_RETRY,
        ErrorKind::Transient => {
            let delay = error::next_backoff(memory.backoff.get(&name).copied());
            memory.backoff.insert(name.clone(), delay);
            delay
        }
    };
    match kind {
        ErrorKind::InvalidSpec | ErrorKind::Blocked => info!(virtualsan = %name, %error, ?delay, "not reconciled"),
        _ => warn!(virtualsan = %name, %error, ?delay, "reconciliation failed"),
    }
    Action::requeue(delay)
}

/// The MirrorVolumes of the SAN `name`, by name.
fn volumes_of(ctx: &Context, name: &str) -> Vec<Arc<MirrorVolume>> {
    let mut volumes = ctx.stores.volumes.state_filter(|v| v.spec.virtual_san == name);
    volumes.sort_by_key(|v| v.name_any());
    volumes
}

/// Node liveness at one instant, from the heartbeat Lease cache.
struct Heartbeats<'a> {
    ctx: &'a Context,
    now: Timestamp,
    /// Nodes that had a heartbeat before (a missing Lease means offline, not pending).
    seen: HashSet<String>,
}

impl Heartbeats<'_> {
    fn liveness(&self, node: &str) -> Liveness {
        let lease = lease::node_lease_name(node)
            .ok()
            .and_then(|n| self.ctx.stores.leases.get(&ObjectRef::new(&n).within(&self.ctx.namespace)));
        liveness::heartbeat(lease.as_deref(), self.now, self.seen.contains(node))
    }

    fn online(&self, node: &str) -> bool {
        self.liveness(node).is_online()
    }
}

/// Publishes an Event, logging (not failing) when the API server refuses it.
async fn publish(
    ctx: &Context,
    regarding: &impl Resource<DynamicType = ()>,
    type_: EventType,
    reason: &str,
    note: String,
) {
    info!(object = %regarding.meta().name.as_deref().unwrap_or_default(), reason, %note, "event");
    if let Err(e) = ctx.recorder.publish(regarding, type_, reason, note).await {
        warn!(reason, error = %e, "publishing an event failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, state: MemberState) -> MemberNode {
        MemberNode { name: name.into(), state, address: None, capacity_bytes: None, free_bytes: None }
    }

    fn view<'a>(
        members: &'a [MemberNode],
        invalid: &'a [String],
        sc: &'a StorageClassState,
        volumes: &'a [VolumeOutcome],
    ) -> SanView<'a> {
        SanView {
            members,
            not_ready: members
                .iter()
                .filter(|m| m.state != MemberState::Ready)
                .map(|m| format!("{}: {:?}", m.name, m.state))
                .collect(),
            invalid,
            notes: &[],
            storage_class: sc,
            volumes,
            deleting_with: None,
        }
    }

    fn by_type<'a>(d: &'a [Desired], t: &str) -> &'a Desired {
        d.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn san_conditions_follow_members_volumes_and_spec() {
        let all = [member("a", MemberState::Ready), member("b", MemberState::Ready)];
        let ours = StorageClassState::Ours;
        let c = san_conditions(view(&all, &[], &ours, &[]));
        assert_eq!(by_type(&c, "Ready").status, ConditionStatus::True);
        assert_eq!(by_type(&c, "Ready").message, "2/2 nodes ready");
        assert_eq!(by_type(&c, "Degraded").status, ConditionStatus::False);

        let one_down = [member("a", MemberState::Ready), member("b", MemberState::Offline)];
        let vols = [VolumeOutcome { name: "v1".into(), health: VolumeHealth::Degraded }];
        let c = san_conditions(view(&one_down, &[], &ours, &vols));
        assert_eq!(by_type(&c, "Ready").reason, "NodesNotReady");
        assert!(by_type(&c, "Ready").message.starts_with("1/2 nodes ready"), "{:?}", by_type(&c, "Ready"));
        assert_eq!(
            (by_type(&c, "Degraded").status, by_type(&c, "Degraded").reason.as_str()),
            (ConditionStatus::True, "VolumesDegraded")
        );

        let invalid = ["spec.replicas is 3 but the SAN has 2 member node(s)".to_owned()];
        let c = san_conditions(view(&all, &invalid, &StorageClassState::Absent, &[]));
        assert_eq!(by_type(&c, "Ready").reason, "InvalidSpec");
        assert!(by_type(&c, "Ready").message.contains("spec.replicas is 3"));

        let c = san_conditions(view(&all, &[], &StorageClassState::Conflict, &[]));
        assert_eq!(by_type(&c, "Ready").reason, "StorageClassConflict");

        let vols = [
            VolumeOutcome { name: "v1".into(), health: VolumeHealth::Resyncing },
            VolumeOutcome { name: "v2".into(), health: VolumeHealth::SplitBrain },
        ];
        let c = san_conditions(view(&all, &[], &ours, &vols));
        assert_eq!(by_type(&c, "Resyncing").status, ConditionStatus::True);
        assert_eq!(by_type(&c, "SplitBrain").status, ConditionStatus::True);
        assert!(by_type(&c, "SplitBrain").message.contains("v2"));

        let mut blocked = view(&all, &[], &ours, &[]);
        let names = ["pvc-1".to_owned(), "pvc-2".to_owned()];
        blocked.deleting_with = Some(&names);
        let c = san_conditions(blocked);
        assert_eq!(by_type(&c, "Ready").reason, "DeletionBlocked");
        assert_eq!(
            by_type(&c, "Ready").message,
            "2 volume(s) still exist (pvc-1, pvc-2): delete their PersistentVolumeClaims first"
        );
    }

    #[test]
    fn the_newest_of_the_written_and_the_cached_value() {
        let object = |uid: &str, rv: &str| -> Lease {
            serde_json::from_value(json!({ "metadata": { "name": "x", "uid": uid, "resourceVersion": rv } })).unwrap()
        };
        let written = Written::of(&object("u1", "120"), "written");
        // The cache has not seen the write yet: the written value.
        assert_eq!(newest(Some(&written), &object("u1", "119"), || "cached"), "written");
        assert_eq!(newest(Some(&written), &object("u1", "99"), || "cached"), "written");
        // It has, or something later: the cache.
        assert_eq!(newest(Some(&written), &object("u1", "120"), || "cached"), "cached");
        assert_eq!(newest(Some(&written), &object("u1", "1000"), || "cached"), "cached");
        // Another object of that name, or nothing written: the cache.
        assert_eq!(newest(Some(&written), &object("u2", "5"), || "cached"), "cached");
        assert_eq!(newest::<Lease, &str>(None, &object("u1", "5"), || "cached"), "cached");
    }

    #[test]
    fn lease_events_map_to_the_san_of_their_node_or_volume() {
        let (leases, mut leases_w) = reflector::store::<Lease>();
        let (san_nodes, mut san_nodes_w) = reflector::store::<SANNode>();
        let (volumes, mut volumes_w) = reflector::store::<MirrorVolume>();
        let lease = |name: &str| -> Lease {
            serde_json::from_value(json!({ "metadata": { "name": name, "namespace": "ns" } })).unwrap()
        };
        let heartbeat = lease("peersan-node-a");
        leases_w.apply_watcher_event(&watcher::Event::Apply(heartbeat.clone()));
        san_nodes_w.apply_watcher_event(&watcher::Event::Apply(
            serde_json::from_value(json!({ "apiVersion": "peersan.io/v1alpha1", "kind": "SANNode",
                "metadata": { "name": "a" }, "spec": { "virtualSAN": "san1", "pool": { "path": "/p" } } }))
            .unwrap(),
        ));
        volumes_w.apply_watcher_event(&watcher::Event::Apply(
            serde_json::from_value(json!({ "apiVersion": "peersan.io/v1alpha1", "kind": "MirrorVolume",
                "metadata": { "name": "pvc-1" },
                "spec": { "virtualSAN": "san2", "sizeBytes": 4096, "replicas": ["a"] } }))
            .unwrap(),
        ));
        let memory = Mutex::new(Memory::default());
        let trigger = |l: &Lease| lease_trigger(l, &leases, &san_nodes, &volumes, &memory).map(|r| r.name);

        // A node not known to be online: its renewal triggers its SAN.
        assert_eq!(trigger(&heartbeat).as_deref(), Some("san1"));
        // Known online: a renewal does not trigger (its expiry is a requeue).
        memory.lock().unwrap().heartbeats.insert("a".into(), true);
        assert_eq!(trigger(&heartbeat), None);
        // Known offline: it does.
        memory.lock().unwrap().heartbeats.insert("a".into(), false);
        assert_eq!(trigger(&heartbeat).as_deref(), Some("san1"));
        // Deleted (gone from the cache): it does, even when known online.
        memory.lock().unwrap().heartbeats.insert("a".into(), true);
        leases_w.apply_watcher_event(&watcher::Event::Delete(heartbeat.clone()));
        assert_eq!(trigger(&heartbeat).as_deref(), Some("san1"));
        // A node without SANNode, a volume Lease, other Leases.
        assert_eq!(trigger(&lease("peersan-node-z")), None);
        assert_eq!(trigger(&lease("peersan-vol-pvc-1")).as_deref(), Some("san2"));
        assert_eq!(trigger(&lease("peersan-vol-pvc-9")), None);
        assert_eq!(trigger(&lease("kube-controller-manager")), None);
    }

    #[test]
    fn member_state_needs_a_heartbeat_and_the_current_generation() {
        let t: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let online = Liveness::Online { expires: t };
        let sn = |generation: i64, observed: Option<i64>, ready: Option<&str>| -> SANNode {
            serde_json::from_value(json!({
                "apiVersion": "peersan.io/v1alpha1", "kind": "SANNode",
                "metadata": { "name": "a", "generation": generation },
                "spec": { "virtualSAN": "s", "pool": { "path": "/p" } },
                "status": {
                    "observedGeneration": observed,
                    "conditions": ready.map(|s| vec![json!({ "type": "Ready", "status": s, "reason": "R",
                        "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z" })]).unwrap_or_default(),
                },
            }))
            .unwrap()
        };
        assert_eq!(member_state(online, Some(&sn(2, Some(2), Some("True")))), MemberState::Ready);
        assert_eq!(member_state(online, Some(&sn(3, Some(2), Some("True")))), MemberState::Pending);
        assert_eq!(member_state(online, Some(&sn(2, Some(2), Some("False")))), MemberState::Degraded);
        assert_eq!(member_state(online, Some(&sn(2, None, None))), MemberState::Pending);
        assert_eq!(member_state(online, None), MemberState::Pending);
        assert_eq!(member_state(Liveness::Offline, Some(&sn(2, Some(2), Some("True")))), MemberState::Offline);
        assert_eq!(member_state(Liveness::Pending, Some(&sn(2, Some(2), Some("True")))), MemberState::Pending);
    }
}
