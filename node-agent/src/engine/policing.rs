//! Per-region write priority of multi-writer volumes: the protocol of `POLICING.md` (read it
//! first; section numbers below refer to it).
//!
//! Every node plays three roles for each multi-writer volume it holds a replica of:
//! - **replica** ([`Fences`]): executes a write only if, for every region it touches, the
//!   write's grant is not older than the newest the replica adopted for that region (§5);
//! - **writer** ([`Writer`]): holds the grants of the regions it writes, cached until the
//!   arbiter revokes them, and tags every write with them (§5);
//! - **arbiter** ([`Arbiter`]), on the node holding write priority: grants a region to one
//!   requester at a time in arrival order, revokes it from its holder first, and recovers a
//!   region whose replicas may differ before granting it again (§6.2).
//!
//! Grant numbers come from one counter per arbiter and epoch, so a number also orders grants
//! of different regions; a restarted arbiter continues above every number it issued
//! (`ReplicaMeta::grant_limit`), and a restarted replica refuses, for regions it has no
//! entry for, grants older than the newest recovery it took part in
//! (`ReplicaMeta::fence_grant`).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;
use tokio::sync::Notify;

use super::{Op, Volume, io_error};
use crate::block::BlockError;
use crate::peer::client::{PeerConn, PeerError};
use crate::peer::proto::{ErrorCode, Reply, Request, Tags};

/// The arbiter persists its grant counter this many grants ahead.
const GRANT_BATCH: u64 = 1024;
/// A write is retried for this many peer I/O timeouts before its client gets `EIO`: enough
/// for a region held by a writer that was cut off without its connection breaking (its
/// `Revoke` times out after two, the region is reclaimed two later) to be recovered.
const RETRY_TIMEOUTS: u32 = 6;

/// A region's grant state at one node, in each of the three roles.
pub(super) struct Policing {
    pub shift: u8,
    fences: Mutex<Fences>,
    fences_idle: Notify,
    writer: Mutex<Writer>,
    writer_changed: Notify,
    arbiter: Mutex<Arbiter>,
    arbiter_changed: Notify,
    /// The writer's grants from a remote arbiter are valid until then (nanoseconds since
    /// `t0`): one peer I/O timeout after the newest request that the arbiter answered was
    /// sent (A2).
    valid_until: AtomicU64,
    t0: Instant,
}

/// Replica role: the newest grant adopted per region, at `epoch`.
struct Fences {
    epoch: u64,
    /// Grants up to this one are refused for a region without an entry (a restarted replica
    /// does not know which of them were superseded).
    floor: u64,
    /// `fence_grant` as persisted in the replica's metadata.
    persisted: u64,
    regions: HashMap<u64, Fence>,
}

#[derive(Default)]
struct Fence {
    grant: u64,
    /// Writes to the region being executed here.
    active: u32,
    /// A recovery waits until `active` is 0.
    waiting: bool,
}

/// Writer role: the grants this node holds, at `epoch`, from the arbiter reached over `conn`
/// (None: this node arbitrates).
#[derive(Default)]
struct Writer {
    epoch: u64,
    conn: Option<Arc<PeerConn>>,
    /// Raised whenever the grants' epoch or connection changes: answers to requests made
    /// before do not count.
    generation: u64,
    held: HashMap<u64, Held>,
    /// The newest grant learnt per region (from a `Revoke` that may overtake its `Granted`).
    learnt: HashMap<u64, u64>,
    /// Regions with an `Acquire` in flight, and the generation it was sent in.
    pending: HashMap<u64, u64>,
}

struct Held {
    epoch: u64,
    grant: u64,
    /// Writes of this node under the grant in flight.
    in_use: u32,
    /// The arbiter asked for the region back: no new write starts under the grant.
    revoking: bool,
    /// A write under the grant failed: the region's replicas may differ.
    tainted: bool,
    /// The grant's epoch or connection ended: it goes when its writes have completed, and
    /// the arbiter recovers the region on its own.
    dead: bool,
}

/// Arbiter role: the region table of `epoch`.
#[derive(Default)]
struct Arbiter {
    epoch: u64,
    ready: bool,
    /// Last grant number issued, and the persisted limit.
    next: u64,
    limit: u64,
    /// Regions without an entry are `Dirty` (this arbiter restarted within its epoch: what
    /// it granted before is unknown) rather than `Free`.
    dirty_start: bool,
    regions: HashMap<u64, Region>,
    next_ticket: u64,
    /// Regions made dirty, for the sweeper ([`Volume::run_sweeper`]) to recover without
    /// waiting for a writer to ask for them; and with `dirty_start`, the next region it
    /// looks at.
    to_recover: VecDeque<u64>,
    sweep: u64,
    /// Per replica, the newest of its connections that ended (a request still being served
    /// from one is not granted anything: the grant would outlive the connection).
    ended: HashMap<usize, u64>,
}

struct Region {
    state: RegionState,
    /// A revoke or a recovery of the region is under way (by the requester at the head).
    busy: bool,
    /// Requesters in arrival order.
    queue: VecDeque<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RegionState {
    Free,
    /// Granted to replica `node` under `grant`, on its connection `session` (0: this node).
    Held {
        node: usize,
        session: u64,
        grant: u64,
    },
    /// The replicas may differ: recovered before the next grant, not before `not_before`.
    Dirty {
        not_before: Instant,
    },
}

/// Why a write's grants were refused by a replica.
#[derive(Debug)]
pub(super) enum FenceRefusal {
    /// The tags do not describe the write's regions (a peer with another region size).
    Mismatch(String),
    /// A newer grant (or epoch) was adopted for a region.
    Stale(String),
}

/// A write's regions entered at a replica; leaving them lets a waiting recovery go on.
pub(super) struct FenceGuard<'a> {
    p: &'a Policing,
    regions: Vec<u64>,
}

impl Drop for FenceGuard<'_> {
    fn drop(&mut self) {
        let mut wake = false;
        {
            let mut f = self.p.fences.lock().unwrap();
            for r in &self.regions {
                if let Some(e) = f.regions.get_mut(r) {
                    e.active -= 1;
                    if e.active == 0 && std::mem::take(&mut e.waiting) {
                        wake = true;
                    }
                }
            }
        }
        if wake {
            self.p.fences_idle.notify_waiters();
        }
    }
}

/// Why a multi-writer write did not complete on this attempt.
pub(super) enum Attempt {
    /// Try again (grants were refused or lost, the epoch changed, the arbiter is not
    /// reachable right now), until the deadline; the text says why for the final error.
    Retry(String),
    /// Try again, the grants still good (the write's regions are the same on every replica
    /// that receives writes).
    RetryClean(String),
    Fail(BlockError),
}

impl Policing {
    /// `epoch`, `fence_grant`, `grant_limit`: from the local replica's metadata (zeros
    /// without one).
    pub fn new(region_size: u64, epoch: u64, fence_grant: u64, grant_limit: u64) -> Policing {
        Policing {
            shift: region_size.trailing_zeros() as u8,
            fences: Mutex::new(Fences { epoch, floor: fence_grant, persisted: fence_grant, regions: HashMap::new() }),
            fences_idle: Notify::new(),
            writer: Mutex::new(Writer::default()),
            writer_changed: Notify::new(),
            arbiter: Mutex::new(Arbiter { epoch, next: grant_limit, limit: grant_limit, ..Arbiter::default() }),
            arbiter_changed: Notify::new(),
            valid_until: AtomicU64::new(0),
            t0: Instant::now(),
        }
    }

    pub fn region_size(&self) -> u64 {
        1 << self.shift
    }

    /// The regions `[offset, offset + len)` touches.
    pub fn regions(&self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 {
            return 0..0;
        }
        (offset >> self.shift)..((offset + len - 1) >> self.shift) + 1
    }

    fn nanos(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.t0).as_nanos() as u64
    }

    /// A request sent at `sent` was answered by the arbiter: grants are valid for `t` more.
    pub fn extend(&self, sent: Instant, t: Duration) {
        self.valid_until.fetch_max(self.nanos(sent + t), Ordering::AcqRel);
    }

    fn valid(&self, now: Instant) -> bool {
        self.nanos(now) < self.valid_until.load(Ordering::Acquire)
    }

    /// Wakes everyone waiting on a grant state (the epoch or a link changed).
    pub fn wake_all(&self) {
        self.writer_changed.notify_waiters();
        self.arbiter_changed.notify_waiters();
        self.fences_idle.notify_waiters();
    }

    // ---- replica ------------------------------------------------------------------------

    /// Checks a write's grants (§5, "A replica executes a write only if…") and, when they
    /// hold, adopts them and counts the write as executing in its regions until the guard
    /// is dropped. `epoch` has passed the volume's epoch check.
    pub fn fence_enter(&self, epoch: u64, tags: &Tags, offset: u64, len: u64) -> Result<FenceGuard<'_>, FenceRefusal> {
        let regions = self.regions(offset, len);
        if tags.list.is_empty() {
            return Err(FenceRefusal::Mismatch(
                "the write carries no region grants, and the volume is multi-writer here".into(),
            ));
        }
        if tags.shift != self.shift {
            return Err(FenceRefusal::Mismatch(format!(
                "the write's regions are {} bytes, this replica's {}: the volume's region_size differs between nodes",
                1u64 << tags.shift,
                self.region_size()
            )));
        }
        if tags.list.len() as u64 != regions.end - regions.start
            || tags.list.iter().zip(regions.clone()).any(|(&(r, _), want)| r != want)
        {
            return Err(FenceRefusal::Mismatch(format!(
                "the write's grants name other regions than the {}..{} it touches",
                regions.start, regions.end
            )));
        }
        let mut f = self.fences.lock().unwrap();
        f.reset_for(epoch);
        if epoch < f.epoch {
            return Err(FenceRefusal::Stale(format!("epoch {epoch} is older than {}", f.epoch)));
        }
        for &(r, g) in &tags.list {
            let newest = f.regions.get(&r).map_or(f.floor, |e| e.grant);
            if g < newest {
                return Err(FenceRefusal::Stale(format!(
                    "grant {g} for region {r} is older than grant {newest} adopted here"
                )));
            }
        }
        for &(r, g) in &tags.list {
            let floor = f.floor;
            let e = f.regions.entry(r).or_insert_with(|| Fence { grant: floor, ..Fence::default() });
            e.grant = e.grant.max(g);
            e.active += 1;
        }
        Ok(FenceGuard { p: self, regions: tags.list.iter().map(|&(r, _)| r).collect() })
    }

    /// Adopts `grant` for region `r` at `epoch` (a recovery, §6.2): older writes are refused
    /// from now on; returns once the writes to the region executing here have finished.
    /// Returns whether the grant is newer than the persisted floor (the caller persists
    /// it), or the newer grant already adopted.
    async fn fence_adopt(&self, epoch: u64, r: u64, grant: u64) -> Result<bool, String> {
        loop {
            let idle = self.fences_idle.notified();
            {
                let mut f = self.fences.lock().unwrap();
                f.reset_for(epoch);
                if epoch < f.epoch {
                    return Err(format!("epoch {epoch} is older than {}", f.epoch));
                }
                let floor = f.floor;
                let e = f.regions.entry(r).or_insert_with(|| Fence { grant: floor, ..Fence::default() });
                if grant < e.grant {
                    return Err(format!("grant {grant} for region {r} is older than grant {} adopted here", e.grant));
                }
                e.grant = grant;
                if e.active == 0 {
                    let persist = grant > f.persisted;
                    return Ok(persist);
                }
                e.waiting = true;
            }
            idle.await;
        }
    }

    fn persisted(&self, epoch: u64, grant: u64) {
        let mut f = self.fences.lock().unwrap();
        if f.epoch == epoch {
            f.persisted = f.persisted.max(grant);
        }
    }
}

impl Fences {
    /// A newer epoch voids every grant of older ones.
    fn reset_for(&mut self, epoch: u64) {
        if epoch > self.epoch {
            self.epoch = epoch;
            self.floor = 0;
            self.persisted = 0;
            self.regions.clear();
        }
    }
}

impl Writer {
    /// Grants belong to one epoch and one connection to the arbiter: when either changes,
    /// the grants held end (each once its writes have completed) and answers to requests
    /// made before are ignored.
    fn sync(&mut self, epoch: u64, conn: Option<&Arc<PeerConn>>) -> bool {
        let same = self.epoch == epoch
            && match (&self.conn, conn) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b) && !a.is_closed(),
                _ => false,
            };
        if same {
            return false;
        }
        self.epoch = epoch;
        self.conn = conn.cloned();
        self.generation += 1;
        self.learnt.clear();
        self.pending.clear();
        self.held.retain(|_, h| {
            h.dead = true;
            h.in_use > 0
        });
        true
    }
}

impl Arbiter {
    fn region(&mut self, r: u64) -> &mut Region {
        let dirty = self.dirty_start;
        self.regions.entry(r).or_insert_with(|| Region {
            state: if dirty { RegionState::Dirty { not_before: Instant::now() } } else { RegionState::Free },
            busy: false,
            queue: VecDeque::new(),
        })
    }

    /// The replicas of region `r` may differ: recovered before its next grant, and by the
    /// sweeper if nobody asks for it.
    fn mark_dirty(&mut self, r: u64, not_before: Instant) {
        self.region(r).state = RegionState::Dirty { not_before };
        self.to_recover.push_back(r);
    }
}

/// What the requester at the head of a region's queue does next.
enum Step {
    Granted(u64),
    Revoke { node: usize, session: u64, grant: u64 },
    Recover { grant: u64 },
    Wait(Option<Instant>),
}

/// Resets a region's `busy` flag when a revoke or a recovery ends, also when the requester
/// driving it is dropped half-way: a revoke that did not complete leaves the region dirty
/// (its holder may have given it back dirty without our hearing it).
struct BusyGuard<'a> {
    v: &'a Volume,
    region: u64,
    revoking: bool,
    done: bool,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        let p = self.v.mw();
        {
            let mut a = p.arbiter.lock().unwrap();
            if let Some(reg) = a.regions.get_mut(&self.region) {
                reg.busy = false;
                if !self.done && self.revoking {
                    a.mark_dirty(self.region, Instant::now());
                }
            }
        }
        p.arbiter_changed.notify_waiters();
    }
}

/// Takes a requester's ticket out of its region's queue when it is answered or gives up.
struct TicketGuard<'a> {
    p: &'a Policing,
    region: u64,
    ticket: u64,
}

impl Drop for TicketGuard<'_> {
    fn drop(&mut self) {
        {
            let mut a = self.p.arbiter.lock().unwrap();
            if let Some(reg) = a.regions.get_mut(&self.region) {
                reg.queue.retain(|&t| t != self.ticket);
                // Left dirty by a requester that gave up: the sweeper's again.
                if reg.queue.is_empty() && matches!(reg.state, RegionState::Dirty { .. }) {
                    a.to_recover.push_back(self.region);
                }
            }
        }
        self.p.arbiter_changed.notify_waiters();
    }
}

fn busy(r: u64, within: Duration) -> Reply {
    Reply::Error { code: ErrorCode::Busy, message: format!("region {r} was not free within {within:?}") }
}

fn stale(message: String) -> Reply {
    Reply::Error { code: ErrorCode::StaleGrant, message }
}

impl Volume {
    pub(super) fn mw(&self) -> &Policing {
        self.mw.as_ref().expect("multi-writer volume")
    }

    /// How long the arbiter waits after a holder's connection ended before it reclaims the
    /// holder's regions: the holder's grants were valid for one peer I/O timeout after its
    /// last request answered on that connection (A2), doubled for clock drift.
    fn reclaim_after(&self) -> Duration {
        self.ctx.io_timeout * 2
    }

    // ---- writer -------------------------------------------------------------------------

    /// A write-like operation of a multi-writer volume: split so that no part touches more
    /// than `MAX_TAGS` regions (each part is applied whole per region), each part retried
    /// while its grants are refused or lost, for up to [`RETRY_TIMEOUTS`] peer I/O timeouts.
    pub(super) async fn submit_multi(&self, op: Op) -> Result<(), BlockError> {
        let p = self.mw();
        let (offset, len) = op.range();
        let chunk = crate::peer::proto::MAX_TAGS as u64 * p.region_size();
        let mut at = offset;
        while at < offset + len || (len == 0 && at == offset) {
            let end = ((at / chunk) + 1) * chunk;
            let part_len = end.min(offset + len) - at;
            let part = op.part(at - offset, part_len);
            self.submit_part(part).await?;
            at += part_len;
            if len == 0 {
                break;
            }
        }
        Ok(())
    }

    async fn submit_part(&self, op: Op) -> Result<(), BlockError> {
        let deadline = tokio::time::Instant::now() + self.ctx.io_timeout * RETRY_TIMEOUTS;
        let mut tries = 0u32;
        loop {
            let changed = self.changed.notified();
            match self.attempt_multi(&op).await {
                Ok(()) => return Ok(()),
                Err(Attempt::Fail(e)) => return Err(e),
                Err(Attempt::Retry(why) | Attempt::RetryClean(why)) => {
                    tries += 1;
                    if tokio::time::Instant::now() >= deadline {
                        return Err(io_error(format!(
                            "volume {}: write not executed after {tries} attempts: {why}",
                            self.spec.name
                        )));
                    }
                    tracing::debug!(volume = %self.spec.name, %why, "multi-writer write retried");
                    // Back off a little, or less if the engine's state changes.
                    let pause = Duration::from_millis(u64::from(tries.min(20)) * 5);
                    let _ = tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + pause), changed).await;
                }
            }
        }
    }

    /// One attempt at a write under grants: take them, send the tagged write to every
    /// replica that receives writes, give them back (tainted when the write failed).
    async fn attempt_multi(&self, op: &Op) -> Result<(), Attempt> {
        let p = self.mw();
        let (offset, len) = op.range();
        let prio = self.priority();
        let Some(arbiter) = self.replica_index(&prio.holder) else {
            return Err(Attempt::Retry(format!("the write-priority holder {:?} is not a replica", prio.holder)));
        };
        let epoch = prio.epoch;
        let grants = self.acquire(epoch, arbiter, p.regions(offset, len)).await?;
        let tags = Tags { shift: p.shift, list: grants.clone() };
        let result = self.write_tagged(op, epoch, arbiter, tags).await;
        let failed = result.as_ref().is_err_and(|e| !matches!(e, Attempt::RetryClean(_)));
        self.release(epoch, &grants, failed);
        result
    }

    async fn write_tagged(&self, op: &Op, epoch: u64, arbiter: usize, tags: Tags) -> Result<(), Attempt> {
        let p = self.mw();
        let (offset, len) = op.range();
        let _guard = self.write_locks.lock(offset, len).await;
        let (local, mut targets) = self.write_targets();
        targets.retain(|t| t.size >= offset + len);
        // The arbiter's replica receives every write, in sync (§6.1): it is the source of
        // every recovery.
        let arbiter_in_sync = if arbiter == self.me {
            matches!(local, Some((_, super::ReplicaState::InSync)))
        } else {
            targets.iter().any(|t| t.idx == arbiter && t.in_sync)
        };
        if !arbiter_in_sync {
            return Err(Attempt::Retry(format!(
                "the replica of the arbiter {} is not reachable in sync",
                self.spec.replicas[arbiter]
            )));
        }
        let (sent, insync) = self.masks(&local, &targets);
        let missed = !sent & self.all_peers;
        if missed != 0 && self.ctx.refuse_degraded.load(Ordering::Relaxed) {
            return Err(Attempt::Fail(self.degraded_refusal(missed, "do not receive writes")));
        }
        self.flag_outdated(missed, None, Some((offset, len)));
        let sent_at = Instant::now();
        let local_fut = async {
            let (r, s) = local.as_ref()?;
            Some(match p.fence_enter(epoch, &tags, offset, len) {
                Ok(_fence) => Ok((self.apply_local(r, op, missed).await, *s == super::ReplicaState::InSync)),
                Err(refusal) => Err(refusal),
            })
        };
        let peer_futs = targets.iter().map(|t| t.conn.call(op.request(insync, sent, epoch, tags.clone())));
        let (local_res, peer_res) = tokio::join!(local_fut, join_all(peer_futs));
        let mut local_stale = None;
        let local_res = match local_res {
            Some(Ok(x)) => Some(x),
            Some(Err(FenceRefusal::Stale(m) | FenceRefusal::Mismatch(m))) => {
                local_stale = Some(m);
                None
            }
            None => None,
        };
        let out = self.conclude(&targets, peer_res, local_res, Some((offset, len)), true);
        if out.done & (1 << arbiter) != 0 && arbiter != self.me {
            p.extend(sent_at, self.ctx.io_timeout);
        }
        if let Some(m) = local_stale {
            return Err(Attempt::Retry(format!("refused by the local replica: {m}")));
        }
        if let Some(f) = out.fenced {
            return Err(Attempt::Retry(format!("refused: write priority is at epoch {} ({})", f.epoch, f.holder)));
        }
        if let Some(m) = out.stale {
            return Err(Attempt::Retry(format!("refused: {m}")));
        }
        if out.done & (1 << arbiter) == 0 {
            return Err(Attempt::Retry(format!(
                "the arbiter {}'s replica did not execute it",
                self.spec.replicas[arbiter]
            )));
        }
        if out.failed != 0 && self.ctx.refuse_degraded.load(Ordering::Relaxed) {
            return Err(Attempt::Fail(self.degraded_refusal(out.failed, "failed to execute it")));
        }
        if out.failed != 0 && arbiter != self.me {
            // Sent again without the replicas that failed it (they are dropped now), so that
            // the arbiter's replica, executing it, records what they missed: the arbiter is
            // where they resynchronise from. The regions are not dirty: every replica that
            // receives writes executed it.
            return Err(Attempt::RetryClean(format!(
                "replica(s) {:#b} failed to execute it; sending it again without them",
                out.failed
            )));
        }
        if out.done_in_sync {
            Ok(())
        } else {
            Err(Attempt::Fail(io_error(format!("volume {}: no in-sync replica executed the write", self.spec.name))))
        }
    }

    /// Takes the grants of `regions` in ascending order (no deadlock, §5 "Several regions").
    async fn acquire(&self, epoch: u64, arbiter: usize, regions: Range<u64>) -> Result<Vec<(u64, u64)>, Attempt> {
        let mut got = Vec::with_capacity((regions.end - regions.start) as usize);
        for r in regions {
            match self.acquire_one(epoch, arbiter, r).await {
                Ok(g) => got.push((r, g)),
                Err(e) => {
                    self.release(epoch, &got, false);
                    return Err(e);
                }
            }
        }
        Ok(got)
    }

    async fn acquire_one(&self, epoch: u64, arbiter: usize, r: u64) -> Result<u64, Attempt> {
        enum Next {
            Renew,
            Wait,
            Ask(u64),
        }
        let p = self.mw();
        loop {
            let changed = p.writer_changed.notified();
            if self.priority().epoch != epoch {
                return Err(Attempt::Retry("write priority moved to a new epoch".into()));
            }
            let conn = if arbiter == self.me {
                None
            } else {
                let c = self.link(arbiter).and_then(|l| l.inner.lock().unwrap().conn.clone());
                match c {
                    Some(c) => Some(c),
                    None => {
                        return Err(Attempt::Retry(format!(
                            "no connection to the arbiter {}",
                            self.spec.replicas[arbiter]
                        )));
                    }
                }
            };
            let now = Instant::now();
            let next = {
                let mut w = p.writer.lock().unwrap();
                if w.sync(epoch, conn.as_ref()) {
                    p.writer_changed.notify_waiters();
                }
                let pending = w.pending.contains_key(&r);
                match w.held.get_mut(&r) {
                    Some(h) if !h.revoking && !h.tainted && !h.dead => {
                        if conn.is_none() || p.valid(now) {
                            h.in_use += 1;
                            return Ok(h.grant);
                        }
                        Next::Renew
                    }
                    Some(_) => Next::Wait,
                    None if pending => Next::Wait,
                    None => {
                        let generation = w.generation;
                        w.pending.insert(r, generation);
                        Next::Ask(generation)
                    }
                }
            };
            match next {
                Next::Wait => {
                    // Bounded: a region being given back waits for this node's own writes.
                    let _ = tokio::time::timeout(self.ctx.io_timeout, changed).await;
                }
                Next::Renew => {
                    let conn = conn.expect("remote arbiter");
                    let sent = Instant::now();
                    match conn.call(Request::Ping).await {
                        Ok(_) => p.extend(sent, self.ctx.io_timeout),
                        Err(e) => return Err(Attempt::Retry(format!("cannot renew the grants: {e}"))),
                    }
                }
                Next::Ask(generation) => {
                    let sent = Instant::now();
                    let answer = match &conn {
                        Some(c) => {
                            c.call_with_timeout(Request::Acquire { epoch, region: r }, self.ctx.io_timeout * 4).await
                        }
                        None => Ok(match self.arbitrate(self.me, 0, epoch, r).await {
                            Ok(grant) => Reply::Granted { grant },
                            Err(reply) => reply,
                        }),
                    };
                    let mut w = p.writer.lock().unwrap();
                    if w.pending.get(&r) == Some(&generation) {
                        w.pending.remove(&r);
                    }
                    p.writer_changed.notify_waiters();
                    match answer {
                        Ok(Reply::Granted { grant }) => {
                            let newer = w.learnt.get(&r).is_none_or(|&l| grant > l);
                            if w.generation == generation && newer && !w.held.contains_key(&r) {
                                w.learnt.insert(r, grant);
                                w.held.insert(
                                    r,
                                    Held { epoch, grant, in_use: 1, revoking: false, tainted: false, dead: false },
                                );
                                if conn.is_some() {
                                    p.extend(sent, self.ctx.io_timeout);
                                }
                                return Ok(grant);
                            }
                            // Revoked before it arrived, or from a connection given up since:
                            // the arbiter does not count it as ours any more. Ask again.
                            if conn.is_none() && w.generation == generation {
                                drop(w);
                                self.arbiter_release(self.me, 0, epoch, r, grant, false);
                            }
                        }
                        Ok(Reply::Fenced { epoch: e, holder }) => {
                            drop(w);
                            self.adopt_priority(e, &holder);
                            return Err(Attempt::Retry(format!("the arbiter is at epoch {e} ({holder})")));
                        }
                        Ok(Reply::Error { code: ErrorCode::Busy | ErrorCode::StaleGrant, message })
                        | Err(PeerError::Remote { code: ErrorCode::Busy | ErrorCode::StaleGrant, message, .. }) => {
                            return Err(Attempt::Retry(format!("region {r}: {message}")));
                        }
                        Ok(other) => {
                            return Err(Attempt::Fail(io_error(format!(
                                "volume {}: the arbiter answered Acquire with {other:?}",
                                self.spec.name
                            ))));
                        }
                        Err(e) => return Err(Attempt::Retry(format!("cannot acquire region {r}: {e}"))),
                    }
                }
            }
        }
    }

    /// A write under `grants` ended; `failed`: it may have been executed by some replicas
    /// only, so its regions are given back dirty (§6.1) and recovered before anyone writes
    /// them again.
    fn release(&self, epoch: u64, grants: &[(u64, u64)], failed: bool) {
        if grants.is_empty() {
            return;
        }
        let p = self.mw();
        let mut give_back = Vec::new();
        let conn;
        {
            let mut w = p.writer.lock().unwrap();
            for &(r, g) in grants {
                let Entry::Occupied(mut e) = w.held.entry(r) else { continue };
                let h = e.get_mut();
                if h.epoch != epoch || h.grant != g {
                    continue;
                }
                h.in_use -= 1;
                h.tainted |= failed;
                if h.in_use == 0 && !h.revoking && (h.dead || h.tainted) {
                    let h = e.remove();
                    if !h.dead {
                        give_back.push((r, g));
                    }
                }
            }
            conn = w.conn.clone();
        }
        p.writer_changed.notify_waiters();
        for (r, g) in give_back {
            match &conn {
                None => self.arbiter_release(self.me, 0, epoch, r, g, true),
                Some(c) => {
                    let c = c.clone();
                    tokio::spawn(async move {
                        // Lost with its connection: the arbiter then reclaims the region anyway.
                        let _ = c.call(Request::Release { epoch, region: r, grant: g, dirty: true }).await;
                    });
                }
            }
        }
    }

    /// The arbiter asks for region `r` (held under `grant`) back: answers once this node's
    /// writes under it have completed. Returns whether the region is dirty.
    pub(super) async fn writer_revoke(&self, epoch: u64, r: u64, grant: u64) -> bool {
        let p = self.mw();
        loop {
            let changed = p.writer_changed.notified();
            {
                let mut w = p.writer.lock().unwrap();
                if w.epoch == epoch {
                    let l = w.learnt.entry(r).or_default();
                    *l = (*l).max(grant);
                }
                match w.held.get_mut(&r) {
                    Some(h) if h.epoch == epoch && h.grant == grant => {
                        h.revoking = true;
                        if h.in_use == 0 {
                            let dirty = h.tainted || h.dead;
                            w.held.remove(&r);
                            drop(w);
                            p.writer_changed.notify_waiters();
                            return dirty;
                        }
                    }
                    // Not (or no longer) held: a grant given up dirty was reported then.
                    _ => return false,
                }
            }
            changed.await;
        }
    }

    // ---- arbiter ------------------------------------------------------------------------

    /// Grants region `r` at `epoch` to replica `from` (its connection `session`; 0 for this
    /// node): in arrival order, after taking it back from its holder or recovering it.
    /// The error is the reply to send.
    pub(super) async fn arbitrate(&self, from: usize, session: u64, epoch: u64, r: u64) -> Result<u64, Reply> {
        let p = self.mw();
        let prio = self.priority();
        if prio.epoch != epoch || prio.holder != self.ctx.name {
            return Err(Reply::Fenced { epoch: prio.epoch, holder: prio.holder });
        }
        if r > (self.size().saturating_sub(1) >> p.shift) {
            return Err(Reply::Error {
                code: ErrorCode::OutOfRange,
                message: format!("region {r} lies past the end of the volume ({} bytes)", self.size()),
            });
        }
        let deadline = Instant::now() + self.ctx.io_timeout * 3;
        let ticket = {
            let mut a = p.arbiter.lock().unwrap();
            self.arbiter_ready(&mut a, epoch);
            a.next_ticket += 1;
            let t = a.next_ticket;
            a.region(r).queue.push_back(t);
            t
        };
        let _ticket = TicketGuard { p, region: r, ticket };
        loop {
            let changed = p.arbiter_changed.notified();
            let step = {
                let mut a = p.arbiter.lock().unwrap();
                if a.epoch != epoch || self.priority().epoch != epoch {
                    let prio = self.priority();
                    return Err(Reply::Fenced { epoch: prio.epoch, holder: prio.holder });
                }
                let head = {
                    let reg = a.region(r);
                    reg.queue.front() == Some(&ticket) && !reg.busy
                };
                let gone = from != self.me && a.ended.get(&from).is_some_and(|&e| session <= e);
                if !head {
                    Step::Wait(None)
                } else {
                    let state = a.region(r).state;
                    match state {
                        RegionState::Free if gone => {
                            return Err(Reply::Error {
                                code: ErrorCode::Busy,
                                message: "the connection this request came on has ended".into(),
                            });
                        }
                        RegionState::Free => match self.issue(&mut a, epoch) {
                            Ok(g) => {
                                let reg = a.region(r);
                                reg.state = RegionState::Held { node: from, session, grant: g };
                                Step::Granted(g)
                            }
                            Err(m) => return Err(Reply::Error { code: ErrorCode::Io, message: m }),
                        },
                        RegionState::Held { node, session, grant } => {
                            a.region(r).busy = true;
                            Step::Revoke { node, session, grant }
                        }
                        RegionState::Dirty { not_before } if Instant::now() >= not_before => {
                            match self.issue(&mut a, epoch) {
                                Ok(g) => {
                                    a.region(r).busy = true;
                                    Step::Recover { grant: g }
                                }
                                Err(m) => return Err(Reply::Error { code: ErrorCode::Io, message: m }),
                            }
                        }
                        RegionState::Dirty { not_before } => Step::Wait(Some(not_before)),
                    }
                }
            };
            match step {
                Step::Granted(g) => return Ok(g),
                Step::Revoke { node, session: s, grant } => {
                    let mut guard = BusyGuard { v: self, region: r, revoking: true, done: false };
                    // Answered by the deadline whatever happens: a requester that waited too
                    // long gives its connection up. A revoke cut short leaves the region dirty
                    // (the guard): it is recovered, and the holder's writes still under the
                    // old grant are refused from then on.
                    let Ok(outcome) =
                        tokio::time::timeout_at(deadline.into(), self.revoke(epoch, r, node, grant)).await
                    else {
                        return Err(busy(r, self.ctx.io_timeout * 3));
                    };
                    {
                        let mut a = p.arbiter.lock().unwrap();
                        if a.region(r).state == (RegionState::Held { node, session: s, grant }) {
                            match outcome {
                                Some(false) => a.region(r).state = RegionState::Free,
                                Some(true) => a.mark_dirty(r, Instant::now()),
                                None => a.mark_dirty(r, Instant::now() + self.reclaim_after()),
                            }
                        }
                    }
                    if outcome.is_none() {
                        self.cut_off(node, "it did not give a region back");
                    }
                    guard.done = true;
                }
                Step::Recover { grant } => {
                    let mut guard = BusyGuard { v: self, region: r, revoking: false, done: false };
                    let Ok(res) = tokio::time::timeout_at(deadline.into(), self.recover_region(epoch, r, grant)).await
                    else {
                        return Err(busy(r, self.ctx.io_timeout * 3));
                    };
                    {
                        let mut a = p.arbiter.lock().unwrap();
                        match &res {
                            Ok(()) => a.region(r).state = RegionState::Free,
                            Err(_) => a.mark_dirty(r, Instant::now() + Duration::from_millis(100)),
                        }
                    }
                    guard.done = true;
                    if let Err(m) = res {
                        tracing::warn!(volume = %self.spec.name, region = r, error = %m, "cannot recover the region");
                        return Err(Reply::Error { code: ErrorCode::Io, message: m });
                    }
                }
                Step::Wait(until) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(busy(r, self.ctx.io_timeout * 3));
                    }
                    let wake = until.map_or(deadline, |u| u.min(deadline));
                    let _ = tokio::time::timeout(wake.saturating_duration_since(now), changed).await;
                }
            }
        }
    }

    /// Sets the region table up for `epoch` when it is not (§6.4, §9 "Epoch changes").
    ///
    /// At a new epoch, the regions that writes of the old one may have left different are
    /// those of writes in flight at the change, and they are in the activity log of every
    /// replica that executed them: this node's own recent extents are dirty here (and
    /// recovered from its replica at once), and every other replica re-copies its own from
    /// this node when it adopts the epoch ([`Volume::adopt_priority`]); the rest is free.
    /// An arbiter that restarted within its epoch (it had issued grants) knows neither what
    /// it granted nor what failed: every region is dirty, and recovered in the background.
    fn arbiter_ready(&self, a: &mut Arbiter, epoch: u64) {
        if a.ready && a.epoch == epoch {
            return;
        }
        let limit = self.local_disk().map(|r| r.meta()).filter(|m| m.epoch == epoch).map_or(0, |m| m.grant_limit);
        let restarted = limit > 0;
        *a = Arbiter {
            epoch,
            ready: true,
            next: limit,
            limit,
            dirty_start: restarted,
            regions: HashMap::new(),
            next_ticket: a.next_ticket,
            to_recover: VecDeque::new(),
            sweep: 0,
            ended: std::mem::take(&mut a.ended),
        };
        let p = self.mw();
        let per_extent = (super::al::AL_EXTENT >> p.shift).max(1);
        let last = self.size().saturating_sub(1) >> p.shift;
        let mut n = 0;
        if !restarted {
            let now = Instant::now();
            for e in self.al.recent(self.ctx.io_timeout * 3 + Duration::from_secs(1)) {
                let first = (u64::from(e) * super::al::AL_EXTENT) >> p.shift;
                for r in first..(first + per_extent).min(last + 1) {
                    a.mark_dirty(r, now);
                    n += 1;
                }
            }
        }
        tracing::info!(volume = %self.spec.name, epoch, restarted, dirty_regions = n, "arbitrating region write priority");
    }

    /// Recovers dirty regions that no writer asks for (a region's replicas must not stay
    /// different because nobody writes it again), while this node arbitrates.
    pub(super) async fn run_sweeper(self: Arc<Self>) {
        let p = self.mw();
        // A node that restarts learns from its peers whether it still holds write priority
        // before it acts on it.
        self.settle(self.ctx.handshake.timeout * 2).await;
        while !self.stopping.load(Ordering::Acquire) {
            let changed = p.arbiter_changed.notified();
            let prio = self.priority();
            let connected = self.links.iter().flatten().any(|l| l.inner.lock().unwrap().conn.is_some());
            let job = if prio.holder == self.ctx.name && connected {
                let mut a = p.arbiter.lock().unwrap();
                self.arbiter_ready(&mut a, prio.epoch);
                let last = self.size().saturating_sub(1) >> p.shift;
                let mut job = None;
                while let Some(&r) = a.to_recover.front() {
                    match a.regions.get(&r).map(|reg| (reg.state, reg.queue.is_empty() && !reg.busy)) {
                        Some((RegionState::Dirty { not_before }, true)) => {
                            job = Some((r, not_before));
                            break;
                        }
                        // Being dealt with by a requester, or recovered since.
                        _ => {
                            a.to_recover.pop_front();
                        }
                    }
                }
                if job.is_none() && a.dirty_start {
                    while a.sweep <= last {
                        let r = a.sweep;
                        if a.regions.get(&r).is_none_or(|reg| matches!(reg.state, RegionState::Dirty { .. })) {
                            job = Some((r, Instant::now()));
                            break;
                        }
                        a.sweep += 1;
                    }
                    if job.is_none() {
                        a.dirty_start = false;
                        tracing::info!(volume = %self.spec.name, "every region recovered after the arbiter's restart");
                    }
                }
                job
            } else {
                None
            };
            match job {
                Some((r, not_before)) if Instant::now() >= not_before => {
                    match self.arbitrate(self.me, 0, prio.epoch, r).await {
                        Ok(g) => self.arbiter_release(self.me, 0, prio.epoch, r, g, false),
                        Err(reply) => {
                            tracing::debug!(volume = %self.spec.name, region = r, ?reply, "sweeper could not recover the region");
                            tokio::select! {
                                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                                _ = self.stop.notified() => return,
                            }
                        }
                    }
                }
                Some((_, not_before)) => {
                    tokio::select! {
                        _ = tokio::time::sleep(not_before.saturating_duration_since(Instant::now())) => {}
                        _ = changed => {}
                        _ = self.stop.notified() => return,
                    }
                }
                None => {
                    tokio::select! {
                        _ = changed => {}
                        // Write priority may come to this node without a region changing.
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = self.stop.notified() => return,
                    }
                }
            }
        }
    }

    /// The next grant number; persists a new limit first when it runs out.
    fn issue(&self, a: &mut Arbiter, epoch: u64) -> Result<u64, String> {
        if a.next >= a.limit {
            let limit = a.next + GRANT_BATCH;
            let Some(r) = self.local_disk() else {
                return Err(format!("the arbiter {} has no working replica", self.ctx.name));
            };
            r.update_meta(|m| {
                if m.epoch == epoch {
                    m.grant_limit = limit;
                }
            })
            .map_err(|e| format!("cannot persist the grant counter: {e}"))?;
            a.limit = limit;
        }
        a.next += 1;
        Ok(a.next)
    }

    /// Asks the holder of `r` to give it back. `Some(dirty)` when it did, `None` when it did
    /// not answer (it is then cut off).
    async fn revoke(&self, epoch: u64, r: u64, node: usize, grant: u64) -> Option<bool> {
        if node == self.me {
            return Some(self.writer_revoke(epoch, r, grant).await);
        }
        let conn = self.link(node).and_then(|l| l.inner.lock().unwrap().conn.clone())?;
        // The holder answers once its writes to the region have completed, which may take
        // as long as one of them waits for another region (up to the retry bound). Whether
        // the holder is alive meanwhile is what decides: it must answer a ping within a peer
        // I/O timeout (one that does not closes the connection, and the revoke fails).
        let t = self.ctx.io_timeout;
        let answer = conn.call_with_timeout(Request::Revoke { epoch, region: r, grant }, t * (RETRY_TIMEOUTS + 2));
        let alive = async {
            loop {
                tokio::time::sleep(t).await;
                if let Err(e) = conn.call(Request::Ping).await {
                    return e;
                }
            }
        };
        let answer = tokio::select! {
            a = answer => a,
            e = alive => Err(e),
        };
        match answer {
            Ok(Reply::Released { dirty }) => Some(dirty),
            Ok(other) => {
                tracing::warn!(volume = %self.spec.name, peer = %self.spec.replicas[node], "unexpected answer to Revoke: {other:?}");
                None
            }
            Err(e) => {
                tracing::warn!(volume = %self.spec.name, peer = %self.spec.replicas[node], error = %e, "region not given back");
                None
            }
        }
    }

    /// A holder that does not answer is cut off (§6.1): its connections are closed, so its
    /// grants end, and its regions are reclaimed once they expired.
    fn cut_off(&self, node: usize, why: &str) {
        let Some(link) = self.link(node) else { return };
        tracing::warn!(volume = %self.spec.name, peer = %link.name, why, "cutting the writer off; its regions are recovered once its grants expired");
        self.drop_link(node, &PeerError::Disconnected { peer: link.name.clone() });
        link.session.send_modify(|s| *s += 1);
        self.reclaim(node, None);
    }

    /// The regions granted to `node` (on connection `session`, or any) become dirty, to be
    /// recovered once the grants expired.
    fn reclaim(&self, node: usize, session: Option<u64>) {
        let p = self.mw();
        let not_before = Instant::now() + self.reclaim_after();
        let mut n = 0;
        {
            let mut a = p.arbiter.lock().unwrap();
            let held: Vec<u64> = a
                .regions
                .iter()
                .filter(|(_, reg)| {
                    matches!(reg.state, RegionState::Held { node: h, session: s, .. }
                        if h == node && session.is_none_or(|x| x == s))
                })
                .map(|(&r, _)| r)
                .collect();
            for r in held {
                a.mark_dirty(r, not_before);
                n += 1;
            }
        }
        if n > 0 {
            tracing::info!(volume = %self.spec.name, peer = %self.spec.replicas[node], regions = n, "reclaiming the regions of a writer whose connection ended");
            p.arbiter_changed.notify_waiters();
        }
    }

    /// A peer's connection to this node ended: as arbiter, reclaim what it held on it.
    pub fn peer_session_ended(&self, node: usize, session: u64) {
        if let Some(p) = &self.mw {
            {
                let mut a = p.arbiter.lock().unwrap();
                let e = a.ended.entry(node).or_default();
                *e = (*e).max(session);
            }
            self.reclaim(node, Some(session));
        }
    }

    /// A holder gives a region back (`Release`, or this node's own writer).
    pub(super) fn arbiter_release(&self, from: usize, session: u64, epoch: u64, r: u64, grant: u64, dirty: bool) {
        let p = self.mw();
        {
            let mut a = p.arbiter.lock().unwrap();
            if a.epoch != epoch {
                return;
            }
            let Some(reg) = a.regions.get_mut(&r) else { return };
            if reg.state == (RegionState::Held { node: from, session, grant }) {
                if dirty {
                    a.mark_dirty(r, Instant::now());
                } else {
                    reg.state = RegionState::Free;
                }
            }
        }
        p.arbiter_changed.notify_waiters();
    }

    /// Recovers region `r` under `grant` (§6.2): fences the local replica, then copies the
    /// region from it to every other replica that receives writes; one that fails is
    /// recorded as out of sync for the region.
    async fn recover_region(&self, epoch: u64, r: u64, grant: u64) -> Result<(), String> {
        let p = self.mw();
        let Some((replica, super::ReplicaState::InSync)) = self.local_replica() else {
            return Err(format!("the arbiter {}'s replica is not in sync; it cannot recover regions", self.ctx.name));
        };
        let persist = p.fence_adopt(epoch, r, grant).await?;
        if persist {
            self.persist_fence(epoch, grant)?;
        }
        let offset = r << p.shift;
        let len = p.region_size().min(self.size().saturating_sub(offset));
        let data = replica.read(offset, len as usize).await.map_err(|e| {
            self.local_failed(&e);
            format!("cannot read region {r}: {e}")
        })?;
        let (_, mut targets) = self.write_targets();
        targets.retain(|t| t.size >= offset + len);
        let sent: u32 = targets.iter().fold(1 << self.me, |m, t| m | 1 << t.idx);
        let missed = !sent & self.all_peers;
        let req = Request::Recover { epoch, region: r, grant, shift: p.shift, data: data.clone() };
        let results = join_all(targets.iter().map(|t| t.conn.call(req.clone()))).await;
        let mut failed = missed;
        for (t, res) in targets.iter().zip(results) {
            match res {
                Ok(Reply::Ok) => {}
                Ok(other) => {
                    tracing::warn!(volume = %self.spec.name, peer = %self.spec.replicas[t.idx], region = r, "recovery refused: {other:?}");
                    self.drop_link(
                        t.idx,
                        &PeerError::Protocol { peer: self.spec.replicas[t.idx].clone(), message: format!("{other:?}") },
                    );
                    failed |= 1 << t.idx;
                }
                Err(e) => {
                    tracing::warn!(volume = %self.spec.name, peer = %self.spec.replicas[t.idx], region = r, error = %e, "recovery failed");
                    self.drop_link(t.idx, &e);
                    failed |= 1 << t.idx;
                }
            }
        }
        // Recorded with the region's blocks marked, like a write they missed.
        self.flag_outdated(failed, None, Some((offset, len)));
        tracing::debug!(volume = %self.spec.name, region = r, grant, "region recovered");
        Ok(())
    }

    fn persist_fence(&self, epoch: u64, grant: u64) -> Result<(), String> {
        let p = self.mw();
        if let Some(r) = self.local_disk() {
            r.update_meta(|m| {
                if m.epoch == epoch {
                    m.fence_grant = m.fence_grant.max(grant);
                }
            })
            .map_err(|e| format!("cannot persist the region's grant: {e}"))?;
        }
        p.persisted(epoch, grant);
        Ok(())
    }

    // ---- requests from peers ------------------------------------------------------------

    /// The policing requests of a peer (`Acquire`, `Revoke`, `Release`, `Recover`).
    pub(super) async fn serve_policing(&self, from: usize, session: u64, req: Request) -> Reply {
        let invalid = |message: String| Reply::Error { code: ErrorCode::Invalid, message };
        if self.mw.is_none() {
            return invalid(format!("volume {} is not multi-writer on {}", self.spec.name, self.ctx.name));
        }
        let sender = self.spec.replicas[from].clone();
        match req {
            Request::Acquire { epoch, region } => match self.arbitrate(from, session, epoch, region).await {
                Ok(grant) => Reply::Granted { grant },
                Err(reply) => reply,
            },
            Request::Release { epoch, region, grant, dirty } => {
                self.arbiter_release(from, session, epoch, region, grant, dirty);
                Reply::Ok
            }
            Request::Revoke { epoch, region, grant } => {
                let prio = self.priority();
                if epoch > prio.epoch {
                    self.adopt_priority(epoch, &sender);
                }
                Reply::Released { dirty: self.writer_revoke(epoch, region, grant).await }
            }
            Request::Recover { epoch, region, grant, shift, data } => {
                self.serve_recover(from, epoch, region, grant, shift, data).await
            }
            other => invalid(format!("{other:?} is not a policing request")),
        }
    }

    async fn serve_recover(&self, from: usize, epoch: u64, r: u64, grant: u64, shift: u8, data: Bytes) -> Reply {
        let p = self.mw();
        if shift != p.shift {
            return Reply::Error {
                code: ErrorCode::Invalid,
                message: format!(
                    "regions of {} bytes there, {} here: the volume's region_size differs between nodes",
                    1u64 << shift,
                    p.region_size()
                ),
            };
        }
        let offset = r << p.shift;
        if let Err(e) = crate::block::check_range(offset, data.len() as u64, self.size()) {
            return Reply::Error { code: ErrorCode::OutOfRange, message: e.message };
        }
        // Only the arbiter recovers: the holder of write priority at `epoch`.
        let prio = self.priority();
        let sender = &self.spec.replicas[from];
        if epoch < prio.epoch || (epoch == prio.epoch && prio.holder != *sender) {
            return Reply::Fenced { epoch: prio.epoch, holder: prio.holder };
        }
        if epoch > prio.epoch {
            self.adopt_priority(epoch, sender);
        }
        match p.fence_adopt(epoch, r, grant).await {
            Ok(persist) => {
                if persist && let Err(m) = self.persist_fence(epoch, grant) {
                    return Reply::Error { code: ErrorCode::Io, message: m };
                }
            }
            Err(m) => return stale(m),
        }
        self.execute_for_peer(&Op::Write { offset, data, fua: false }, 0).await
    }

    /// A peer's write of a multi-writer volume: its grants are checked and adopted, and the
    /// write executed while its regions count it as executing.
    pub(super) fn peer_fence<'a>(&'a self, epoch: u64, tags: &Tags, op: &Op) -> Result<Option<FenceGuard<'a>>, Reply> {
        let Some(p) = &self.mw else {
            if tags.list.is_empty() {
                return Ok(None);
            }
            return Err(Reply::Error {
                code: ErrorCode::Invalid,
                message: format!(
                    "volume {} is single-writer on {}; the write carries region grants",
                    self.spec.name, self.ctx.name
                ),
            });
        };
        let (offset, len) = op.range();
        match p.fence_enter(epoch, tags, offset, len) {
            Ok(g) => Ok(Some(g)),
            Err(FenceRefusal::Mismatch(m)) => Err(Reply::Error { code: ErrorCode::Invalid, message: m }),
            Err(FenceRefusal::Stale(m)) => Err(stale(m)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(shift: u8, list: &[(u64, u64)]) -> Tags {
        Tags { shift, list: list.to_vec() }
    }

    #[test]
    fn regions_of_a_range() {
        let p = Policing::new(1 << 20, 0, 0, 0);
        assert_eq!(p.regions(0, 4096), 0..1);
        assert_eq!(p.regions((1 << 20) - 4096, 8192), 0..2);
        assert_eq!(p.regions(3 << 20, 1 << 20), 3..4);
        assert_eq!(p.regions(5, 0), 0..0);
    }

    #[test]
    fn replicas_refuse_older_grants_and_check_the_regions() {
        let p = Policing::new(1 << 20, 1, 0, 0);
        let g = p.fence_enter(1, &tags(20, &[(0, 5)]), 0, 4096).unwrap();
        drop(g);
        // Same grant, newer grant: executed.
        drop(p.fence_enter(1, &tags(20, &[(0, 5)]), 4096, 4096).unwrap());
        drop(p.fence_enter(1, &tags(20, &[(0, 7)]), 0, 4096).unwrap());
        // Older grant: refused, and nothing adopted for the other region.
        assert!(matches!(
            p.fence_enter(1, &tags(20, &[(0, 6), (1, 9)]), (1 << 20) - 4096, 8192),
            Err(FenceRefusal::Stale(_))
        ));
        drop(p.fence_enter(1, &tags(20, &[(1, 8)]), 1 << 20, 4096).unwrap());
        // Wrong region size, wrong regions, no grants.
        assert!(matches!(p.fence_enter(1, &tags(16, &[(0, 9)]), 0, 4096), Err(FenceRefusal::Mismatch(_))));
        assert!(matches!(p.fence_enter(1, &tags(20, &[(1, 9)]), 0, 4096), Err(FenceRefusal::Mismatch(_))));
        assert!(matches!(p.fence_enter(1, &tags(20, &[]), 0, 4096), Err(FenceRefusal::Mismatch(_))));
        // A newer epoch voids the grants; an older one is refused.
        drop(p.fence_enter(2, &tags(20, &[(0, 1)]), 0, 4096).unwrap());
        assert!(matches!(p.fence_enter(1, &tags(20, &[(0, 99)]), 0, 4096), Err(FenceRefusal::Stale(_))));
    }

    #[test]
    fn a_restarted_replica_refuses_grants_below_its_floor() {
        let p = Policing::new(1 << 20, 3, 40, 0);
        assert!(matches!(p.fence_enter(3, &tags(20, &[(7, 39)]), 7 << 20, 4096), Err(FenceRefusal::Stale(_))));
        drop(p.fence_enter(3, &tags(20, &[(7, 40)]), 7 << 20, 4096).unwrap());
        // A newer epoch starts without a floor.
        drop(p.fence_enter(4, &tags(20, &[(7, 1)]), 7 << 20, 4096).unwrap());
    }

    #[tokio::test]
    async fn a_recovery_waits_for_the_writes_executing_in_its_region() {
        let p = Arc::new(Policing::new(1 << 20, 1, 0, 0));
        let guard = p.fence_enter(1, &tags(20, &[(0, 5)]), 0, 4096).unwrap();
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let p2 = p.clone();
        let task = tokio::spawn(async move {
            let r = p2.fence_adopt(1, 0, 6).await;
            let _ = tx.send(());
            r
        });
        // The recovery has adopted grant 6 (older writes are refused) but waits.
        tokio::task::yield_now().await;
        for _ in 0..100 {
            if p.fence_enter(1, &tags(20, &[(0, 5)]), 0, 4096).is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(matches!(p.fence_enter(1, &tags(20, &[(0, 5)]), 0, 4096), Err(FenceRefusal::Stale(_))));
        assert!(rx.try_recv().is_err(), "the recovery must wait for the write executing in the region");
        drop(guard);
        assert_eq!(task.await.unwrap(), Ok(true));
        // An older recovery is refused.
        assert!(p.fence_adopt(1, 0, 4).await.is_err());
    }
}
