//! The mirror engine: one [`Volume`] per volume this node holds a replica of.
//!
//! A write received by a frontend is executed on the local replica and sent to every peer
//! that receives writes (in sync or catching up) at the same time; it completes when all of
//! them have completed it. Overlapping writes from this node are serialised
//! ([`ranges::RangeLocks`]), so every replica applies them in the same order. Only the node
//! that holds write priority writes; every write carries its epoch and a replica that knows
//! a newer epoch refuses it (fencing). A read is served by the local replica when it is in
//! sync, otherwise by an in-sync peer; a read or a flush that finds no in-sync replica
//! waits for one, up to the peer I/O timeout, before it fails ([`Volume::source_wait`]).
//!
//! Every replica keeps an out-of-sync bitmap per replica of the volume ([`bitmap`]): bit set
//! in bitmap `i` = replica `i` may lack that block relative to this one; this node's own
//! index holds the blocks the local replica lacks. An activity log ([`al`]) bounds what a
//! crash leaves unknown.
//!
//! State changes (all of them are here):
//! - a peer's state is learnt at connect (`Open`/`Opened`) and by `State` messages, and
//!   [`state::decide`] gives the link's state and whether the local replica is out of date;
//! - a peer that fails or times out on a request is dropped (Disconnected) and recorded as
//!   outdated in the local metadata before the write is acknowledged;
//! - a write whose `sent` set excludes a replica makes every replica that executes it record
//!   that replica as outdated and mark the blocks in its bitmap;
//! - a local I/O error makes the node diskless for the volume: reads and writes go to peers;
//! - a newer epoch is adopted durably; a node that loses write priority stops acknowledging
//!   writes, and replicas re-copy the extents of their activity log from the new holder;
//! - an out-of-date local replica pulls the blocks it lacks from an in-sync peer
//!   ([`Volume::run_resync`]), then announces itself consistent, and peers clear their
//!   record of it;
//! - the operator resolves a split brain by discarding one side's changes
//!   ([`Volume::discard_changes`]).
//!
//! Size: a volume grows online ([`Volume::grow`]), one replica at a time (each node's API
//! grows its own). Replicas of different sizes stay connected and mirror what both hold; a
//! write reaching past a peer's end (as that peer last announced it) is not sent to it, so
//! it is recorded as missed by every replica that executes it, like a write to a
//! disconnected peer; a peer that still receives one refuses it (`OutOfRange`) and is
//! dropped and recorded the same way. Reads go only to peers that hold the range, and a
//! replica resynchronises only from a peer of its own size: one that lacks writes past its
//! end waits, outdated, until it has grown too.

pub mod al;
pub mod bitmap;
mod policing;
pub mod ranges;
mod resync;
pub mod state;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;
use tokio::sync::Notify;

use crate::block::{BlockDevice, BlockError, BlockErrorKind, BlockResult, check_range};
use crate::peer::client::{PeerConn, PeerError};
use crate::peer::handshake::HandshakeConfig;
use crate::peer::proto::{ErrorCode, ReplicaStateMsg, Reply, Request, Tags, WF_FUA};
use crate::replica::{BLOCK_SIZE, Replica};
use al::ActivityLog;
use bitmap::Bitmap;
use ranges::RangeLocks;
pub use state::ReplicaState;

/// Largest resync copy request.
const RESYNC_CHUNK: u64 = 4 << 20;
/// Resync copy requests in flight (many small ones after scattered writes), and the bytes
/// they may ask for at once.
const RESYNC_DEPTH: usize = 256;
const RESYNC_INFLIGHT_BYTES: u64 = 48 << 20;
/// Resync writes of at least this size bypass the page cache.
const BULK_MIN: usize = 256 << 10;
/// Bytes of bitmap fetched by one `GetBitmap`.
const BITMAP_CHUNK: usize = 1 << 20;
/// The target persists its progress after this many bytes copied, or this long.
const CHECKPOINT_BYTES: u64 = 64 << 20;
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// What every volume of a node shares.
pub struct NodeCtx {
    pub name: String,
    pub handshake: HandshakeConfig,
    pub io_timeout: Duration,
    pub reconnect_max: Duration,
    /// Resync copy rate per volume in bytes per second; 0 = unlimited.
    pub resync_rate: u64,
    /// Writes fail while a replica does not receive them (`degraded_writes: refuse`), rather
    /// than going on and marking what it missed. Changeable while running.
    pub refuse_degraded: std::sync::atomic::AtomicBool,
}

/// A volume's identity: name and its replicas' nodes (sorted; the index in this list is the
/// replica's bit in the masks of write frames and the index of its bitmap). The size is not
/// part of it: it grows ([`Volume::size`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub name: String,
    pub replicas: Vec<String>,
    /// Multi-writer volumes: the region size of write priority (`POLICING.md`); None: the
    /// write-priority holder is the only writer.
    pub multi_writer: Option<u64>,
}

struct Local {
    replica: Option<Arc<Replica>>,
    state: ReplicaState,
    detail: String,
}

struct Link {
    name: String,
    inner: Mutex<LinkInner>,
    /// Cuts the reconnect back-off short (the peer just reached us, so it is up).
    retry_now: Notify,
    /// Bumped when this node records that the peer missed writes: the peer's connections
    /// to us are then closed, so that it reconnects and learns it from our `Opened`.
    missed_writes: tokio::sync::watch::Sender<u64>,
    /// Wakes the task that sends our state to the peer (it sends the state current at the
    /// time of sending, one message at a time, so the peer never sees an older state last).
    announce: Notify,
    /// The peer's connections to us: the newest replaces older ones (see
    /// [`Volume::begin_peer_session`]).
    session: tokio::sync::watch::Sender<u64>,
    serving: Arc<tokio::sync::Mutex<()>>,
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
    /// Bytes this node's bitmap says the replica lacks (for the local replica: what it
    /// still has to copy).
    pub out_of_sync_bytes: u64,
}

/// Write priority: the newest epoch this node knows and the node holding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priority {
    pub epoch: u64,
    pub holder: String,
}

/// A peer that receives a write or a flush.
struct Target {
    idx: usize,
    conn: Arc<PeerConn>,
    in_sync: bool,
    /// The peer's size as it last announced it (`u64::MAX` before it did).
    size: u64,
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

    fn request(&self, insync: u32, sent: u32, epoch: u64, tags: Tags) -> Request {
        match self.clone() {
            Op::Write { offset, data, fua } => {
                Request::Write { offset, flags: if fua { WF_FUA } else { 0 }, insync, sent, epoch, tags, data }
            }
            Op::Zero { offset, len, punch: true, fua } => {
                Request::Trim { offset, len, flags: if fua { WF_FUA } else { 0 }, insync, sent, epoch, tags }
            }
            Op::Zero { offset, len, punch: false, fua } => {
                Request::WriteZeroes { offset, len, flags: if fua { WF_FUA } else { 0 }, insync, sent, epoch, tags }
            }
        }
    }

    /// The part `[at, at + len)` of the operation (offsets relative to its start).
    fn part(&self, at: u64, len: u64) -> Op {
        match self {
            Op::Write { offset, data, fua } => {
                Op::Write { offset: offset + at, data: data.slice(at as usize..(at + len) as usize), fua: *fua }
            }
            Op::Zero { offset, punch, fua, .. } => Op::Zero { offset: offset + at, len, punch: *punch, fua: *fua },
        }
    }
}

/// Outcome of one request sent to the replicas.
#[derive(Debug, Default)]
struct Outcome {
    /// A replica that was in sync completed it.
    done_in_sync: bool,
    /// A replica refused it: a newer epoch exists.
    fenced: Option<Priority>,
    /// Replicas that did not execute it (their link failed, or the local disk).
    failed: u32,
    /// Replicas that executed it.
    done: u32,
    /// Multi-writer volumes: a replica refused it for a stale region grant.
    stale: Option<String>,
}

/// Where each peer node is reached (`host:port`), looked up at every (re)connect, so that a
/// peer that moves (or whose address becomes known) is reached at its new address.
pub type PeerAddresses = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// The mirror engine of one volume on this node.
pub struct Volume {
    spec: VolumeSpec,
    addresses: PeerAddresses,
    /// Size in bytes. Grows (never shrinks) while requests run: a request's range is checked
    /// against the value loaded when it arrives; the bitmaps cover the new blocks before
    /// the new value is stored.
    size: AtomicU64,
    me: usize,
    /// Bitmask of every replica index but this node's.
    all_peers: u32,
    ctx: Arc<NodeCtx>,
    local: Mutex<Local>,
    links: Vec<Option<Link>>,
    write_locks: RangeLocks,
    apply_locks: RangeLocks,
    /// Out-of-sync bitmaps by replica index; this node's index: blocks the local replica lacks.
    bitmaps: Mutex<Vec<Bitmap>>,
    al: ActivityLog,
    priority: Mutex<Priority>,
    /// The connection resync currently pulls from (also used to complete partial-block
    /// writes on blocks not copied yet).
    resync_source: Mutex<Option<Arc<PeerConn>>>,
    resync: Mutex<ResyncProgress>,
    changed: Notify,
    stopping: AtomicBool,
    stop: Notify,
    attempts: AtomicUsize,
    settled: Notify,
    next_read: AtomicUsize,
    /// The local replica has never been written (its generation is 0).
    generation_zero: AtomicBool,
    /// Multi-writer volumes: region write priority (`POLICING.md`).
    mw: Option<policing::Policing>,
}

const SIZE_NOTE: &str = "sizes differ:";

/// The detail of a link to a peer of another size.
fn size_note(mine: u64, theirs: u64) -> String {
    format!(
        "{SIZE_NOTE} {theirs} bytes there, {mine} here; writes past the smaller end are marked for it until it is grown"
    )
}

fn io_error(msg: impl Into<String>) -> BlockError {
    BlockError::new(BlockErrorKind::Io, msg)
}

fn blocks_of(offset: u64, len: u64) -> (u64, u64) {
    (offset / BLOCK_SIZE, (offset + len).div_ceil(BLOCK_SIZE))
}

/// Changed bitmap pages: (replica index, [(page index, bytes)]).
type BitmapPages = Vec<(u32, Vec<(usize, Vec<u8>)>)>;

/// Writes bitmap pages to the replica and makes them durable.
fn write_pages(replica: &Replica, pages: &BitmapPages) -> std::io::Result<()> {
    pages.iter().try_for_each(|(k, p)| replica.write_bitmap_pages(*k, p))
}

/// Blocks of one activity-log extent.
const EXTENT_BLOCKS: u64 = al::AL_EXTENT / BLOCK_SIZE;

impl Volume {
    /// Creates the engine of a volume of `size` bytes. `replica` is the local replica (None
    /// when it is missing or its disk failed); `addresses` gives each peer's address (None
    /// while it is not known), asked again at every connection attempt.
    ///
    /// Loads the bitmaps; after an unclean shutdown, replays the activity log (its extents
    /// become out of sync against every peer); a replica created to replace a lost one is
    /// marked as lacking every block.
    pub fn new(
        spec: VolumeSpec,
        size: u64,
        ctx: Arc<NodeCtx>,
        replica: Option<Arc<Replica>>,
        replica_detail: String,
        addresses: PeerAddresses,
    ) -> Arc<Volume> {
        let me = spec.replicas.iter().position(|r| *r == ctx.name).expect("volume must list this node");
        let n = spec.replicas.len();
        let links = spec
            .replicas
            .iter()
            .enumerate()
            .map(|(i, name)| {
                (i != me).then(|| Link {
                    name: name.clone(),
                    inner: Mutex::new(LinkInner {
                        state: ReplicaState::Disconnected,
                        conn: None,
                        theirs: None,
                        detail: String::new(),
                    }),
                    retry_now: Notify::new(),
                    missed_writes: tokio::sync::watch::Sender::new(0),
                    announce: Notify::new(),
                    session: tokio::sync::watch::Sender::new(0),
                    serving: Arc::new(tokio::sync::Mutex::new(())),
                })
            })
            .collect();
        let mut bitmaps: Vec<Bitmap> = (0..n).map(|_| Bitmap::new(size)).collect();
        let mut replica = replica;
        let mut detail = replica_detail;
        let mut priority = Priority { epoch: 0, holder: spec.replicas[0].clone() };
        if let Some(r) = replica.clone() {
            match Self::load_replica(&spec, size, me, &r, &mut bitmaps) {
                Ok(()) => {
                    let m = r.meta();
                    if !m.holder.is_empty() {
                        priority = Priority { epoch: m.epoch, holder: m.holder.clone() };
                    }
                }
                Err(e) => {
                    tracing::error!(volume = %spec.name, error = %e, "cannot load the replica's metadata; serving from peers");
                    detail = format!("metadata I/O error: {e}");
                    replica = None;
                }
            }
        }
        let gen0 = replica.as_ref().is_some_and(|r| r.meta().generation == 0);
        let mw = spec.multi_writer.map(|region| {
            let (epoch, fence, limit) =
                replica.as_ref().map_or((0, 0, 0), |r| (r.meta().epoch, r.meta().fence_grant, r.meta().grant_limit));
            policing::Policing::new(region, epoch, fence, limit)
        });
        let state = match &replica {
            Some(r) if r.meta().consistent => ReplicaState::InSync,
            Some(_) => ReplicaState::Outdated,
            None => ReplicaState::Diskless,
        };
        Arc::new(Volume {
            local: Mutex::new(Local { replica, state, detail }),
            links,
            write_locks: RangeLocks::default(),
            apply_locks: RangeLocks::default(),
            bitmaps: Mutex::new(bitmaps),
            al: ActivityLog::default(),
            priority: Mutex::new(priority),
            resync_source: Mutex::new(None),
            resync: Mutex::new(ResyncProgress::default()),
            changed: Notify::new(),
            stopping: AtomicBool::new(false),
            stop: Notify::new(),
            attempts: AtomicUsize::new(0),
            settled: Notify::new(),
            next_read: AtomicUsize::new(0),
            generation_zero: AtomicBool::new(gen0),
            mw,
            all_peers: (((1u64 << n) - 1) as u32) & !(1 << me),
            size: AtomicU64::new(size),
            spec,
            addresses,
            me,
            ctx,
        })
    }

    fn load_replica(
        spec: &VolumeSpec,
        size: u64,
        me: usize,
        r: &Replica,
        bitmaps: &mut [Bitmap],
    ) -> Result<(), crate::replica::ReplicaError> {
        let io = |e: std::io::Error| crate::replica::ReplicaError::Io { path: r.path().to_owned(), source: e };
        for (k, b) in bitmaps.iter_mut().enumerate() {
            *b = Bitmap::from_bytes(size, &r.read_bitmap(k as u32).map_err(io)?);
        }
        let m = r.meta();
        if m.needs_full {
            bitmaps[me].set_all();
        }
        if !m.clean {
            let extents = r.read_al();
            if !extents.is_empty() {
                tracing::warn!(volume = %spec.name, extents = extents.len(), "unclean shutdown: regions of the activity log are out of sync against every peer");
            }
            for (k, b) in bitmaps.iter_mut().enumerate() {
                if k != me {
                    for &e in &extents {
                        b.set_blocks(u64::from(e) * EXTENT_BLOCKS, (u64::from(e) + 1) * EXTENT_BLOCKS);
                    }
                }
            }
        }
        for (k, b) in bitmaps.iter_mut().enumerate() {
            let pages: Vec<(usize, Vec<u8>)> = b.take_dirty_pages().into_iter().map(|p| (p, b.page(p))).collect();
            r.write_bitmap_pages(k as u32, &pages).map_err(io)?;
        }
        r.write_al(&[]).map_err(io)?;
        r.update_meta(|m| {
            if m.needs_full {
                m.consistent = false;
                m.needs_full = false;
            }
            m.clean = false;
        })?;
        Ok(())
    }

    pub fn spec(&self) -> &VolumeSpec {
        &self.spec
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The volume's size in bytes (see [`Volume::grow`]).
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The local replica, to grow it before the volume grows ([`Volume::grow`]). Refused
    /// (with the reason) when this node has no working replica of the volume.
    pub fn replica_to_grow(&self) -> Result<Arc<Replica>, String> {
        let l = self.local.lock().unwrap();
        match (&l.replica, l.state) {
            (Some(_), ReplicaState::Diskless) | (None, _) => Err(format!(
                "{} has no working replica of volume {} ({}); it cannot grow here",
                self.ctx.name,
                self.spec.name,
                if l.detail.is_empty() { "diskless" } else { &l.detail }
            )),
            (Some(r), _) => Ok(r.clone()),
        }
    }

    /// Makes the volume `size` bytes large, live, after the local replica has grown to it
    /// durably. Requests in flight are within the old size and unaffected; the bitmaps
    /// cover the new blocks (clear: the new range is zeros on every replica, and what a
    /// replica misses there is marked as usual) before a request can reach them. Peers
    /// learn the new size from this node's state. A size not larger changes nothing.
    pub fn grow(&self, size: u64) {
        {
            let mut b = self.bitmaps.lock().unwrap();
            if size <= self.size() {
                return;
            }
            for bm in b.iter_mut() {
                bm.grow(size);
            }
            self.size.store(size, Ordering::Release);
        }
        tracing::info!(volume = %self.spec.name, size, "volume grown");
        self.refresh_size_details();
        self.broadcast_state();
        self.changed.notify_waiters();
    }

    /// Says on each link whose peer has another size which replica still has to grow.
    fn refresh_size_details(&self) {
        let mine = self.size();
        for link in self.links.iter().flatten() {
            let mut li = link.inner.lock().unwrap();
            let theirs = li.theirs.as_ref().map(|t| t.size);
            let note = theirs.filter(|t| *t != mine && li.conn.is_some()).map(|t| size_note(mine, t));
            if let Some(note) = note {
                li.detail = note;
            } else if li.detail.starts_with(SIZE_NOTE) {
                li.detail.clear();
            }
        }
    }

    /// Starts the connection managers of every peer and the resync task.
    pub fn start(self: &Arc<Self>) {
        for idx in 0..self.links.len() {
            if self.links[idx].is_some() {
                let v = self.clone();
                tokio::spawn(async move { v.run_link(idx).await });
                let v = self.clone();
                tokio::spawn(async move { v.run_announcer(idx).await });
            }
        }
        let v = self.clone();
        tokio::spawn(async move { v.resync_loop().await });
        if self.mw.is_some() {
            let v = self.clone();
            tokio::spawn(async move { v.run_sweeper().await });
        }
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

    /// A clean shutdown (after [`Volume::stop`] and a flush): writes every bitmap page and
    /// records that the activity log need not be replayed.
    pub fn shutdown(&self) {
        let Some((replica, state)) = self.local_replica() else { return };
        if state == ReplicaState::Diskless {
            return;
        }
        match self.flush_bitmaps_sync(&replica).and_then(|()| replica.flush_sync()) {
            Ok(()) => {
                if let Err(e) = replica.update_meta(|m| m.clean = true) {
                    tracing::warn!(volume = %self.spec.name, error = %e, "cannot record the clean shutdown");
                }
            }
            Err(e) => tracing::warn!(volume = %self.spec.name, error = %e, "cannot write the bitmaps at shutdown"),
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

    /// The local replica when it has a working disk.
    fn local_disk(&self) -> Option<Arc<Replica>> {
        self.local_replica().filter(|(_, s)| *s != ReplicaState::Diskless).map(|(r, _)| r)
    }

    pub fn priority(&self) -> Priority {
        self.priority.lock().unwrap().clone()
    }

    /// This replica's state as sent to peers.
    pub fn state_msg(&self) -> ReplicaStateMsg {
        let prio = self.priority();
        let l = self.local.lock().unwrap();
        match &l.replica {
            Some(r) if l.state != ReplicaState::Diskless => {
                let m = r.meta();
                let bitmaps = self.bitmaps.lock().unwrap();
                let dirty_peers = (0..self.spec.replicas.len())
                    .filter(|&i| i != self.me && !bitmaps[i].is_empty())
                    .map(|i| self.spec.replicas[i].clone())
                    .filter(|n| !m.outdated_peers.contains(n))
                    .collect();
                ReplicaStateMsg {
                    consistent: m.consistent,
                    generation: m.generation,
                    size: self.size(),
                    outdated_peers: m.outdated_peers,
                    local_ok: true,
                    epoch: prio.epoch,
                    holder: prio.holder,
                    dirty_peers,
                    flag_epoch: m.flag_epoch,
                }
            }
            _ => ReplicaStateMsg {
                consistent: false,
                generation: 0,
                size: self.size(),
                outdated_peers: vec![],
                local_ok: false,
                epoch: prio.epoch,
                holder: prio.holder,
                dirty_peers: vec![],
                flag_epoch: 0,
            },
        }
    }

    // ---- state transitions -------------------------------------------------------------

    /// The local replica returned an I/O error: the node goes diskless for this volume.
    fn local_failed(&self, err: &std::io::Error) {
        let mut l = self.local.lock().unwrap();
        if l.state != ReplicaState::Diskless {
            tracing::error!(volume = %self.spec.name, error = %err, "local replica failed; the node is diskless for this volume and serves it from peers");
            l.state = ReplicaState::Diskless;
            l.detail = format!("disk failed: {err}");
            drop(l);
            self.broadcast_state();
            self.changed.notify_waiters();
        }
    }

    /// Records durably that the replicas in the bitmask `missed` (this node's bit ignored)
    /// missed writes, the one to `range` if given. Must complete before a write they missed
    /// is acknowledged.
    /// `sender` is the peer whose write revealed it, if any: its connections are left open
    /// (it is the writer, and knows the state it sent).
    ///
    /// The blocks of `range` are marked for them first, then the record is written: a
    /// consistent peer for which no block is marked is taken to have caught up and its
    /// record is cleared ([`Volume::observe_peer_state`], which looks at the bitmap under the
    /// metadata lock), so the record must never be there without the blocks it stands for.
    /// The write marks them again once executed ([`Volume::apply_local`]), for a resync
    /// read that cleared them meanwhile.
    fn flag_outdated(&self, missed: u32, sender: Option<usize>, range: Option<(u64, u64)>) {
        let missed = missed & self.all_peers;
        if missed == 0 {
            return;
        }
        if let Some((offset, len)) = range {
            self.mark_bits(missed, offset, len);
        }
        let idxs: Vec<usize> = (0..self.spec.replicas.len()).filter(|i| missed & (1 << i) != 0).collect();
        // Only an in-sync replica records: a failed disk cannot, and a replica that is itself
        // catching up does not hold the writes it would vouch for (a write that no in-sync
        // replica executed is not acknowledged). The in-sync replicas that executed it do.
        let Some((replica, ReplicaState::InSync)) = self.local_replica() else { return };
        let names: Vec<String> = idxs.iter().map(|&i| self.spec.replicas[i].clone()).collect();
        // The new generation is newer than any this node knows of, so that of two replicas
        // that recorded each other under one writer, the one that did so later is newer.
        let known = self
            .links
            .iter()
            .flatten()
            .filter_map(|l| l.inner.lock().unwrap().theirs.as_ref().map(|t| t.generation))
            .max()
            .unwrap_or(0);
        let epoch = self.priority().epoch;
        match replica.update_meta(|m| {
            let before = m.outdated_peers.len();
            for n in &names {
                if !m.outdated_peers.contains(n) {
                    m.outdated_peers.push(n.clone());
                }
            }
            if m.outdated_peers.len() != before {
                m.generation = m.generation.max(known).max(1) + 1;
                m.flag_epoch = epoch;
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
                        // Multi-writer volumes: the peer learns it from the state announced
                        // below instead; its connection to this node carries its region grants
                        // (when this node arbitrates), and closing it would cut a live writer off.
                        if Some(i) != sender && self.mw.is_none() {
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

    /// Marks `[offset, offset + len)` out of sync for the replicas in `mask`. Called after
    /// the local write completed and before its activity-log extents are left, so that a
    /// concurrent resync read either sees the data or leaves the bit set (and, for a write
    /// a replica misses, also before that is recorded: see [`Volume::flag_outdated`]).
    fn mark_bits(&self, mask: u32, offset: u64, len: u64) {
        if mask == 0 || len == 0 {
            return;
        }
        let (s, e) = blocks_of(offset, len);
        let mut b = self.bitmaps.lock().unwrap();
        for (i, bm) in b.iter_mut().enumerate() {
            if mask & (1 << i) != 0 {
                bm.set_blocks(s, e);
            }
        }
    }

    /// The local replica lacks the blocks now set in its own bitmap (and, with `all`, every
    /// block): record that durably and let the resync task bring it back.
    fn local_outdated(&self, all: bool) {
        let Some((replica, state)) = self.local_replica() else { return };
        if state == ReplicaState::Diskless {
            return;
        }
        if all {
            self.bitmaps.lock().unwrap()[self.me].set_all();
        }
        if let Err(e) = self.flush_bitmaps_sync(&replica) {
            tracing::error!(volume = %self.spec.name, error = %e, "cannot write the out-of-sync bitmap");
        }
        if let Err(e) = replica.update_meta(|m| m.consistent = false) {
            tracing::error!(volume = %self.spec.name, error = %e, "cannot record that the local replica is outdated");
        }
        {
            let mut l = self.local.lock().unwrap();
            if l.state == ReplicaState::InSync {
                l.state = ReplicaState::Outdated;
                l.detail = "missed writes; waiting for resync".into();
                tracing::warn!(volume = %self.spec.name, "local replica is out of date; resynchronising");
            }
        }
        self.broadcast_state();
        self.changed.notify_waiters();
    }

    /// Adopts a newer write priority (durably, before anything that depends on it). A node
    /// that loses priority stops acknowledging writes. When the holder changes, writes of
    /// the old holder that were in flight may have reached some replicas and been refused by
    /// others, so every replica but the new holder re-copies from it the extents it wrote
    /// shortly before: a write in flight at the change arrives within a peer I/O timeout of
    /// being sent (or its connection is dropped), and the old holder stops sending within a
    /// timeout of the change, so the window is the last `3 × timeouts.peer_io + 1 s` of
    /// writes, anchored at the newest write this replica executed.
    /// Returns false when `(epoch, holder)` is not newer than what this node knows.
    fn adopt_priority(&self, epoch: u64, holder: &str) -> bool {
        if holder.is_empty() {
            return false;
        }
        let old = {
            let mut p = self.priority.lock().unwrap();
            if epoch <= p.epoch {
                return false;
            }
            std::mem::replace(&mut *p, Priority { epoch, holder: holder.to_owned() })
        };
        if let Some(r) = self.local_disk()
            && let Err(e) = r.update_meta(|m| {
                m.epoch = epoch;
                m.holder = holder.to_owned();
                // Region grants belong to one epoch.
                m.fence_grant = 0;
                m.grant_limit = 0;
            })
        {
            tracing::error!(volume = %self.spec.name, error = %e, "cannot record the write-priority epoch");
        }
        tracing::info!(volume = %self.spec.name, epoch, %holder, previous = %old.holder, "write priority changed");
        if let Some(p) = &self.mw {
            // Multi-writer volumes: grants of the old epoch are void; the new arbiter recovers
            // the regions of its own recent extents, and every other replica re-copies its
            // own from the new holder (below), covering the writes of every writer that were
            // in flight at the change (POLICING.md §9).
            p.wake_all();
        }
        if old.holder != holder && holder != self.ctx.name {
            let extents = self.al.recent(self.ctx.io_timeout * 3 + Duration::from_secs(1));
            if !extents.is_empty() && self.local_disk().is_some() {
                {
                    let mut b = self.bitmaps.lock().unwrap();
                    for &e in &extents {
                        b[self.me].set_blocks(u64::from(e) * EXTENT_BLOCKS, (u64::from(e) + 1) * EXTENT_BLOCKS);
                    }
                }
                tracing::info!(volume = %self.spec.name, extents = extents.len(), "re-copying recently written regions from the new holder");
                self.local_outdated(false);
            }
        }
        self.broadcast_state();
        self.changed.notify_waiters();
        true
    }

    /// Takes write priority as the control plane assigns it (the volume's Lease: its
    /// fencing epoch and holder). Only a newer epoch is adopted, durably; the engine then
    /// refuses writes of older epochs from peers, and local writes unless `holder` is this
    /// node. Returns false (and changes nothing) when `epoch` is not newer than the one this
    /// node knows, or `holder` is empty.
    pub fn set_priority(&self, epoch: u64, holder: &str) -> bool {
        self.adopt_priority(epoch, holder)
    }

    /// Resolves at the engine's next change of state (a replica's state, write priority,
    /// size, a resync starting or ending), for those who report it.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// The peers' addresses changed: every link that is not connected tries again now, at
    /// the address looked up then.
    pub fn peers_changed(&self) {
        for link in self.links.iter().flatten() {
            if link.inner.lock().unwrap().conn.is_none() {
                link.retry_now.notify_one();
            }
        }
    }

    /// Gives this node write priority with an epoch newer than any it knows of (its own and
    /// its connected peers'). Refused when no in-sync replica is reachable.
    pub fn promote(&self) -> Result<Priority, String> {
        let has_in_sync = matches!(self.local_replica(), Some((_, ReplicaState::InSync)))
            || self.links.iter().flatten().any(|l| {
                let li = l.inner.lock().unwrap();
                li.conn.is_some() && li.state == ReplicaState::InSync
            });
        if !has_in_sync {
            return Err(format!("volume {}: no in-sync replica is reachable from {}", self.spec.name, self.ctx.name));
        }
        let cur = self.priority();
        if cur.holder == self.ctx.name {
            return Ok(cur);
        }
        let newest = self
            .links
            .iter()
            .flatten()
            .filter_map(|l| l.inner.lock().unwrap().theirs.as_ref().map(|t| t.epoch))
            .fold(cur.epoch, u64::max);
        self.adopt_priority(newest + 1, &self.ctx.name);
        Ok(self.priority())
    }

    /// Resolves a split brain with `keep`: this node discards its changes made while cut off
    /// (the blocks it wrote that `keep` missed join the blocks it lacks) and resynchronises
    /// from `keep`.
    pub fn discard_changes(&self, keep: &str) -> Result<(), String> {
        let Some(k) = self.replica_index(keep).filter(|&k| k != self.me) else {
            return Err(format!("{keep} is not another replica of volume {}", self.spec.name));
        };
        let Some(replica) = self.local_disk() else {
            return Err(format!("{} has no working replica of {} to discard", self.ctx.name, self.spec.name));
        };
        {
            let mut b = self.bitmaps.lock().unwrap();
            let theirs = b[k].clone();
            b[self.me].or(&theirs);
            b[k].clear_all();
        }
        self.flush_bitmaps_sync(&replica).map_err(|e| e.to_string())?;
        replica
            .update_meta(|m| {
                m.outdated_peers.retain(|p| p != keep);
                m.consistent = false;
            })
            .map_err(|e| e.to_string())?;
        {
            let mut l = self.local.lock().unwrap();
            if l.state != ReplicaState::Diskless {
                l.state = ReplicaState::Outdated;
                l.detail = format!("discarding local changes in favour of {keep}");
            }
        }
        if let Some(link) = self.link(k) {
            let mut li = link.inner.lock().unwrap();
            if li.state == ReplicaState::SplitBrain {
                li.state = ReplicaState::InSync;
                li.detail.clear();
            }
        }
        tracing::warn!(volume = %self.spec.name, %keep, "split brain resolved: local changes are discarded");
        self.broadcast_state();
        self.changed.notify_waiters();
        Ok(())
    }

    /// Asks the replicas in split brain with this node to discard their changes in favour
    /// of this node's.
    pub async fn keep_local_changes(&self) -> Result<Vec<String>, String> {
        let mut asked = Vec::new();
        for link in self.links.iter().flatten() {
            let conn = {
                let li = link.inner.lock().unwrap();
                if li.state != ReplicaState::SplitBrain {
                    continue;
                }
                li.conn.clone()
            };
            let Some(conn) = conn else { continue };
            conn.call(Request::Resolve { keep: self.ctx.name.clone() })
                .await
                .map_err(|e| format!("{}: {e}", link.name))?;
            asked.push(link.name.clone());
        }
        Ok(asked)
    }

    /// Applies what a peer's state means (see [`state::decide`]). `announced` is true for a
    /// `State` message (a change the peer announces), false at connect.
    pub fn observe_peer_state(&self, idx: usize, theirs: ReplicaStateMsg, announced: bool) {
        let Some(link) = self.link(idx) else { return };
        self.adopt_priority(theirs.epoch, &theirs.holder);
        // A peer that announces it became consistent has caught up: forget that it missed
        // writes, unless writes it missed since are marked.
        let was_inconsistent = link.inner.lock().unwrap().theirs.as_ref().is_some_and(|t| !t.consistent);
        // A consistent peer for which no block is marked has caught up: forget that it missed
        // writes. Marked blocks left after it announced it caught up were missed after its
        // last look at our bitmap: tell it (it resyncs again).
        let mut tell_again = false;
        if theirs.consistent && theirs.local_ok {
            // Multi-writer volumes: a replica resynchronises from the arbiter only, whose
            // replica executed every write and marked what the peer missed of it (a writer
            // whose write failed on the peer sends it again without the peer, for that). So a
            // peer that announces it caught up has what this node marked for it, and only the
            // arbiter keeps watching what it misses afterwards.
            if self.mw.is_some() && announced && was_inconsistent && self.priority().holder != self.ctx.name {
                self.bitmaps.lock().unwrap()[idx].clear_all();
            }
            let is_clean = || self.bitmaps.lock().unwrap()[idx].is_empty();
            let clean = match self.local_disk() {
                Some(replica) => {
                    let name = link.name.clone();
                    let mut clean = false;
                    // The bitmap is looked at under the metadata lock: a write the peer misses
                    // marks its blocks before it records the peer (`flag_outdated`), so a
                    // record being written now is either seen with its blocks, and kept, or
                    // written after this and kept. Peers learn that a record is gone (they
                    // choose resync sources by it).
                    tell_again |= replica
                        .update_meta(|m| {
                            clean = is_clean();
                            if clean {
                                m.outdated_peers.retain(|p| *p != name);
                            }
                        })
                        .unwrap_or(false);
                    clean
                }
                None => is_clean(),
            };
            tell_again |= announced && was_inconsistent && !clean;
        }
        let mine = self.state_msg();
        let holder = self.priority().holder;
        let d = if announced {
            // The rule for a never-written replica facing a written one (it lacks the other's
            // writes) is for states exchanged at connect, before this node's writes flow to the
            // peer. A state announced later (a growth, an epoch) may have been taken while a
            // first write was in flight to one of the two, and would make a replica that
            // receives every write look empty; a replica that really missed writes is known
            // from the records of the replicas that executed them.
            let written = |s: &ReplicaStateMsg| ReplicaStateMsg { generation: s.generation.max(1), ..s.clone() };
            state::decide(&self.ctx.name, &written(&mine), &link.name, &written(&theirs), &holder, self.mw.is_some())
        } else {
            state::decide(&self.ctx.name, &mine, &link.name, &theirs, &holder, self.mw.is_some())
        };
        {
            let mut li = link.inner.lock().unwrap();
            li.theirs = Some(theirs);
            if li.conn.is_some() {
                if li.state != d.peer {
                    tracing::info!(volume = %self.spec.name, peer = %link.name, from = %li.state, to = %d.peer, "replica state");
                }
                li.state = d.peer;
                let size = li.theirs.as_ref().map_or(0, |t| t.size);
                li.detail = match d.peer {
                    ReplicaState::SplitBrain => {
                        "both replicas accepted writes the other missed; not merged (resolve: peersan volume resolve)"
                            .into()
                    }
                    _ if size != self.size() => size_note(self.size(), size),
                    _ => String::new(),
                };
            }
        }
        if d.peer == ReplicaState::SplitBrain {
            tracing::error!(volume = %self.spec.name, peer = %link.name, "split brain detected; the replicas will not be merged automatically");
        }
        if d.stale_record
            && let Some(replica) = self.local_disk()
        {
            // The peer is newer: what this replica recorded against it is redone from it.
            let name = link.name.clone();
            {
                let mut b = self.bitmaps.lock().unwrap();
                let mine = b[idx].clone();
                b[self.me].or(&mine);
                b[idx].clear_all();
            }
            if let Err(e) = self.flush_bitmaps_sync(&replica) {
                tracing::error!(volume = %self.spec.name, error = %e, "cannot write the out-of-sync bitmap");
            }
            let _ = replica.update_meta(|m| m.outdated_peers.retain(|p| *p != name));
            tracing::info!(volume = %self.spec.name, peer = %name, "the peer is newer; this replica's record that it missed writes is stale");
        }
        if d.local_outdated {
            let theirs_flag_me =
                link.inner.lock().unwrap().theirs.as_ref().is_some_and(|t| t.outdated_peers.contains(&self.ctx.name));
            let full = mine.generation == 0 && mine.consistent && !theirs_flag_me;
            self.local_outdated(full);
        }
        if tell_again {
            self.broadcast_state();
        }
        self.changed.notify_waiters();
    }

    fn broadcast_state(&self) {
        for link in self.links.iter().flatten() {
            link.announce.notify_one();
        }
    }

    /// Sends our state to peer `idx` whenever it changes, in order.
    async fn run_announcer(self: Arc<Self>, idx: usize) {
        let link = self.link(idx).expect("link");
        while !self.stopping.load(Ordering::Acquire) {
            tokio::select! {
                _ = link.announce.notified() => {}
                _ = self.stop.notified() => return,
            }
            let conn = link.inner.lock().unwrap().conn.clone();
            if let Some(conn) = conn {
                let _ = conn.call(Request::State { state: self.state_msg() }).await;
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
        if let Some(p) = &self.mw {
            p.wake_all();
        }
    }

    /// Takes the changed pages of every bitmap.
    fn take_bitmap_pages(&self) -> BitmapPages {
        let mut b = self.bitmaps.lock().unwrap();
        b.iter_mut()
            .enumerate()
            .map(|(k, bm)| (k as u32, bm.take_dirty_pages().into_iter().map(|i| (i, bm.page(i))).collect::<Vec<_>>()))
            .filter(|(_, p)| !p.is_empty())
            .collect()
    }

    /// Marks pages whose write failed as still to be written.
    fn remark_dirty(&self, pages: &BitmapPages) {
        let mut b = self.bitmaps.lock().unwrap();
        for (k, p) in pages {
            for (i, _) in p {
                b[*k as usize].mark_dirty(*i);
            }
        }
    }

    /// Writes the changed pages of every bitmap (blocking; for rare state changes).
    fn flush_bitmaps_sync(&self, replica: &Replica) -> std::io::Result<()> {
        let pages = self.take_bitmap_pages();
        let res = write_pages(replica, &pages);
        if res.is_err() {
            self.remark_dirty(&pages);
        }
        res
    }

    async fn flush_bitmaps(&self, replica: &Arc<Replica>) -> std::io::Result<()> {
        let pages = self.take_bitmap_pages();
        if pages.is_empty() {
            return Ok(());
        }
        let r = replica.clone();
        let (pages, res) = tokio::task::spawn_blocking(move || {
            let res = write_pages(&r, &pages);
            (pages, res)
        })
        .await
        .map_err(std::io::Error::other)?;
        if res.is_err() {
            self.remark_dirty(&pages);
        }
        res
    }

    /// Enters the activity log for a write to `[offset, offset + len)`, writing the log
    /// first when the range touches extents not in it.
    async fn al_enter(&self, replica: &Arc<Replica>, offset: u64, len: u64) -> std::io::Result<(u32, u32)> {
        let (first, last) = al::extents(offset, len);
        if self.al.try_enter(first, last) {
            return Ok((first, last));
        }
        loop {
            let _c = self.al.commit.lock().await;
            if self.al.try_enter(first, last) {
                return Ok((first, last));
            }
            let Some(plan) = self.al.plan(first, last) else {
                drop(_c);
                self.al.wait_left().await;
                continue;
            };
            if !plan.evicted.is_empty() {
                self.flush_bitmaps(replica).await?;
            }
            let r = replica.clone();
            let extents = plan.extents.clone();
            tokio::task::spawn_blocking(move || r.write_al(&extents)).await.map_err(std::io::Error::other)??;
            self.al.install(&plan, first, last);
            return Ok((first, last));
        }
    }
    // ---- connections -------------------------------------------------------------------

    async fn run_link(self: Arc<Self>, idx: usize) {
        let link = self.link(idx).expect("link");
        let mut backoff = Duration::from_millis(100);
        let mut first = true;
        while !self.stopping.load(Ordering::Acquire) {
            let address = (self.addresses)(&link.name);
            let result = match &address {
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
                        if li.detail.is_empty() || li.detail.starts_with(SIZE_NOTE) {
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

    /// Executes `op` on the local replica, inside the activity log. While the local replica
    /// lacks blocks, a write that covers a lacking block whole makes it current (resync will
    /// not overwrite it); a lacking block written in part is first completed from the resync
    /// source. After the write, the replicas in `missed` get its blocks marked out of sync.
    async fn apply_local(&self, replica: &Arc<Replica>, op: &Op, missed: u32) -> std::io::Result<()> {
        let (offset, len) = op.range();
        let (first, last) = self.al_enter(replica, offset, len).await?;
        let res = self.apply_local_in_al(replica, op).await;
        if res.is_ok() {
            self.mark_bits(missed, offset, len);
        }
        self.al.leave(first, last);
        res
    }

    async fn apply_local_in_al(&self, replica: &Arc<Replica>, op: &Op) -> std::io::Result<()> {
        let (offset, len) = op.range();
        let lacking = !self.bitmaps.lock().unwrap()[self.me].is_empty();
        let _guard = if lacking { Some(self.apply_locks.lock(offset, len).await) } else { None };
        if lacking {
            self.complete_partial_blocks(replica, offset, len).await?;
        }
        match op {
            Op::Write { offset, data, fua } => replica.write(*offset, data.clone(), *fua).await?,
            Op::Zero { offset, len, punch, fua } => replica.zero(*offset, *len, *punch, *fua).await?,
        }
        if lacking {
            self.bitmaps.lock().unwrap()[self.me].clear_covered(offset, len);
        }
        if self.generation_zero.load(Ordering::Relaxed) {
            self.generation_zero.store(false, Ordering::Relaxed);
            let _ = replica.update_meta(|m| m.generation = m.generation.max(1));
        }
        Ok(())
    }

    /// Copies from the resync source the lacking blocks that `[offset, offset + len)` covers
    /// only in part, so that the write lands on current data.
    async fn complete_partial_blocks(&self, replica: &Replica, offset: u64, len: u64) -> std::io::Result<()> {
        let (s, e) = blocks_of(offset, len);
        let mut partial = Vec::new();
        {
            let b = self.bitmaps.lock().unwrap();
            if !offset.is_multiple_of(BLOCK_SIZE) && b[self.me].contains(s) {
                partial.push(s);
            }
            if !(offset + len).is_multiple_of(BLOCK_SIZE) && b[self.me].contains(e - 1) && !partial.contains(&(e - 1)) {
                partial.push(e - 1);
            }
        }
        if partial.is_empty() {
            return Ok(());
        }
        let conn = self.resync_source.lock().unwrap().clone();
        let Some(conn) = conn else {
            return Err(std::io::Error::other(
                "a partial write to a block not yet resynchronised needs a resync source",
            ));
        };
        for b in partial {
            let off = b * BLOCK_SIZE;
            let reply = conn
                .call(Request::ResyncRead { offset: off, len: BLOCK_SIZE as u32 })
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let Reply::Data { data } = reply else { return Err(std::io::Error::other("unexpected resync reply")) };
            replica.write(off, data, false).await?;
            self.bitmaps.lock().unwrap()[self.me].clear_blocks(b, b + 1);
        }
        Ok(())
    }

    /// The `sent` and `insync` masks of a write to `local` and `targets`.
    fn masks(&self, local: &Option<(Arc<Replica>, ReplicaState)>, targets: &[Target]) -> (u32, u32) {
        let mut sent = 0u32;
        let mut insync = 0u32;
        if let Some((_, s)) = local {
            sent |= 1 << self.me;
            if *s == ReplicaState::InSync {
                insync |= 1 << self.me;
            }
        }
        for t in targets {
            sent |= 1 << t.idx;
            if t.in_sync {
                insync |= 1 << t.idx;
            }
        }
        (sent, insync)
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
                let size = li.theirs.as_ref().map_or(u64::MAX, |t| t.size);
                Some(Target { idx, conn, in_sync: li.state == ReplicaState::InSync, size })
            })
            .collect();
        (local, peers)
    }

    /// Applies the outcome of one request sent to the local replica and the peers: failed
    /// peers are dropped and recorded as outdated (their bits set for `range`), a failed
    /// local replica makes the node diskless, a refusal for an older epoch is adopted.
    fn conclude(
        &self,
        targets: &[Target],
        peer_results: Vec<Result<Reply, PeerError>>,
        local: Option<(std::io::Result<()>, bool)>,
        range: Option<(u64, u64)>,
        multi: bool,
    ) -> Outcome {
        let mut out = Outcome::default();
        let mut failed = 0u32;
        let local_applied = matches!(local, Some((Ok(()), _)));
        for (t, res) in targets.iter().zip(peer_results) {
            match res {
                Ok(Reply::Fenced { epoch, holder }) => {
                    out.fenced = Some(Priority { epoch, holder });
                }
                Ok(_) => {
                    out.done_in_sync |= t.in_sync;
                    out.done |= 1 << t.idx;
                }
                Err(PeerError::Remote { code: ErrorCode::StaleGrant, message, .. }) if multi => {
                    out.stale = Some(format!("{}: {message}", self.spec.replicas[t.idx]));
                }
                Err(PeerError::Remote { code: ErrorCode::Fenced, message, .. }) => {
                    tracing::warn!(volume = %self.spec.name, peer = %self.spec.replicas[t.idx], %message, "write refused: fenced");
                    out.fenced.get_or_insert(Priority { epoch: 0, holder: String::new() });
                }
                Err(e) => {
                    self.drop_link(t.idx, &e);
                    failed |= 1 << t.idx;
                }
            }
        }
        match local {
            Some((Ok(()), in_sync)) => {
                out.done_in_sync |= in_sync;
                out.done |= 1 << self.me;
            }
            Some((Err(e), _)) => {
                self.local_failed(&e);
                out.failed |= 1 << self.me;
            }
            None => {}
        }
        out.failed |= failed;
        if multi && let Some(arbiter) = self.replica_index(&self.priority().holder) {
            // Multi-writer: a write the arbiter's replica did not execute is not acknowledged
            // (its regions are recovered from that replica), and the arbiter's replica is never
            // recorded as having missed writes (POLICING.md §6.1).
            failed &= !(1 << arbiter);
        }
        self.flag_outdated(failed, None, range);
        if let Some(p) = &out.fenced
            && multi
        {
            // Multi-writer: the write is retried under the newer epoch's grants; its regions
            // are recovered by the new arbiter before they are written again.
            self.adopt_priority(p.epoch, &p.holder);
        } else if let Some(p) = &out.fenced {
            if !self.adopt_priority(p.epoch, &p.holder) {
                // The refusing replica knows the same epoch under another holder, or did not
                // say: stop writing until priority is given again.
                let mut cur = self.priority.lock().unwrap();
                if cur.holder == self.ctx.name {
                    cur.holder = p.holder.clone();
                }
            }
            tracing::warn!(volume = %self.spec.name, epoch = p.epoch, holder = %p.holder, "this node lost write priority; writes fail until it is promoted again");
            // What this node wrote locally was refused elsewhere: take it back from the holder.
            if local_applied && let Some((offset, len)) = range {
                let (s, e) = blocks_of(offset, len);
                self.bitmaps.lock().unwrap()[self.me].set_blocks(s, e);
                self.local_outdated(false);
            }
        }
        out
    }

    /// The epoch to write under, when this node holds write priority.
    fn write_epoch(&self) -> BlockResult<u64> {
        let p = self.priority.lock().unwrap();
        if p.holder == self.ctx.name {
            return Ok(p.epoch);
        }
        Err(BlockError::new(
            BlockErrorKind::Unavailable,
            format!(
                "volume {}: {} does not hold write priority (held by {} at epoch {}); promote this node to write here",
                self.spec.name, self.ctx.name, p.holder, p.epoch
            ),
        ))
    }

    /// A write-like operation received by a frontend of this node.
    async fn submit(&self, op: Op) -> BlockResult<()> {
        let (offset, len) = op.range();
        check_range(offset, len, self.size())?;
        if self.mw.is_some() {
            return self.submit_multi(op).await;
        }
        self.write_epoch()?;
        let _guard = self.write_locks.lock(offset, len).await;
        // Again under the lock: priority may have moved while this write waited.
        let epoch = self.write_epoch()?;

        let (local, mut targets) = self.write_targets();
        // A peer that has not grown as far as this write reaches misses it, and is recorded
        // as having missed it (below), like a disconnected one.
        targets.retain(|t| t.size >= offset + len);
        let (sent, insync) = self.masks(&local, &targets);
        let missed = !sent & self.all_peers;
        if missed != 0 && self.ctx.refuse_degraded.load(Ordering::Relaxed) {
            return Err(self.degraded_refusal(missed, "do not receive writes"));
        }
        self.flag_outdated(missed, None, Some((offset, len)));

        let local_fut = async {
            match &local {
                Some((r, s)) => Some((self.apply_local(r, &op, missed).await, *s == ReplicaState::InSync)),
                None => None,
            }
        };
        let peer_futs = targets.iter().map(|t| t.conn.call(op.request(insync, sent, epoch, Tags::default())));
        let (local_res, peer_res) = tokio::join!(local_fut, join_all(peer_futs));
        let out = self.conclude(&targets, peer_res, local_res, Some((offset, len)), false);
        if let Some(p) = out.fenced {
            return Err(io_error(format!(
                "volume {}: write refused: write priority moved to {} (epoch {}); nothing acknowledged",
                self.spec.name, p.holder, p.epoch
            )));
        }
        if out.failed != 0 && self.ctx.refuse_degraded.load(Ordering::Relaxed) {
            // Executed on some replicas only (marked for the others): not acknowledged.
            return Err(self.degraded_refusal(out.failed, "failed to execute it"));
        }
        if out.done_in_sync {
            Ok(())
        } else {
            Err(io_error(format!("volume {}: no in-sync replica executed the write", self.spec.name)))
        }
    }

    /// The error of a write under `degraded_writes: refuse` that replicas `mask` miss.
    fn degraded_refusal(&self, mask: u32, what: &str) -> BlockError {
        let names: Vec<&str> = self
            .spec
            .replicas
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, n)| n.as_str())
            .collect();
        io_error(format!(
            "volume {}: write refused: replica(s) {} {what}, and the volume refuses degraded writes",
            self.spec.name,
            names.join(", ")
        ))
    }

    /// How long a read or a flush that finds no in-sync replica to serve it waits for one
    /// before it fails. An in-sync replica is missing for a moment in the ordinary course of
    /// the protocol: a peer that records that this replica missed writes closes this node's
    /// connections to it so that it reconnects and learns it, and any link blip does the
    /// same; the reconnect takes a back-off step and a handshake. Failing then would hand the
    /// client an EIO (a filesystem remounts read-only on it) for a gap that heals by itself.
    /// The bound is the peer I/O timeout, the time a read already waits for one peer to
    /// answer; past it the request fails as before, so a volume with no reachable in-sync
    /// replica errors out rather than hangs.
    fn source_wait(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.ctx.io_timeout
    }

    /// Waits until the engine's state changes (a link connects, a state is learnt, the
    /// local replica catches up), `deadline` passes, or the engine stops. `changed` must
    /// have been created before the state was last looked at. Returns false when the
    /// caller should give up.
    async fn wait_for_source(
        &self,
        changed: tokio::sync::futures::Notified<'_>,
        deadline: tokio::time::Instant,
    ) -> bool {
        if self.stopping.load(Ordering::Acquire) || tokio::time::Instant::now() >= deadline {
            return false;
        }
        let _ = tokio::time::timeout_at(deadline, changed).await;
        !self.stopping.load(Ordering::Acquire)
    }

    /// A read from the local replica when it is in sync, otherwise from an in-sync peer
    /// that holds the range. When none can serve it, waits for one (see
    /// [`Volume::source_wait`]) before failing.
    async fn do_read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        check_range(offset, u64::from(len), self.size())?;
        let deadline = self.source_wait();
        let mut first = true;
        loop {
            let changed = self.changed.notified();
            if let Some(data) = self.try_read(offset, len).await {
                return Ok(data);
            }
            if std::mem::take(&mut first) {
                tracing::debug!(volume = %self.spec.name, offset, len, "no in-sync replica can serve the read now; waiting for one");
            }
            if !self.wait_for_source(changed, deadline).await {
                return Err(io_error(format!("volume {}: no in-sync replica can serve the read", self.spec.name)));
            }
        }
    }

    /// One attempt at a read: the local replica when it is in sync, then each in-sync peer
    /// that holds the range. None when no replica served it.
    async fn try_read(&self, offset: u64, len: u32) -> Option<Bytes> {
        if let Some((r, ReplicaState::InSync)) = self.local_replica() {
            match r.read(offset, len as usize).await {
                Ok(b) => return Some(b),
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
                let holds_range = li.theirs.as_ref().is_none_or(|t| t.size >= offset + u64::from(len));
                match (&li.conn, li.state) {
                    (Some(c), ReplicaState::InSync) if holds_range => c.clone(),
                    _ => continue,
                }
            };
            match conn.call(Request::Read { offset, len }).await {
                Ok(Reply::Data { data }) if data.len() == len as usize => return Some(data),
                Ok(other) => {
                    tracing::warn!(volume = %self.spec.name, peer = %link.name, "unexpected read reply {other:?}")
                }
                Err(PeerError::Remote { code: ErrorCode::NotInSync, .. }) => {
                    link.inner.lock().unwrap().state = ReplicaState::Outdated;
                }
                Err(e) => self.drop_link(idx, &e),
            }
        }
        None
    }

    /// A flush: durable on every in-sync replica, and on at least one. When no in-sync
    /// replica completed it, waits for one (see [`Volume::source_wait`]) and flushes again
    /// (a flush may be repeated) before failing.
    async fn do_flush(&self) -> BlockResult<()> {
        let deadline = self.source_wait();
        let mut first = true;
        loop {
            let changed = self.changed.notified();
            if self.try_flush().await {
                return Ok(());
            }
            if std::mem::take(&mut first) {
                tracing::debug!(volume = %self.spec.name, "no in-sync replica completed the flush; waiting for one");
            }
            if !self.wait_for_source(changed, deadline).await {
                return Err(io_error(format!("volume {}: no in-sync replica completed the flush", self.spec.name)));
            }
        }
    }

    /// One attempt at a flush; true when an in-sync replica completed it.
    async fn try_flush(&self) -> bool {
        let (local, targets) = self.write_targets();
        let local_fut = async {
            match &local {
                Some((r, s)) => Some((r.flush().await, *s == ReplicaState::InSync)),
                None => None,
            }
        };
        let (local_res, peer_res) =
            tokio::join!(local_fut, join_all(targets.iter().map(|t| t.conn.call(Request::Flush))));
        self.conclude(&targets, peer_res, local_res, None, self.mw.is_some()).done_in_sync
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

    /// A peer opened the volume on a new connection. Older connections from it are told to
    /// stop (the returned receiver changes for them), and this waits until they have
    /// finished what they were executing: a write still in flight on a connection the peer
    /// gave up (sent before a link failure, delivered after it healed) must not land after
    /// the peer has learnt our state and started a resync. Returns the session id and the
    /// guard to hold while serving.
    pub async fn begin_peer_session(
        &self,
        idx: usize,
    ) -> Option<(u64, tokio::sync::watch::Receiver<u64>, tokio::sync::OwnedMutexGuard<()>)> {
        let link = self.link(idx)?;
        let mut id = 0;
        link.session.send_modify(|s| {
            *s += 1;
            id = *s;
        });
        let rx = link.session.subscribe();
        let guard = link.serving.clone().lock_owned().await;
        Some((id, rx, guard))
    }

    /// Checks the epoch of a write from `from`: a newer one is adopted, an older one (or the
    /// same one held by another node) is refused.
    /// Multi-writer volumes: every replica node writes at the current epoch; a write at a
    /// newer one is refused (`StaleGrant`, retried) until this node learns who holds it.
    fn check_epoch(&self, from: usize, epoch: u64) -> Result<(), Reply> {
        let sender = &self.spec.replicas[from];
        {
            let cur = self.priority.lock().unwrap();
            if epoch == cur.epoch && (cur.holder == *sender || self.mw.is_some()) {
                return Ok(());
            }
            if epoch <= cur.epoch {
                return Err(Reply::Fenced { epoch: cur.epoch, holder: cur.holder.clone() });
            }
            if self.mw.is_some() {
                return Err(Reply::Error {
                    code: ErrorCode::StaleGrant,
                    message: format!("epoch {epoch} is newer than the one known here ({})", cur.epoch),
                });
            }
        }
        self.adopt_priority(epoch, sender);
        Ok(())
    }

    /// Executes a request that a peer sent us on its connection `session`. Returns the
    /// reply to send.
    pub async fn serve_peer(&self, from: usize, session: u64, req: Request) -> Reply {
        let err = |code, message: String| Reply::Error { code, message };
        match req {
            Request::Write { offset, flags, sent, epoch, tags, data, .. } => {
                self.peer_write(from, sent, epoch, &tags, Op::Write { offset, data, fua: flags & WF_FUA != 0 }).await
            }
            Request::WriteZeroes { offset, len, flags, sent, epoch, tags, .. } => {
                let op = Op::Zero { offset, len, punch: false, fua: flags & WF_FUA != 0 };
                self.peer_write(from, sent, epoch, &tags, op).await
            }
            Request::Trim { offset, len, flags, sent, epoch, tags, .. } => {
                let op = Op::Zero { offset, len, punch: true, fua: flags & WF_FUA != 0 };
                self.peer_write(from, sent, epoch, &tags, op).await
            }
            req @ (Request::Acquire { .. }
            | Request::Revoke { .. }
            | Request::Release { .. }
            | Request::Recover { .. }) => self.serve_policing(from, session, req).await,
            Request::Read { offset, len } => self.serve_read(offset, len, None).await,
            Request::ResyncRead { offset, len } => self.serve_read(offset, len, Some(from)).await,
            Request::GetBitmap { offset, len } => {
                let b = self.bitmaps.lock().unwrap();
                let total = b[from].len_bytes() as u64;
                if offset.checked_add(u64::from(len)).is_none_or(|end| end > total) {
                    return err(
                        ErrorCode::OutOfRange,
                        format!("bitmap bytes {offset}+{len} past the end ({total} bytes)"),
                    );
                }
                Reply::Data { data: Bytes::from(b[from].bytes(offset as usize, len as usize)) }
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
            Request::Resolve { keep } => match self.discard_changes(&keep) {
                Ok(()) => Reply::Ok,
                Err(message) => err(ErrorCode::Invalid, message),
            },
            Request::Ping => Reply::Pong,
            Request::Open { .. } => err(ErrorCode::Invalid, "volume already open on this connection".into()),
            Request::CreateVolume { .. } | Request::DeleteVolume { .. } => {
                err(ErrorCode::Invalid, "volume lifecycle requests must come on a connection of their own".into())
            }
        }
    }

    /// A read for a peer: from the local replica when it is in sync. A resync read
    /// (`resync_for`) first clears the requester's out-of-sync bits for the blocks it
    /// returns; a write that the requester misses afterwards sets them again once it has
    /// been applied, so no update is lost between the two.
    async fn serve_read(&self, offset: u64, len: u32, resync_for: Option<usize>) -> Reply {
        if let Err(e) = check_range(offset, u64::from(len), self.size()) {
            return Reply::Error { code: ErrorCode::OutOfRange, message: e.message };
        }
        match self.local_replica() {
            Some((r, ReplicaState::InSync)) => {
                if let Some(k) = resync_for {
                    self.bitmaps.lock().unwrap()[k].clear_covered(offset, u64::from(len));
                }
                match r.read(offset, len as usize).await {
                    Ok(data) => Reply::Data { data },
                    Err(e) => {
                        if let Some(k) = resync_for {
                            self.mark_bits(1 << k, offset, u64::from(len));
                        }
                        self.local_failed(&e);
                        Reply::Error { code: ErrorCode::Io, message: e.to_string() }
                    }
                }
            }
            _ => Reply::Error {
                code: ErrorCode::NotInSync,
                message: format!("the replica of {} on {} is not in sync", self.spec.name, self.ctx.name),
            },
        }
    }

    async fn peer_write(&self, from: usize, sent: u32, epoch: u64, tags: &Tags, op: Op) -> Reply {
        let (offset, len) = op.range();
        if let Err(e) = check_range(offset, len, self.size()) {
            return Reply::Error { code: ErrorCode::OutOfRange, message: e.message };
        }
        if let Err(reply) = self.check_epoch(from, epoch) {
            return reply;
        }
        // Multi-writer volumes: the region grants come second (POLICING.md §7).
        let _fence = match self.peer_fence(epoch, tags, &op) {
            Ok(g) => g,
            Err(reply) => return reply,
        };
        let missed = !sent & self.all_peers;
        self.flag_outdated(missed, Some(from), Some((offset, len)));
        self.execute_for_peer(&op, missed).await
    }

    /// Executes a peer's write-like operation on the local replica (the replicas in `missed`
    /// get its blocks marked); the reply to send.
    async fn execute_for_peer(&self, op: &Op, missed: u32) -> Reply {
        match self.local_replica() {
            Some((r, s)) if s.receives_writes() => match self.apply_local(&r, op, missed).await {
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

    // ---- reporting ---------------------------------------------------------------------

    pub fn resync_progress(&self) -> ResyncProgress {
        self.resync.lock().unwrap().clone()
    }

    pub fn report(&self) -> Vec<ReplicaReport> {
        let oos: Vec<u64> = self.bitmaps.lock().unwrap().iter().map(|b| b.count() * BLOCK_SIZE).collect();
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
                    out_of_sync_bytes: oos[i],
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
                    out_of_sync_bytes: oos[i],
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
        Volume::size(self)
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
