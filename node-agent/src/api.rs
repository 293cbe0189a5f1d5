//! The agent control API (gRPC on a unix socket) and its client.

use std::path::Path;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::agent::{AgentError, Node};
use crate::engine::Volume;

pub mod pb {
    tonic::include_proto!("peersan.agent.v1");
}

use pb::agent_server::{Agent, AgentServer};

/// The one place where agent errors become gRPC status codes.
fn status(e: AgentError) -> Status {
    match &e {
        AgentError::Invalid(_) => Status::invalid_argument(e.to_string()),
        AgentError::NotFound(_) => Status::not_found(e.to_string()),
        AgentError::Conflict { .. } => Status::already_exists(e.to_string()),
        AgentError::Peer { .. } => Status::unavailable(e.to_string()),
        AgentError::OutOfRange(_) => Status::out_of_range(e.to_string()),
        AgentError::Aborted(_) => Status::aborted(e.to_string()),
        AgentError::Precondition(_) => Status::failed_precondition(e.to_string()),
        AgentError::Replica(_) | AgentError::Io { .. } => Status::internal(e.to_string()),
    }
}

pub fn volume_pb(node: &Node, v: &Volume) -> pb::Volume {
    let progress = v.resync_progress();
    let prio = v.priority();
    let nbd_uri = format!("nbd+unix:///{}?socket={}", v.name(), node.config.listen.nbd_unix.display());
    let (attached_node, attachment_seq) = node.attachment(v.name()).unwrap_or_default();
    pb::Volume {
        name: v.name().to_owned(),
        size_bytes: v.size(),
        attached_node,
        attachment_seq,
        health: v.health().to_owned(),
        nbd_uri,
        epoch: prio.epoch,
        writer: prio.holder,
        replicas: v
            .report()
            .into_iter()
            .map(|r| {
                let resyncing = r.local && r.state == crate::engine::ReplicaState::CatchingUp;
                let elapsed = progress.started.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
                let rate = if resyncing && elapsed > 0.0 { (progress.done_bytes as f64 / elapsed) as u64 } else { 0 };
                let eta =
                    if rate > 0 { progress.total_bytes.saturating_sub(progress.done_bytes).div_ceil(rate) } else { 0 };
                pb::Replica {
                    node: r.node,
                    local: r.local,
                    state: r.state.as_str().to_owned(),
                    detail: r.detail,
                    generation: r.generation,
                    resync_done_bytes: if resyncing { progress.done_bytes } else { 0 },
                    resync_total_bytes: if resyncing { progress.total_bytes } else { 0 },
                    path: r.path,
                    resync_rate_bytes_per_sec: rate,
                    resync_eta_seconds: eta,
                    out_of_sync_bytes: r.out_of_sync_bytes,
                }
            })
            .collect(),
    }
}

pub struct AgentService {
    node: Arc<Node>,
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn create_volume(&self, req: Request<pb::CreateVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        self.not_managed("CreateVolume")?;
        let r = req.into_inner();
        tracing::info!(volume = %r.name, size = r.size_bytes, replicas = ?r.replicas, "CreateVolume");
        let v = self.node.create_local(&r.name, r.size_bytes, &r.replicas).map_err(status)?;
        if let Err(e) = crate::peer::control::create_on_peers(&self.node, &v).await {
            // The replicas created so far stay; say how to remove them.
            let partly = |m: String| format!("{m}; volume {:?} now exists in part: DeleteVolume removes it", r.name);
            let e = match e {
                AgentError::OutOfRange(m) => AgentError::OutOfRange(partly(m)),
                e => e,
            };
            return Err(status(e));
        }
        // The volume is ready when this node mirrors to every replica.
        let missing = v.wait_connected(self.node.config.timeouts.connect * 2).await;
        if !missing.is_empty() {
            tracing::warn!(volume = %v.name(), ?missing, "volume created; not yet connected to some replicas");
        }
        Ok(Response::new(volume_pb(&self.node, &v)))
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        self.not_managed("DeleteVolume")?;
        let r = req.into_inner();
        tracing::info!(volume = %r.name, "DeleteVolume");
        let v = self.node.get(&r.name).ok_or_else(|| status(AgentError::NotFound(r.name.clone())))?;
        self.node.delete_local(&r.name).map_err(status)?;
        crate::peer::control::delete_on_peers(&self.node, &v).await.map_err(status)?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn list_volumes(
        &self,
        _: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let volumes = self.node.volumes().iter().map(|v| volume_pb(&self.node, v)).collect();
        Ok(Response::new(pb::ListVolumesResponse { volumes }))
    }

    async fn get_volume(&self, req: Request<pb::GetVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        let name = req.into_inner().name;
        let v = self.node.get(&name).ok_or_else(|| status(AgentError::NotFound(name)))?;
        Ok(Response::new(volume_pb(&self.node, &v)))
    }

    async fn promote(&self, req: Request<pb::PromoteRequest>) -> Result<Response<pb::Volume>, Status> {
        self.not_managed("Promote")?;
        let name = req.into_inner().name;
        tracing::info!(volume = %name, "Promote");
        let v = self.node.get(&name).ok_or_else(|| status(AgentError::NotFound(name)))?;
        v.promote().map_err(Status::failed_precondition)?;
        Ok(Response::new(volume_pb(&self.node, &v)))
    }

    async fn resolve_split_brain(
        &self,
        req: Request<pb::ResolveSplitBrainRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        tracing::warn!(volume = %r.name, keep = %r.keep, "ResolveSplitBrain");
        let v = self.node.get(&r.name).ok_or_else(|| status(AgentError::NotFound(r.name.clone())))?;
        if v.replica_index(&r.keep).is_none() {
            return Err(Status::invalid_argument(format!("{} is not a replica of volume {}", r.keep, r.name)));
        }
        if r.keep == self.node.config.node.name {
            let asked = v.keep_local_changes().await.map_err(Status::unavailable)?;
            if asked.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "volume {}: no connected replica is in split brain with {}",
                    r.name, r.keep
                )));
            }
        } else {
            v.discard_changes(&r.keep).map_err(Status::failed_precondition)?;
        }
        Ok(Response::new(volume_pb(&self.node, &v)))
    }

    async fn get_node(&self, _: Request<pb::GetNodeRequest>) -> Result<Response<pb::Node>, Status> {
        let c = &self.node.config;
        let space = self.node.pool_space().map_err(status)?;
        Ok(Response::new(pb::Node {
            name: c.node.name.clone(),
            peer_address: c.listen.peer.to_string(),
            nbd_unix_socket: c.listen.nbd_unix.display().to_string(),
            nbd_tcp_address: c.listen.nbd_tcp.map(|a| a.to_string()).unwrap_or_default(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            capacity_bytes: space.capacity,
            allocated_bytes: space.allocated,
            free_bytes: space.free,
        }))
    }

    async fn expand_volume(&self, req: Request<pb::ExpandVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        self.not_managed("ExpandVolume")?;
        let r = req.into_inner();
        tracing::info!(volume = %r.name, size = r.size_bytes, "ExpandVolume");
        let node = self.node.clone();
        let name = r.name.clone();
        let v = tokio::task::spawn_blocking(move || node.expand_local(&name, r.size_bytes))
            .await
            .map_err(|e| Status::internal(format!("expanding volume {}: {e}", r.name)))?
            .map_err(status)?;
        Ok(Response::new(volume_pb(&self.node, &v)))
    }

    async fn set_attachment(&self, req: Request<pb::SetAttachmentRequest>) -> Result<Response<pb::Volume>, Status> {
        self.not_managed("SetAttachment")?;
        let r = req.into_inner();
        tracing::info!(volume = %r.name, node = %r.node, seq = r.seq, "SetAttachment");
        self.node.set_attachment(&r.name, &r.node, r.seq).map_err(status)?;
        let v = self.node.get(&r.name).ok_or_else(|| status(AgentError::NotFound(r.name.clone())))?;
        Ok(Response::new(volume_pb(&self.node, &v)))
    }
}

/// Serves the API on `listener` until `shutdown` resolves.
impl AgentService {
    /// FAILED_PRECONDITION for a change the control plane owns, when the agent runs in
    /// Kubernetes mode: there the MirrorVolume and the volume's Lease decide, and a change
    /// made here would be undone (a volume without a MirrorVolume is deleted).
    fn not_managed(&self, op: &str) -> Result<(), Status> {
        if self.node.config.kubernetes {
            return Err(Status::failed_precondition(format!(
                "{op}: this node agent runs in Kubernetes mode; volumes and write priority are managed through \
                 MirrorVolumes, their Leases and the CSI driver (kubectl), not the agent API"
            )));
        }
        Ok(())
    }
}

pub async fn serve(
    listener: tokio::net::UnixListener,
    node: Arc<Node>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(AgentServer::new(AgentService { node }))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), shutdown)
        .await
}

/// Connects to an agent's API socket.
pub async fn connect(
    path: &Path,
) -> Result<pb::agent_client::AgentClient<tonic::transport::Channel>, tonic::transport::Error> {
    let path = path.to_owned();
    let channel = tonic::transport::Endpoint::from_static("http://agent.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await?;
    Ok(pb::agent_client::AgentClient::new(channel))
}
