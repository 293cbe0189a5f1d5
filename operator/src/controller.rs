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
use crate::volume::{self, describe, health_name};
use crate::{Error, ErrorKind, FINALIZER, MANAGER, address, members};

/// Label the operator puts on the StorageClasses it makes, and looks for before changing one.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Requeue when no heartbeat expires sooner.
pub const RESYNC_PERIOD: Duration = Duration::from_secs(60);
/// Slack after a heartbeat's expiry before looking at it, so that it has expired.
const EXPIRY_SLACK: Duration = Duration::from_millis(200);
/// How often a write-priority move is retried after conflicts before giving up for now.
const LEASE_ATTEMPTS: usize = 5;
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

/// What became of a volume in one reconciliation.
struct VolumeOutcome {
    name: String,
    health: VolumeHealth,
}

/// Carries a VirtualSAN's spec out and writes its status. `deleting_with`: the SAN is being
/// deleted and these volumes still exist. Returns when to look again.
async fn apply(vsan: &VirtualSAN, ctx: &Context, deleting_with: Option<&[String]>) -> Result<Duration, Error> {
    let name = vsan.name_any();
    let spec = &vsan.spec;
    let now = Timestamp::now();
    let previous = newest(ctx.memory().san_status.get(&name), vsan, || vsan.status.clone().unwrap_or_default());
    let mut invalid: Vec<String> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let add_invalid = |invalid: &mut Vec<String>, m: String| {
        if !invalid.contains(&m) {
            invalid.push(m);
        }
    };

    // (1) Members.
    let nodes = ctx.stores.nodes.state();
    let members = match members::select_members(&spec.nodes, nodes.iter().map(|n| &**n)) {
        Ok(m) => m,
        Err(e) => {
            add_invalid(&mut invalid, format!("spec.nodes.selector: {e}"));
            let names_only = NodeSelection { selector: None, names: spec.nodes.names.clone() };
            members::select_members(&names_only, nodes.iter().map(|n| &**n)).unwrap_or_default()
        }
    };
    for (member, node) in &members {
        if node.is_none() {
            notes.push(format!("node {member} has no Node object"));
        }
    }

    // (5) What the schema cannot check.
    let replicas = usize::try_from(spec.replicas).unwrap_or(0);
    if replicas > members.len() {
        add_invalid(
            &mut invalid,
            format!(
                "spec.replicas is {} but the SAN has {} member node(s){}: every replica needs a node of its own",
                spec.replicas,
                members.len(),
                list_in_parens(members.keys()),
            ),
        );
    }
    for np in &spec.node_pools {
        if !members.contains_key(&np.node) {
            add_invalid(&mut invalid, format!("spec.nodePools names node {}, which is not a member", np.node));
        }
    }
    for ni in &spec.replication_link.node_interfaces {
        if !members.contains_key(&ni.node) {
            add_invalid(
                &mut invalid,
                format!("spec.replicationLink.nodeInterfaces names node {}, which is not a member", ni.node),
            );
        }
    }
    let san_nodes: BTreeMap<String, Arc<SANNode>> =
        ctx.stores.san_nodes.state().into_iter().map(|sn| (sn.name_any(), sn)).collect();
    let mut claimed: BTreeSet<String> = BTreeSet::new();
    for member in members.keys() {
        if let Some(sn) = san_nodes.get(member)
            && sn.spec.virtual_san != name
        {
            add_invalid(
                &mut invalid,
                format!("node {member} is already a member of VirtualSAN {}", sn.spec.virtual_san),
            );
            claimed.insert(member.clone());
        }
    }

    // SANNodes of nodes that left: deleted, unless a volume still has a replica there.
    let volumes = volumes_of(ctx, &name);
    let mut retained: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (node, sn) in &san_nodes {
        if sn.spec.virtual_san != name || members.contains_key(node) {
            continue;
        }
        let holding: Vec<String> = volumes
            .iter()
            .filter(|v| {
                v.spec.replicas.contains(node)
                    || v.status.as_ref().is_some_and(|s| volume::entry_of(&s.replicas, node).is_some())
            })
            .map(|v| v.name_any())
            .collect();
        if holding.is_empty() {
            info!(virtualsan = %name, node, "deleting the SANNode of a node that left");
            delete_ignoring_missing(&Api::<SANNode>::all(ctx.client.clone()), node, sn.uid()).await?;
        } else {
            notes.push(format!(
                "SANNode {node} is kept although the node is no longer a member: volume(s) {} still have a replica there",
                holding.join(", ")
            ));
            retained.insert(node.clone(), holding);
        }
    }

    // (6) Liveness.
    let seen: HashSet<String> = {
        let memory = ctx.memory();
        let mut seen: HashSet<String> = memory.heartbeats.keys().cloned().collect();
        seen.extend(previous.nodes.iter().filter(|n| n.state != MemberState::Pending).map(|n| n.name.clone()));
        seen
    };
    let heartbeats = Heartbeats { ctx, now, seen };

    // (2) Addresses, (3) SANNodes.
    let managed: Vec<String> =
        members.keys().filter(|m| !claimed.contains(*m)).chain(retained.keys()).cloned().collect();
    let mut addresses: BTreeMap<String, Option<String>> = BTreeMap::new();
    for node in &managed {
        let node_object = match members.get(node) {
            Some(n) => *n,
            None => nodes.iter().find(|n| n.name_any() == *node).map(|n| &**n),
        };
        let reported = san_nodes.get(node).and_then(|sn| sn.status.as_ref()).map(|s| s.addresses.as_slice());
        let address = match address::replication_address(
            &spec.replication_link,
            node,
            node_object,
            reported.unwrap_or_default(),
            ctx.peer_port,
        ) {
            Ok(a) => a,
            Err(e) => {
                add_invalid(&mut invalid, format!("spec.replicationLink: {e}"));
                None
            }
        };
        // A node kept for its replicas keeps its address when it can no longer be told.
        let address = address.or_else(|| {
            retained
                .contains_key(node)
                .then(|| san_nodes.get(node).and_then(|sn| sn.spec.replication_address.clone()))?
        });
        addresses.insert(node.clone(), address);
    }
    let owner = owner_reference(vsan)?;
    for node in &managed {
        let pool = spec.node_pools.iter().find(|np| np.node == *node).map_or(&spec.pool, |np| &np.pool).clone();
        let peers = managed
            .iter()
            .filter(|p| *p != node)
            .filter_map(|p| Some(Peer { name: p.clone(), address: addresses.get(p)?.clone()? }))
            .collect();
        let desired = SANNodeSpec {
            virtual_san: name.clone(),
            pool,
            replication_address: addresses.get(node).cloned().flatten(),
            peers,
            resync_rate: spec.resync_rate.clone(),
            write_policy: spec.write_policy,
            degraded_writes: spec.degraded_writes,
        };
        if let Some(other) = ensure_san_node(ctx, &owner, node, desired, san_nodes.get(node)).await? {
            add_invalid(&mut invalid, format!("node {node} is already a member of VirtualSAN {other}"));
            claimed.insert(node.clone());
        }
    }

    // (4) StorageClass.
    let storage_class = if deleting_with.is_some() {
        // No new volumes on a SAN being deleted.
        delete_storage_class(ctx, vsan).await?;
        StorageClassState::Absent
    } else if invalid.is_empty() {
        ensure_storage_class(ctx, vsan, &owner).await?
    } else {
        existing_storage_class(ctx, &name)
    };

    // (7) Volumes. An error of one volume does not keep the others or the status from
    // being written; the first one is returned at the end.
    let mut outcomes = Vec::new();
    let mut first_error = None;
    for v in &volumes {
        match reconcile_volume(ctx, v, &heartbeats).await {
            Ok(outcome) => outcomes.push(outcome),
            Err(e) => {
                warn!(volume = %v.name_any(), error = %e, "volume not reconciled");
                first_error.get_or_insert(e);
            }
        }
    }

    // (8) Status.
    let member_nodes: Vec<MemberNode> = members
        .keys()
        .map(|m| {
            let sn = san_nodes.get(m).filter(|_| !claimed.contains(m));
            let pool = sn.and_then(|sn| sn.status.as_ref()).and_then(|s| s.pool.as_ref());
            MemberNode {
                name: m.clone(),
                state: member_state(heartbeats.liveness(m), sn.map(|s| &**s)),
                address: addresses.get(m).cloned().flatten(),
                capacity_bytes: pool.map(|p| p.capacity_bytes),
                free_bytes: pool.map(|p| p.free_bytes),
            }
        })
        .collect();
    let ready = member_nodes.iter().filter(|n| n.state == MemberState::Ready).count();
    let offline = member_nodes.iter().filter(|n| n.state == MemberState::Offline).count();
    let conditions = san_conditions(SanView {
        members: &member_nodes,
        not_ready: member_nodes
            .iter()
            .filter(|n| n.state != MemberState::Ready)
            .map(|n| format!("{}: {}", n.name, member_detail(n, heartbeats.liveness(&n.name), san_nodes.get(&n.name))))
            .collect(),
        invalid: &invalid,
        notes: &notes,
        storage_class: &storage_class,
        volumes: &outcomes,
        deleting_with,
    });
    let generation = vsan.metadata.generation;
    let status = VirtualSANStatus {
        observed_generation: generation,
        conditions: conditions::merge(&previous.conditions, conditions, now, generation),
        nodes: member_nodes,
        ready_nodes: Some(format!("{ready}/{}", members.len())),
        volumes: Some(i32::try_from(volumes.len()).unwrap_or(i32::MAX)),
        storage_class: matches!(storage_class, StorageClassState::Ours).then(|| name.clone()),
    };
    if status != previous {
        let patch =
            json!({ "apiVersion": VirtualSAN::api_version(&()), "kind": VirtualSAN::kind(&()), "status": status });
        let written = Api::<VirtualSAN>::all(ctx.client.clone())
            .patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
            .await?;
        ctx.memory().san_status.insert(name.clone(), Written::of(&written, status.clone()));
    }
    // (9) Events on transitions.
    san_events(ctx, vsan, &previous, &status).await;

    // Memory for the next reconciliation and for the Lease trigger.
    let watched: BTreeSet<&str> = managed
        .iter()
        .map(String::as_str)
        .chain(members.keys().map(String::as_str))
        .chain(volumes.iter().flat_map(|v| v.spec.replicas.iter().map(String::as_str)))
        .collect();
    let mut next = RESYNC_PERIOD;
    {
        let mut memory = ctx.memory();
        for node in &watched {
            match heartbeats.liveness(node) {
                Liveness::Online { expires } => {
                    memory.heartbeats.insert((*node).to_owned(), true);
                    let until = Duration::try_from(expires.duration_since(now)).unwrap_or_default();
                    next = next.min(until + EXPIRY_SLACK);
                }
                Liveness::Offline => {
                    memory.heartbeats.insert((*node).to_owned(), false);
                }
                Liveness::Pending => {}
            }
        }
        memory.next_check.insert(name.clone(), next);
        let volumes = &ctx.stores.volumes;
        memory.disconnected.retain(|(v, _)| volumes.get(&ObjectRef::new(v)).is_some());
        memory.volume_status.retain(|v, _| volumes.get(&ObjectRef::new(v)).is_some());
    }
    ctx.metrics.set_nodes_offline(&name, offline);

    if deleting_with.is_none() && !invalid.is_empty() {
        return Err(Error::InvalidSpec(invalid.join("; ")));
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(next),
    }
}

fn list_in_parens<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<&str> = names.map(String::as_str).collect();
    if names.is_empty() { String::new() } else { format!(" ({})", names.join(", ")) }
}

/// The state of a member from its heartbeat and its SANNode (none if another SAN has it).
fn member_state(live: Liveness, san_node: Option<&SANNode>) -> MemberState {
    match live {
        Liveness::Offline => MemberState::Offline,
        Liveness::Pending => MemberState::Pending,
        Liveness::Online { .. } => match san_node.map(agent_report) {
            Some(AgentReport::Ready) => MemberState::Ready,
            Some(AgentReport::NotReady { .. }) => MemberState::Degraded,
            _ => MemberState::Pending,
        },
    }
}

/// What a SANNode's agent says about the current spec.
enum AgentReport {
    /// Ready=True for the current generation.
    Ready,
    /// Ready=False for the current generation.
    NotReady { reason: String, message: String },
    /// Runs an older generation, or has not reported.
    Behind { observed: Option<i64>, generation: Option<i64> },
}

fn agent_report(sn: &SANNode) -> AgentReport {
    let generation = sn.metadata.generation;
    let observed = sn.status.as_ref().and_then(|s| s.observed_generation);
    let ready = sn.status.as_ref().and_then(|s| conditions::find(&s.conditions, san_node_condition::READY));
    match ready {
        Some(c) if observed == generation && generation.is_some() => match c.status {
            ConditionStatus::True => AgentReport::Ready,
            _ => AgentReport::NotReady { reason: c.reason.clone(), message: c.message.clone() },
        },
        _ => AgentReport::Behind { observed, generation },
    }
}

/// Why a member is not ready, for the Ready condition's message.
fn member_detail(n: &MemberNode, live: Liveness, sn: Option<&Arc<SANNode>>) -> String {
    match (n.state, live) {
        (MemberState::Offline, _) => "offline (heartbeat expired)".into(),
        (MemberState::Pending, Liveness::Pending) => "pending (no heartbeat from its agent yet)".into(),
        (MemberState::Degraded, _) => match sn.map(|s| agent_report(s)) {
            Some(AgentReport::NotReady { reason, message }) if message.is_empty() => format!("degraded ({reason})"),
            Some(AgentReport::NotReady { reason, message }) => format!("degraded ({reason}: {message})"),
            _ => "degraded".into(),
        },
        (_, _) => match sn.map(|s| agent_report(s)) {
            None => "pending (no SANNode yet)".into(),
            Some(AgentReport::Behind { observed: None, .. }) => "pending (its agent has not reported yet)".into(),
            Some(AgentReport::Behind { observed: Some(o), generation }) => format!(
                "pending (its agent runs generation {o} of its SANNode, not {})",
                generation.map_or_else(|| "?".into(), |g| g.to_string())
            ),
            Some(_) => "pending".into(),
        },
    }
}

/// Whether the StorageClass of a SAN is the operator's.
#[derive(Debug, PartialEq, Eq)]
enum StorageClassState {
    /// It exists and the operator made it.
    Ours,
    /// A StorageClass of that name made by someone else: left alone.
    Conflict,
    /// It does not exist.
    Absent,
}

/// What the VirtualSAN's conditions are computed from.
struct SanView<'a> {
    members: &'a [MemberNode],
    not_ready: Vec<String>,
    invalid: &'a [String],
    notes: &'a [String],
    storage_class: &'a StorageClassState,
    volumes: &'a [VolumeOutcome],
    deleting_with: Option<&'a [String]>,
}

/// Ready, Degraded, Resyncing and SplitBrain of a VirtualSAN.
fn san_conditions(v: SanView<'_>) -> Vec<Desired> {
    let total = v.members.len();
    let ready = total - v.not_ready.len();
    let with_notes = |m: String| {
        if v.notes.is_empty() { m } else { format!("{m}; {}", v.notes.join("; ")) }
    };
    let ready_condition = if let Some(volumes) = v.deleting_with {
        Desired::new(
            san_condition::READY,
            false,
            "DeletionBlocked",
            format!(
                "{} volume(s) still exist ({}): delete their PersistentVolumeClaims first",
                volumes.len(),
                volumes.join(", ")
            ),
        )
    } else if !v.invalid.is_empty() {
        Desired::new(san_condition::READY, false, "InvalidSpec", with_notes(v.invalid.join("; ")))
    } else if total == 0 {
        Desired::new(san_condition::READY, false, "NoMembers", with_notes("no node matches spec.nodes".into()))
    } else if *v.storage_class == StorageClassState::Conflict {
        Desired::new(
            san_condition::READY,
            false,
            "StorageClassConflict",
            with_notes("a StorageClass of the VirtualSAN's name exists and was not made by peersan-operator".into()),
        )
    } else if !v.not_ready.is_empty() {
        Desired::new(
            san_condition::READY,
            false,
            "NodesNotReady",
            with_notes(format!("{ready}/{total} nodes ready; {}", v.not_ready.join("; "))),
        )
    } else if *v.storage_class != StorageClassState::Ours {
        Desired::new(
            san_condition::READY,
            false,
            "StorageClassMissing",
            with_notes("the StorageClass is missing".into()),
        )
    } else {
        Desired::new(san_condition::READY, true, "AllNodesReady", with_notes(format!("{ready}/{total} nodes ready")))
    };

    let volumes_in = |healths: &[VolumeHealth]| -> Vec<&str> {
        v.volumes.iter().filter(|o| healths.contains(&o.health)).map(|o| o.name.as_str()).collect()
    };
    let degraded_volumes = volumes_in(&[VolumeHealth::Degraded, VolumeHealth::Unavailable]);
    let bad_nodes: Vec<String> = v
        .members
        .iter()
        .filter(|n| matches!(n.state, MemberState::Offline | MemberState::Degraded))
        .map(|n| format!("{} {}", n.name, if n.state == MemberState::Offline { "offline" } else { "degraded" }))
        .collect();
    let degraded = match (degraded_volumes.is_empty(), bad_nodes.is_empty()) {
        (true, true) => Desired::new(san_condition::DEGRADED, false, "AllInSync", "no volume lacks an in-sync replica"),
        (false, _) => Desired::new(
            san_condition::DEGRADED,
            true,
            "VolumesDegraded",
            format!(
                "volume(s) without every replica in sync: {}{}",
                degraded_volumes.join(", "),
                if bad_nodes.is_empty() { String::new() } else { format!("; nodes: {}", bad_nodes.join(", ")) }
            ),
        ),
        (true, false) => {
            Desired::new(san_condition::DEGRADED, true, "NodesDown", format!("nodes: {}", bad_nodes.join(", ")))
        }
    };
    let resyncing = volumes_in(&[VolumeHealth::Resyncing]);
    let resyncing = if resyncing.is_empty() {
        Desired::new(san_condition::RESYNCING, false, "NoResync", "")
    } else {
        Desired::new(san_condition::RESYNCING, true, "VolumesResyncing", format!("resyncing: {}", resyncing.join(", ")))
    };
    let split = volumes_in(&[VolumeHealth::SplitBrain]);
    let split = if split.is_empty() {
        Desired::new(san_condition::SPLIT_BRAIN, false, "NoSplitBrain", "")
    } else {
        Desired::new(
            san_condition::SPLIT_BRAIN,
            true,
            "VolumesSplitBrain",
            format!(
                "volume(s) whose replicas accepted different writes: {}; nothing is merged until the survivor is chosen",
                split.join(", ")
            ),
        )
    };
    vec![ready_condition, degraded, resyncing, split]
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

/// NodeJoined, NodeOffline, NodeOnline and DeletionBlocked, from the change of status.
async fn san_events(ctx: &Context, vsan: &VirtualSAN, previous: &VirtualSANStatus, status: &VirtualSANStatus) {
    for node in &status.nodes {
        match previous.nodes.iter().find(|p| p.name == node.name) {
            None => {
                publish(ctx, vsan, EventType::Normal, reason::NODE_JOINED, format!("node {} joined", node.name)).await;
            }
            Some(p) if p.state != MemberState::Offline && node.state == MemberState::Offline => {
                let note = format!("node {}: heartbeat expired", node.name);
                publish(ctx, vsan, EventType::Warning, reason::NODE_OFFLINE, note).await;
            }
            Some(p) if p.state == MemberState::Offline && node.state != MemberState::Offline => {
                let note = format!("node {}: heartbeat is fresh again", node.name);
                publish(ctx, vsan, EventType::Normal, reason::NODE_ONLINE, note).await;
            }
            Some(_) => {}
        }
    }
    let ready = |s: &VirtualSANStatus| {
        conditions::find(&s.conditions, san_condition::READY).map(|c| (c.reason.clone(), c.message.clone()))
    };
    if let Some((reason, message)) = ready(status)
        && reason == reason::DELETION_BLOCKED
        && ready(previous) != Some((reason.clone(), message.clone()))
    {
        publish(ctx, vsan, EventType::Warning, reason::DELETION_BLOCKED, message).await;
    }
}

fn owner_reference(vsan: &VirtualSAN) -> Result<OwnerReference, Error> {
    Ok(OwnerReference {
        api_version: VirtualSAN::api_version(&()).into_owned(),
        kind: VirtualSAN::kind(&()).into_owned(),
        name: vsan.metadata.name.clone().ok_or(Error::Unnamed)?,
        uid: vsan.metadata.uid.clone().ok_or(Error::Unnamed)?,
        controller: Some(true),
        block_owner_deletion: None,
    })
}

fn owned_by(meta: &ObjectMeta, owner: &OwnerReference) -> bool {
    meta.owner_references.iter().flatten().any(|o| o.uid == owner.uid)
}

/// Writes a SANNode's spec (server-side apply) when it differs from the cache. Returns the
/// VirtualSAN that already has the node, if another one does.
async fn ensure_san_node(
    ctx: &Context,
    owner: &OwnerReference,
    node: &str,
    desired: SANNodeSpec,
    cached: Option<&Arc<SANNode>>,
) -> Result<Option<String>, Error> {
    let api = Api::<SANNode>::all(ctx.client.clone());
    let _claim = match cached {
        Some(sn) if sn.spec == desired && owned_by(&sn.metadata, owner) => return Ok(None),
        Some(_) => None,
        None => {
            // Creating: make sure no other SAN created it since the cache was filled.
            let guard = ctx.claims.lock().await;
            if let Some(sn) = api.get_opt(node).await?
                && sn.spec.virtual_san != desired.virtual_san
            {
                return Ok(Some(sn.spec.virtual_san));
            }
            Some(guard)
        }
    };
    debug!(node, ?desired, "applying SANNode spec");
    let patch = json!({
        "apiVersion": SANNode::api_version(&()),
        "kind": SANNode::kind(&()),
        "metadata": { "name": node, "ownerReferences": [owner] },
        "spec": desired,
    });
    api.patch(node, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(None)
}

async fn delete_ignoring_missing<K>(api: &Api<K>, name: &str, uid: Option<String>) -> Result<(), Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let params = DeleteParams {
        preconditions: uid.map(|uid| Preconditions { uid: Some(uid), resource_version: None }),
        ..Default::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        // Gone already, or replaced by a newer object of that name (uid precondition).
        Err(e) if is_not_found(&e) || is_conflict(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The StorageClass a VirtualSAN provisions with.
fn desired_storage_class(vsan: &VirtualSAN, owner: &OwnerReference) -> StorageClass {
    let name = vsan.name_any();
    StorageClass {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(BTreeMap::from([(MANAGED_BY_LABEL.to_owned(), MANAGER.to_owned())])),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        },
        provisioner: peersan_crds::CSI_DRIVER_NAME.to_owned(),
        parameters: Some(BTreeMap::from([
            ("virtualSAN".to_owned(), name),
            ("replicas".to_owned(), vsan.spec.replicas.to_string()),
        ])),
        allow_volume_expansion: Some(true),
        volume_binding_mode: Some("WaitForFirstConsumer".to_owned()),
        reclaim_policy: Some("Delete".to_owned()),
        ..Default::default()
    }
}

fn is_ours(sc: &StorageClass, virtual_san: &str) -> bool {
    sc.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGER)
        && sc.parameters.as_ref().and_then(|p| p.get("virtualSAN")).map(String::as_str) == Some(virtual_san)
}

fn existing_storage_class(ctx: &Context, name: &str) -> StorageClassState {
    match ctx.stores.storage_classes.get(&ObjectRef::new(name)) {
        None => StorageClassState::Absent,
        Some(sc) if is_ours(&sc, name) => StorageClassState::Ours,
        Some(_) => StorageClassState::Conflict,
    }
}

/// Creates or updates the SAN's StorageClass. Its immutable fields (provisioner,
/// parameters, reclaim policy, binding mode) change by deleting and creating it again.
async fn ensure_storage_class(
    ctx: &Context,
    vsan: &VirtualSAN,
    owner: &OwnerReference,
) -> Result<StorageClassState, Error> {
    let name = vsan.name_any();
    let api = Api::<StorageClass>::all(ctx.client.clone());
    let desired = desired_storage_class(vsan, owner);
    if let Some(sc) = ctx.stores.storage_classes.get(&ObjectRef::new(&name)) {
        if !is_ours(&sc, &name) {
            return Ok(StorageClassState::Conflict);
        }
        let immutable_same = sc.provisioner == desired.provisioner
            && sc.parameters == desired.parameters
            && sc.reclaim_policy == desired.reclaim_policy
            && sc.volume_binding_mode == desired.volume_binding_mode;
        if immutable_same
            && sc.allow_volume_expansion == desired.allow_volume_expansion
            && owned_by(&sc.metadata, owner)
        {
            return Ok(StorageClassState::Ours);
        }
        if !immutable_same {
            info!(storageclass = %name, "recreating the StorageClass: its parameters changed");
            delete_ignoring_missing(&api, &name, sc.uid()).await?;
        }
    }
    api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&desired)).await?;
    Ok(StorageClassState::Ours)
}

async fn delete_storage_class(ctx: &Context, vsan: &VirtualSAN) -> Result<(), Error> {
    let name = vsan.name_any();
    if let Some(sc) = ctx.stores.storage_classes.get(&ObjectRef::new(&name))
        && is_ours(&sc, &name)
    {
        delete_ignoring_missing(&Api::<StorageClass>::all(ctx.client.clone()), &name, sc.uid()).await?;
    }
    Ok(())
}

/// Deletion without volumes: deletes the SAN's SANNodes and StorageClass (the finalizer goes
/// when this returns). The API server, not the cache, says whether volumes remain.
async fn cleanup(vsan: &VirtualSAN, ctx: &Context) -> Result<Action, Error> {
    let name = vsan.name_any();
    let volumes: Vec<String> = Api::<MirrorVolume>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|v| v.spec.virtual_san == name)
        .map(|v| v.name_any())
        .collect();
    if !volumes.is_empty() {
        return Err(Error::DeletionBlocked(format!("volume(s) still exist: {}", volumes.join(", "))));
    }
    let san_nodes = Api::<SANNode>::all(ctx.client.clone());
    for sn in san_nodes.list(&ListParams::default()).await?.items.into_iter().filter(|sn| sn.spec.virtual_san == name) {
        delete_ignoring_missing(&san_nodes, &sn.name_any(), sn.uid()).await?;
    }
    let classes = Api::<StorageClass>::all(ctx.client.clone());
    if let Some(sc) = classes.get_opt(&name).await?
        && is_ours(&sc, &name)
    {
        delete_ignoring_missing(&classes, &name, sc.uid()).await?;
    }
    ctx.metrics.forget(&name);
    {
        let mut memory = ctx.memory();
        memory.next_check.remove(&name);
        memory.san_status.remove(&name);
        memory.backoff.remove(&name);
    }
    info!(virtualsan = %name, "deleted its SANNodes and StorageClass");
    Ok(Action::await_change())
}

/// The outcome of looking at a volume's write priority.
enum Priority {
    /// The holder is not offline (or there is no holder): nothing moves.
    Stays(Lease),
    /// The holder is offline and no in-sync replica on an online node can take over.
    Stuck { holder: String, lease: Lease },
    /// Moved from an offline holder.
    Moved { from: String, to: String, epoch: u64, lease: Lease },
    /// The Lease was deleted meanwhile (the volume is being deleted).
    Gone,
}

/// (7) One volume: replicas on offline nodes marked disconnected, failover of write
/// priority, health, conditions, status and events.
async fn reconcile_volume(ctx: &Context, v: &MirrorVolume, hb: &Heartbeats<'_>) -> Result<VolumeOutcome, Error> {
    let name = v.name_any();
    let status = v.status.clone().unwrap_or_default();
    let entries = &status.replicas;
    let online = |n: &str| hb.online(n);
    let previous = newest(ctx.memory().volume_status.get(&name), v, || VolumeStatusPart::of(&status));

    mark_disconnected(ctx, v, hb).await?;

    let lease_name = lease::volume_lease_name(&name)?;
    let cached = ctx.stores.leases.get(&ObjectRef::new(&lease_name).within(&ctx.namespace));
    let mut stuck_note = None;
    let lease = match cached {
        None => None,
        Some(cached) => match move_priority(ctx, v, (*cached).clone(), hb).await? {
            Priority::Stays(lease) => Some(lease),
            Priority::Gone => None,
            Priority::Stuck { holder, lease } => {
                stuck_note = Some(format!(
                    "write priority holder {holder} is offline and no in-sync replica on an online node can take over; \
                     the Lease stays with {holder}"
                ));
                Some(lease)
            }
            Priority::Moved { from, to, epoch, lease } => {
                ctx.metrics.failovers.inc();
                let note = format!("write priority moved from {from} (offline) to {to} at epoch {epoch}");
                publish(ctx, v, EventType::Warning, reason::WRITE_PRIORITY_MOVED, note).await;
                Some(lease)
            }
        },
    };
    let writer = lease.as_ref().and_then(|l| l.spec.as_ref()).and_then(|s| s.holder_identity.clone());
    let epoch = match &lease {
        Some(l) => lease::epoch_of(l.metadata.annotations.as_ref())?,
        None => None,
    }
    .and_then(|e| i64::try_from(e).ok());

    let health = volume::health(&v.spec.replicas, entries, online);
    let replicas = describe(&v.spec.replicas, entries, online);
    let ready_reason = match health {
        VolumeHealth::Healthy => "InSync",
        VolumeHealth::Degraded => "ReplicasNotInSync",
        VolumeHealth::Resyncing => "Resyncing",
        VolumeHealth::Unavailable => "NoReplicaAvailable",
        VolumeHealth::SplitBrain => "SplitBrain",
    };
    let ready = match &stuck_note {
        Some(note) => Desired::new(volume_condition::READY, false, "WriterOffline", format!("{note}; {replicas}")),
        None => Desired::new(volume_condition::READY, health == VolumeHealth::Healthy, ready_reason, replicas.clone()),
    };
    let degraded =
        Desired::new(volume_condition::DEGRADED, health != VolumeHealth::Healthy, ready_reason, replicas.clone());
    let catching_up: Vec<String> = v
        .spec
        .replicas
        .iter()
        .filter(|n| volume::effective_state(volume::entry_of(entries, n), online(n)) == Some(ReplicaState::CatchingUp))
        .map(|n| {
            let e = volume::entry_of(entries, n);
            match e.and_then(|e| Some((e.resync_done_bytes?, e.resync_total_bytes?))) {
                Some((done, total)) => format!("{n} {done}/{total} bytes"),
                None => n.clone(),
            }
        })
        .collect();
    let resyncing = if catching_up.is_empty() {
        Desired::new(volume_condition::RESYNCING, false, "NoResync", "")
    } else {
        Desired::new(
            volume_condition::RESYNCING,
            true,
            "CatchingUp",
            format!("catching up: {}", catching_up.join(", ")),
        )
    };
    let split = if health == VolumeHealth::SplitBrain {
        Desired::new(
            volume_condition::SPLIT_BRAIN,
            true,
            "SplitBrain",
            format!("replicas accepted different writes ({replicas}); nothing is merged until the survivor is chosen"),
        )
    } else {
        Desired::new(volume_condition::SPLIT_BRAIN, false, "NoSplitBrain", "")
    };
    let generation = v.metadata.generation;
    let conditions =
        conditions::merge(&previous.conditions, vec![ready, degraded, resyncing, split], hb.now, generation);
    let part = VolumeStatusPart { observed_generation: generation, health: Some(health), epoch, writer, conditions };
    if part != previous {
        let VolumeStatusPart { epoch, writer, conditions, .. } = &part;
        // Unknown values are left out, not written as null: what the operator stops
        // setting is removed by the apply.
        let mut fields = serde_json::Map::new();
        fields.insert("health".into(), json!(health));
        fields.insert("conditions".into(), json!(conditions));
        if let Some(g) = generation {
            fields.insert("observedGeneration".into(), json!(g));
        }
        if let Some(e) = epoch {
            fields.insert("epoch".into(), json!(e));
        }
        if let Some(w) = &writer {
            fields.insert("writer".into(), json!(w));
        }
        let patch = json!({
            "apiVersion": MirrorVolume::api_version(&()),
            "kind": MirrorVolume::kind(&()),
            "status": fields,
        });
        let written = Api::<MirrorVolume>::all(ctx.client.clone())
            .patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
            .await?;
        ctx.memory().volume_status.insert(name.clone(), Written::of(&written, part));
    }

    match (previous.health, health) {
        (Some(VolumeHealth::Healthy | VolumeHealth::Resyncing), VolumeHealth::Degraded | VolumeHealth::Unavailable) => {
            let note = format!("volume {name} is {}: {replicas}", health_name(health));
            publish(ctx, v, EventType::Warning, reason::VOLUME_DEGRADED, note).await;
        }
        (Some(VolumeHealth::Resyncing), VolumeHealth::Healthy) => {
            let note = format!("volume {name}: every replica is in sync again");
            publish(ctx, v, EventType::Normal, reason::RESYNC_DONE, note).await;
        }
        _ => {}
    }
    Ok(VolumeOutcome { name, health })
}

/// Sets the state of the replica entries of offline nodes to `disconnected`. A JSON patch
/// (field manager `peersan-operator`, an update) with a test of each entry's node: the
/// agent's own server-side apply takes the field back when it returns, and the operator's
/// status apply, which never lists replicas, cannot remove it.
async fn mark_disconnected(ctx: &Context, v: &MirrorVolume, hb: &Heartbeats<'_>) -> Result<(), Error> {
    let Some(status) = &v.status else { return Ok(()) };
    let volume = v.name_any();
    let mut ops = Vec::new();
    let mut nodes = Vec::new();
    {
        let mut memory = ctx.memory();
        for (i, e) in status.replicas.iter().enumerate() {
            let key = (volume.clone(), e.node.clone());
            if hb.liveness(&e.node) != Liveness::Offline {
                memory.disconnected.remove(&key);
            } else if e.state == ReplicaState::Disconnected {
                memory.disconnected.insert(key);
            } else if !memory.disconnected.contains(&key) {
                ops.push(json!({ "op": "test", "path": format!("/status/replicas/{i}/node"), "value": e.node }));
                ops.push(
                    json!({ "op": "replace", "path": format!("/status/replicas/{i}/state"), "value": "disconnected" }),
                );
                nodes.push(e.node.clone());
            }
        }
    }
    if ops.is_empty() {
        return Ok(());
    }
    let patch: Patch<()> = Patch::Json(
        serde_json::from_value(serde_json::Value::Array(ops))
            .map_err(|e| Error::InvalidSpec(format!("building the JSON patch of {}'s replicas: {e}", v.name_any())))?,
    );
    let params = PatchParams { field_manager: Some(MANAGER.to_owned()), ..Default::default() };
    match Api::<MirrorVolume>::all(ctx.client.clone()).patch_status(&v.name_any(), &params, &patch).await {
        Ok(_) => {
            info!(volume = %volume, nodes = ?nodes, "replicas on offline nodes marked disconnected");
            let mut memory = ctx.memory();
            for node in nodes {
                memory.disconnected.insert((volume.clone(), node));
            }
            Ok(())
        }
        // The list changed under the test: its watch event brings the next look.
        Err(kube::Error::Api(s)) if s.code == 422 => {
            debug!(volume = %v.name_any(), message = %s.message, "replica list changed; not marked");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Moves write priority away from an offline holder (optimistic concurrency: replace with
/// the resourceVersion read; on a conflict, read again and decide again).
async fn move_priority(
    ctx: &Context,
    v: &MirrorVolume,
    mut lease: Lease,
    hb: &Heartbeats<'_>,
) -> Result<Priority, Error> {
    let api = ctx.leases();
    let entries = v.status.as_ref().map(|s| s.replicas.as_slice()).unwrap_or_default();
    let name = lease.name_any();
    let mut last_error = None;
    for _ in 0..LEASE_ATTEMPTS {
        let Some(holder) = lease.spec.as_ref().and_then(|s| s.holder_identity.clone()) else {
            return Ok(Priority::Stays(lease));
        };
        if hb.liveness(&holder) != Liveness::Offline {
            return Ok(Priority::Stays(lease));
        }
        let Some(target) = volume::failover_target(&v.spec.replicas, entries, &holder, |n| hb.online(n)) else {
            return Ok(Priority::Stuck { holder, lease });
        };
        let epoch = volume::next_epoch(lease::epoch_of(lease.metadata.annotations.as_ref())?, entries);
        let mut moved = lease.clone();
        moved.metadata.managed_fields = None;
        moved.annotations_mut().insert(lease::EPOCH_ANNOTATION.to_owned(), lease::epoch_value(epoch));
        let spec = moved.spec.get_or_insert_with(Default::default);
        spec.holder_identity = Some(target.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        spec.acquire_time = Some(MicroTime(hb.now));
        spec.renew_time = Some(MicroTime(hb.now));
        let params = PostParams { field_manager: Some(MANAGER.to_owned()), ..Default::default() };
        match api.replace(&name, &params, &moved).await {
            Ok(lease) => {
                info!(volume = %v.name_any(), from = %holder, to = %target, epoch, "write priority moved");
                return Ok(Priority::Moved { from: holder, to: target, epoch, lease });
            }
            Err(e) if is_conflict(&e) => {
                debug!(lease = %name, "Lease changed meanwhile; reading it again");
                last_error = Some(e);
                match api.get_opt(&name).await? {
                    Some(fresh) => lease = fresh,
                    None => return Ok(Priority::Gone),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(last_error.map_or(Error::Unnamed, Error::from))
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
