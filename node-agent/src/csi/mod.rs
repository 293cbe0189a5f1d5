//! The CSI Node service of the node agent: stages a volume (attaches it as a block device
//! through the node's frontend, creates a filesystem when there is none, mounts it),
//! publishes it into pods (bind mounts of the filesystem or of the device node), and
//! undoes all of it, also after the agent was restarted in between.
//!
//! What a stage did is recorded in `state_dir/<volume>.json` before the call returns, so
//! that unstage finds the device, the mounts and the FUSE export of an earlier process.

pub mod mount;
pub mod node;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use peersan_csi_driver::error::CsiError;
use serde::{Deserialize, Serialize};

/// What NodeStageVolume set up for a volume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StageRecord {
    pub volume: String,
    pub staging_path: PathBuf,
    /// The block device (`/dev/loopN`).
    pub device: PathBuf,
    /// `fuse-loop` (or another frontend later).
    pub frontend: String,
    /// volumeMode Block: nothing is mounted at the staging path.
    pub block: bool,
    /// Filesystem mounted at the staging path (mount volumes).
    #[serde(default)]
    pub fs_type: Option<String>,
    /// Paths the volume is published at.
    #[serde(default)]
    pub published: Vec<PathBuf>,
}

/// The stage records of one node, kept as one small JSON file per volume.
#[derive(Debug, Clone)]
pub struct StageRecords {
    dir: PathBuf,
}

impl StageRecords {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn path(&self, volume: &str) -> PathBuf {
        self.dir.join(format!("{volume}.json"))
    }

    pub fn get(&self, volume: &str) -> Result<Option<StageRecord>, CsiError> {
        let p = self.path(volume);
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| CsiError::Internal(format!("{}: unreadable stage record: {e}", p.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CsiError::Internal(format!("{}: {e}", p.display()))),
        }
    }

    /// Writes a record durably (temporary file, fsync, rename, fsync of the directory).
    pub fn put(&self, r: &StageRecord) -> Result<(), CsiError> {
        let io = |what: &str, p: &Path, e: std::io::Error| CsiError::Internal(format!("{what} {}: {e}", p.display()));
        std::fs::create_dir_all(&self.dir).map_err(|e| io("creating", &self.dir, e))?;
        let p = self.path(&r.volume);
        let tmp = p.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(r).map_err(|e| CsiError::Internal(e.to_string()))?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating", &tmp, e))?;
            f.write_all(&bytes).and_then(|_| f.sync_all()).map_err(|e| io("writing", &tmp, e))?;
        }
        std::fs::rename(&tmp, &p).map_err(|e| io("renaming", &tmp, e))?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| io("syncing", &self.dir, e))?;
        Ok(())
    }

    pub fn remove(&self, volume: &str) -> Result<(), CsiError> {
        let p = self.path(volume);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CsiError::Internal(format!("removing {}: {e}", p.display()))),
        }
    }
}

/// The node plugin is ready once the agent serves: its volumes were opened before the CSI
/// socket was bound.
struct AgentReady;

#[tonic::async_trait]
impl peersan_csi_driver::identity::Readiness for AgentReady {
    async fn ready(&self) -> Result<bool, CsiError> {
        Ok(true)
    }
}

/// Serves the CSI Identity and Node services on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::UnixListener,
    node: Arc<crate::agent::Node>,
    frontends: Arc<crate::frontend::Frontends>,
    records: StageRecords,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    use peersan_csi_driver::pb::identity_server::IdentityServer;
    use peersan_csi_driver::pb::node_server::NodeServer;
    let identity = peersan_csi_driver::identity::IdentityService::new(Arc::new(AgentReady));
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_service(NodeServer::new(node::NodeService::new(node, frontends, records)))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), shutdown)
        .await
}
