//! The node agent: opens the pool, runs a mirror engine per volume, and serves the peer
//! protocol, the NBD frontend and the agent API.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Config, MAX_REPLICAS, PeerConfig, VolumeConfig, WritePolicy, check_name};
use crate::engine::{NodeCtx, PeerAddresses, Volume, VolumeSpec};
use crate::nbd::{ExportInfo, Exports};
use crate::peer::handshake::HandshakeConfig;
use crate::peer::proto::ErrorCode;
use crate::peer::server::VolumeLookup;
use crate::replica::{BLOCK_SIZE, Layout, Replica, ReplicaError};

/// Record of the volumes whose replicas this node created, kept in the pool directory.
/// It tells a lost replica (recreate it empty and resynchronise in full) from a new one,
/// keeps volumes created through the API across restarts, and holds what is recorded per
/// volume (its size as grown, its attachment).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolRecord {
    volumes: BTreeMap<String, RecordedVolume>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct RecordedVolume {
    /// The volume's size: the size it was created with, or grown to.
    size: u64,
    replicas: Vec<String>,
    #[serde(default)]
    device: Option<PathBuf>,
    /// Created through the API (not declared in the config file).
    #[serde(default)]
    from_api: bool,
    /// Attachment record (see [`Node::set_attachment`]): the node the volume is attached to
    /// ("" = none) and the record's sequence number. Absent in records written before it
    /// existed, and left out while unset, so those records still load everywhere.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    attached_node: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    attachment_seq: u64,
    /// Multi-writer volumes: the region size of write priority (absent: single writer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    multi_writer_region: Option<u64>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Space of the pool as the API reports it (`GetNode`). Replicas in the pool are counted
/// at their full size, metadata area included (no overcommit); replicas on devices are
/// not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSpace {
    /// Size of the pool's filesystem.
    pub capacity: u64,
    /// What the pool's replicas may take.
    pub allocated: u64,
    /// `capacity - allocated`, floored at 0, and never more than the filesystem has free.
    pub free: u64,
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
    /// Not enough space (pool, device, or room in the replica's metadata area).
    #[error("{0}")]
    OutOfRange(String),
    /// The request conflicts with one in force or in progress (a retry may succeed).
    #[error("{0}")]
    Aborted(String),
    /// The volume is not in a state that allows the request here.
    #[error("{0}")]
    Precondition(String),
}

/// The volumes of this node, shared by every server of the agent.
pub struct Node {
    pub config: Config,
    pub ctx: Arc<NodeCtx>,
    /// The peers' addresses by node name: `config.peers`, replaced as a whole by
    /// [`Node::set_peers`] (Kubernetes mode, where nodes join and move). The engines look an
    /// address up at every connection attempt.
    peers: Arc<RwLock<BTreeMap<String, String>>>,
    volumes: RwLock<BTreeMap<String, Arc<Volume>>>,
    record: Mutex<PoolRecord>,
    /// Volumes with a growth or deletion in progress (a second one is refused, not queued).
    busy: Mutex<BTreeSet<String>>,
    /// Held from the space check of a new or growing pool replica until it has its space.
    space: Mutex<()>,
}

/// Marks a volume busy until dropped (see `Node::busy`).
struct BusyGuard<'a> {
    node: &'a Node,
    name: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.node.busy.lock().unwrap().remove(&self.name);
    }
}

impl VolumeLookup for Node {
    fn volume(&self, name: &str) -> Option<Arc<Volume>> {
        self.volumes.read().unwrap().get(name).cloned()
    }

    fn create_volume(&self, name: &str, size: u64, replicas: &[String]) -> Result<(), (ErrorCode, String)> {
        self.create_local(name, size, replicas).map(|_| ()).map_err(|e| {
            let code = match e {
                AgentError::OutOfRange(_) => ErrorCode::OutOfRange,
                _ => ErrorCode::Invalid,
            };
            (code, format!("{e}"))
        })
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
                description: format!("peersan volume, {} bytes", v.size()),
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
            refuse_degraded: std::sync::atomic::AtomicBool::new(
                config.degraded_writes == crate::config::DegradedWrites::Refuse,
            ),
        });
        let peers = config.peers.iter().map(|p| (p.name.clone(), p.address.clone())).collect();
        let node = Arc::new(Node {
            config,
            ctx,
            peers: Arc::new(RwLock::new(peers)),
            volumes: RwLock::new(BTreeMap::new()),
            record: Mutex::new(record),
            busy: Mutex::new(BTreeSet::new()),
            space: Mutex::new(()),
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
                        write_policy: if rv.multi_writer_region.is_some() {
                            WritePolicy::MultiWriter
                        } else {
                            WritePolicy::SingleWriter
                        },
                        region_size: rv.multi_writer_region.map(crate::config::ByteSize),
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

    /// Applies `change` to the record of volume `name` and writes it down (fsync + rename);
    /// the record in memory changes only once that succeeded. NotFound when the volume
    /// has no record.
    fn update_record(&self, name: &str, change: impl FnOnce(&mut RecordedVolume)) -> Result<(), AgentError> {
        let mut rec = self.record.lock().unwrap();
        let mut next = rec.clone();
        let entry = next.volumes.get_mut(name).ok_or_else(|| AgentError::NotFound(name.into()))?;
        change(entry);
        self.save_record(&next)?;
        *rec = next;
        Ok(())
    }

    /// Opens (or creates) the local replica of `v` and starts its engine.
    ///
    /// Size: a volume from the API opens at its recorded size; when its replica is larger
    /// (a growth was interrupted after the replica grew and before the record did), at the
    /// replica's size, which is recorded. A volume declared in the configuration file whose
    /// size there grew is grown at open (offline growth); a smaller size than recorded is a
    /// conflict (volumes do not shrink).
    fn open_volume(&self, v: &VolumeConfig, from_api: bool) -> Result<Arc<Volume>, AgentError> {
        let path = self.replica_path(v);
        let mut size = v.size.0;
        let mut replicas = v.replicas.clone();
        replicas.sort();
        let recorded = self.record.lock().unwrap().volumes.get(&v.name).cloned();
        if let Some(r) = &recorded {
            let mut rr = r.replicas.clone();
            rr.sort();
            if rr != replicas {
                return Err(AgentError::Conflict {
                    name: v.name.clone(),
                    existing: format!("{} bytes on {:?}", r.size, r.replicas),
                });
            }
            if r.size > size {
                return Err(AgentError::Invalid(format!(
                    "volume {:?} has {} bytes; it cannot shrink to the {size} bytes configured (volumes only grow)",
                    v.name, r.size
                )));
            }
        }
        let exists = match &v.device {
            // A device holds a replica when its metadata says so. A blank or foreign-looking
            // device is initialised; one that holds another volume's replica is never
            // overwritten.
            Some(_) => match Replica::open(&path, &v.name, size) {
                Ok(_) | Err(ReplicaError::WrongSize { .. }) => true,
                Err(ReplicaError::NotAReplica { .. }) => false,
                Err(e) => return Err(e.into()),
            },
            None => path.exists(),
        };
        let (replica, detail) = if exists {
            match self.open_replica(&path, &v.name, size, from_api) {
                Ok(r) => {
                    size = r.size();
                    (Some(Arc::new(r)), String::new())
                }
                Err(e @ AgentError::OutOfRange(_)) => return Err(e),
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
        match &recorded {
            None => {
                let mut rec = self.record.lock().unwrap();
                let mut next = rec.clone();
                next.volumes.insert(
                    v.name.clone(),
                    RecordedVolume {
                        size,
                        replicas: replicas.clone(),
                        device: v.device.clone(),
                        from_api,
                        attached_node: String::new(),
                        attachment_seq: 0,
                        multi_writer_region: v.policing_region(),
                    },
                );
                self.save_record(&next)?;
                *rec = next;
            }
            Some(r) if r.size != size => {
                tracing::info!(volume = %v.name, from = r.size, to = size, "recording the volume's grown size");
                self.update_record(&v.name, |r| r.size = size)?;
            }
            Some(_) => {}
        }
        let spec = VolumeSpec { name: v.name.clone(), replicas, multi_writer: v.policing_region() };
        let peers = self.peers.clone();
        let addresses: PeerAddresses = Arc::new(move |name: &str| peers.read().unwrap().get(name).cloned());
        let volume = Volume::new(spec, size, self.ctx.clone(), replica, detail, addresses);
        volume.start();
        self.volumes.write().unwrap().insert(v.name.clone(), volume.clone());
        Ok(volume)
    }

    /// Opens an existing replica of a volume of `size` bytes: one that is smaller is grown
    /// to `size` (its growth was recorded, or configured, and not finished); one that is
    /// larger is taken at its size for a volume from the API (its growth finished and was
    /// not yet recorded). A growth the replica cannot take is `OutOfRange`.
    fn open_replica(&self, path: &Path, name: &str, size: u64, from_api: bool) -> Result<Replica, AgentError> {
        match Replica::open(path, name, size) {
            Err(ReplicaError::WrongSize { found, .. }) if found < size => {
                let r = Replica::open(path, name, found)?;
                tracing::info!(volume = %name, from = found, to = size, "growing the local replica");
                r.grow(size).map_err(grow_error)?;
                Ok(r)
            }
            Err(ReplicaError::WrongSize { found, .. }) if from_api => {
                tracing::info!(volume = %name, recorded = size, replica = found, "the replica grew and the record did not; taking the replica's size");
                Ok(Replica::open(path, name, found)?)
            }
            other => Ok(other?),
        }
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

    /// The address of peer `name`, if known.
    pub fn peer_address(&self, name: &str) -> Option<String> {
        self.peers.read().unwrap().get(name).cloned()
    }

    /// Replaces the peers' addresses (Kubernetes mode: a node joined, left or moved). Every
    /// volume's links use the new addresses from their next connection attempt, which
    /// starts at once for the links that are down. Returns whether anything changed.
    pub fn set_peers(&self, peers: &[PeerConfig]) -> bool {
        let next: BTreeMap<String, String> =
            peers.iter().filter(|p| p.name != self.ctx.name).map(|p| (p.name.clone(), p.address.clone())).collect();
        {
            let mut cur = self.peers.write().unwrap();
            if *cur == next {
                return false;
            }
            tracing::info!(peers = ?next, previous = ?*cur, "peer addresses changed");
            *cur = next;
        }
        for v in self.volumes() {
            v.peers_changed();
        }
        true
    }

    /// Creates a volume with a local replica (local part of the API's CreateVolume).
    /// Idempotent for an identical definition. Every other replica node must be a peer
    /// with a known address.
    pub fn create_local(&self, name: &str, size: u64, replicas: &[String]) -> Result<Arc<Volume>, AgentError> {
        self.create_replica(name, size, replicas, true, None)
    }

    /// Creates this node's replica of a volume that the control plane placed on `replicas`
    /// (Kubernetes mode): like [`Node::create_local`], except that the other replica nodes
    /// need no known address yet; their links connect once [`Node::set_peers`] names them.
    /// `multi_writer_region`: the region size of a multi-writer volume (None: single writer).
    pub fn create_member(
        &self,
        name: &str,
        size: u64,
        replicas: &[String],
        multi_writer_region: Option<u64>,
    ) -> Result<Arc<Volume>, AgentError> {
        self.create_replica(name, size, replicas, false, multi_writer_region)
    }

    fn create_replica(
        &self,
        name: &str,
        size: u64,
        replicas: &[String],
        known_peers: bool,
        multi_writer_region: Option<u64>,
    ) -> Result<Arc<Volume>, AgentError> {
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
            if known_peers && *r != self.ctx.name && self.peer_address(r).is_none() {
                return Err(AgentError::Invalid(format!(
                    "replicas: node {r:?} is neither this node nor a configured peer"
                )));
            }
        }
        if !sorted.contains(&self.ctx.name) {
            return Err(AgentError::Invalid(format!("replicas: this node ({}) is not among them", self.ctx.name)));
        }
        // Held until the replica exists: two requests for the same volume (or for the last
        // free space) do not both pass the checks.
        let _space = self.space.lock().unwrap();
        if let Some(v) = self.get(name) {
            if v.size() == size && v.spec().replicas == sorted && v.spec().multi_writer == multi_writer_region {
                return Ok(v);
            }
            return Err(AgentError::Conflict {
                name: name.into(),
                existing: format!("{} bytes on {:?}", v.size(), v.spec().replicas),
            });
        }
        let footprint = Layout::for_new(size, sorted.len() as u32, None)
            .and_then(|l| l.data_offset.checked_add(size))
            .ok_or_else(|| {
                AgentError::OutOfRange(format!(
                    "size_bytes: {size} is too large for a replica on node {}",
                    self.ctx.name
                ))
            })?;
        let space = self.pool_space()?;
        if footprint > space.free {
            return Err(AgentError::OutOfRange(format!(
                "node {} lacks the space for a replica of {size} bytes: its pool {} has {} bytes free, the replica takes {footprint} with its metadata area",
                self.ctx.name,
                self.config.pool.path.display(),
                space.free
            )));
        }
        let v = VolumeConfig {
            name: name.into(),
            size: crate::config::ByteSize(size),
            replicas: sorted,
            device: None,
            write_policy: if multi_writer_region.is_some() {
                WritePolicy::MultiWriter
            } else {
                WritePolicy::SingleWriter
            },
            region_size: multi_writer_region.map(crate::config::ByteSize),
        };
        self.open_volume(&v, true)
    }

    /// Space of the pool: its filesystem (`statvfs`) and the full size of the replicas in it
    /// (the length of each replica file: its metadata area and data; an estimate for one
    /// that is missing and will be recreated).
    pub fn pool_space(&self) -> Result<PoolSpace, AgentError> {
        let pool = &self.config.pool.path;
        let st = rustix::fs::statvfs(pool)
            .map_err(|e| AgentError::Io { context: format!("pool.path {}", pool.display()), source: e.into() })?;
        let capacity = st.f_blocks.saturating_mul(st.f_frsize);
        let fs_free = st.f_bavail.saturating_mul(st.f_frsize);
        let allocated = self
            .record
            .lock()
            .unwrap()
            .volumes
            .iter()
            .filter(|(_, r)| r.device.is_none())
            .map(|(name, r)| {
                let path = pool.join(format!("{name}.replica"));
                std::fs::metadata(&path).map(|m| m.len()).unwrap_or_else(|_| {
                    Layout::for_new(r.size, r.replicas.len() as u32, None)
                        .map_or(r.size, |l| l.data_offset.saturating_add(r.size))
                })
            })
            .fold(0u64, u64::saturating_add);
        Ok(PoolSpace { capacity, allocated, free: capacity.saturating_sub(allocated).min(fs_free) })
    }

    /// Marks `name` busy for the life of the guard; `Aborted` when it is already.
    fn begin(&self, name: &str, what: &str) -> Result<BusyGuard<'_>, AgentError> {
        if !self.busy.lock().unwrap().insert(name.to_owned()) {
            return Err(AgentError::Aborted(format!(
                "volume {name:?}: another growth or deletion is in progress; {what} again when it is done"
            )));
        }
        Ok(BusyGuard { node: self, name: name.to_owned() })
    }

    /// Grows this node's replica of a volume created through the API to `size` bytes,
    /// online (the local part of the API's ExpandVolume; every replica node is asked in
    /// turn by the caller). In order, each step durable before the next: the replica file
    /// (or device range) and its metadata; the pool record; then the engine, so reads and
    /// writes up to the new end work at once, and peers learn the size from this node's
    /// state. Idempotent: a volume already of that size succeeds, and a call interrupted
    /// after any step completes the rest when repeated.
    ///
    /// Invalid: a size that is smaller, zero or not a multiple of 4096, or a volume declared
    /// in the configuration file. OutOfRange: more than the replica's metadata area (or its
    /// device) can take (the message names the largest size), or more than the pool has
    /// free. Precondition: this node has no working replica of the volume. Aborted: another
    /// growth or deletion of the volume is in progress.
    ///
    /// Blocking (file and device I/O): call it from a blocking thread.
    pub fn expand_local(&self, name: &str, size: u64) -> Result<Arc<Volume>, AgentError> {
        let v = self.get(name).ok_or_else(|| AgentError::NotFound(name.into()))?;
        if self.config.volumes.iter().any(|c| c.name == name) {
            return Err(AgentError::Invalid(format!(
                "volume {name:?} is declared in the configuration file; change its size there and restart the agent"
            )));
        }
        if size == 0 || !size.is_multiple_of(BLOCK_SIZE) {
            return Err(AgentError::Invalid(format!("size_bytes: {size} is not a positive multiple of {BLOCK_SIZE}")));
        }
        let _busy = self.begin(name, "expand")?;
        let current = v.size();
        if size < current {
            return Err(AgentError::Invalid(format!(
                "volume {name:?} has {current} bytes; it cannot shrink to {size} (volumes only grow)"
            )));
        }
        if size == current {
            return Ok(v);
        }
        let replica = v.replica_to_grow().map_err(AgentError::Precondition)?;
        let (max, why) = replica.max_size()?;
        if size > max {
            return Err(AgentError::OutOfRange(format!(
                "volume {name:?}: the replica on {} can grow to at most {max} bytes ({}), the limit of {why}; {size} bytes asked",
                self.ctx.name,
                human_bytes(max)
            )));
        }
        if replica.is_device() {
            replica.grow(size).map_err(grow_error)?;
        } else {
            let _space = self.space.lock().unwrap();
            let more = size - replica.size();
            let free = self.pool_space()?.free;
            if more > free {
                return Err(AgentError::OutOfRange(format!(
                    "node {} lacks the space to grow volume {name:?} to {size} bytes: its pool {} has {free} bytes free, the growth takes {more}",
                    self.ctx.name,
                    self.config.pool.path.display()
                )));
            }
            replica.grow(size).map_err(grow_error)?;
        }
        self.update_record(name, |r| r.size = size)?;
        v.grow(size);
        tracing::info!(volume = %name, from = current, to = size, "volume expanded on this node");
        Ok(v)
    }

    /// Records which node volume `name` is attached to (the API's SetAttachment): a record
    /// with a higher `seq` replaces the one in force; the same `seq` and node again is
    /// accepted (idempotent); the same `seq` with another node is `Aborted`; a lower `seq`
    /// changes nothing and is not an error. Durable (the pool record is written with fsync
    /// and rename) before it returns. Returns the record now in force.
    pub fn set_attachment(&self, name: &str, node: &str, seq: u64) -> Result<(String, u64), AgentError> {
        if self.get(name).is_none() {
            return Err(AgentError::NotFound(name.into()));
        }
        if node.len() > 253 || node.chars().any(char::is_control) {
            return Err(AgentError::Invalid(format!(
                "node: {node:?} is not a node name (at most 253 characters, no control characters)"
            )));
        }
        let mut rec = self.record.lock().unwrap();
        let r = rec.volumes.get(name).ok_or_else(|| AgentError::NotFound(name.into()))?;
        let current = (r.attached_node.clone(), r.attachment_seq);
        match seq.cmp(&current.1) {
            std::cmp::Ordering::Less => return Ok(current),
            std::cmp::Ordering::Equal if current.0 == node => return Ok(current),
            std::cmp::Ordering::Equal => {
                return Err(AgentError::Aborted(format!(
                    "volume {name:?}: attachment {seq} already records node {:?}; a new record needs a higher seq",
                    current.0
                )));
            }
            std::cmp::Ordering::Greater => {}
        }
        let mut next = rec.clone();
        if let Some(r) = next.volumes.get_mut(name) {
            r.attached_node = node.to_owned();
            r.attachment_seq = seq;
        }
        self.save_record(&next)?;
        *rec = next;
        tracing::info!(volume = %name, %node, seq, "attachment recorded");
        Ok((node.to_owned(), seq))
    }

    /// The attachment record of a volume: (node, seq); None when it has no record.
    pub fn attachment(&self, name: &str) -> Option<(String, u64)> {
        self.record.lock().unwrap().volumes.get(name).map(|r| (r.attached_node.clone(), r.attachment_seq))
    }

    /// Deletes the local replica of a volume created through the API, and its record
    /// (attachment included).
    pub fn delete_local(&self, name: &str) -> Result<(), AgentError> {
        if self.config.volumes.iter().any(|v| v.name == name) {
            return Err(AgentError::Invalid(format!(
                "volume {name:?} is declared in the configuration file; remove it there"
            )));
        }
        let _busy = self.begin(name, "delete")?;
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

    /// Clean shutdown, once the frontends have stopped: everything acknowledged is made
    /// durable, the engines stop, and the bitmaps are written complete (with the clean
    /// flag), so the next start need not replay the activity log.
    pub async fn shutdown(&self) {
        use crate::block::BlockDevice;
        for v in self.volumes() {
            if let Err(e) = v.flush().await {
                tracing::warn!(volume = %v.name(), error = %e, "flush at shutdown failed");
            }
        }
        self.stop();
        for v in self.volumes() {
            v.shutdown();
        }
    }
}

/// A replica's refusal to grow, as an agent error: beyond what it can take is OutOfRange.
fn grow_error(e: ReplicaError) -> AgentError {
    match e {
        ReplicaError::CannotGrow { .. } => AgentError::OutOfRange(e.to_string()),
        ReplicaError::Invalid(m) => AgentError::Invalid(m),
        e => e.into(),
    }
}

/// `17179869184` → `16.0 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[i]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_without_attachments_load_and_unset_ones_are_not_written() {
        let old = r#"{"volumes":{"v":{"size":4096,"replicas":["a","b"],"device":null,"from_api":true}}}"#;
        let rec: PoolRecord = serde_json::from_str(old).unwrap();
        let v = &rec.volumes["v"];
        assert_eq!((v.attached_node.as_str(), v.attachment_seq), ("", 0));
        let text = serde_json::to_string(&rec).unwrap();
        assert!(!text.contains("attach"), "{text}");
        let mut rec = rec;
        rec.volumes.get_mut("v").unwrap().attached_node = "node-b".into();
        rec.volumes.get_mut("v").unwrap().attachment_seq = 7;
        let back: PoolRecord = serde_json::from_str(&serde_json::to_string(&rec).unwrap()).unwrap();
        assert_eq!(back.volumes["v"], rec.volumes["v"]);
    }
}
