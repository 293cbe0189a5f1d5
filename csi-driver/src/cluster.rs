//! The CSI Controller service against the Kubernetes API (`peersan-csi-controller
//! --kubernetes`).
//!
//! Where volume state lives: in the API server, never in this process, so the controller can
//! be restarted or moved at any time.
//!
//! - A `MirrorVolume` per volume (name = volume id): the spec (VirtualSAN, size, replica
//!   nodes, write policy) is written here; each node agent creates, grows and deletes its
//!   replica from it and reports the replica in `status.replicas`; `status.attachedNodes` is
//!   written here (ControllerPublish/Unpublish).
//! - A Lease `peersan-vol-<volume>` per volume: its holder is the node with write priority,
//!   its `peersan.io/epoch` annotation the fencing epoch. Created with the volume (holder: the
//!   first replica, epoch 1); ControllerPublish to another node moves it and raises the
//!   epoch. The node agents feed it into their engines, which refuse writes of older epochs.
//!   A multi-writer volume (writePolicy MultiWriter, published with MULTI_NODE_MULTI_WRITER
//!   block access) is published on several nodes at once: the first publish moves the
//!   Lease, later ones leave it where it is (its holder arbitrates the writers' regions, and
//!   a new epoch would fail the writes the others have in flight).
//!
//! A call that needs the agents to act (create, publish, expand) writes the desired state,
//! then waits until the agents report it, up to `wait` (UNAVAILABLE after that: the caller
//! retries, and the retry finds the state written and waits again).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use peersan_crds::common::ConditionStatus;
use peersan_crds::lease::{self, EPOCH_ANNOTATION};
use peersan_crds::mirrorvolume::{ReplicaState, VolumeHealth};
use peersan_crds::{MirrorVolume, MirrorVolumeSpec, SANNode, VirtualSAN, WritePolicy};
use serde_json::json;
use tonic::{Request, Response, Status};

use crate::controller::{Candidate, SIZE_ALIGN, csi_volume, place, size_for};
use crate::error::{CsiError, CsiResult, require, require_some};
use crate::limiter::VolumeGuards;
use crate::params::{self, Access, Capability, VolumeParams};
use crate::pb;
use crate::pb::controller_server::Controller;

/// Server-side apply field manager of what this controller writes in a MirrorVolume's status.
pub const FIELD_MANAGER: &str = "peersan-csi-controller";

/// How often a wait for the node agents looks again.
const POLL: Duration = Duration::from_millis(200);

/// The Controller service backed by the Kubernetes API.
pub struct ClusterController {
    volumes: Api<MirrorVolume>,
    nodes: Api<SANNode>,
    sans: Api<VirtualSAN>,
    leases: Api<Lease>,
    guards: VolumeGuards,
    wait: Duration,
}

/// An API error as a CSI error: conflicts are ABORTED (retry), unreachable servers and
/// server-side failures UNAVAILABLE, refusals of the request INVALID_ARGUMENT.
fn api_error(what: &str, e: kube::Error) -> CsiError {
    match &e {
        kube::Error::Api(s) if s.code == 409 => CsiError::Aborted(format!("{what}: {}", s.message)),
        kube::Error::Api(s) if s.code == 404 => CsiError::NotFound(format!("{what}: {}", s.message)),
        kube::Error::Api(s) if s.code == 422 || s.code == 400 => {
            CsiError::InvalidArgument(format!("{what}: {}", s.message))
        }
        kube::Error::Api(s) if s.code == 403 || s.code == 401 => {
            CsiError::Internal(format!("{what}: the controller's service account may not do this: {}", s.message))
        }
        _ => CsiError::Unavailable(format!("{what}: {e}")),
    }
}

/// Whether an error is the API server's 404.
fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// The epoch a Lease carries (0 when it has none yet); an unreadable annotation is an
/// error rather than a silent 0, which could make the next epoch one already used.
fn lease_epoch(l: &Lease) -> CsiResult<u64> {
    lease::epoch_of(l.metadata.annotations.as_ref())
        .map(|e| e.unwrap_or(0))
        .map_err(|e| CsiError::Internal(format!("Lease {}: {e}", l.metadata.name.as_deref().unwrap_or("?"))))
}

/// Whether a heartbeat Lease was renewed within its duration at `now`.
pub fn heartbeat_fresh(l: &Lease, now: Timestamp) -> bool {
    let Some(spec) = &l.spec else { return false };
    let (Some(renewed), Some(secs)) = (&spec.renew_time, spec.lease_duration_seconds) else { return false };
    let expires = renewed.0.as_second().saturating_add(i64::from(secs.max(0)));
    now.as_second() <= expires
}

/// The size of a replica as its node reports it, when the node reports the replica created.
fn reported_size(v: &MirrorVolume, node: &str) -> Option<u64> {
    let st = v.status.as_ref()?;
    st.replicas.iter().find(|r| r.node == node)?.size_bytes.map(|s| s.max(0) as u64)
}

/// The newest epoch any replica reports.
fn newest_reported_epoch(v: &MirrorVolume) -> u64 {
    v.status.iter().flat_map(|s| s.replicas.iter()).filter_map(|r| r.epoch).map(|e| e.max(0) as u64).max().unwrap_or(0)
}

fn attached(v: &MirrorVolume) -> Vec<String> {
    v.status.as_ref().map(|s| s.attached_nodes.clone()).unwrap_or_default()
}

/// Why a volume published on other nodes may not be published on one more with `cap`, or
/// `None` when it may. Several nodes write at once only a MultiWriter volume (the engines of
/// a SingleWriter volume take writes from the Lease holder only, and moving the Lease would
/// fence the node writing now), and only through MULTI_NODE_MULTI_WRITER (any other mode
/// tells that the workload expects no other writer) with raw block access (ext4 and xfs
/// are not cluster filesystems: two nodes mounting one corrupt it).
pub fn multi_node_refusal(v: &MirrorVolume, cap: &Capability) -> Option<String> {
    if v.spec.write_policy != WritePolicy::MultiWriter {
        return Some(format!(
            "it is a single-writer volume (writePolicy {} of VirtualSAN {}), published on one node at a time",
            params::write_policy_name(v.spec.write_policy),
            v.spec.virtual_san
        ));
    }
    if !cap.multi_writer() {
        return Some(format!(
            "access mode {} is for one node; several nodes at once need MULTI_NODE_MULTI_WRITER (ReadWriteMany)",
            cap.mode.as_str_name()
        ));
    }
    if matches!(cap.access, Access::Mount { .. }) {
        return Some(
            "a filesystem is mounted on one node at a time; several nodes at once need raw block access \
             (volumeMode: Block)"
                .into(),
        );
    }
    None
}

/// How messages name a volume with its VirtualSAN.
fn volume_source(v: &MirrorVolume) -> String {
    format!("volume {} (VirtualSAN {})", v.metadata.name.as_deref().unwrap_or_default(), v.spec.virtual_san)
}

/// What a volume's replicas report, for messages: `node: state (detail)`.
fn replica_summary(v: &MirrorVolume) -> String {
    v.spec
        .replicas
        .iter()
        .map(|n| match v.status.as_ref().and_then(|s| s.replicas.iter().find(|r| r.node == *n)) {
            None => format!("{n}: not reported"),
            Some(r) => {
                let mut s = format!("{n}: {}", r.state.as_str());
                if let Some(d) = r.detail.as_deref().filter(|d| !d.is_empty()) {
                    s.push_str(&format!(" ({d})"));
                }
                s
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A volume's condition as CSI reports it, from the health the operator computes.
pub fn volume_condition(v: &MirrorVolume) -> pb::VolumeCondition {
    let health = v.status.as_ref().and_then(|s| s.health);
    let abnormal = health != Some(VolumeHealth::Healthy);
    let name = health.map_or("unknown", VolumeHealth::as_str);
    pb::VolumeCondition { abnormal, message: format!("{name}: {}", replica_summary(v)) }
}

fn volume_context(v: &MirrorVolume) -> HashMap<String, String> {
    HashMap::from([
        (params::PARAM_REPLICAS.to_owned(), v.spec.replicas.len().to_string()),
        (params::PARAM_VIRTUAL_SAN.to_owned(), v.spec.virtual_san.clone()),
    ])
}

fn csi_of(v: &MirrorVolume, context: HashMap<String, String>) -> pb::Volume {
    let mut replicas = v.spec.replicas.clone();
    replicas.sort();
    csi_volume(v.metadata.name.as_deref().unwrap_or_default(), v.spec.size_bytes.max(0) as u64, &replicas, context)
}

impl ClusterController {
    /// A controller keeping its state in the API server behind `client`; the volumes'
    /// Leases live in `namespace`. Calls that wait for the node agents give up after `wait`.
    pub fn new(client: Client, namespace: &str, wait: Duration) -> Self {
        Self {
            volumes: Api::all(client.clone()),
            nodes: Api::all(client.clone()),
            sans: Api::all(client.clone()),
            leases: Api::namespaced(client, namespace),
            guards: VolumeGuards::new(),
            wait,
        }
    }

    async fn get_volume(&self, name: &str) -> CsiResult<Option<MirrorVolume>> {
        self.volumes.get_opt(name).await.map_err(|e| api_error(&format!("reading MirrorVolume {name}"), e))
    }

    async fn find(&self, name: &str) -> CsiResult<MirrorVolume> {
        self.get_volume(name).await?.ok_or_else(|| CsiError::NotFound(format!("volume {name} does not exist")))
    }

    /// The nodes of a VirtualSAN that can take a replica now: the agent is ready, its
    /// heartbeat is fresh, and it reports its pool's free space.
    async fn candidates(&self, san: Option<&str>) -> CsiResult<Vec<Candidate>> {
        let nodes = self.nodes.list(&ListParams::default()).await.map_err(|e| api_error("listing SANNodes", e))?;
        let now = Timestamp::now();
        let mut out = Vec::new();
        for n in nodes {
            if san.is_some_and(|s| n.spec.virtual_san != s) {
                continue;
            }
            let name = n.metadata.name.clone().unwrap_or_default();
            let Some(st) = &n.status else { continue };
            let ready = st
                .conditions
                .iter()
                .any(|c| c.type_ == peersan_crds::sannode::condition::READY && c.status == ConditionStatus::True);
            let Some(pool) = &st.pool else { continue };
            if !ready {
                continue;
            }
            let hb = lease::node_lease_name(&name).map_err(|e| CsiError::Internal(e.to_string()))?;
            match self.leases.get_opt(&hb).await {
                Ok(Some(l)) if heartbeat_fresh(&l, now) => {}
                Ok(_) => continue,
                Err(e) => return Err(api_error(&format!("reading Lease {hb}"), e)),
            }
            out.push(Candidate { name, free: pool.free_bytes.max(0) as u64 });
        }
        Ok(out)
    }

    /// Creates the volume's Lease (holder `holder`, epoch 1) unless it exists.
    async fn ensure_lease(&self, volume: &str, holder: &str) -> CsiResult<()> {
        let name = lease::volume_lease_name(volume).map_err(|e| CsiError::InvalidArgument(e.to_string()))?;
        let l = Lease {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                annotations: Some(BTreeMap::from([(EPOCH_ANNOTATION.to_owned(), lease::epoch_value(1))])),
                labels: Some(BTreeMap::from([("app.kubernetes.io/managed-by".to_owned(), FIELD_MANAGER.to_owned())])),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.to_owned()),
                acquire_time: Some(MicroTime(Timestamp::now())),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        match self.leases.create(&PostParams::default(), &l).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(api_error(&format!("creating Lease {name}"), e)),
        }
    }

    /// Gives `node` write priority for `volume`: the Lease's holder becomes `node` with an
    /// epoch newer than the Lease's and every epoch a replica reports. Returns the epoch in
    /// force for `node` (unchanged when it already holds the Lease). Conflicting writers of
    /// the Lease (the operator's failover) are resolved by the API server's resourceVersion:
    /// on a conflict the Lease is read again and the decision made again.
    async fn move_lease(&self, v: &MirrorVolume, node: &str) -> CsiResult<u64> {
        let volume = v.metadata.name.as_deref().unwrap_or_default();
        let name = lease::volume_lease_name(volume).map_err(|e| CsiError::InvalidArgument(e.to_string()))?;
        for _ in 0..10 {
            let mut l = match self.leases.get_opt(&name).await {
                Ok(Some(l)) => l,
                Ok(None) => {
                    self.ensure_lease(volume, node).await?;
                    continue;
                }
                Err(e) => return Err(api_error(&format!("reading Lease {name}"), e)),
            };
            let current = lease_epoch(&l)?;
            let spec = l.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() == Some(node) && current > 0 {
                return Ok(current);
            }
            let epoch = current.max(newest_reported_epoch(v)) + 1;
            spec.holder_identity = Some(node.to_owned());
            spec.acquire_time = Some(MicroTime(Timestamp::now()));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
            l.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(EPOCH_ANNOTATION.to_owned(), lease::epoch_value(epoch));
            match self.leases.replace(&name, &PostParams::default(), &l).await {
                Ok(_) => {
                    tracing::info!(volume, node, epoch, "write priority moved");
                    return Ok(epoch);
                }
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(api_error(&format!("updating Lease {name}"), e)),
            }
        }
        Err(CsiError::Aborted(format!("Lease {name} keeps changing under this update; retry")))
    }

    /// The holder and epoch of the volume's Lease as they are, for a publish that must not
    /// move it. A Lease without a holder or an epoch is FAILED_PRECONDITION, and a missing
    /// one UNAVAILABLE (the volume is being deleted): no writer arbitrates then.
    async fn current_priority(&self, volume: &str) -> CsiResult<(String, u64)> {
        let name = lease::volume_lease_name(volume).map_err(|e| CsiError::InvalidArgument(e.to_string()))?;
        let l = self
            .leases
            .get_opt(&name)
            .await
            .map_err(|e| api_error(&format!("reading Lease {name}"), e))?
            .ok_or_else(|| CsiError::Unavailable(format!("Lease {name} of volume {volume} does not exist")))?;
        let epoch = lease_epoch(&l)?;
        match l.spec.and_then(|s| s.holder_identity) {
            Some(holder) if epoch > 0 => Ok((holder, epoch)),
            _ => Err(CsiError::FailedPrecondition(format!(
                "Lease {name} of volume {volume} names no holder with an epoch, so no node arbitrates its writers"
            ))),
        }
    }

    /// Makes the volume's Lease owned by its MirrorVolume, so that the garbage collector
    /// removes a Lease left behind by a deletion cut short. Best effort: DeleteVolume deletes
    /// the Lease itself.
    async fn own_lease(&self, v: &MirrorVolume) {
        let (Some(name), Some(uid)) = (v.metadata.name.as_deref(), v.metadata.uid.as_deref()) else { return };
        let Ok(lease_name) = lease::volume_lease_name(name) else { return };
        let patch = json!({ "metadata": { "ownerReferences": [{
            "apiVersion": "peersan.io/v1alpha1", "kind": "MirrorVolume", "name": name, "uid": uid,
        }] } });
        if let Err(e) = self.leases.patch(&lease_name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            tracing::warn!(volume = name, error = %e, "cannot make the MirrorVolume own its Lease");
        }
    }

    async fn set_attached(&self, volume: &str, nodes: &[String]) -> CsiResult<()> {
        let patch = json!({
            "apiVersion": "peersan.io/v1alpha1",
            "kind": "MirrorVolume",
            "status": { "attachedNodes": nodes },
        });
        self.volumes
            .patch_status(volume, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
            .await
            .map(|_| ())
            .map_err(|e| api_error(&format!("recording the attachment of {volume}"), e))
    }

    /// Waits until `done` holds for the volume as the API server has it; UNAVAILABLE after
    /// `self.wait`, with `what` and the replicas' reports in the message.
    async fn wait_for(
        &self,
        volume: &str,
        what: &str,
        done: impl Fn(&MirrorVolume) -> bool,
    ) -> CsiResult<MirrorVolume> {
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            let v = self.find(volume).await?;
            if done(&v) {
                return Ok(v);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(CsiError::Unavailable(format!(
                    "volume {volume}: {what} has not happened within {:?} (replicas: {}); retry",
                    self.wait,
                    replica_summary(&v)
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

#[tonic::async_trait]
impl Controller for ClusterController {
    /// Creates a MirrorVolume named `name` on the VirtualSAN of the StorageClass parameter
    /// `virtualSAN` (required), with `replicas` replicas (default: the VirtualSAN's) on
    /// distinct ready nodes of that SAN that have room and satisfy the accessibility
    /// requirements, and its write-priority Lease; returns once every replica node reports
    /// its replica. Required: `name`, `volume_capabilities`. Idempotent: the same name with a
    /// compatible size and replica count returns the existing volume (waiting for its
    /// replicas); an incompatible one gets ALREADY_EXISTS. A content source gets
    /// INVALID_ARGUMENT, and so does MULTI_NODE_MULTI_WRITER (ReadWriteMany) unless the
    /// VirtualSAN's writePolicy is MultiWriter and the access is raw block. An unknown
    /// VirtualSAN gets FAILED_PRECONDITION; too little space or too few ready nodes
    /// RESOURCE_EXHAUSTED; replicas not reported in time UNAVAILABLE.
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        crate::log::request("CreateVolume", &r, true);
        let name = require("name", &r.name)?;
        crate::controller::check_volume_name(name)?;
        let caps = params::capabilities("volume_capabilities", &r.volume_capabilities)?;
        if r.volume_content_source.is_some() {
            return Err(CsiError::InvalidArgument(
                "volume_content_source: creating a volume from a snapshot or another volume is not supported".into(),
            )
            .into());
        }
        let p = VolumeParams::parse(&r.parameters)?;
        let Some(san_name) = p.virtual_san.clone() else {
            return Err(CsiError::InvalidArgument(format!(
                "parameter {} is required: the StorageClass must name the VirtualSAN (the operator's StorageClass for each VirtualSAN does)",
                params::PARAM_VIRTUAL_SAN
            ))
            .into());
        };
        let size = size_for(r.capacity_range.as_ref())?;
        let _guard = self.guards.try_lock(name, "CreateVolume")?;
        let mut context = p.volume_context();

        let v = match self.get_volume(name).await? {
            Some(v) => {
                let have = v.spec.size_bytes.max(0) as u64;
                let (req_b, lim_b) =
                    r.capacity_range.as_ref().map(|c| (c.required_bytes, c.limit_bytes)).unwrap_or((0, 0));
                let fits = have >= req_b.max(0) as u64 && (lim_b == 0 || have <= lim_b as u64);
                let explicit = r.parameters.contains_key(params::PARAM_REPLICAS);
                if !fits || v.spec.virtual_san != san_name || (explicit && v.spec.replicas.len() != p.replicas as usize)
                {
                    return Err(CsiError::AlreadyExists(format!(
                        "volume {name} exists with {have} bytes on {} replica(s) of VirtualSAN {}; the request asks for {size} bytes on VirtualSAN {san_name}",
                        v.spec.replicas.len(),
                        v.spec.virtual_san
                    ))
                    .into());
                }
                params::check_write_policy("volume_capabilities", &caps, v.spec.write_policy, &volume_source(&v))?;
                v
            }
            None => {
                let san = self
                    .sans
                    .get_opt(&san_name)
                    .await
                    .map_err(|e| api_error(&format!("reading VirtualSAN {san_name}"), e))?
                    .ok_or_else(|| CsiError::FailedPrecondition(format!("VirtualSAN {san_name} does not exist")))?;
                if san.metadata.deletion_timestamp.is_some() {
                    return Err(CsiError::FailedPrecondition(format!(
                        "VirtualSAN {san_name} is being deleted; no new volumes are created on it"
                    ))
                    .into());
                }
                params::check_write_policy(
                    "volume_capabilities",
                    &caps,
                    san.spec.write_policy,
                    &format!("VirtualSAN {san_name}"),
                )?;
                let n = if r.parameters.contains_key(params::PARAM_REPLICAS) {
                    p.replicas as usize
                } else {
                    san.spec.replicas.clamp(1, params::MAX_REPLICAS as i32) as usize
                };
                let candidates = self.candidates(Some(&san_name)).await?;
                let chosen = place(&candidates, n, size, r.accessibility_requirements.as_ref())?;
                self.ensure_lease(name, &chosen[0]).await?;
                let v = MirrorVolume::new(
                    name,
                    MirrorVolumeSpec {
                        virtual_san: san_name.clone(),
                        size_bytes: size as i64,
                        replicas: chosen.clone(),
                        write_policy: san.spec.write_policy,
                    },
                );
                match self.volumes.create(&PostParams::default(), &v).await {
                    Ok(v) => {
                        tracing::info!(volume = name, size, replicas = ?chosen, san = %san_name, "volume created");
                        self.own_lease(&v).await;
                        v
                    }
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        return Err(CsiError::Aborted(format!("volume {name} was created concurrently; retry")).into());
                    }
                    Err(e) => return Err(api_error(&format!("creating MirrorVolume {name}"), e).into()),
                }
            }
        };
        let want = v.spec.size_bytes.max(0) as u64;
        let replicas = v.spec.replicas.clone();
        let v = self
            .wait_for(name, "the creation of every replica", |v| {
                replicas.iter().all(|n| reported_size(v, n).is_some_and(|s| s >= want))
            })
            .await?;
        context.insert(params::PARAM_REPLICAS.to_owned(), v.spec.replicas.len().to_string());
        Ok(Response::new(pb::CreateVolumeResponse { volume: Some(csi_of(&v, context)) }))
    }

    /// Deletes the MirrorVolume and its Lease; each node agent then deletes its replica (a
    /// node that is down does so when it comes back). Required: `volume_id`. Idempotent: a
    /// volume that does not exist succeeds. A volume still attached to a node gets
    /// FAILED_PRECONDITION.
    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        crate::log::request("DeleteVolume", &r, true);
        let name = require("volume_id", &r.volume_id)?;
        let _guard = self.guards.try_lock(name, "DeleteVolume")?;
        if let Some(v) = self.get_volume(name).await? {
            let on = attached(&v);
            if !on.is_empty() {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {name} is published on node {}; unpublish it first",
                    on.join(", ")
                ))
                .into());
            }
            match self.volumes.delete(name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(api_error(&format!("deleting MirrorVolume {name}"), e).into()),
            }
        }
        if let Ok(l) = lease::volume_lease_name(name) {
            match self.leases.delete(&l, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(api_error(&format!("deleting Lease {l}"), e).into()),
            }
        }
        tracing::info!(volume = name, "volume deleted");
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    /// Attaches a volume to `node_id`. Required: `volume_id`, `node_id`,
    /// `volume_capability`. Idempotent for a node it is attached to.
    ///
    /// The first node gets write priority: the volume's Lease moves to it with a new fencing
    /// epoch, and the call returns once the node's agent runs under that epoch (from then on
    /// the replicas refuse writes of the previous holder).
    ///
    /// A volume attached elsewhere is attached here too only when it is multi-writer
    /// (writePolicy MultiWriter) and the capability is MULTI_NODE_MULTI_WRITER with raw block
    /// access: the live migration of a virtual machine (published on the target, both write
    /// for a while, unpublished on the source) and clustered filesystems. The Lease stays
    /// where it is: its holder arbitrates the writers' regions, and a new epoch would void
    /// every grant and fail the writes the other nodes have in flight. The call returns once
    /// the node's agent runs under the Lease's epoch. Otherwise FAILED_PRECONDITION, naming
    /// the rule that refused it.
    ///
    /// A node without a replica gets FAILED_PRECONDITION (the volume is accessible only on
    /// its replica nodes); an unknown volume NOT_FOUND; an agent that does not take the epoch
    /// in time UNAVAILABLE.
    async fn controller_publish_volume(
        &self,
        req: Request<pb::ControllerPublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerPublishVolumeResponse>, Status> {
        let r = req.into_inner();
        crate::log::request("ControllerPublishVolume", &r, true);
        let name = require("volume_id", &r.volume_id)?;
        let node = require("node_id", &r.node_id)?;
        let cap = params::capability("volume_capability", require_some("volume_capability", &r.volume_capability)?)?;
        let _guard = self.guards.try_lock(name, "ControllerPublishVolume")?;
        let v = self.find(name).await?;
        if !v.spec.replicas.iter().any(|n| n == node) {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {name} has no replica on node {node} (replicas: {}); it is accessible only there",
                v.spec.replicas.join(", ")
            ))
            .into());
        }
        let on = attached(&v);
        let others: Vec<&str> = on.iter().map(String::as_str).filter(|n| *n != node).collect();
        if !others.is_empty()
            && let Some(why) = multi_node_refusal(&v, &cap)
        {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {name} is published on node {}; {why}",
                others.join(", ")
            ))
            .into());
        }
        if !on.iter().any(|n| n == node) {
            let mut nodes = on.clone();
            nodes.push(node.to_owned());
            self.set_attached(name, &nodes).await?;
        }
        let (epoch, what) = if others.is_empty() {
            let epoch = self.move_lease(&v, node).await?;
            (epoch, format!("node {node} taking write priority at epoch {epoch}"))
        } else {
            let (holder, epoch) = self.current_priority(name).await?;
            (epoch, format!("node {node} running under epoch {epoch} (write priority stays with {holder})"))
        };
        let sole = others.is_empty();
        let v = self
            .wait_for(name, &what, |v| {
                v.status.as_ref().and_then(|s| s.replicas.iter().find(|r| r.node == node)).is_some_and(|r| {
                    r.epoch.is_some_and(|e| e.max(0) as u64 >= epoch)
                        && (!sole || r.writer.as_deref() == Some(node))
                        && r.state != ReplicaState::SplitBrain
                })
            })
            .await?;
        tracing::info!(
            volume = name,
            node,
            epoch,
            also_on = ?others,
            readonly = r.readonly || cap.read_only_mode(),
            health = ?v.status.as_ref().and_then(|s| s.health),
            "published"
        );
        let publish_context =
            HashMap::from([("node".to_owned(), node.to_owned()), ("epoch".to_owned(), epoch.to_string())]);
        Ok(Response::new(pb::ControllerPublishVolumeResponse { publish_context }))
    }

    /// Detaches a volume from `node_id` (from every node when it is empty). Required:
    /// `volume_id`. Idempotent: a volume not attached there, or that does not exist,
    /// succeeds (it can be regarded as unpublished, as the spec allows).
    ///
    /// Write priority never moves here. A single-writer volume keeps it on the node until
    /// another is published; the epoch fences it then. A multi-writer volume whose Lease
    /// holder is unpublished while other nodes stay attached (the end of a live migration)
    /// keeps its Lease there as well: the holder's agent is the arbiter that grants the
    /// writers their regions, and it keeps doing so without a pod of its own (its agent runs
    /// and its replica is in sync). Moving the Lease would raise the epoch, which voids every
    /// grant and fails the writes the remaining nodes have in flight, the pause that live
    /// migration must not have. If the holder's node dies, the operator's failover moves the
    /// Lease to an in-sync replica on a live node; once no node is attached, the next
    /// publish moves it to its node.
    async fn controller_unpublish_volume(
        &self,
        req: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        crate::log::request("ControllerUnpublishVolume", &r, true);
        let name = require("volume_id", &r.volume_id)?;
        let _guard = self.guards.try_lock(name, "ControllerUnpublishVolume")?;
        let Some(v) = self.get_volume(name).await? else {
            return Ok(Response::new(pb::ControllerUnpublishVolumeResponse {}));
        };
        let on = attached(&v);
        let left: Vec<String> =
            if r.node_id.is_empty() { vec![] } else { on.iter().filter(|n| **n != r.node_id).cloned().collect() };
        if left.len() != on.len() {
            self.set_attached(name, &left).await?;
            tracing::info!(volume = name, node = %r.node_id, "unpublished");
        }
        Ok(Response::new(pb::ControllerUnpublishVolumeResponse {}))
    }

    /// Confirms the capabilities when peersan supports all of them for this volume
    /// (MULTI_NODE_MULTI_WRITER: raw block access to a MultiWriter volume); else an empty
    /// `confirmed` with a message. Required: `volume_id`, `volume_capabilities`. An unknown
    /// volume gets NOT_FOUND.
    async fn validate_volume_capabilities(
        &self,
        req: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        crate::log::request("ValidateVolumeCapabilities", &r, false);
        let name = require("volume_id", &r.volume_id)?;
        if r.volume_capabilities.is_empty() {
            return Err(CsiError::InvalidArgument("volume_capabilities is required".into()).into());
        }
        let v = self.find(name).await?;
        let source = volume_source(&v);
        Ok(Response::new(crate::controller::validated(r, |caps| {
            params::check_write_policy("volume_capabilities", caps, v.spec.write_policy, &source)
        })))
    }

    /// Lists the MirrorVolumes in name order with the nodes each is published on and its
    /// health. `starting_token` is the `next_token` of an earlier page; any other token gets
    /// ABORTED.
    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let r = req.into_inner();
        crate::log::request("ListVolumes", &r, false);
        if r.max_entries < 0 {
            return Err(CsiError::InvalidArgument("max_entries must not be negative".into()).into());
        }
        let mut all: Vec<MirrorVolume> =
            self.volumes.list(&ListParams::default()).await.map_err(|e| api_error("listing MirrorVolumes", e))?.items;
        all.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        let entries = all
            .iter()
            .map(|v| pb::list_volumes_response::Entry {
                volume: Some(csi_of(v, volume_context(v))),
                status: Some(pb::list_volumes_response::VolumeStatus {
                    published_node_ids: attached(v),
                    volume_condition: Some(volume_condition(v)),
                }),
            })
            .collect();
        let (entries, next_token) = crate::controller::page(entries, &r.starting_token, r.max_entries)?;
        Ok(Response::new(pb::ListVolumesResponse { entries, next_token }))
    }

    /// The largest volume that can be created now with the given parameters (VirtualSAN,
    /// replica count) and, when given, on the node named by `accessible_topology`: the
    /// `replicas`-th largest free space among the SAN's ready nodes.
    async fn get_capacity(
        &self,
        req: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        let r = req.into_inner();
        crate::log::request("GetCapacity", &r, false);
        if !r.volume_capabilities.is_empty() {
            params::capabilities("volume_capabilities", &r.volume_capabilities)?;
        }
        let p = VolumeParams::parse(&r.parameters)?;
        let free: Vec<(String, u64)> =
            self.candidates(p.virtual_san.as_deref()).await?.into_iter().map(|c| (c.name, c.free)).collect();
        let available = crate::controller::capacity(free, p.replicas as usize, r.accessible_topology.as_ref());
        Ok(Response::new(pb::GetCapacityResponse {
            available_capacity: available as i64,
            maximum_volume_size: Some(available as i64),
            minimum_volume_size: Some(SIZE_ALIGN as i64),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(crate::controller::capabilities()))
    }

    /// Grows the volume to the requested size (whole MiB), online: the MirrorVolume's size
    /// grows and each node agent grows its replica; returns once every replica reports the
    /// new size. Required: `volume_id`, `capacity_range`. Idempotent: a volume already that
    /// large returns its size. Volumes never shrink (a limit under the current size gets
    /// OUT_OF_RANGE). The node then grows its block device and filesystem
    /// (NodeExpandVolume).
    async fn controller_expand_volume(
        &self,
        req: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Result<Response<pb::ControllerExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        crate::log::request("ControllerExpandVolume", &r, true);
        let name = require("volume_id", &r.volume_id)?;
        let range = require_some("capacity_range", &r.capacity_range)?;
        if let Some(c) = &r.volume_capability {
            params::capability("volume_capability", c)?;
        }
        let size = size_for(Some(range))?;
        let _guard = self.guards.try_lock(name, "ControllerExpandVolume")?;
        let v = self.find(name).await?;
        let current = v.spec.size_bytes.max(0) as u64;
        if range.limit_bytes > 0 && current > range.limit_bytes as u64 {
            return Err(CsiError::OutOfRange(format!(
                "volume {name} already has {current} bytes, more than limit_bytes {}; volumes do not shrink",
                range.limit_bytes
            ))
            .into());
        }
        let target = size.max(current);
        if target > current {
            let patch = json!({ "spec": { "sizeBytes": target } });
            self.volumes
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| api_error(&format!("growing MirrorVolume {name}"), e))?;
        }
        let replicas = v.spec.replicas.clone();
        self.wait_for(name, &format!("every replica growing to {target} bytes"), |v| {
            replicas.iter().all(|n| reported_size(v, n).is_some_and(|s| s >= target))
        })
        .await?;
        tracing::info!(volume = name, from = current, to = target, "volume expanded");
        Ok(Response::new(pb::ControllerExpandVolumeResponse {
            capacity_bytes: target as i64,
            node_expansion_required: true,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use peersan_crds::{MirrorVolumeStatus, ReplicaStatus};

    fn heartbeat(renewed: i64, secs: i32) -> Lease {
        Lease {
            metadata: Default::default(),
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
                lease_duration_seconds: Some(secs),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn heartbeats_expire_after_their_duration() {
        let now = Timestamp::from_second(1_000).unwrap();
        assert!(heartbeat(990, 10,).spec.is_some());
        assert!(heartbeat_fresh(&heartbeat(990, 10), now));
        assert!(!heartbeat_fresh(&heartbeat(989, 10), now));
        assert!(!heartbeat_fresh(&Lease::default(), now));
    }

    fn volume(entries: &[(&str, i64, Option<i64>)]) -> MirrorVolume {
        let mut v = MirrorVolume::new(
            "pvc-1",
            MirrorVolumeSpec {
                virtual_san: "san".into(),
                size_bytes: 1 << 20,
                replicas: vec!["a".into(), "b".into(), "c".into()],
                write_policy: WritePolicy::SingleWriter,
            },
        );
        v.status = Some(MirrorVolumeStatus {
            replicas: entries
                .iter()
                .map(|(n, epoch, size)| ReplicaStatus {
                    node: (*n).into(),
                    state: ReplicaState::InSync,
                    out_of_sync_bytes: None,
                    resync_done_bytes: None,
                    resync_total_bytes: None,
                    size_bytes: *size,
                    epoch: Some(*epoch),
                    writer: Some("a".into()),
                    detail: None,
                })
                .collect(),
            ..Default::default()
        });
        v
    }

    #[test]
    fn epochs_and_sizes_from_the_replicas() {
        let v = volume(&[("a", 3, Some(1 << 20)), ("b", 5, None)]);
        assert_eq!(newest_reported_epoch(&v), 5);
        assert_eq!(reported_size(&v, "a"), Some(1 << 20));
        assert_eq!(reported_size(&v, "b"), None);
        assert_eq!(reported_size(&v, "c"), None);
        let s = replica_summary(&v);
        assert!(s.contains("a: in-sync") && s.contains("c: not reported"), "{s}");
        assert!(volume_condition(&v).abnormal, "no health reported is not normal");
    }

    #[test]
    fn several_nodes_only_for_multi_writer_block_volumes() {
        use crate::pb::volume_capability::access_mode::Mode;
        let cap = |access, mode| Capability { access, mode };
        let rwx_block = cap(Access::Block, Mode::MultiNodeMultiWriter);
        let mut v = volume(&[]);
        let why = multi_node_refusal(&v, &rwx_block).expect("a single-writer volume is refused");
        assert!(why.contains("single-writer") && why.contains("SingleWriter of VirtualSAN san"), "{why}");
        v.spec.write_policy = WritePolicy::MultiWriter;
        assert_eq!(multi_node_refusal(&v, &rwx_block), None);
        let why = multi_node_refusal(&v, &cap(Access::Block, Mode::SingleNodeWriter)).unwrap();
        assert!(why.contains("SINGLE_NODE_WRITER is for one node"), "{why}");
        let mount = Access::Mount { fs_type: "ext4".into(), mount_flags: vec![] };
        let why = multi_node_refusal(&v, &cap(mount, Mode::MultiNodeMultiWriter)).unwrap();
        assert!(why.contains("volumeMode: Block"), "{why}");
    }
}
