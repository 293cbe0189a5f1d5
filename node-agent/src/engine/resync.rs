//! Resynchronisation of the local replica: pulled from an in-sync peer, block ranges
//! chosen by the out-of-sync bitmaps, paced, checkpointed and resumable.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;

use super::{
    BITMAP_CHUNK, BULK_MIN, CHECKPOINT_BYTES, CHECKPOINT_EVERY, RESYNC_CHUNK, RESYNC_DEPTH, RESYNC_INFLIGHT_BYTES,
    ReplicaState, ResyncProgress, Volume, blocks_of,
};
use crate::peer::client::PeerConn;
use crate::peer::proto::{Reply, Request};
use crate::replica::{BLOCK_SIZE, Replica};

impl Volume {
    pub(super) async fn resync_loop(self: Arc<Self>) {
        while !self.stopping.load(Ordering::Acquire) {
            let changed = self.changed.notified();
            let needs = matches!(self.local_replica(), Some((_, ReplicaState::Outdated | ReplicaState::CatchingUp)));
            let source = needs.then(|| self.pick_source()).flatten();
            if needs && source.is_none() {
                self.note_size_wait();
            }
            match source {
                Some((idx, conn)) => {
                    if let Err(e) = self.run_resync(idx, &conn).await {
                        tracing::warn!(volume = %self.spec.name, source = %self.spec.replicas[idx], error = %e, "resync interrupted; it resumes where it stopped");
                        *self.resync_source.lock().unwrap() = None;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                None => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
                }
            }
        }
    }

    /// Multi-writer volumes: ends the connections of peers this node has lost its own link
    /// to, and waits until what they were executing is done. A writer gives up a write to a
    /// replica that does not answer in time and goes on (it resends it without the replica);
    /// the replica may still be executing it, received before the link failed. Here the
    /// replica copies from the arbiter, not from that writer, while the writer's connection
    /// may still be open: such a write landing after the copy would overwrite newer data.
    /// (In single-writer volumes the copy comes after a new connection from the writer,
    /// which ends the old one the same way.) The arbiter keeps its writers' connections: they
    /// carry their grants.
    async fn end_stale_sessions(&self) {
        if self.mw.is_none() || self.priority().holder == self.ctx.name {
            return;
        }
        for link in self.links.iter().flatten() {
            if link.inner.lock().unwrap().conn.is_some() {
                continue;
            }
            link.session.send_modify(|s| *s += 1);
            // Held by a connection of the peer while it serves; free once it finished.
            drop(link.serving.clone().lock_owned().await);
        }
    }

    /// An in-sync peer of this replica's size to copy from (a peer of another size may
    /// lack blocks this one needs, or hold blocks past this one's end). A peer that recorded
    /// blocks this replica lacks comes first (its record is cleared by what it serves;
    /// another source would leave it, and the replica would be told again it is out of
    /// date), then the holder of write priority. While such a peer has another size, none:
    /// the replica waits until both are grown. Multi-writer volumes copy from the holder of
    /// write priority (the arbiter) only.
    fn pick_source(&self) -> Option<(usize, Arc<PeerConn>)> {
        let holder = self.priority().holder;
        let me = &self.ctx.name;
        let size = self.size();
        let mut best: Option<(u8, usize, Arc<PeerConn>)> = None;
        for (i, l) in self.links.iter().enumerate() {
            let Some(l) = l else { continue };
            let li = l.inner.lock().unwrap();
            let Some(t) = li.theirs.as_ref() else { continue };
            if li.state != ReplicaState::InSync || !t.consistent || !t.local_ok {
                continue;
            }
            let Some(c) = li.conn.clone() else { continue };
            let records_me = t.outdated_peers.contains(me) || t.dirty_peers.contains(me);
            if t.size != size {
                if records_me {
                    return None;
                }
                continue;
            }
            // Multi-writer volumes: the arbiter only (its replica has every write; another
            // writer's may lack the writes it missed).
            if self.mw.is_some() && l.name != holder {
                continue;
            }
            let rank = u8::from(records_me) * 2 + u8::from(l.name == holder);
            if best.as_ref().is_none_or(|(r, _, _)| rank > *r) {
                best = Some((rank, i, c));
            }
        }
        best.map(|(_, i, c)| (i, c))
    }

    /// The local replica lacks writes and no in-sync peer of its size can give them: if one
    /// of another size could, say that this replica waits to be grown.
    fn note_size_wait(&self) {
        let size = self.size();
        let other = self.links.iter().flatten().find_map(|l| {
            let li = l.inner.lock().unwrap();
            let t = li.theirs.as_ref()?;
            (li.conn.is_some() && li.state == ReplicaState::InSync && t.consistent && t.size != size)
                .then(|| (l.name.clone(), t.size))
        });
        if let Some((peer, theirs)) = other {
            let detail = format!(
                "lacks writes; in-sync {peer} has {theirs} bytes, this replica {size}: it resynchronises once both are grown to the same size"
            );
            let mut l = self.local.lock().unwrap();
            if matches!(l.state, ReplicaState::Outdated | ReplicaState::CatchingUp) && l.detail != detail {
                tracing::warn!(volume = %self.spec.name, %peer, theirs, size, "cannot resynchronise from a replica of another size");
                l.detail = detail;
            }
        }
    }

    /// Fetches the source's bitmap for this replica and merges it into the local record of
    /// the blocks this replica lacks. Fails when the source's size is no longer this
    /// replica's (one of them grew): the resync stops, and resumes from a source of the same
    /// size.
    async fn merge_source_bitmap(&self, idx: usize, conn: &PeerConn) -> Result<(), String> {
        let size = self.size();
        let theirs = self.link(idx).and_then(|l| l.inner.lock().unwrap().theirs.as_ref().map(|t| t.size));
        if theirs != Some(size) {
            return Err(format!("the source has {} bytes, this replica {size}", theirs.unwrap_or(0)));
        }
        let total = self.bitmaps.lock().unwrap()[self.me].len_bytes();
        let mut off = 0usize;
        while off < total {
            let n = BITMAP_CHUNK.min(total - off);
            let reply =
                conn.call(Request::GetBitmap { offset: off as u64, len: n as u32 }).await.map_err(|e| e.to_string())?;
            let Reply::Data { data } = reply else { return Err(format!("unexpected reply {reply:?}")) };
            if data.len() != n {
                return Err(format!("short bitmap read: {} of {n} bytes", data.len()));
            }
            if data.iter().any(|b| *b != 0) {
                self.bitmaps.lock().unwrap()[self.me].or_bytes(off, &data);
            }
            off += n;
        }
        Ok(())
    }

    /// Brings the local replica up to date from peer `idx`: merges what the source recorded
    /// that this replica missed with what this replica recorded itself, persists that, then
    /// copies the blocks (paced to the configured rate) while foreground writes continue,
    /// and repeats until the source has nothing more; then declares the replica consistent.
    /// Interrupted, it resumes from the persisted record.
    async fn run_resync(&self, idx: usize, conn: &Arc<PeerConn>) -> Result<(), String> {
        let Some(replica) = self.local_disk() else { return Err("no local replica".into()) };
        let source = self.spec.replicas[idx].clone();
        {
            let mut l = self.local.lock().unwrap();
            l.state = ReplicaState::CatchingUp;
            l.detail = format!("resynchronising from {source}");
        }
        *self.resync_source.lock().unwrap() = Some(conn.clone());
        self.broadcast_state();
        self.end_stale_sessions().await;
        self.merge_source_bitmap(idx, conn).await?;
        {
            // What this node recorded against the source (crash, refused writes) is lacking too.
            let mut b = self.bitmaps.lock().unwrap();
            let mine = b[idx].clone();
            b[self.me].or(&mine);
            b[idx].clear_all();
        }
        self.flush_bitmaps(&replica).await.map_err(|e| e.to_string())?;
        replica.update_meta(|m| m.consistent = false).map_err(|e| e.to_string())?;
        let total = self.bitmaps.lock().unwrap()[self.me].count() * BLOCK_SIZE;
        *self.resync.lock().unwrap() = ResyncProgress {
            source: Some(source.clone()),
            done_bytes: 0,
            total_bytes: total,
            started: Some(Instant::now()),
        };
        tracing::info!(volume = %self.spec.name, %source, bytes = total, "resync started");

        let mut rounds = 0;
        loop {
            self.end_stale_sessions().await;
            self.copy_lacking(&replica, conn).await?;
            self.merge_source_bitmap(idx, conn).await?;
            let left = self.bitmaps.lock().unwrap()[self.me].count() * BLOCK_SIZE;
            if left == 0 {
                break;
            }
            rounds += 1;
            if rounds > 10_000 {
                return Err("resync does not converge".into());
            }
            self.resync.lock().unwrap().total_bytes += left;
        }
        replica.flush().await.map_err(|e| e.to_string())?;
        let source_gen =
            self.link(idx).and_then(|l| l.inner.lock().unwrap().theirs.as_ref().map(|t| t.generation)).unwrap_or(1);
        {
            // The replica now equals the source: what it recorded as possibly different from
            // other peers (not known missed writes) no longer applies.
            let outdated = replica.meta().outdated_peers;
            let mut b = self.bitmaps.lock().unwrap();
            for (i, bm) in b.iter_mut().enumerate() {
                if i != self.me && !outdated.contains(&self.spec.replicas[i]) {
                    bm.clear_all();
                }
            }
        }
        self.flush_bitmaps(&replica).await.map_err(|e| e.to_string())?;
        replica
            .update_meta(|m| {
                m.consistent = true;
                m.generation = m.generation.max(source_gen).max(1);
                // The source has everything this replica has now: a record that it missed
                // writes is stale.
                m.outdated_peers.retain(|p| *p != source);
            })
            .map_err(|e| e.to_string())?;
        self.generation_zero.store(false, Ordering::Relaxed);
        {
            let mut l = self.local.lock().unwrap();
            if l.state == ReplicaState::CatchingUp {
                l.state = ReplicaState::InSync;
                l.detail.clear();
            }
        }
        *self.resync_source.lock().unwrap() = None;
        let p = self.resync.lock().unwrap().clone();
        let took = p.started.map(|s| s.elapsed()).unwrap_or_default();
        tracing::info!(volume = %self.spec.name, %source, ?took, bytes = p.done_bytes, "resync done; local replica in sync");
        self.broadcast_state();
        self.changed.notify_waiters();
        Ok(())
    }

    /// Copies every block set in the local bitmap from `conn`, checkpointing progress.
    async fn copy_lacking(&self, replica: &Arc<Replica>, conn: &Arc<PeerConn>) -> Result<(), String> {
        // Pace the copy: a chunk is requested no earlier than the time by which the copy,
        // including this chunk, is within the configured rate.
        let start = tokio::time::Instant::now();
        let rate = self.ctx.resync_rate;
        let mut scheduled = 0u64;
        let mut since_checkpoint = 0u64;
        let mut last_checkpoint = Instant::now();
        let mut checkpoint: Option<tokio::task::JoinHandle<std::io::Result<()>>> = None;
        let mut cursor = 0u64;
        let mut inflight = FuturesUnordered::new();
        let mut inflight_bytes = 0u64;
        loop {
            while inflight.len() < RESYNC_DEPTH && inflight_bytes < RESYNC_INFLIGHT_BYTES {
                let run = self.bitmaps.lock().unwrap()[self.me].next_run(cursor, RESYNC_CHUNK / BLOCK_SIZE);
                let Some((b, n)) = run else { break };
                cursor = b + n;
                let (off, len) = (b * BLOCK_SIZE, n * BLOCK_SIZE);
                scheduled += len;
                inflight_bytes += len;
                let at = start + Duration::from_secs_f64(if rate > 0 { scheduled as f64 / rate as f64 } else { 0.0 });
                inflight.push(async move {
                    tokio::time::sleep_until(at).await;
                    let reply = conn
                        .call(Request::ResyncRead { offset: off, len: len as u32 })
                        .await
                        .map_err(|e| e.to_string())?;
                    let Reply::Data { data } = reply else { return Err(format!("unexpected reply {reply:?}")) };
                    if data.len() as u64 != len {
                        return Err(format!("short resync read: {} of {len} bytes", data.len()));
                    }
                    self.apply_resync(replica, off, data).await.map_err(|e| e.to_string())?;
                    Ok(len)
                });
            }
            let Some(r) = inflight.next().await else { break };
            let len = r?;
            inflight_bytes -= len;
            self.resync.lock().unwrap().done_bytes += len;
            since_checkpoint += len;
            // Checkpoint in the background: the bitmap pages taken now clear only blocks
            // whose data was written before, which the flush that precedes writing them makes
            // durable; the copy goes on meanwhile.
            let due = since_checkpoint >= CHECKPOINT_BYTES || last_checkpoint.elapsed() >= CHECKPOINT_EVERY;
            if due && checkpoint.as_ref().is_none_or(|h| h.is_finished()) {
                if let Some(h) = checkpoint.take() {
                    h.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
                }
                since_checkpoint = 0;
                last_checkpoint = Instant::now();
                let pages = self.take_bitmap_pages();
                let r = replica.clone();
                checkpoint = Some(tokio::task::spawn_blocking(move || {
                    r.flush_sync()?;
                    super::write_pages(&r, &pages)
                }));
            }
            if self.stopping.load(Ordering::Acquire) {
                return Err("stopping".into());
            }
        }
        if let Some(h) = checkpoint.take() {
            h.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
        }
        replica.flush().await.map_err(|e| e.to_string())?;
        self.flush_bitmaps(replica).await.map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Writes resync data for the blocks still lacking (a foreground write may have made
    /// some current meanwhile) and clears them.
    pub(super) async fn apply_resync(&self, replica: &Arc<Replica>, off: u64, data: Bytes) -> std::io::Result<()> {
        let _g = self.apply_locks.lock(off, data.len() as u64).await;
        let (s, e) = blocks_of(off, data.len() as u64);
        let mut runs = Vec::new();
        {
            let b = self.bitmaps.lock().unwrap();
            let mut at = s;
            while let Some((rs, rn)) = b[self.me].next_run(at, e - at) {
                if rs >= e {
                    break;
                }
                let rn = rn.min(e - rs);
                runs.push((rs, rn));
                at = rs + rn;
                if at >= e {
                    break;
                }
            }
        }
        for (rs, rn) in runs {
            let from = ((rs - s) * BLOCK_SIZE) as usize;
            let chunk = data.slice(from..from + (rn * BLOCK_SIZE) as usize);
            if chunk.len() >= BULK_MIN {
                let r = replica.clone();
                tokio::task::spawn_blocking(move || r.write_bulk(rs * BLOCK_SIZE, &chunk))
                    .await
                    .map_err(std::io::Error::other)??;
            } else {
                replica.write(rs * BLOCK_SIZE, chunk, false).await?;
            }
            self.bitmaps.lock().unwrap()[self.me].clear_blocks(rs, rs + rn);
        }
        Ok(())
    }
}
