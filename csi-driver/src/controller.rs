//! The CSI Controller service (binary `peersan-csi-controller`).
//!
//! Where volume state lives: until the control plane keeps a per-volume resource in the
//! API server, the node agents are the store. Each node holding a replica records the
//! volume (size, replica nodes) and its attachment (the node it is published on, with a
//! sequence number; the highest sequence among the replicas wins). The controller keeps
//! nothing itself, so it can be restarted or moved at any time; it finds a volume by asking
//! every configured node agent.
//!
//! Publishing a volume to a node records the attachment on every reachable replica node
//! and then gives that node write priority (the agent's Promote: a new fencing epoch, so
//! that writes from the previous holder are refused by the replicas). Volumes are
//! single-writer in this mode: multi-writer volumes (MULTI_NODE_MULTI_WRITER, published on
//! several nodes at once) need the control plane (`--kubernetes`, `cluster.rs`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use futures::future::join_all;
use serde::Deserialize;
use tonic::{Code, Request, Response, Status};

use crate::agent::{self, AgentClient, pb as apb};
use crate::error::{CsiError, CsiResult, require, require_some};
use crate::limiter::VolumeGuards;
use crate::params::{self, VolumeParams};
use crate::pb;
use crate::pb::controller_server::Controller;

/// Size of a volume whose request names no capacity.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Volume sizes are multiples of this.
pub const SIZE_ALIGN: u64 = 1 << 20;

/// A node agent the controller drives.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeEndpoint {
    /// The node's name (its CSI node id).
    pub name: String,
    /// The agent's API socket.
    pub api: PathBuf,
}

/// The controller's node list (`--nodes FILE`):
///
/// ```yaml
/// nodes:
///   - { name: node-a, api: /run/peersan/node-a/api.sock }
///   - { name: node-b, api: /run/peersan/node-b/api.sock }
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodesFile {
    pub nodes: Vec<NodeEndpoint>,
}

impl NodesFile {
    /// Checks that there is at least one node, names are unique and sockets absolute.
    pub fn validate(&self) -> Result<(), String> {
        if self.nodes.is_empty() {
            return Err("nodes: at least one node is required".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if n.name.is_empty() {
                return Err(format!("nodes[{i}].name is required"));
            }
            if !seen.insert(&n.name) {
                return Err(format!("nodes[{i}].name: {:?} is listed twice", n.name));
            }
            if !n.api.is_absolute() {
                return Err(format!("nodes[{i}].api: {} is not an absolute path", n.api.display()));
            }
        }
        Ok(())
    }
}

pub struct ControllerService {
    nodes: Arc<Vec<NodeEndpoint>>,
    guards: VolumeGuards,
}

/// What the node agents say about one volume.
#[derive(Debug, Default)]
struct Lookup {
    /// Each reachable node that holds a replica, with its view of the volume.
    views: Vec<(String, apb::Volume)>,
    /// Nodes whose agent did not answer.
    unreachable: Vec<String>,
}

impl Lookup {
    fn exists(&self) -> bool {
        !self.views.is_empty()
    }

    /// The volume's replica nodes.
    fn replicas(&self) -> Vec<String> {
        let mut r: Vec<String> =
            self.views.first().map(|(_, v)| v.replicas.iter().map(|r| r.node.clone()).collect()).unwrap_or_default();
        r.sort();
        r
    }

    fn size(&self) -> u64 {
        self.views.iter().map(|(_, v)| v.size_bytes).max().unwrap_or(0)
    }

    /// The attachment record in force: the one with the highest sequence number.
    fn attachment(&self) -> (String, u64) {
        self.views
            .iter()
            .max_by_key(|(_, v)| v.attachment_seq)
            .map(|(_, v)| (v.attached_node.clone(), v.attachment_seq))
            .unwrap_or_default()
    }
}

fn topology(node: &str) -> pb::Topology {
    pb::Topology { segments: HashMap::from([(crate::TOPOLOGY_NODE_KEY.to_owned(), node.to_owned())]) }
}

/// The node a topology segment names, if it names one.
fn topology_node(t: &pb::Topology) -> Option<&str> {
    t.segments.get(crate::TOPOLOGY_NODE_KEY).map(String::as_str)
}

pub(crate) fn csi_volume(name: &str, size: u64, replicas: &[String], context: HashMap<String, String>) -> pb::Volume {
    pb::Volume {
        capacity_bytes: size as i64,
        volume_id: name.to_owned(),
        volume_context: context,
        content_source: None,
        accessible_topology: replicas.iter().map(|n| topology(n)).collect(),
    }
}

/// The size to create for a capacity range: `required` rounded up to whole MiB (or the
/// default when none is asked), checked against `limit`.
pub fn size_for(range: Option<&pb::CapacityRange>) -> CsiResult<u64> {
    let (required, limit) = range.map(|r| (r.required_bytes, r.limit_bytes)).unwrap_or((0, 0));
    if required < 0 || limit < 0 {
        return Err(CsiError::OutOfRange("capacity_range: sizes must not be negative".into()));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit != 0 && required > limit {
        return Err(CsiError::OutOfRange(format!(
            "capacity_range: required_bytes {required} is larger than limit_bytes {limit}"
        )));
    }
    let want = if required == 0 { if limit != 0 { limit.min(DEFAULT_SIZE) } else { DEFAULT_SIZE } } else { required };
    let size = want.div_ceil(SIZE_ALIGN) * SIZE_ALIGN;
    if limit != 0 && size > limit {
        // The limit is not a whole MiB: the largest whole MiB under it.
        let down = limit / SIZE_ALIGN * SIZE_ALIGN;
        if down >= required.max(1) && down > 0 {
            return Ok(down);
        }
        return Err(CsiError::OutOfRange(format!(
            "capacity_range: no size in whole MiB lies between {required} and {limit} bytes"
        )));
    }
    Ok(size)
}

/// A node that may take a replica, with the space its pool has left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub free: u64,
}

/// Chooses `n` distinct nodes for a volume of `size` bytes. Requisite topologies bound the
/// choice as the spec says (all of them when `n` is at least their number, else `n` of
/// them); preferred topologies come first in their order; then the nodes with the most free
/// space (ties by name, so the choice is deterministic).
pub fn place(
    candidates: &[Candidate],
    n: usize,
    size: u64,
    req: Option<&pb::TopologyRequirement>,
) -> CsiResult<Vec<String>> {
    let requisite: Vec<&str> = req.map(|r| r.requisite.iter().filter_map(topology_node).collect()).unwrap_or_default();
    let preferred: Vec<&str> = req.map(|r| r.preferred.iter().filter_map(topology_node).collect()).unwrap_or_default();
    let fits = |c: &&Candidate| c.free >= size;
    let mut by_space: Vec<&Candidate> = candidates.iter().filter(fits).collect();
    by_space.sort_by(|a, b| b.free.cmp(&a.free).then(a.name.cmp(&b.name)));
    let rank = |name: &str| preferred.iter().position(|p| *p == name).unwrap_or(usize::MAX);
    let mut ordered = by_space.clone();
    ordered.sort_by_key(|c| rank(&c.name)); // stable: space order within equal rank
    let short = |why: String| {
        let have: Vec<String> = candidates.iter().map(|c| format!("{} ({} MiB free)", c.name, c.free >> 20)).collect();
        CsiError::ResourceExhausted(format!(
            "cannot place {n} replicas of {} MiB: {why}; nodes: {}",
            size >> 20,
            if have.is_empty() { "none reachable".into() } else { have.join(", ") }
        ))
    };
    let mut chosen: Vec<String> = Vec::new();
    if !requisite.is_empty() && n >= requisite.len() {
        for r in &requisite {
            if !ordered.iter().any(|c| c.name == *r) {
                return Err(short(format!("required node {r} is unreachable or lacks space")));
            }
            if !chosen.iter().any(|c| c == r) {
                chosen.push((*r).to_owned());
            }
        }
    }
    let from_requisite_only = !requisite.is_empty() && n < requisite.len();
    for c in &ordered {
        if chosen.len() == n {
            break;
        }
        if from_requisite_only && !requisite.contains(&c.name.as_str()) {
            continue;
        }
        if !chosen.contains(&c.name) {
            chosen.push(c.name.clone());
        }
    }
    if chosen.len() < n {
        return Err(short(format!("only {} suitable node(s)", chosen.len())));
    }
    Ok(chosen)
}

impl ControllerService {
    pub fn new(nodes: Vec<NodeEndpoint>) -> Self {
        Self { nodes: Arc::new(nodes), guards: VolumeGuards::new() }
    }

    fn endpoint(&self, node: &str) -> Option<&NodeEndpoint> {
        self.nodes.iter().find(|n| n.name == node)
    }

    async fn client(&self, node: &str) -> CsiResult<AgentClient> {
        let ep = self
            .endpoint(node)
            .ok_or_else(|| CsiError::NotFound(format!("node {node} is not one of this controller's nodes")))?;
        agent::connect(&ep.name, &ep.api).await
    }

    /// Every node's answer to GetNode, in configuration order.
    async fn nodes_info(&self) -> Vec<(String, CsiResult<apb::Node>)> {
        join_all(self.nodes.iter().map(|n| async move {
            let r = async {
                let mut c = agent::connect(&n.name, &n.api).await?;
                c.get_node(agent::request(apb::GetNodeRequest {}))
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| CsiError::from_agent(&format!("GetNode on {}", n.name), &s))
            }
            .await;
            (n.name.clone(), r)
        }))
        .await
    }

    /// Asks every node about `volume`.
    async fn lookup(&self, volume: &str) -> Lookup {
        let answers = join_all(self.nodes.iter().map(|n| async move {
            let r = async {
                let mut c = agent::connect(&n.name, &n.api).await?;
                match c.get_volume(agent::request(apb::GetVolumeRequest { name: volume.to_owned() })).await {
                    Ok(v) => Ok(Some(v.into_inner())),
                    Err(s) if s.code() == Code::NotFound => Ok(None),
                    Err(s) => Err(CsiError::from_agent(&format!("GetVolume on {}", n.name), &s)),
                }
            }
            .await;
            (n.name.clone(), r)
        }))
        .await;
        let mut l = Lookup::default();
        for (node, r) in answers {
            match r {
                Ok(Some(v)) => l.views.push((node, v)),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(node = %node, error = %e, "node agent unreachable");
                    l.unreachable.push(node);
                }
            }
        }
        l
    }

    /// The volume, or NOT_FOUND; UNAVAILABLE when it is not found but some nodes did not
    /// answer (it may live there).
    async fn find(&self, volume: &str) -> CsiResult<Lookup> {
        let l = self.lookup(volume).await;
        if l.exists() {
            return Ok(l);
        }
        if !l.unreachable.is_empty() {
            return Err(CsiError::Unavailable(format!(
                "volume {volume} was not found on the reachable nodes, and nodes {} did not answer",
                l.unreachable.join(", ")
            )));
        }
        Err(CsiError::NotFound(format!("volume {volume} does not exist")))
    }

    /// Writes an attachment record on every reachable replica node; `must` names nodes on
    /// which it has to succeed.
    async fn set_attachment(&self, volume: &str, l: &Lookup, node: &str, seq: u64, must: &[&str]) -> CsiResult<()> {
        let results = join_all(l.views.iter().map(|(n, _)| async move {
            let r = async {
                let mut c = self.client(n).await?;
                c.set_attachment(agent::request(apb::SetAttachmentRequest {
                    name: volume.to_owned(),
                    node: node.to_owned(),
                    seq,
                }))
                .await
                .map_err(|s| CsiError::from_agent(&format!("SetAttachment on {n}"), &s))
            }
            .await;
            (n.clone(), r)
        }))
        .await;
        let mut written = 0;
        for (n, r) in results {
            match r {
                Ok(_) => written += 1,
                Err(e) if must.contains(&n.as_str()) => return Err(e),
                Err(e) if e.code() == Code::Aborted => return Err(e),
                Err(e) => {
                    tracing::warn!(volume, node = %n, error = %e, "attachment record not written on a replica node")
                }
            }
        }
        if written == 0 {
            return Err(CsiError::Unavailable(format!("volume {volume}: no replica node recorded the attachment")));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    /// Creates a volume named `name` with replicas on distinct nodes (StorageClass parameter
    /// `replicas`, default 2) that have room and satisfy the accessibility requirements.
    /// Required: `name`, `volume_capabilities`. Idempotent: the same name with a compatible
    /// size and replica count returns the existing volume; an incompatible one gets
    /// ALREADY_EXISTS. A content source gets INVALID_ARGUMENT (snapshots and clones are not
    /// supported), and so does MULTI_NODE_MULTI_WRITER (volumes created here are
    /// single-writer; multi-writer volumes need `--kubernetes`). Too little space:
    /// RESOURCE_EXHAUSTED; a size outside the range: OUT_OF_RANGE.
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        crate::log::request("CreateVolume", &r, true);
        let name = require("name", &r.name)?;
        check_volume_name(name)?;
        single_writer_only(
            "volume_capabilities",
            &params::capabilities("volume_capabilities", &r.volume_capabilities)?,
        )?;
        if r.volume_content_source.is_some() {
            return Err(CsiError::InvalidArgument(
                "volume_content_source: creating a volume from a snapshot or another volume is not supported".into(),
            )
            .into());
        }
        let p = VolumeParams::parse(&r.parameters)?;
        let size = size_for(r.capacity_range.as_ref())?;
        let _guard = self.guards.try_lock(name, "CreateVolume")?;

        let existing = self.lookup(name).await;
        if existing.exists() {
            let have = existing.size();
            let replicas = existing.replicas();
            let (req_b, lim_b) = r.capacity_range.as_ref().map(|c| (c.required_bytes, c.limit_bytes)).unwrap_or((0, 0));
            let fits = have >= req_b.max(0) as u64 && (lim_b == 0 || have <= lim_b as u64);
            if !fits || replicas.len() != p.replicas as usize {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {name} exists with {have} bytes on {} replica(s); the request asks for {size} bytes on {}",
                    replicas.len(),
                    p.replicas
                ))
                .into());
            }
            // An earlier attempt may have stopped with some replicas missing (a peer
            // without room, or down): complete it, through a node that has the volume.
            let missing: Vec<&String> =
                replicas.iter().filter(|n| !existing.views.iter().any(|(v, _)| v == *n)).collect();
            if !missing.is_empty() {
                let (via, _) = &existing.views[0];
                tracing::info!(volume = name, ?missing, via = %via, "completing a partly created volume");
                let mut c = self.client(via).await?;
                c.create_volume(agent::request(apb::CreateVolumeRequest {
                    name: name.to_owned(),
                    size_bytes: have,
                    replicas: replicas.clone(),
                }))
                .await
                .map_err(|s| match CsiError::from_agent(&format!("CreateVolume on {via}"), &s) {
                    CsiError::OutOfRange(m) => CsiError::ResourceExhausted(m),
                    e => e,
                })?;
            }
            return Ok(Response::new(pb::CreateVolumeResponse {
                volume: Some(csi_volume(name, have, &replicas, p.volume_context())),
            }));
        }
        if !existing.unreachable.is_empty() {
            // The volume might exist on a node that does not answer; creating it elsewhere
            // would make two volumes of one name.
            return Err(CsiError::Unavailable(format!(
                "cannot tell whether volume {name} exists: nodes {} did not answer",
                existing.unreachable.join(", ")
            ))
            .into());
        }

        let candidates: Vec<Candidate> = self
            .nodes_info()
            .await
            .into_iter()
            .filter_map(|(n, r)| r.ok().map(|i| Candidate { name: n, free: i.free_bytes }))
            .collect();
        let chosen = place(&candidates, p.replicas as usize, size, r.accessibility_requirements.as_ref())?;
        let first = &chosen[0];
        let mut c = self.client(first).await?;
        let v = c
            .create_volume(agent::request(apb::CreateVolumeRequest {
                name: name.to_owned(),
                size_bytes: size,
                replicas: chosen.clone(),
            }))
            .await
            .map_err(|s| match CsiError::from_agent(&format!("CreateVolume on {first}"), &s) {
                // A pool without room is the caller's "insufficient capacity".
                CsiError::OutOfRange(m) => CsiError::ResourceExhausted(m),
                e => e,
            })?
            .into_inner();
        tracing::info!(volume = name, size, replicas = ?chosen, "volume created");
        let mut replicas: Vec<String> = v.replicas.iter().map(|r| r.node.clone()).collect();
        replicas.sort();
        Ok(Response::new(pb::CreateVolumeResponse {
            volume: Some(csi_volume(name, v.size_bytes, &replicas, p.volume_context())),
        }))
    }

    /// Deletes a volume and every replica. Required: `volume_id`. Idempotent: a volume that
    /// does not exist (on any node, all nodes answering) succeeds. A volume still attached
    /// to a node gets FAILED_PRECONDITION; a replica node that does not answer gets
    /// UNAVAILABLE (the caller retries; nothing is left half-deleted silently).
    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        crate::log::request("DeleteVolume", &r, true);
        let name = require("volume_id", &r.volume_id)?;
        let _guard = self.guards.try_lock(name, "DeleteVolume")?;
        let l = match self.find(name).await {
            Ok(l) => l,
            Err(CsiError::NotFound(_)) => return Ok(Response::new(pb::DeleteVolumeResponse {})),
            Err(e) => return Err(e.into()),
        };
        let (attached, _) = l.attachment();
        if !attached.is_empty() {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {name} is published on node {attached}; unpublish it first"
            ))
            .into());
        }
        let (node, _) = &l.views[0];
        let mut c = self.client(node).await?;
        match c.delete_volume(agent::request(apb::DeleteVolumeRequest { name: name.to_owned() })).await {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(CsiError::from_agent(&format!("DeleteVolume on {node}"), &s).into()),
        }
        // Replicas on nodes that did not take part (the agent deletes its peers' replicas;
        // this catches a peer that was down then and answers now).
        let left = self.lookup(name).await;
        for (n, _) in &left.views {
            let mut c = self.client(n).await?;
            if let Err(s) = c.delete_volume(agent::request(apb::DeleteVolumeRequest { name: name.to_owned() })).await
                && s.code() != Code::NotFound
            {
                return Err(CsiError::from_agent(&format!("DeleteVolume on {n}"), &s).into());
            }
        }
        tracing::info!(volume = name, "volume deleted");
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    /// Attaches a volume to `node_id` and gives that node write priority (a new fencing
    /// epoch: writes from the previous holder are refused from then on). Required:
    /// `volume_id`, `node_id`, `volume_capability`. Idempotent for the node it is attached
    /// to. A volume attached to another node gets FAILED_PRECONDITION (single writer); a
    /// node that holds no replica gets FAILED_PRECONDITION (the volume is accessible only
    /// on its replica nodes); an unknown volume or node NOT_FOUND; MULTI_NODE_MULTI_WRITER
    /// INVALID_ARGUMENT (volumes of this mode are single-writer).
    async fn controller_publish_volume(
        &self,
        req: Request<pb::ControllerPublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerPublishVolumeResponse>, Status> {
        let r = req.into_inner();
        crate::log::request("ControllerPublishVolume", &r, true);
        let name = require("volume_id", &r.volume_id)?;
        let node = require("node_id", &r.node_id)?;
        let cap = params::capability("volume_capability", require_some("volume_capability", &r.volume_capability)?)?;
        if cap.multi_writer() {
            return Err(multi_writer_refused("volume_capability").into());
        }
        if self.endpoint(node).is_none() {
            return Err(CsiError::NotFound(format!("node {node} is not one of this controller's nodes")).into());
        }
        let _guard = self.guards.try_lock(name, "ControllerPublishVolume")?;
        let l = self.find(name).await?;
        if !l.replicas().iter().any(|n| n == node) {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {name} has no replica on node {node} (replicas: {}); it is accessible only there",
                l.replicas().join(", ")
            ))
            .into());
        }
        let (attached, seq) = l.attachment();
        if !attached.is_empty() && attached != node {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {name} is published on node {attached}; a single-writer volume is published on one node at a time"
            ))
            .into());
        }
        if attached.is_empty() {
            self.set_attachment(name, &l, node, seq + 1, &[node]).await?;
        }
        let mut c = self.client(node).await?;
        let v = c
            .promote(agent::request(apb::PromoteRequest { name: name.to_owned() }))
            .await
            .map_err(|s| CsiError::from_agent(&format!("Promote on {node}"), &s))?
            .into_inner();
        tracing::info!(
            volume = name,
            node,
            epoch = v.epoch,
            readonly = r.readonly || cap.read_only_mode(),
            "published"
        );
        let publish_context =
            HashMap::from([("node".to_owned(), node.to_owned()), ("epoch".to_owned(), v.epoch.to_string())]);
        Ok(Response::new(pb::ControllerPublishVolumeResponse { publish_context }))
    }

    /// Detaches a volume from `node_id` (from every node when it is empty). Required:
    /// `volume_id`. Idempotent: a volume not attached to that node succeeds. Write priority
    /// stays with the node until another is published; its epoch fences it then. A volume
    /// that does not exist gets NOT_FOUND.
    async fn controller_unpublish_volume(
        &self,
        req: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        crate::log::request("ControllerUnpublishVolume", &r, true);
        let name = require("volume_id", &r.volume_id)?;
        let _guard = self.guards.try_lock(name, "ControllerUnpublishVolume")?;
        let l = self.find(name).await?;
        let (attached, seq) = l.attachment();
        if attached.is_empty() || (!r.node_id.is_empty() && attached != r.node_id) {
            return Ok(Response::new(pb::ControllerUnpublishVolumeResponse {}));
        }
        self.set_attachment(name, &l, "", seq + 1, &[]).await?;
        tracing::info!(volume = name, node = %attached, "unpublished");
        Ok(Response::new(pb::ControllerUnpublishVolumeResponse {}))
    }

    /// Confirms the capabilities when peersan supports all of them for this volume; else
    /// an empty `confirmed` with a message. Required: `volume_id`, `volume_capabilities`.
    /// An unknown volume gets NOT_FOUND.
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
        self.find(name).await?;
        Ok(Response::new(validated(r, |caps| single_writer_only("volume_capabilities", caps))))
    }

    /// Lists the volumes of every reachable node, in name order, with the node each is
    /// published on and its health. `starting_token` is the `next_token` of an earlier
    /// page; any other token gets ABORTED.
    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let r = req.into_inner();
        crate::log::request("ListVolumes", &r, false);
        if r.max_entries < 0 {
            return Err(CsiError::InvalidArgument("max_entries must not be negative".into()).into());
        }
        let answers = join_all(self.nodes.iter().map(|n| async move {
            let mut c = agent::connect(&n.name, &n.api).await.ok()?;
            c.list_volumes(agent::request(apb::ListVolumesRequest {})).await.ok().map(|r| r.into_inner().volumes)
        }))
        .await;
        let mut all: BTreeMap<String, apb::Volume> = BTreeMap::new();
        for v in answers.into_iter().flatten().flatten() {
            match all.get(&v.name) {
                Some(have) if have.attachment_seq >= v.attachment_seq => {}
                _ => {
                    all.insert(v.name.clone(), v);
                }
            }
        }
        let entries: Vec<pb::list_volumes_response::Entry> = all
            .values()
            .map(|v| {
                let mut replicas: Vec<String> = v.replicas.iter().map(|r| r.node.clone()).collect();
                replicas.sort();
                let ctx = HashMap::from([(params::PARAM_REPLICAS.to_owned(), replicas.len().to_string())]);
                pb::list_volumes_response::Entry {
                    volume: Some(csi_volume(&v.name, v.size_bytes, &replicas, ctx)),
                    status: Some(pb::list_volumes_response::VolumeStatus {
                        published_node_ids: if v.attached_node.is_empty() {
                            vec![]
                        } else {
                            vec![v.attached_node.clone()]
                        },
                        volume_condition: Some(condition(v)),
                    }),
                }
            })
            .collect();
        let (entries, next_token) = page(entries, &r.starting_token, r.max_entries)?;
        Ok(Response::new(pb::ListVolumesResponse { entries, next_token }))
    }

    /// The largest volume that can be created now with the given parameters (replica
    /// count) and, when given, on the node named by `accessible_topology`: the `replicas`-th
    /// largest free space among reachable nodes (replicas are accounted at full size).
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
            self.nodes_info().await.into_iter().filter_map(|(n, i)| i.ok().map(|i| (n, i.free_bytes))).collect();
        let available = capacity(free, p.replicas as usize, r.accessible_topology.as_ref());
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
        Ok(Response::new(capabilities()))
    }

    /// Grows every replica of the volume to the requested size (whole MiB), online.
    /// Required: `volume_id`, `capacity_range`. Idempotent: a volume already that large
    /// returns its size. Every replica node must answer (UNAVAILABLE otherwise, and
    /// nothing is shrunk back: growing is idempotent and the retry completes it). The node
    /// then grows its block device and filesystem (NodeExpandVolume).
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
        let l = self.find(name).await?;
        let current = l.size();
        if range.limit_bytes > 0 && current > range.limit_bytes as u64 {
            return Err(CsiError::OutOfRange(format!(
                "volume {name} already has {current} bytes, more than limit_bytes {}; volumes do not shrink",
                range.limit_bytes
            ))
            .into());
        }
        let target = size.max(current);
        for n in l.replicas() {
            if !l.views.iter().any(|(v, _)| *v == n) {
                return Err(CsiError::Unavailable(format!(
                    "volume {name}: replica node {n} does not answer; every replica must grow"
                ))
                .into());
            }
            let mut c = self.client(&n).await?;
            c.expand_volume(agent::request(apb::ExpandVolumeRequest { name: name.to_owned(), size_bytes: target }))
                .await
                .map_err(|s| CsiError::from_agent(&format!("ExpandVolume on {n}"), &s))?;
        }
        tracing::info!(volume = name, from = current, to = target, "volume expanded");
        Ok(Response::new(pb::ControllerExpandVolumeResponse {
            capacity_bytes: target as i64,
            node_expansion_required: true,
        }))
    }
}

/// A volume's condition as CSI reports it: abnormal unless every replica is in sync.
pub fn condition(v: &apb::Volume) -> pb::VolumeCondition {
    let abnormal = v.health != "healthy";
    let replicas: Vec<String> = v.replicas.iter().map(|r| format!("{} {}", r.node, r.state)).collect();
    pb::VolumeCondition { abnormal, message: format!("{}: {}", v.health, replicas.join(", ")) }
}

/// With a nodes file every volume is single-writer: the agents' API creates volumes so, and
/// their engines take writes from the node with write priority only. A capability asking
/// for several writers (MULTI_NODE_MULTI_WRITER) gets INVALID_ARGUMENT saying where
/// multi-writer volumes come from; `field` names it in the request.
fn multi_writer_refused(field: &str) -> CsiError {
    CsiError::InvalidArgument(format!(
        "{field}: access mode MULTI_NODE_MULTI_WRITER needs a multi-writer volume, which only the controller \
         with --kubernetes creates (on a VirtualSAN with writePolicy MultiWriter); with --nodes, volumes are \
         single-writer"
    ))
}

/// [`multi_writer_refused`] for the first capability of `caps` (request field `field`)
/// that asks for several writers.
fn single_writer_only(field: &str, caps: &[params::Capability]) -> CsiResult<()> {
    match caps.iter().position(params::Capability::multi_writer) {
        None => Ok(()),
        Some(i) => Err(multi_writer_refused(&format!("{field}[{i}]"))),
    }
}

/// ValidateVolumeCapabilities' answer for an existing volume: the capabilities and
/// parameters confirmed when peersan supports all of them and `fits` accepts them for this
/// volume (its write policy), else a message saying why not.
pub(crate) fn validated(
    r: pb::ValidateVolumeCapabilitiesRequest,
    fits: impl FnOnce(&[params::Capability]) -> CsiResult<()>,
) -> pb::ValidateVolumeCapabilitiesResponse {
    let checked = params::capabilities("volume_capabilities", &r.volume_capabilities)
        .and_then(|caps| fits(&caps))
        .and_then(|_| VolumeParams::parse(&r.parameters).map(|_| ()));
    match checked {
        Ok(()) => pb::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                volume_context: r.volume_context,
                volume_capabilities: r.volume_capabilities,
                parameters: r.parameters,
                mutable_parameters: Default::default(),
            }),
            message: String::new(),
        },
        Err(e) => pb::ValidateVolumeCapabilitiesResponse { confirmed: None, message: e.to_string() },
    }
}

/// One page of ListVolumes: `entries` (in volume order) from `starting_token` (the index an
/// earlier page returned; ABORTED for any other) for at most `max_entries` (0 = all).
pub(crate) fn page<T>(entries: Vec<T>, starting_token: &str, max_entries: i32) -> CsiResult<(Vec<T>, String)> {
    let total = entries.len();
    let start: usize = if starting_token.is_empty() {
        0
    } else {
        starting_token
            .parse()
            .ok()
            .filter(|i| *i <= total)
            .ok_or_else(|| CsiError::Aborted(format!("starting_token {starting_token:?} is not valid")))?
    };
    let take = if max_entries <= 0 { usize::MAX } else { max_entries as usize };
    let page: Vec<T> = entries.into_iter().skip(start).take(take).collect();
    let end = start.saturating_add(page.len());
    Ok((page, if end < total { end.to_string() } else { String::new() }))
}

/// GetCapacity's answer from the free space of each node that can take a replica: the
/// largest size, in whole MiB, of which `replicas` distinct nodes have room (including the
/// node `topology` names, when it names one).
pub(crate) fn capacity(mut free: Vec<(String, u64)>, replicas: usize, topology: Option<&pb::Topology>) -> u64 {
    free.sort_by_key(|f| std::cmp::Reverse(f.1));
    let n = replicas.max(1);
    let available = match topology.and_then(topology_node) {
        Some(node) => match free.iter().position(|(name, _)| name == node) {
            None => 0,
            Some(i) => {
                let mine = free[i].1;
                let others: Vec<u64> = free.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, f)| f.1).collect();
                if n == 1 { mine } else { others.get(n - 2).map(|o| mine.min(*o)).unwrap_or(0) }
            }
        },
        None => free.get(n - 1).map(|f| f.1).unwrap_or(0),
    };
    available / SIZE_ALIGN * SIZE_ALIGN
}

/// The Controller service's capabilities (the same in both modes).
pub(crate) fn capabilities() -> pb::ControllerGetCapabilitiesResponse {
    use pb::controller_service_capability::rpc::Type;
    let capabilities = [
        Type::CreateDeleteVolume,
        Type::PublishUnpublishVolume,
        Type::ListVolumes,
        Type::GetCapacity,
        Type::PublishReadonly,
        Type::ExpandVolume,
        Type::ListVolumesPublishedNodes,
        Type::VolumeCondition,
    ]
    .into_iter()
    .map(|t| pb::ControllerServiceCapability {
        r#type: Some(pb::controller_service_capability::Type::Rpc(pb::controller_service_capability::Rpc {
            r#type: t as i32,
        })),
    })
    .collect();
    pb::ControllerGetCapabilitiesResponse { capabilities }
}

/// Volume ids are the CSI names, which must also be valid peersan volume names.
pub(crate) fn check_volume_name(name: &str) -> CsiResult<()> {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if name.len() > 63 || !name.chars().all(ok) || name.starts_with('-') || name.ends_with('-') {
        return Err(CsiError::InvalidArgument(format!(
            "name {name:?}: peersan volume names have 1 to 63 lowercase letters, digits and '-' (Kubernetes' pvc-<uid> names fit)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(v: &[(&str, u64)]) -> Vec<Candidate> {
        v.iter().map(|(n, f)| Candidate { name: n.to_string(), free: *f << 20 }).collect()
    }

    fn req(requisite: &[&str], preferred: &[&str]) -> pb::TopologyRequirement {
        pb::TopologyRequirement {
            requisite: requisite.iter().map(|n| topology(n)).collect(),
            preferred: preferred.iter().map(|n| topology(n)).collect(),
        }
    }

    #[test]
    fn placement_spreads_over_nodes_with_room() {
        let c = cands(&[("a", 100), ("b", 300), ("c", 200), ("d", 10)]);
        assert_eq!(place(&c, 2, 50 << 20, None).unwrap(), vec!["b", "c"]);
        assert_eq!(place(&c, 3, 50 << 20, None).unwrap(), vec!["b", "c", "a"]);
        let e = place(&c, 3, 150 << 20, None).unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert!(e.to_string().contains("only 2 suitable"), "{e}");
    }

    #[test]
    fn placement_honours_topology() {
        let c = cands(&[("a", 100), ("b", 300), ("c", 200)]);
        // Preferred first, in order.
        assert_eq!(place(&c, 2, 1 << 20, Some(&req(&[], &["a"]))).unwrap(), vec!["a", "b"]);
        // Fewer replicas than requisite nodes: chosen among them.
        assert_eq!(place(&c, 1, 1 << 20, Some(&req(&["a", "c"], &[]))).unwrap(), vec!["c"]);
        // At least as many: all requisite nodes, then the rest.
        assert_eq!(place(&c, 2, 1 << 20, Some(&req(&["a"], &[]))).unwrap(), vec!["a", "b"]);
        // A requisite node without room fails.
        assert_eq!(place(&c, 2, 150 << 20, Some(&req(&["a"], &[]))).unwrap_err().code(), Code::ResourceExhausted);
    }

    #[test]
    fn sizes() {
        let range = |r: i64, l: i64| pb::CapacityRange { required_bytes: r, limit_bytes: l };
        assert_eq!(size_for(None).unwrap(), DEFAULT_SIZE);
        assert_eq!(size_for(Some(&range(1, 0))).unwrap(), SIZE_ALIGN);
        assert_eq!(size_for(Some(&range(5 << 20, 5 << 20))).unwrap(), 5 << 20);
        assert_eq!(size_for(Some(&range(0, 3 << 20))).unwrap(), 3 << 20);
        assert_eq!(size_for(Some(&range((5 << 20) + 1, (6 << 20) + 5))).unwrap(), 6 << 20);
        assert_eq!(size_for(Some(&range(10, 100))).unwrap_err().code(), Code::OutOfRange);
        assert_eq!(size_for(Some(&range(10 << 20, 5 << 20))).unwrap_err().code(), Code::OutOfRange);
        assert_eq!(size_for(Some(&range(-1, 0))).unwrap_err().code(), Code::OutOfRange);
    }

    #[test]
    fn volume_names() {
        assert!(check_volume_name("pvc-3f1c2a7e-0d7e-4a53-9c07-6a3b1e0f9a11").is_ok());
        assert_eq!(check_volume_name("PVC_1").unwrap_err().code(), Code::InvalidArgument);
    }
}
