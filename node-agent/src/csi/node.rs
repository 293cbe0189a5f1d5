//! The CSI Node service, served by the node agent on its CSI socket.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use peersan_csi_driver::error::{CsiError, CsiResult, require, require_some};
use peersan_csi_driver::limiter::VolumeGuards;
use peersan_csi_driver::params::{self, Access, PARAM_MKFS_OPTIONS};
use peersan_csi_driver::pb;
use peersan_csi_driver::pb::node_server::Node as CsiNode;
use tonic::{Request, Response, Status};

use super::mount::{self, Content};
use super::{StageRecord, StageRecords};
use crate::agent::Node;
use crate::engine::Volume;
use crate::frontend::Frontends;

pub struct NodeService {
    node: Arc<Node>,
    frontends: Arc<Frontends>,
    records: StageRecords,
    guards: VolumeGuards,
}

fn absolute(field: &str, p: &str) -> CsiResult<PathBuf> {
    require(field, p)?;
    let path = PathBuf::from(p);
    if !path.is_absolute() {
        return Err(CsiError::InvalidArgument(format!("{field}: {p:?} is not an absolute path")));
    }
    Ok(path)
}

fn frontend_error(what: &str, e: impl std::fmt::Display) -> CsiError {
    CsiError::Internal(format!("{what}: {e}"))
}

impl NodeService {
    pub fn new(node: Arc<Node>, frontends: Arc<Frontends>, records: StageRecords) -> Self {
        Self { node, frontends, records, guards: VolumeGuards::new() }
    }

    fn volume(&self, id: &str) -> CsiResult<Arc<Volume>> {
        self.node.get(id).ok_or_else(|| {
            CsiError::NotFound(format!("volume {id} has no replica on node {}", self.node.config.node.name))
        })
    }

    /// Attaches the volume and, for a mount volume, makes sure it holds a filesystem and
    /// mounts it at `staging`. On failure nothing stays attached.
    async fn stage(
        &self,
        id: &str,
        volume: Arc<Volume>,
        staging: &Path,
        cap: &params::Capability,
        mkfs_options: Option<&str>,
    ) -> CsiResult<StageRecord> {
        let attached = self.frontends.attach(id, volume).await.map_err(|e| frontend_error("attaching", e))?;
        let mut record = StageRecord {
            volume: id.to_owned(),
            staging_path: staging.to_owned(),
            device: attached.device.clone(),
            frontend: attached.kind.as_str().to_owned(),
            block: matches!(cap.access, Access::Block),
            fs_type: None,
            published: Vec::new(),
        };
        let result = async {
            if let Access::Mount { fs_type, mount_flags } = &cap.access {
                match mount::probe(&attached.device).await? {
                    Content::Blank => {
                        tracing::info!(volume = id, fs = %fs_type, device = %attached.device.display(), "creating filesystem");
                        mount::mkfs(&attached.device, fs_type, mkfs_options).await?;
                    }
                    Content::Filesystem(t) if t == *fs_type => {}
                    Content::Filesystem(t) => {
                        return Err(CsiError::FailedPrecondition(format!(
                            "volume {id} holds a {t} filesystem; the request asks for {fs_type} (it is never reformatted)"
                        )));
                    }
                    Content::Other(what) => {
                        return Err(CsiError::FailedPrecondition(format!(
                            "volume {id} holds data that is not a filesystem ({what}); it is never formatted over"
                        )));
                    }
                }
                std::fs::create_dir_all(staging)
                    .map_err(|e| CsiError::Internal(format!("creating {}: {e}", staging.display())))?;
                let mut opts = mount_flags.clone();
                if cap.read_only_mode() {
                    opts.push("ro".into());
                }
                mount::mount(&attached.device, staging, Some(fs_type), &opts).await?;
                record.fs_type = Some(fs_type.clone());
            }
            self.records.put(&record)
        }
        .await;
        if let Err(e) = result {
            if record.fs_type.is_some() {
                let _ = mount::unmount(staging);
            }
            if let Err(d) = self.frontends.detach(id).await {
                tracing::error!(volume = id, error = %d, "detaching after a failed stage");
            }
            return Err(e);
        }
        Ok(record)
    }
}

#[tonic::async_trait]
impl CsiNode for NodeService {
    /// Attaches the volume as a block device on this node (FUSE export + loop device), and
    /// for a mount volume creates a filesystem if the device holds none (ext4 or xfs, with
    /// the `mkfsOptions` of the volume context) and mounts it at `staging_target_path`.
    /// Required: `volume_id`, `staging_target_path`, `volume_capability`. Idempotent: a
    /// volume staged at the same path with the same access type succeeds; staged at another
    /// path or as another type: ALREADY_EXISTS. A volume without a replica here: NOT_FOUND.
    /// Existing data is never formatted over (FAILED_PRECONDITION). MULTI_NODE_MULTI_WRITER
    /// (a ReadWriteMany claim) is staged like any block volume, on each node it is published
    /// on (the controller decided that the volume takes several writers); with a filesystem
    /// it is INVALID_ARGUMENT: two nodes mounting one ext4 or xfs filesystem corrupt it.
    async fn node_stage_volume(
        &self,
        req: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        peersan_csi_driver::log::request("NodeStageVolume", &r, true);
        let id = require("volume_id", &r.volume_id)?;
        let staging = absolute("staging_target_path", &r.staging_target_path)?;
        let cap = params::capability("volume_capability", require_some("volume_capability", &r.volume_capability)?)?;
        let _guard = self.guards.try_lock(id, "NodeStageVolume")?;
        let volume = self.volume(id)?;
        if let Some(rec) = self.records.get(id)? {
            if rec.staging_path != staging {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {id} is staged at {}, not {}",
                    rec.staging_path.display(),
                    staging.display()
                ))
                .into());
            }
            if rec.block != matches!(cap.access, Access::Block) {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {id} is staged as a {} volume",
                    if rec.block { "block" } else { "filesystem" }
                ))
                .into());
            }
            if self.frontends.attached(id).is_none() {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {id} was staged by an earlier node agent process and its block device is gone; \
                     unstage it (NodeUnstageVolume) and stage it again"
                ))
                .into());
            }
            return Ok(Response::new(pb::NodeStageVolumeResponse {}));
        }
        let mkfs = r.volume_context.get(PARAM_MKFS_OPTIONS).map(String::as_str);
        let rec = self.stage(id, volume, &staging, &cap, mkfs).await?;
        tracing::info!(volume = id, device = %rec.device.display(), staging = %staging.display(), "staged");
        Ok(Response::new(pb::NodeStageVolumeResponse {}))
    }

    /// Unmounts the staging path, detaches the block device and the FUSE export, also those
    /// of an earlier agent process. Required: `volume_id`, `staging_target_path`.
    /// Idempotent: a volume not staged succeeds. A volume still published on this node:
    /// FAILED_PRECONDITION.
    async fn node_unstage_volume(
        &self,
        req: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        peersan_csi_driver::log::request("NodeUnstageVolume", &r, true);
        let id = require("volume_id", &r.volume_id)?;
        let staging = absolute("staging_target_path", &r.staging_target_path)?;
        let _guard = self.guards.try_lock(id, "NodeUnstageVolume")?;
        let rec = self.records.get(id)?;
        if let Some(rec) = &rec {
            let still: Vec<String> = rec
                .published
                .iter()
                .filter(|p| mount::mount_at(p).ok().flatten().is_some())
                .map(|p| p.display().to_string())
                .collect();
            if !still.is_empty() {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {id} is still published at {}; unpublish it first",
                    still.join(", ")
                ))
                .into());
            }
        }
        // Unmount whatever is mounted at the staging path (the record may be gone if an
        // earlier unstage was interrupted).
        while mount::unmount(&staging)? {}
        self.frontends.detach(id).await.map_err(|e| frontend_error("detaching", e))?;
        self.records.remove(id)?;
        tracing::info!(volume = id, "unstaged");
        Ok(Response::new(pb::NodeUnstageVolumeResponse {}))
    }

    /// Makes the staged volume available at `target_path`: a bind mount of the staging
    /// directory (mount volumes) or of the device node onto a file (block volumes),
    /// read-only when `readonly` is set or the access mode is read-only. Required:
    /// `volume_id`, `staging_target_path`, `target_path`, `volume_capability`. Idempotent:
    /// already published there with the same read-only flag succeeds; with another flag:
    /// ALREADY_EXISTS. Not staged: FAILED_PRECONDITION.
    async fn node_publish_volume(
        &self,
        req: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        peersan_csi_driver::log::request("NodePublishVolume", &r, true);
        let id = require("volume_id", &r.volume_id)?;
        let target = absolute("target_path", &r.target_path)?;
        let staging = absolute("staging_target_path", &r.staging_target_path)?;
        let cap = params::capability("volume_capability", require_some("volume_capability", &r.volume_capability)?)?;
        let read_only = r.readonly || cap.read_only_mode();
        let _guard = self.guards.try_lock(id, "NodePublishVolume")?;
        self.volume(id)?;
        let mut rec = self.records.get(id)?.filter(|rec| rec.staging_path == staging).ok_or_else(|| {
            CsiError::FailedPrecondition(format!("volume {id} is not staged at {}", staging.display()))
        })?;
        if rec.block != matches!(cap.access, Access::Block) {
            return Err(CsiError::InvalidArgument(format!(
                "volume_capability: volume {id} is staged as a {} volume",
                if rec.block { "block" } else { "filesystem" }
            ))
            .into());
        }
        if let Some(m) = mount::mount_at(&target)? {
            if m.read_only() != read_only {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {id} is already published at {} {}",
                    target.display(),
                    if m.read_only() { "read-only" } else { "read-write" }
                ))
                .into());
            }
        } else {
            let source = if rec.block {
                if !target.exists() {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .truncate(false)
                        .write(true)
                        .open(&target)
                        .map_err(|e| CsiError::Internal(format!("creating {}: {e}", target.display())))?;
                }
                rec.device.clone()
            } else {
                if mount::mount_at(&staging)?.is_none() {
                    return Err(CsiError::FailedPrecondition(format!(
                        "volume {id}: nothing is mounted at the staging path {}",
                        staging.display()
                    ))
                    .into());
                }
                std::fs::create_dir_all(&target)
                    .map_err(|e| CsiError::Internal(format!("creating {}: {e}", target.display())))?;
                staging.clone()
            };
            mount::bind(&source, &target, read_only).await?;
        }
        if !rec.published.contains(&target) {
            rec.published.push(target.clone());
            self.records.put(&rec)?;
        }
        tracing::info!(volume = id, target = %target.display(), read_only, "published");
        Ok(Response::new(pb::NodePublishVolumeResponse {}))
    }

    /// Unmounts `target_path` and removes it. Required: `volume_id`, `target_path`.
    /// Idempotent: a path that is not mounted (or does not exist) succeeds.
    async fn node_unpublish_volume(
        &self,
        req: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        peersan_csi_driver::log::request("NodeUnpublishVolume", &r, true);
        let id = require("volume_id", &r.volume_id)?;
        let target = absolute("target_path", &r.target_path)?;
        let _guard = self.guards.try_lock(id, "NodeUnpublishVolume")?;
        while mount::unmount(&target)? {}
        match std::fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(&target),
            Ok(_) => std::fs::remove_file(&target),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
        .map_err(|e| CsiError::Internal(format!("removing {}: {e}", target.display())))?;
        if let Some(mut rec) = self.records.get(id)?
            && rec.published.contains(&target)
        {
            rec.published.retain(|p| *p != target);
            self.records.put(&rec)?;
        }
        tracing::info!(volume = id, target = %target.display(), "unpublished");
        Ok(Response::new(pb::NodeUnpublishVolumeResponse {}))
    }

    /// Bytes and inodes of the filesystem at `volume_path` (bytes only for a block
    /// volume), with the volume's health as `volume_condition` (abnormal unless every
    /// replica is in sync). Required: `volume_id`, `volume_path`. NOT_FOUND when the volume
    /// has no replica here or the path does not exist.
    async fn node_get_volume_stats(
        &self,
        req: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        peersan_csi_driver::log::request("NodeGetVolumeStats", &r, false);
        let id = require("volume_id", &r.volume_id)?;
        let path = absolute("volume_path", &r.volume_path)?;
        let volume = self.volume(id)?;
        let meta =
            std::fs::metadata(&path).map_err(|e| CsiError::NotFound(format!("volume_path {}: {e}", path.display())))?;
        let usage = if meta.is_dir() {
            let ((bt, ba, bu), (it, ia, iu)) = mount::fs_usage(&path)?;
            use pb::volume_usage::Unit;
            vec![
                pb::VolumeUsage { total: bt as i64, available: ba as i64, used: bu as i64, unit: Unit::Bytes as i32 },
                pb::VolumeUsage { total: it as i64, available: ia as i64, used: iu as i64, unit: Unit::Inodes as i32 },
            ]
        } else {
            vec![pb::VolumeUsage {
                total: volume.size() as i64,
                unit: pb::volume_usage::Unit::Bytes as i32,
                ..Default::default()
            }]
        };
        let replicas: Vec<String> =
            volume.report().into_iter().map(|r| format!("{} {}", r.node, r.state.as_str())).collect();
        let condition = pb::VolumeCondition {
            abnormal: volume.health() != "healthy",
            message: format!("{}: {}", volume.health(), replicas.join(", ")),
        };
        Ok(Response::new(pb::NodeGetVolumeStatsResponse { usage, volume_condition: Some(condition) }))
    }

    /// Makes the staged volume's block device and filesystem use the volume's current size
    /// (the controller grew the replicas first): the loop device is refreshed, then ext4 is
    /// grown with resize2fs and xfs with xfs_growfs, online. Required: `volume_id`,
    /// `volume_path`. Not staged here: FAILED_PRECONDITION; a volume smaller than
    /// `required_bytes` (the controller has not grown it): OUT_OF_RANGE.
    async fn node_expand_volume(
        &self,
        req: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        peersan_csi_driver::log::request("NodeExpandVolume", &r, true);
        let id = require("volume_id", &r.volume_id)?;
        absolute("volume_path", &r.volume_path)?;
        let _guard = self.guards.try_lock(id, "NodeExpandVolume")?;
        let volume = self.volume(id)?;
        let rec = self
            .records
            .get(id)?
            .ok_or_else(|| CsiError::FailedPrecondition(format!("volume {id} is not staged on this node")))?;
        let size = volume.size();
        if let Some(range) = &r.capacity_range
            && range.required_bytes > 0
            && size < range.required_bytes as u64
        {
            return Err(CsiError::OutOfRange(format!(
                "volume {id} has {size} bytes, less than the {} asked: expand it at the controller first",
                range.required_bytes
            ))
            .into());
        }
        self.frontends.refresh_size(id).await.map_err(|e| frontend_error("refreshing the device size", e))?;
        if let Some(fs) = &rec.fs_type {
            mount::grow(fs, &rec.device, &rec.staging_path).await?;
        }
        tracing::info!(volume = id, size, "expanded on the node");
        Ok(Response::new(pb::NodeExpandVolumeResponse { capacity_bytes: size as i64 }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        use pb::node_service_capability::rpc::Type;
        let capabilities = [Type::StageUnstageVolume, Type::GetVolumeStats, Type::ExpandVolume, Type::VolumeCondition]
            .into_iter()
            .map(|t| pb::NodeServiceCapability {
                r#type: Some(pb::node_service_capability::Type::Rpc(pb::node_service_capability::Rpc {
                    r#type: t as i32,
                })),
            })
            .collect();
        Ok(Response::new(pb::NodeGetCapabilitiesResponse { capabilities }))
    }

    /// The node's id (its peersan node name) and topology: the volumes reachable here are
    /// those with a replica on this node.
    async fn node_get_info(
        &self,
        _: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        let name = self.node.config.node.name.clone();
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: name.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(pb::Topology {
                segments: HashMap::from([(peersan_csi_driver::TOPOLOGY_NODE_KEY.to_owned(), name)]),
            }),
        }))
    }
}
