//! The mirror engine: one [`Volume`] per volume this node holds a replica of.
//!
//! A write received by a frontend is executed on the local replica and sent to every peer
//! that receives writes (in sync or catching up) at the same time; it completes when all of
//! them have completed it. Overlapping writes from this node are serialised
//! ([`ranges::RangeLocks`]), so every replica applies them in the same order.
//!
//! State changes (all of them are here):
//! - a peer's state is learnt at connect (`Open`/`Opened`) and by `State` messages, and
//!   [`state::decide`] gives the link's state and whether the local replica is out of date;
//! - a peer that fails or times out on a request is dropped (Disconnected) and recorded as
//!   outdated in the local metadata before the write is acknowledged;
//! - a write whose `sent` set excludes a replica makes every replica that executes it record
//!   that replica as outdated;
//! - a local I/O error marks the local replica Failed: reads and writes go to peers;
//! - an out-of-date local replica is resynchronised from an in-sync peer
//!   ([`Volume::run_resync`]), then announces itself consistent, and peers clear their
//!   record of it.

pub mod bitmap;
pub mod ranges;
pub mod state;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::future::join_all;
use tokio::sync::Notify;

use crate::block::{BlockDevice, BlockError, BlockErrorKind, BlockResult, check_range};
use crate::peer::client::{PeerConn, PeerError};
use crate::peer::handshake::HandshakeConfig;
use crate::peer::proto::{ErrorCode, ReplicaStateMsg, Reply, Request, WF_FUA};
use crate::replica::{BLOCK_SIZE, Replica};
use ranges::{BlockSet, RangeLocks};
pub use state::ReplicaState;

/// Size of one resync copy request.
const RESYNC_CHUNK: u64 = 1 << 20;
/// Resync copy requests in flight.
const RESYNC_DEPTH: usize = 4;

/// What every volume of a node shares.
pub struct NodeCtx {
    pub name: String,
    pub handshake: HandshakeConfig,
    pub io_timeout: Duration,
    pub reconnect_max: Duration,
    /// Resync copy rate per volume in bytes per second; 0 = unlimited.
    pub resync_rate: u64,
}

/// A volume's identity: name, size and its replicas' nodes (sorted; the index in this list
/// is the replica's bit in the masks of write frames).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub name: String,
    pub size: u64,
    pub replicas: Vec<String>,
}

struct Local {
    replica: Option<Arc<Replica>>,
    state: ReplicaState,
    detail: String,
}

struct Link {
    name: String,
    address: Option<String>,
    inner: Mutex<LinkInner>,
    /// Cuts the reconnect back-off short (the peer just reached us, so it is up).
    retry_now: Notify,
    /// Bumped when this node records that the peer missed writes: the peer's connections
    /// to us are then closed, so that it reconnects and learns it from our `Opened`.
    missed_writes: tokio::sync::watch::Sender<u64>,
}

struct LinkInner {
    state: ReplicaState,
    conn: Option<Arc<PeerConn>>,
    theirs: Option<ReplicaStateMsg>,
    detail: String,
}

/// Resync progress of the local replica.
#[derive(Debug, Clone, Default)]
pub struct ResyncProgress {
    pub source: Option<String>,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub started: Option<Instant>,
}

/// One replica's state as reported by the API.
#[derive(Debug, Clone)]
pub struct ReplicaReport {
    pub node: String,
    pub local: bool,
    pub state: ReplicaState,
    pub detail: String,
    pub generation: u64,
    pub path: String,
}

/// A peer that receives a write or a flush.
struct Target {
    idx: usize,
    conn: Arc<PeerConn>,
    in_sync: bool,
}

/// The write-like operations.
#[derive(Clone)]
enum Op {
    Write { offset: u64, data: Bytes, fua: bool },
    Zero { offset: u64, len: u64, punch: bool, fua: bool },
}

impl Op {
    fn range(&self) -> (u64, u64) {
        match self {
            Op::Write { offset, data, .. } => (*offset, data.len() as u64),
            Op::Zero { offset, len, .. } => (*offset, *len),
        }
    }

    fn request(&self, insync: u32, sent: u32) -> Request {
        match self.clone() {
            Op::Write { offset, data, fua } => {
                Request::Write { offset, flags: if fua { WF_FUA } else { 0 }, insync, sent, data }
            }
            Op::Zero { offset, len, punch: true, fua } => {
                Request::Trim { offset, len, flags: if fua { WF_FUA } else { 0 }, insync, sent }
            }
            Op::Zero { offset, len, punch: false, fua } => {
                Request::WriteZeroes { offset, len, flags: if fua { WF_FUA } else { 0 }, insync, sent }
            }
        }
    }
}

/// The mirror engine of one volume on this node.
pub struct Volume {
    spec: VolumeSpec,
    me: usize,
    /// Bitmask of every replica index but this node's.
    all_peers: u32,
    ctx: Arc<NodeCtx>,
    local: Mutex<Local>,
    links: Vec<Option<Link>>,
    write_locks: RangeLocks,
    apply_locks: RangeLocks,
    /// While the local replica catches up: blocks written by foreground writes since.
    fresh: Mutex<Option<BlockSet>>,
    /// For peers resynchronising from this replica: blocks written here since they started.
    missed: Mutex<HashMap<usize, BlockSet>>,
    tracking: AtomicBool,
    generation_zero: AtomicBool,
    resync: Mutex<ResyncProgress>,
    changed: Notify,
    stopping: AtomicBool,
    stop: Notify,
    attempts: AtomicUsize,
    settled: Notify,
    next_read: AtomicUsize,
}

fn io_error(msg: impl Into<String>) -> BlockError {
    BlockError::new(BlockErrorKind::Io, msg)
}

impl Volume {
    /// Creates the engine. `replica` is the local replica (None when it is missing or its
    /// disk failed); `addresses` gives each peer's address (None for this node).
    pub fn new(
        spec: VolumeSpec,
        ctx: Arc<NodeCtx>,
        replica: Option<Arc<Replica>>,
        replica_detail: String,
        addresses: impl Fn(&str) -> Option<String>,
    ) -> Arc<Volume> {
        let me = spec.replicas.iter().position(|r| *r == ctx.name).expect("volume must list this node");
        let links = spec
            .replicas
            .iter()
            .enumerate()
            .map(|(i, name)| {
                (i != me).then(|| Link {
                    name: name.clone(),
                    address: addresses(name),
                    inner: Mutex::new(LinkInner {
                        state: ReplicaState::Disconnected,
                        conn: None,
                        theirs: None,
                        detail: String::new(),
                    }),
                    retry_now: Notify::new(),
                    missed_writes: tokio::sync::watch::Sender::new(0),
                })
            })
            .collect();
        let (state, fresh, gen0) = match &replica {
            Some(r) => {
                let m = r.meta();
                if m.consistent {
                    (ReplicaState::InSync, None, m.generation == 0)
                } else {
                    (ReplicaState::Outdated, Some(BlockSet::new(spec.size)), m.generation == 0)
                }
            }
            None => (ReplicaState::Failed, None, false),
        };
        Arc::new(Volume {
            local: Mutex::new(Local { replica, state, detail: replica_detail }),
            links,
            write_locks: RangeLocks::default(),
            apply_locks: RangeLocks::default(),
            fresh: Mutex::new(fresh),
            missed: Mutex::new(HashMap::new()),
            tracking: AtomicBool::new(false),
            generation_zero: AtomicBool::new(gen0),
            resync: Mutex::new(ResyncProgress::default()),
            changed: Notify::new(),
            stopping: AtomicBool::new(false),
            stop: Notify::new(),
            attempts: AtomicUsize::new(0),
            settled: Notify::new(),
            next_read: AtomicUsize::new(0),
            all_peers: (((1u64 << spec.replicas.len()) - 1) as u32) & !(1 << me),
            spec,
            me,
            ctx,
        })
    }

    pub fn spec(&self) -> &VolumeSpec {
        &self.spec
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Starts the connection managers of every peer and the resync task.
    pub fn start(self: &Arc<Self>) {
        for idx in 0..self.links.len() {
            if self.links[idx].is_some() {
                let v = self.clone();
                tokio::spawn(async move { v.run_link(idx).await });
            }
        }
        let v = self.clone();
        tokio::spawn(async move { v.resync_loop().await });
    }

    /// Stops the engine's tasks and closes its connections.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stop.notify_waiters();
        self.changed.notify_waiters();
        for link in self.links.iter().flatten() {
            if let Some(c) = link.inner.lock().unwrap().conn.take() {
                c.close();
            }
        }
    }

    /// Waits until every peer has been tried once (or `max` elapsed), so that a replica
    /// that missed writes learns it before it serves reads.
    pub async fn settle(&self, max: Duration) {
        let peers = self.links.iter().flatten().count();
        let _ = tokio::time::timeout(max, async {
            loop {
                let n = self.settled.notified();
                if self.attempts.load(Ordering::Acquire) >= peers {
                    return;
                }
                n.await;
            }
        })
        .await;
    }

    fn link(&self, idx: usize) -> Option<&Link> {
        self.links.get(idx).and_then(Option::as_ref)
    }

    pub fn replica_index(&self, node: &str) -> Option<usize> {
        self.spec.replicas.iter().position(|r| r == node)
    }

    fn local_replica(&self) -> Option<(Arc<Replica>, ReplicaState)> {
        let l = self.local.lock().unwrap();
        l.replica.clone().map(|r| (r, l.state))
    }

    /// This replica's state as sent to peers.
    pub fn state_msg(&self) -> ReplicaStateMsg {
        let l = self.local.lock().unwrap();
        match &l.replica {
            Some(r) if l.state != ReplicaState::Failed => {
                let m = r.meta();
                ReplicaStateMsg {
                    consistent: m.consistent,
                    generation: m.generation,
                    size: self.spec.size,
                    outdated_peers: m.outdated_peers,
                    local_ok: true,
                }
            }
            _ => ReplicaStateMsg {
                consistent: false,
                generation: 0,
                size: self.spec.size,
                outdated_peers: vec![],
                local_ok: false,
            },
        }
    }

    // ---- state transitions -------------------------------------------------------------

    /// The local replica returned an I/O error: stop using it.
    fn local_failed(&self, err: &std::io::Error) {
        let mut l = self.local.lock().unwrap();
        if l.state != ReplicaState::Failed {
            tracing::error!(volume = %self.spec.name, error = %err, "local replica failed; serving from peers");
            l.state = ReplicaState::Failed;
            l.detail = format!("I/O error: {err}");
            drop(l);
            self.broadcast_state();
            self.changed.notify_waiters();
        }
    }

    /// Records durably that the replicas in the bitmask `missed` (this node's bit ignored)
    /// missed writes. Must complete before a write they missed is acknowledged.
    /// `sender` is the peer whose write revealed it, if any: its connections are left open
    /// (it is the writer, and knows the state it sent).
    fn flag_outdated(&self, missed: u32, sender: Option<usize>) {
        let missed = missed & self.all_peers;
        if missed == 0 {
            return;
        }
        let idxs: Vec<usize> = (0..self.spec.replicas.len()).filter(|i| missed & (1 << i) != 0).collect();
        // A failed disk records nothing; the replicas that executed the write do.
        let Some((replica, _)) = self.local_replica().filter(|(_, s)| *s != ReplicaState::Failed) else { return };
        let names: Vec<String> = idxs.iter().map(|&i| self.spec.replicas[i].clone()).collect();
        match replica.update_meta(|m| {
            let before = m.outdated_peers.len();
            for n in &names {
                if !m.outdated_peers.contains(n) {
                    m.outdated_peers.push(n.clone());
                }
            }
            if m.outdated_peers.len() != before {
                m.generation = m.generation.max(1) + 1;
            }
        }) {
            Ok(true) => {
                tracing::warn!(volume = %self.spec.name, peers = ?names, "replicas missed writes; recorded as outdated");
                for &i in &idxs {
                    if let Some(link) = self.link(i) {
                        let mut li = link.inner.lock().unwrap();
                        if li.state == ReplicaState::InSync {
                            li.state = ReplicaState::Outdated;
                        }
                        drop(li);
                        if Some(i) != sender {
                            link.missed_writes.send_modify(|n| *n += 1);
                        }
                    }
                }
                self.broadcast_state();
            }
            Ok(false) => {}
            Err(e) => tracing::error!(volume = %self.spec.name, error = %e, "cannot record outdated replicas"),
        }
    }

    /// The local replica is out of date: mark it inconsistent (durably) and let the resync
    /// task bring it back.
    fn local_outdated(&self) {
        let Some((replica, state)) = self.local_replica() else { return };
        if state != ReplicaState::InSync {
            return;
        }
        *self.fresh.lock().unwrap() = Some(BlockSet::new(self.spec.size));
        if let Err(e) = replica.update_meta(|m| m.consistent = false) {
            tracing::error!(volume = %self.spec.name, error = %e, "cannot record that the local replica is outdated");
        }
        {
            let mut l = self.local.lock().unwrap();
            if l.state == ReplicaState::InSync {
                l.state = ReplicaState::Outdated;
                l.detail = "missed writes; waiting for resync".into();
            }
        }
        tracing::warn!(volume = %self.spec.name, "local replica is out of date; resynchronising");
        self.broadcast_state();
        self.changed.notify_waiters();
    }

    /// Applies what a peer's state means (see [`state::decide`]). `announced` is true for a
    /// `State` message (a change the peer announces), false at connect.
    pub fn observe_peer_state(&self, idx: usize, theirs: ReplicaStateMsg, announced: bool) {
        let Some(link) = self.link(idx) else { return };
        // A peer that announces it became consistent has caught up: forget that it missed writes.
        let was_inconsistent = link.inner.lock().unwrap().theirs.as_ref().is_some_and(|t| !t.consistent);
        if announced && theirs.consistent && theirs.local_ok && was_inconsistent {
            if let Some((replica, _)) = self.local_replica() {
                let name = link.name.clone();
                let _ = replica.update_meta(|m| m.outdated_peers.retain(|p| *p != name));
            }
            self.missed.lock().unwrap().remove(&idx);
        }
        let mine = self.state_msg();
        let d = state::decide(&self.ctx.name, &mine, &link.name, &theirs);
        {
            let mut li = link.inner.lock().unwrap();
            li.theirs = Some(theirs);
            if li.conn.is_some() {
                if li.state != d.peer {
                    tracing::info!(volume = %self.spec.name, peer = %link.name, from = %li.state, to = %d.peer, "replica state");
                }
                li.state = d.peer;
                li.detail = match d.peer {
                    ReplicaState::SplitBrain => "both replicas accepted writes the other missed; not merged".into(),
                    _ => String::new(),
                };
            }
        }
        if d.peer == ReplicaState::SplitBrain {
            tracing::error!(volume = %self.spec.name, peer = %link.name, "split brain detected; the replicas will not be merged automatically");
        }
        if d.local_outdated {
            self.local_outdated();
        }
        self.changed.notify_waiters();
    }

    fn broadcast_state(&self) {
        let st = self.state_msg();
        for link in self.links.iter().flatten() {
            let conn = link.inner.lock().unwrap().conn.clone();
            if let Some(conn) = conn {
                let st = st.clone();
                tokio::spawn(async move {
                    let _ = conn.call(Request::State { state: st }).await;
                });
            }
        }
    }

    fn drop_link(&self, idx: usize, err: &PeerError) {
        if let Some(link) = self.link(idx) {
            let mut li = link.inner.lock().unwrap();
            if let Some(c) = li.conn.take() {
                c.close();
                tracing::warn!(volume = %self.spec.name, peer = %link.name, error = %err, "peer dropped from the volume");
            }
            li.state = ReplicaState::Disconnected;
            li.detail = err.to_string();
        }
    }

    // ---- connections -------------------------------------------------------------------

    async fn run_link(self: Arc<Self>, idx: usize) {
        let link = self.link(idx).expect("link");
        let mut backoff = Duration::from_millis(100);
        let mut first = true;
        while !self.stopping.load(Ordering::Acquire) {
            let result = match &link.address {
                Some(addr) => {
                    PeerConn::connect(
                        &link.name,
                        addr,
                        &self.ctx.handshake,
                        &self.spec.name,
                        self.state_msg(),
                        self.ctx.io_timeout,
                    )
                    .await
                }
                None => Err(PeerError::Connect {
                    peer: link.name.clone(),
                    address: String::new(),
                    message: "no address configured for this peer".into(),
                }),
            };
            match result {
                Ok((conn, theirs)) => {
                    tracing::info!(volume = %self.spec.name, peer = %link.name, "connected");
                    link.inner.lock().unwrap().conn = Some(conn.clone());
                    self.observe_peer_state(idx, theirs, false);
                    if first {
                        first = false;
                        self.attempts.fetch_add(1, Ordering::AcqRel);
                        self.settled.notify_waiters();
                    }
                    backoff = Duration::from_millis(100);
                    tokio::select! {
                        _ = conn.closed() => {}
                        _ = self.stop.notified() => { conn.close(); }
                    }
                    let mut li = link.inner.lock().unwrap();
                    if li.conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn)) {
                        li.conn = None;
                        li.state = ReplicaState::Disconnected;
                        if li.detail.is_empty() {
                            li.detail = "connection closed".into();
                        }
                    }
                    drop(li);
                    self.changed.notify_waiters();
                }
                Err(e) => {
                    {
                        let mut li = link.inner.lock().unwrap();
                        if li.detail != e.to_string() {
                            tracing::debug!(volume = %self.spec.name, peer = %link.name, error = %e, "cannot connect");
                        }
                        li.detail = e.to_string();
                    }
                    if first {
                        first = false;
                        self.attempts.fetch_add(1, Ordering::AcqRel);
                        self.settled.notify_waiters();
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = link.retry_now.notified() => {}
                _ = self.stop.notified() => {}
            }
            backoff = (backoff * 2).min(self.ctx.reconnect_max);
        }
    }

    // ---- foreground I/O ----------------------------------------------------------------

    /// Executes `op` on the local replica. While the local replica catches up, foreground
    /// writes mark the blocks they cover as fresh so that resync never overwrites them.
    async fn apply_local(&self, replica: &Replica, op: &Op) -> std::io::Result<()> {
        let (offset, len) = op.range();
        let catching_up = self.fresh.lock().unwrap().is_some();
        let _guard = if catching_up { Some(self.apply_locks.lock(offset, len).await) } else { None };
        match op {
            Op::Write { offset, data, fua } => replica.write(*offset, data.clone(), *fua).await?,
            Op::Zero { offset, len, punch, fua } => replica.zero(*offset, *len, *punch, *fua).await?,
        }
        if catching_up && let Some(f) = self.fresh.lock().unwrap().as_mut() {
            f.insert_covered(offset, len);
        }
        if self.tracking.load(Ordering::Acquire) {
            for set in self.missed.lock().unwrap().values_mut() {
                set.insert_touched(offset, len);
            }
        }
        if self.generation_zero.load(Ordering::Relaxed) {
            self.generation_zero.store(false, Ordering::Relaxed);
            let _ = replica.update_meta(|m| m.generation = m.generation.max(1));
        }
        Ok(())
    }

    /// The local replica (when it receives writes) and the peers that receive writes now.
    fn write_targets(&self) -> (Option<(Arc<Replica>, ReplicaState)>, Vec<Target>) {
        let local = self.local_replica().filter(|(_, s)| s.receives_writes());
        let peers = self
            .links
            .iter()
            .enumerate()
            .filter_map(|(idx, l)| {
                let li = l.as_ref()?.inner.lock().unwrap();
                let conn = li.conn.clone().filter(|_| li.state.receives_writes())?;
                Some(Target { idx, conn, in_sync: li.state == ReplicaState::InSync })
            })
            .collect();
        (local, peers)
    }

    /// Applies the outcome of one request sent to the local replica and the peers: failed
    /// peers are dropped and recorded as outdated, a failed local replica is marked failed.
    /// Returns whether a replica that was in sync completed it.
    fn conclude(
        &self,
        targets: &[Target],
        peer_results: Vec<Result<Reply, PeerError>>,
        local: Option<(std::io::Result<()>, bool)>,
    ) -> bool {
        let mut done_in_sync = false;
        let mut failed = 0u32;
        for (t, res) in targets.iter().zip(peer_results) {
            match res {
                Ok(_) => done_in_sync |= t.in_sync,
                Err(e) => {
                    self.drop_link(t.idx, &e);
                    failed |= 1 << t.idx;
                }
            }
        }
        match local {
            Some((Ok(()), in_sync)) => done_in_sync |= in_sync,
            Some((Err(e), _)) => self.local_failed(&e),
            None => {}
        }
        self.flag_outdated(failed, None);
        done_in_sync
    }

    /// A write-like operation received by a frontend of this node.
    async fn submit(&self, op: Op) -> BlockResult<()> {
        let (offset, len) = op.range();
        check_range(offset, len, self.spec.size)?;
        let _guard = self.write_locks.lock(offset, len).await;

        let (local, targets) = self.write_targets();
        let mut sent = 0u32;
        let mut insync = 0u32;
        if let Some((_, s)) = &local {
            sent |= 1 << self.me;
            if *s == ReplicaState::InSync {
                insync |= 1 << self.me;
            }
        }
        for t in &targets {
            sent |= 1 << t.idx;
            if t.in_sync {
                insync |= 1 << t.idx;
            }
        }
        self.flag_outdated(!sent, None);

        let local_fut = async {
            match &local {
                Some((r, s)) => Some((self.apply_local(r, &op).await, *s == ReplicaState::InSync)),
                None => None,
            }
        };
        let peer_futs = targets.iter().map(|t| t.conn.call(op.request(insync, sent)));
        let (local_res, peer_res) = tokio::join!(local_fut, join_all(peer_futs));
        if self.conclude(&targets, peer_res, local_res) {
            Ok(())
        } else {
            Err(io_error(format!("volume {}: no in-sync replica executed the write", self.spec.name)))
        }
    }

    async fn do_read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        check_range(offset, u64::from(len), self.spec.size)?;
        if let Some((r, ReplicaState::InSync)) = self.local_replica() {
            match r.read(offset, len as usize).await {
                Ok(b) => return Ok(b),
                Err(e) => self.local_failed(&e),
            }
        }
        let n = self.links.len();
        let start = self.next_read.fetch_add(1, Ordering::Relaxed);
        for k in 0..n {
            let idx = (start + k) % n;
            let Some(link) = self.link(idx) else { continue };
            let conn = {
                let li = link.inner.lock().unwrap();
                match (&li.conn, li.state) {
                    (Some(c), ReplicaState::InSync) => c.clone(),
                    _ => continue,
                }
            };
            match conn.call(Request::Read { offset, len }).await {
                Ok(Reply::Data { data }) if data.len() == len as usize => return Ok(data),
                Ok(other) => {
                    tracing::warn!(volume = %self.spec.name, peer = %link.name, "unexpected read reply {other:?}")
                }
                Err(PeerError::Remote { code: ErrorCode::NotInSync, .. }) => {
                    link.inner.lock().unwrap().state = ReplicaState::Outdated;
                }
                Err(e) => self.drop_link(idx, &e),
            }
        }
        Err(io_error(format!("volume {}: no in-sync replica can serve the read", self.spec.name)))
    }

    async fn do_flush(&self) -> BlockResult<()> {
        let (local, targets) = self.write_targets();
        let local_fut = async {
            match &local {
                Some((r, s)) => Some((r.flush().await, *s == ReplicaState::InSync)),
                None => None,
            }
        };
        let (local_res, peer_res) =
            tokio::join!(local_fut, join_all(targets.iter().map(|t| t.conn.call(Request::Flush))));
        if self.conclude(&targets, peer_res, local_res) {
            Ok(())
        } else {
            Err(io_error(format!("volume {}: no in-sync replica completed the flush", self.spec.name)))
        }
    }

    // ---- requests from peers -----------------------------------------------------------

    /// A peer opened the volume: learn its state and return ours. If our own connection to
    /// it is down, retry it now rather than after the back-off: writes are sent to a peer
    /// only over our connection to it.
    pub fn peer_open(&self, from: usize, theirs: ReplicaStateMsg) -> ReplicaStateMsg {
        self.observe_peer_state(from, theirs, false);
        if let Some(link) = self.link(from)
            && link.inner.lock().unwrap().conn.is_none()
        {
            link.retry_now.notify_one();
        }
        self.state_msg()
    }

    /// Waits until this node is connected to every peer of the volume, or `max` elapsed.
    /// Returns the peers still unconnected.
    pub async fn wait_connected(&self, max: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let changed = self.changed.notified();
            let missing: Vec<String> = self
                .links
                .iter()
                .flatten()
                .filter(|l| l.inner.lock().unwrap().conn.is_none())
                .map(|l| l.name.clone())
                .collect();
            if missing.is_empty() || tokio::time::Instant::now() >= deadline {
                return missing;
            }
            for l in self.links.iter().flatten() {
                l.retry_now.notify_one();
            }
            let _ = tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(100)),
                changed,
            )
            .await;
        }
    }

    /// Changes when this node records that peer `idx` missed writes; the peer server closes
    /// the peer's connections then (see `Link::missed_writes`).
    pub fn missed_writes_watch(&self, idx: usize) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.link(idx).map(|l| l.missed_writes.subscribe())
    }

    /// A peer's connection to us closed: stop tracking resync for it.
    pub fn peer_closed(&self, from: usize) {
        let mut missed = self.missed.lock().unwrap();
        missed.remove(&from);
        self.tracking.store(!missed.is_empty(), Ordering::Release);
    }

    /// Executes a request that a peer sent us. Returns the reply to send.
    pub async fn serve_peer(&self, from: usize, req: Request) -> Reply {
        let err = |code, message: String| Reply::Error { code, message };
        match req {
            Request::Write { offset, flags, sent, data, .. } => {
                self.peer_write(from, sent, Op::Write { offset, data, fua: flags & WF_FUA != 0 }).await
            }
            Request::WriteZeroes { offset, len, flags, sent, .. } => {
                self.peer_write(from, sent, Op::Zero { offset, len, punch: false, fua: flags & WF_FUA != 0 }).await
            }
            Request::Trim { offset, len, flags, sent, .. } => {
                self.peer_write(from, sent, Op::Zero { offset, len, punch: true, fua: flags & WF_FUA != 0 }).await
            }
            Request::Read { offset, len } => {
                if let Err(e) = check_range(offset, u64::from(len), self.spec.size) {
                    return err(ErrorCode::OutOfRange, e.message);
                }
                match self.local_replica() {
                    Some((r, ReplicaState::InSync)) => match r.read(offset, len as usize).await {
                        Ok(data) => Reply::Data { data },
                        Err(e) => {
                            self.local_failed(&e);
                            err(ErrorCode::Io, e.to_string())
                        }
                    },
                    _ => err(
                        ErrorCode::NotInSync,
                        format!("the replica of {} on {} is not in sync", self.spec.name, self.ctx.name),
                    ),
                }
            }
            Request::Flush => match self.local_replica() {
                Some((r, s)) if s.receives_writes() => match r.flush().await {
                    Ok(()) => Reply::Ok,
                    Err(e) => {
                        self.local_failed(&e);
                        err(ErrorCode::Io, e.to_string())
                    }
                },
                _ => err(ErrorCode::Io, format!("the replica of {} on {} has failed", self.spec.name, self.ctx.name)),
            },
            Request::State { state } => {
                self.observe_peer_state(from, state, true);
                Reply::Ok
            }
            Request::ResyncPoll { finish } => {
                let mut missed = self.missed.lock().unwrap();
                if !finish {
                    missed.insert(from, BlockSet::new(self.spec.size));
                    self.tracking.store(true, Ordering::Release);
                    return Reply::ResyncRanges { ranges: vec![], done: false };
                }
                match missed.get_mut(&from) {
                    Some(set) => {
                        let ranges = set.ranges();
                        set.clear();
                        let done = ranges.is_empty();
                        Reply::ResyncRanges { ranges, done }
                    }
                    None => err(ErrorCode::Invalid, "no resync in progress for this peer".into()),
                }
            }
            Request::Ping => Reply::Pong,
            Request::Open { .. } => err(ErrorCode::Invalid, "volume already open on this connection".into()),
            Request::CreateVolume { .. } | Request::DeleteVolume { .. } => {
                err(ErrorCode::Invalid, "volume lifecycle requests must come on a connection of their own".into())
            }
        }
    }

    async fn peer_write(&self, from: usize, sent: u32, op: Op) -> Reply {
        let (offset, len) = op.range();
        if let Err(e) = check_range(offset, len, self.spec.size) {
            return Reply::Error { code: ErrorCode::OutOfRange, message: e.message };
        }
        self.flag_outdated(!sent, Some(from));
        match self.local_replica() {
            Some((r, s)) if s.receives_writes() => match self.apply_local(&r, &op).await {
                Ok(()) => Reply::Ok,
                Err(e) => {
                    self.local_failed(&e);
                    Reply::Error { code: ErrorCode::Io, message: e.to_string() }
                }
            },
            _ => Reply::Error {
                code: ErrorCode::Io,
                message: format!("the replica of {} on {} has failed", self.spec.name, self.ctx.name),
            },
        }
    }

    // ---- resync ------------------------------------------------------------------------

    async fn resync_loop(self: Arc<Self>) {
        while !self.stopping.load(Ordering::Acquire) {
            let changed = self.changed.notified();
            let needs = matches!(self.local_replica(), Some((_, ReplicaState::Outdated | ReplicaState::CatchingUp)));
            let source = needs.then(|| self.pick_source()).flatten();
            match source {
                Some((idx, conn)) => {
                    if let Err(e) = self.run_resync(idx, &conn).await {
                        tracing::warn!(volume = %self.spec.name, source = %self.spec.replicas[idx], error = %e, "resync interrupted; will retry");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                None => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
                }
            }
        }
    }

    fn pick_source(&self) -> Option<(usize, Arc<PeerConn>)> {
        self.links.iter().enumerate().find_map(|(i, l)| {
            let li = l.as_ref()?.inner.lock().unwrap();
            let ok = li.state == ReplicaState::InSync && li.theirs.as_ref().is_some_and(|t| t.consistent && t.local_ok);
            ok.then(|| Some((i, li.conn.clone()?)))?
        })
    }

    /// Copies the whole volume from `idx` while foreground writes continue, then the blocks
    /// written at the source in the meantime, until nothing is left; then declares the local
    /// replica consistent.
    async fn run_resync(&self, idx: usize, conn: &Arc<PeerConn>) -> Result<(), String> {
        let Some((replica, _)) = self.local_replica() else { return Err("no local replica".into()) };
        let source = self.spec.replicas[idx].clone();
        {
            let mut l = self.local.lock().unwrap();
            l.state = ReplicaState::CatchingUp;
            l.detail = format!("resynchronising from {source}");
            self.fresh.lock().unwrap().get_or_insert_with(|| BlockSet::new(self.spec.size));
        }
        self.broadcast_state();
        *self.resync.lock().unwrap() = ResyncProgress {
            source: Some(source.clone()),
            done_bytes: 0,
            total_bytes: self.spec.size,
            started: Some(Instant::now()),
        };
        tracing::info!(volume = %self.spec.name, %source, "full resync started");
        conn.call(Request::ResyncPoll { finish: false }).await.map_err(|e| e.to_string())?;

        let chunks: Vec<(u64, u64)> = (0..self.spec.size)
            .step_by(RESYNC_CHUNK as usize)
            .map(|o| (o, RESYNC_CHUNK.min(self.spec.size - o)))
            .collect();
        self.copy_ranges(&replica, conn, chunks).await?;
        let mut rounds = 0;
        loop {
            let reply = conn.call(Request::ResyncPoll { finish: true }).await.map_err(|e| e.to_string())?;
            let Reply::ResyncRanges { ranges, .. } = reply else { return Err(format!("unexpected reply {reply:?}")) };
            let todo = self.not_fresh(&ranges);
            if todo.is_empty() {
                break;
            }
            rounds += 1;
            if rounds > 10_000 {
                return Err("resync does not converge".into());
            }
            self.resync.lock().unwrap().total_bytes += todo.iter().map(|r| r.1).sum::<u64>();
            self.copy_ranges(&replica, conn, todo).await?;
        }
        replica.flush().await.map_err(|e| e.to_string())?;
        let source_gen =
            self.link(idx).and_then(|l| l.inner.lock().unwrap().theirs.as_ref().map(|t| t.generation)).unwrap_or(1);
        replica
            .update_meta(|m| {
                m.consistent = true;
                m.generation = m.generation.max(source_gen).max(1);
            })
            .map_err(|e| e.to_string())?;
        {
            let mut l = self.local.lock().unwrap();
            *self.fresh.lock().unwrap() = None;
            if l.state == ReplicaState::CatchingUp {
                l.state = ReplicaState::InSync;
                l.detail.clear();
            }
        }
        self.generation_zero.store(false, Ordering::Relaxed);
        let took = self.resync.lock().unwrap().started.map(|s| s.elapsed()).unwrap_or_default();
        tracing::info!(volume = %self.spec.name, %source, ?took, "resync done; local replica in sync");
        self.broadcast_state();
        self.changed.notify_waiters();
        Ok(())
    }

    /// The blocks of `ranges` that no foreground write has covered since resync started.
    fn not_fresh(&self, ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let fresh = self.fresh.lock().unwrap();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &(off, len) in ranges {
            let mut b = off / BLOCK_SIZE;
            while b * BLOCK_SIZE < off + len {
                if !fresh.as_ref().is_some_and(|f| f.contains_block(b)) {
                    let o = b * BLOCK_SIZE;
                    match out.last_mut() {
                        Some((lo, ll)) if *lo + *ll == o && *ll < RESYNC_CHUNK => *ll += BLOCK_SIZE,
                        _ => out.push((o, BLOCK_SIZE)),
                    }
                }
                b += 1;
            }
        }
        out
    }

    async fn copy_ranges(
        &self,
        replica: &Arc<Replica>,
        conn: &Arc<PeerConn>,
        ranges: Vec<(u64, u64)>,
    ) -> Result<(), String> {
        // Pace the copy: a chunk is requested no earlier than the time by which the copy,
        // including this chunk, is within the configured rate.
        let start = tokio::time::Instant::now();
        let scheduled = std::sync::atomic::AtomicU64::new(0);
        let rate = self.ctx.resync_rate;
        let scheduled = &scheduled;
        let mut s = futures::stream::iter(ranges.into_iter().map(|(off, len)| async move {
            let upto = scheduled.fetch_add(len, Ordering::Relaxed) + len;
            if rate > 0 {
                tokio::time::sleep_until(start + Duration::from_secs_f64(upto as f64 / rate as f64)).await;
            }
            let reply = conn.call(Request::Read { offset: off, len: len as u32 }).await.map_err(|e| e.to_string())?;
            let Reply::Data { data } = reply else { return Err(format!("unexpected reply {reply:?}")) };
            if data.len() as u64 != len {
                return Err(format!("short resync read: {} of {len} bytes", data.len()));
            }
            self.apply_resync(replica, off, data).await.map_err(|e| e.to_string())?;
            self.resync.lock().unwrap().done_bytes += len;
            Ok(())
        }))
        .buffer_unordered(RESYNC_DEPTH);
        while let Some(r) = s.next().await {
            r?;
            if self.stopping.load(Ordering::Acquire) {
                return Err("stopping".into());
            }
        }
        Ok(())
    }

    /// Writes resync data, skipping blocks that a foreground write made fresh.
    async fn apply_resync(&self, replica: &Replica, off: u64, data: Bytes) -> std::io::Result<()> {
        let _g = self.apply_locks.lock(off, data.len() as u64).await;
        let runs = self.not_fresh(&[(off, data.len() as u64)]);
        for (o, l) in runs {
            let s = (o - off) as usize;
            replica.write(o, data.slice(s..s + l as usize), false).await?;
        }
        Ok(())
    }

    // ---- reporting ---------------------------------------------------------------------

    pub fn resync_progress(&self) -> ResyncProgress {
        self.resync.lock().unwrap().clone()
    }

    pub fn report(&self) -> Vec<ReplicaReport> {
        let mut out = Vec::new();
        for (i, name) in self.spec.replicas.iter().enumerate() {
            if i == self.me {
                let l = self.local.lock().unwrap();
                let (generation, path) = l
                    .replica
                    .as_ref()
                    .map(|r| (r.meta().generation, r.path().display().to_string()))
                    .unwrap_or_default();
                out.push(ReplicaReport {
                    node: name.clone(),
                    local: true,
                    state: l.state,
                    detail: l.detail.clone(),
                    generation,
                    path,
                });
            } else if let Some(link) = self.link(i) {
                let li = link.inner.lock().unwrap();
                out.push(ReplicaReport {
                    node: name.clone(),
                    local: false,
                    state: li.state,
                    detail: li.detail.clone(),
                    generation: li.theirs.as_ref().map(|t| t.generation).unwrap_or(0),
                    path: String::new(),
                });
            }
        }
        out
    }

    /// healthy | degraded | resyncing | unavailable | split-brain
    pub fn health(&self) -> &'static str {
        let r = self.report();
        if r.iter().any(|x| x.state == ReplicaState::SplitBrain) {
            "split-brain"
        } else if !r.iter().any(|x| x.state == ReplicaState::InSync) {
            "unavailable"
        } else if r.iter().all(|x| x.state == ReplicaState::InSync) {
            "healthy"
        } else if r.iter().any(|x| x.state == ReplicaState::CatchingUp) {
            "resyncing"
        } else {
            "degraded"
        }
    }
}

impl BlockDevice for Volume {
    fn size(&self) -> u64 {
        self.spec.size
    }

    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        self.do_read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BlockResult<()> {
        self.submit(Op::Write { offset, data, fua }).await
    }

    async fn flush(&self) -> BlockResult<()> {
        self.do_flush().await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> BlockResult<()> {
        self.submit(Op::Zero { offset, len, punch: true, fua }).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> BlockResult<()> {
        self.submit(Op::Zero { offset, len, punch: false, fua }).await
    }
}
