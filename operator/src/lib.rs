//! peersan operator: reconciles `VirtualSAN` resources into per-node configuration
//! (`SANNode`), a StorageClass and status, watches node heartbeats and moves a volume's
//! write priority (its Lease) away from a node whose heartbeat expired.
//!
//! - [`config`]: command line and environment.
//! - [`run`]: the process entry point (`run::run`), also used by the multi-call binary.
//! - [`controller`]: the reconciler, its context and the watches that trigger it.
//! - [`events`]: Events about cluster-scoped objects (in `kube-system`).
//! - [`leader`]: leader election, so that one of several operator processes reconciles.
//! - Pure decisions, unit tested without an API server: [`members`] (who is a member),
//!   [`address`] (where a member mirrors), [`liveness`] (heartbeat Leases), [`volume`]
//!   (health, failover target, fencing epoch), [`conditions`] (status conditions).
//!
//! # What a reconciliation of a VirtualSAN does
//!
//! 1. Members: the Nodes its `spec.nodes.selector` matches and the nodes `spec.nodes.names`
//!    lists (one without a Node object stays pending).
//! 2. Each member's replication address: `Cluster` link → the Node's InternalIP (else
//!    ExternalIP); `Dedicated` → the address the agent reports in SANNode `status.addresses`
//!    inside `cidr`, or of `interface` (per node: `nodeInterfaces`); `ip:port`, IPv6 in
//!    brackets; unset while unknown.
//! 3. A SANNode per member (server-side apply, manager `peersan-operator`, owner reference
//!    to the VirtualSAN): `virtualSAN`, `pool` (`nodePools` first), `replicationAddress`,
//!    `peers` (every other member with a known address), `resyncRate`, `writePolicy`,
//!    `degradedWrites`. The SANNode of a node that left is deleted, unless a volume of the
//!    SAN has a replica there: then it is kept (and still configured) and the Ready message
//!    says so.
//! 4. The StorageClass named after the VirtualSAN (provisioner `csi.peersan.io`, parameters
//!    `virtualSAN` and `replicas`, expansion allowed, WaitForFirstConsumer, Delete, label
//!    `app.kubernetes.io/managed-by: peersan-operator`). One of that name made by someone
//!    else is left alone (Ready False, `StorageClassConflict`). Not made while the spec is
//!    invalid; deleted as soon as the VirtualSAN is being deleted.
//! 5. What the schema cannot check: more replicas than members, `nodePools` or
//!    `nodeInterfaces` naming non-members, a node another VirtualSAN has → Ready False,
//!    `InvalidSpec`, the message saying what.
//! 6. Liveness of every node concerned from its heartbeat Lease `peersan-node-<node>`:
//!    offline once `renewTime + leaseDurationSeconds < now`, or when the Lease is gone after
//!    it was seen; pending when there never was one.
//! 7. Each MirrorVolume of the SAN: the entries of replicas on offline nodes get state
//!    `disconnected` (once per offline period; the agent takes the field back); if the
//!    holder of the volume Lease `peersan-vol-<volume>` is offline, write priority moves to
//!    the in-sync replica on an online node with the lowest name, at epoch
//!    `max(Lease epoch, every replica's epoch) + 1`, `leaseTransitions + 1` (replace with
//!    resourceVersion, read again on conflict), with the Event `WritePriorityMoved`; status
//!    (apply, force): `health`, `conditions` (Ready, Degraded, Resyncing, SplitBrain),
//!    `observedGeneration`, `epoch` and `writer` from the Lease.
//! 8. The VirtualSAN's status (apply, force): `observedGeneration`, `conditions` (Ready,
//!    Degraded, Resyncing, SplitBrain, each with `observedGeneration`, `lastTransitionTime`
//!    kept while the status does not change), `nodes[]`, `readyNodes`, `volumes`,
//!    `storageClass`. Ready: every member's agent reports Ready for the current SANNode
//!    generation and has a fresh heartbeat, and the StorageClass is the operator's.
//! 9. Events on transitions: `NodeJoined`, `NodeOffline`, `NodeOnline`, `DeletionBlocked`
//!    (on the VirtualSAN), `VolumeDegraded`, `ResyncDone`, `WritePriorityMoved` (on the
//!    MirrorVolume).
//! 10. Looks again when the first heartbeat of an online node expires, else after 60 s.
//!
//! Deletion (finalizer `peersan.io/cleanup`): while MirrorVolumes of the SAN exist, the
//! finalizer stays, Ready is False with reason `DeletionBlocked` (and volumes keep their
//! failover); then its SANNodes and StorageClass are deleted and the finalizer removed.
//!
//! Only what differs from the watch caches is written, so the API load follows changes of
//! state, not I/O.
//!
//! Several operator processes may run: the one holding the Lease `peersan-operator` in
//! the namespace reconciles, the others stand by (see [`leader`]).

pub mod address;
pub mod conditions;
pub mod config;
pub mod controller;
pub mod error;
pub mod events;
mod http;
pub mod leader;
pub mod liveness;
pub mod members;
pub mod metrics;
pub mod run;
pub mod volume;

pub use error::{Error, ErrorKind};

/// Field manager of every write the operator makes (server-side apply and updates).
pub const MANAGER: &str = "peersan-operator";

/// Finalizer the operator puts on every VirtualSAN, so that it can delete the SAN's
/// SANNodes and StorageClass (and refuse while volumes remain).
pub const FINALIZER: &str = "peersan.io/cleanup";
