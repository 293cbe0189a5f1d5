//! The node agent: opens the pool, runs a mirror engine per volume, and serves the peer
//! protocol, the NBD frontend and the agent API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Config, MAX_REPLICAS, VolumeConfig, check_name};
use crate::engine::{NodeCtx, Volume, VolumeSpec};
use crate::nbd::{ExportInfo, Exports};
use crate::peer::handshake::HandshakeConfig;
use crate::peer::server::VolumeLookup;
use crate::replica::{BLOCK_SIZE, Replica, ReplicaError};

/// Record of the volumes whose replicas this node created, kept in the pool directory.
/// It tells a lost replica (recreate it empty and resynchronise in full) from a new one,
/// and keeps volumes created through the API across restarts.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolRecord {
    volumes: BTreeMap<String, RecordedVolume>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct RecordedVolume {
    size: u64,
    replicas: Vec<String>,
    #[serde(default)]
    device: Option<PathBuf>,
    /// Created through the API (not declared in the config file).
    #[serde(default)]
    from_api: bool,
}

const RECORD_FILE: &str = "peersan-volumes.json";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Invalid(String),
    #[error("volume {0:?} does not exist on this node")]
    NotFound(String),
    #[error("volume {name:?} already exists with a different definition ({existing})")]
    Conflict { name: String, existing: String },
    #[error("{0}")]
    Replica(#[from] crate::replica::ReplicaError),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("peer {peer}: {message}")]
    Peer { peer: String, message: String },
}

/// The volumes of this node, shared by every server of the agent.
pub struct Node {
    pub config: Config,
    pub ctx: Arc<NodeCtx>,
    volumes: RwLock<BTreeMap<String, Arc<Volume>>>,
    record: std::sync::Mutex<PoolRecord>,
}

impl VolumeLookup for Node {
    fn volume(&self, name: &str) -> Option<Arc<Volume>> {
        self.volumes.read().unwrap().get(name).cloned()
    }

    fn create_volume(&self, name: &str, size: u64, replicas: &[String]) -> Result<(), String> {
        self.create_local(name, size, replicas).map(|_| ()).map_err(|e| e.to_string())
    }

    fn delete_volume(&self, name: &str) -> Result<(), String> {
        match self.delete_local(name) {
            Ok(()) | Err(AgentError::NotFound(_)) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl Exports for Node {
    type Device = Volume;

    fn lookup(&self, name: &str) -> Option<Arc<Volume>> {
        let vols = self.volumes.read().unwrap();
        if name.is_empty() && vols.len() == 1 {
            return vols.values().next().cloned();
        }
        vols.get(name).cloned()
    }

    fn list(&self) -> Vec<ExportInfo> {
        self.volumes
            .read()
            .unwrap()
            .values()
            .map(|v| ExportInfo {
                name: v.name().to_owned(),
                description: format!("peersan volume, {} bytes", v.spec().size),
            })
            .collect()
    }
}

/// Reads the peer secret. It must exist and hold at least 16 bytes.
pub fn read_secret(path: &Path) -> Result<Vec<u8>, AgentError> {
    let s = std::fs::read(path)
        .map_err(|source| AgentError::Io { context: format!("secret_file {}", path.display()), source })?;
    let trimmed: Vec<u8> = s.trim_ascii().to_vec();
    if trimmed.len() < 16 {
        return Err(AgentError::Invalid(format!(
            "secret_file {}: the shared secret must be at least 16 bytes (it has {})",
            path.display(),
            trimmed.len()
        )));
    }
    Ok(trimmed)
}

impl Node {
    pub fn new(config: Config) -> Result<Arc<Node>, AgentError> {
        let secret = read_secret(&config.secret_file)?;
        std::fs::create_dir_all(&config.pool.path).map_err(|source| AgentError::Io {
            context: format!("pool.path {}", config.pool.path.display()),
            source,
        })?;
        let record_path = config.pool.path.join(RECORD_FILE);
        let record: PoolRecord = match std::fs::read(&record_path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| AgentError::Invalid(format!("{}: {e}", record_path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => PoolRecord::default(),
            Err(source) => return Err(AgentError::Io { context: record_path.display().to_string(), source }),
        };
        let ctx = Arc::new(NodeCtx {
            name: config.node.name.clone(),
            handshake: HandshakeConfig {
                node_name: config.node.name.clone(),
                secret: Arc::new(secret),
                timeout: config.timeouts.connect,
            },
            io_timeout: config.timeouts.peer_io,
            reconnect_max: Duration::from_secs(2),
            resync_rate: config.resync.rate.0,
        });
        let node = Arc::new(Node {
            config,
            ctx,
            volumes: RwLock::new(BTreeMap::new()),
            record: std::sync::Mutex::new(record),
        });
        let mut wanted: Vec<(VolumeConfig, bool)> = node.config.volumes.iter().map(|v| (v.clone(), false)).collect();
        for (name, rv) in node.record.lock().unwrap().volumes.iter().filter(|(_, r)| r.from_api) {
            if !wanted.iter().any(|(v, _)| v.name == *name) {
                wanted.push((
                    VolumeConfig {
                        name: name.clone(),
                        size: crate::config::ByteSize(rv.size),
                        replicas: rv.replicas.clone(),
                        device: rv.device.clone(),
                    },
                    true,
                ));
            }
        }
        for (v, from_api) in wanted {
            node.open_volume(&v, from_api)?;
        }
        Ok(node)
    }

    fn save_record(&self, record: &PoolRecord) -> Result<(), AgentError> {
        let path = self.config.pool.path.join(RECORD_FILE);
        let tmp = path.with_extension("tmp");
        let io = |source| AgentError::Io { context: path.display().to_string(), source };
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| AgentError::Invalid(e.to_string()))?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(&self.config.pool.path).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    }

    fn replica_path(&self, v: &VolumeConfig) -> PathBuf {
        v.device.clone().unwrap_or_else(|| self.config.pool.path.join(format!("{}.replica", v.name)))
    }

    /// Opens (or creates) the local replica of `v` and starts its engine.
    fn open_volume(&self, v: &VolumeConfig, from_api: bool) -> Result<Arc<Volume>, AgentError> {
        let path = self.replica_path(v);
        let size = v.size.0;
        let mut replicas = v.replicas.clone();
        replicas.sort();
        let recorded = self.record.lock().unwrap().volumes.get(&v.name).cloned();
        if let Some(r) = &recorded
            && (r.size != size || {
                let mut rr = r.replicas.clone();
                rr.sort();
                rr != replicas
            })
        {
            return Err(AgentError::Conflict {
                name: v.name.clone(),
                existing: format!("{} bytes on {:?}", r.size, r.replicas),
            });
        }
        let exists = match &v.device {
            // A device holds a replica when its metadata says so. A blank or foreign-looking
            // device is initialised; one that holds another volume's replica is never
            // overwritten.
            Some(_) => match Replica::open(&path, &v.name, size) {
                Ok(_) => true,
                Err(ReplicaError::NotAReplica { .. }) => false,
                Err(e) => return Err(e.into()),
            },
            None => path.exists(),
        };
        let (replica, detail) = if exists {
            match Replica::open(&path, &v.name, size) {
                Ok(r) => (Some(Arc::new(r)), String::new()),
                Err(e) => {
                    tracing::error!(volume = %v.name, error = %e, "cannot open the local replica; serving from peers");
                    (None, e.to_string())
                }
            }
        } else {
            // A replica this node created before and lost is replaced by an empty one that
            // is resynchronised in full; a new volume starts empty and consistent.
            let replaced = recorded.is_some();
            if replaced {
                tracing::warn!(volume = %v.name, path = %path.display(), "local replica is missing; creating an empty one for a full resync");
            }
            let r = Replica::create(&path, &v.name, size, replicas.len() as u32, !replaced, v.device.is_some())?;
            (Some(Arc::new(r)), String::new())
        };
        if recorded.is_none() {
            let mut rec = self.record.lock().unwrap();
            rec.volumes.insert(
                v.name.clone(),
                RecordedVolume { size, replicas: replicas.clone(), device: v.device.clone(), from_api },
            );
            self.save_record(&rec)?;
        }
        let spec = VolumeSpec { name: v.name.clone(), size, replicas };
        let volume = Volume::new(spec, self.ctx.clone(), replica, detail, |name| {
            self.config.peer_address(name).map(str::to_owned)
        });
        volume.start();
        self.volumes.write().unwrap().insert(v.name.clone(), volume.clone());
        Ok(volume)
    }

    pub fn volumes(&self) -> Vec<Arc<Volume>> {
        self.volumes.read().unwrap().values().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Volume>> {
        self.volumes.read().unwrap().get(name).cloned()
    }

    /// Waits until every volume has tried each of its peers once.
    pub async fn settle(&self) {
        let max = self.config.timeouts.connect * 2;
        futures::future::join_all(self.volumes().iter().map(|v| {
            let v = v.clone();
            async move { v.settle(max).await }
        }))
        .await;
    }

    /// Creates a volume with a local replica (local part of the API's CreateVolume).
    /// Idempotent for an identical definition.
    pub fn create_local(&self, name: &str, size: u64, replicas: &[String]) -> Result<Arc<Volume>, AgentError> {
        check_name("name", name).map_err(|e| AgentError::Invalid(e.to_string()))?;
        if size == 0 || !size.is_multiple_of(BLOCK_SIZE) {
            return Err(AgentError::Invalid(format!("size_bytes: {size} is not a positive multiple of {BLOCK_SIZE}")));
        }
        if replicas.is_empty() || replicas.len() > MAX_REPLICAS {
            return Err(AgentError::Invalid(format!(
                "replicas: needs 1 to {MAX_REPLICAS} nodes, has {}",
                replicas.len()
            )));
        }
        let mut sorted = replicas.to_vec();
        sorted.sort();
        if sorted.windows(2).any(|w| w[0] == w[1]) {
            return Err(AgentError::Invalid(
                "replicas: a node is listed twice; replicas must be on distinct nodes".into(),
            ));
        }
        for r in &sorted {
            if *r != self.ctx.name && self.config.peer_address(r).is_none() {
                return Err(AgentError::Invalid(format!(
                    "replicas: node {r:?} is neither this node nor a configured peer"
                )));
            }
        }
        if !sorted.contains(&self.ctx.name) {
            return Err(AgentError::Invalid(format!("replicas: this node ({}) is not among them", self.ctx.name)));
        }
        if let Some(v) = self.get(name) {
            if v.spec().size == size && v.spec().replicas == sorted {
                return Ok(v);
            }
            return Err(AgentError::Conflict {
                name: name.into(),
                existing: format!("{} bytes on {:?}", v.spec().size, v.spec().replicas),
            });
        }
        let v = VolumeConfig { name: name.into(), size: crate::config::ByteSize(size), replicas: sorted, device: None };
        self.open_volume(&v, true)
    }

    /// Deletes the local replica of a volume created through the API.
    pub fn delete_local(&self, name: &str) -> Result<(), AgentError> {
        if self.config.volumes.iter().any(|v| v.name == name) {
            return Err(AgentError::Invalid(format!(
                "volume {name:?} is declared in the configuration file; remove it there"
            )));
        }
        let Some(v) = self.volumes.write().unwrap().remove(name) else {
            return Err(AgentError::NotFound(name.into()));
        };
        v.stop();
        let mut rec = self.record.lock().unwrap();
        if let Some(r) = rec.volumes.remove(name)
            && r.device.is_none()
        {
            let path = self.config.pool.path.join(format!("{name}.replica"));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(AgentError::Io { context: path.display().to_string(), source }),
            }
        }
        self.save_record(&rec)?;
        tracing::info!(volume = %name, "volume deleted");
        Ok(())
    }

    pub fn stop(&self) {
        for v in self.volumes() {
            v.stop();
        }
    }
}
