//! The activity log: the set of 4 MiB extents of a volume that may have writes in flight,
//! written to the replica before a write to an extent not yet in it is executed.
//!
//! After a crash of the agent, replicas may differ only inside the extents of the log (a
//! write in flight may have reached some replicas and not others, and out-of-sync bits set
//! in memory may not have reached the disk). The engine replays the log at start by marking
//! those extents out of sync against every peer, so a crash costs a resync of the hot set
//! instead of the whole volume. An extent leaves the log only when no write is in flight in
//! it and after the bitmap pages have been written.
//!
//! Capacity: [`AL_CAPACITY`] extents of [`AL_EXTENT`] bytes (about 4 GiB of hot data): a
//! workload whose working set fits writes the log only when it first touches an extent.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::replica::AL_MAX_EXTENTS;

/// Bytes covered by one activity-log extent.
pub const AL_EXTENT: u64 = 4 << 20;
/// Extents kept in the log before the least recently used idle ones are evicted.
pub const AL_CAPACITY: usize = 1000;

#[derive(Default)]
pub struct ActivityLog {
    state: Mutex<State>,
    /// Serialises writes of the log.
    pub commit: tokio::sync::Mutex<()>,
    left: Notify,
}

#[derive(Default)]
struct State {
    active: HashMap<u32, Ext>,
    tick: u64,
}

struct Ext {
    inflight: u32,
    used: u64,
    last: std::time::Instant,
}

/// The extents `[first, last]` of a byte range.
pub fn extents(offset: u64, len: u64) -> (u32, u32) {
    let first = (offset / AL_EXTENT) as u32;
    let last = ((offset + len.max(1) - 1) / AL_EXTENT) as u32;
    (first, last)
}

/// What a commit of the log will write.
pub struct Plan {
    /// The extents of the new log.
    pub extents: Vec<u32>,
    /// Extents that leave the log (their bitmap pages must be written first).
    pub evicted: Vec<u32>,
}

impl ActivityLog {
    /// Enters `[first, last]` if all of them are in the log already.
    pub fn try_enter(&self, first: u32, last: u32) -> bool {
        let mut s = self.state.lock().unwrap();
        if !(first..=last).all(|e| s.active.contains_key(&e)) {
            return false;
        }
        s.tick += 1;
        let tick = s.tick;
        let now = std::time::Instant::now();
        for e in first..=last {
            let x = s.active.get_mut(&e).expect("checked");
            x.inflight += 1;
            x.used = tick;
            x.last = now;
        }
        true
    }

    /// Leaves `[first, last]` (the write is done and its out-of-sync bits are set).
    pub fn leave(&self, first: u32, last: u32) {
        let mut s = self.state.lock().unwrap();
        for e in first..=last {
            if let Some(x) = s.active.get_mut(&e) {
                x.inflight = x.inflight.saturating_sub(1);
            }
        }
        drop(s);
        self.left.notify_waiters();
    }

    /// Plans a log that holds `[first, last]`, evicting idle least recently used extents
    /// beyond the capacity; the evicted extents are removed at once so that no write enters
    /// them before the commit. None when the extents can't fit until writes leave.
    /// Must be called with `commit` held.
    pub fn plan(&self, first: u32, last: u32) -> Option<Plan> {
        let mut s = self.state.lock().unwrap();
        let new: Vec<u32> = (first..=last).filter(|e| !s.active.contains_key(e)).collect();
        let mut evicted = Vec::new();
        let over = (s.active.len() + new.len()).saturating_sub(AL_CAPACITY);
        if over > 0 {
            let mut idle: Vec<(u64, u32)> =
                s.active.iter().filter(|(_, x)| x.inflight == 0).map(|(e, x)| (x.used, *e)).collect();
            idle.sort_unstable();
            for (_, e) in idle.into_iter().take(over) {
                s.active.remove(&e);
                evicted.push(e);
            }
        }
        if s.active.len() + new.len() > AL_MAX_EXTENTS {
            return None;
        }
        let mut extents: Vec<u32> = s.active.keys().copied().chain(new).collect();
        extents.sort_unstable();
        Some(Plan { extents, evicted })
    }

    /// Installs a committed plan and enters `[first, last]`.
    pub fn install(&self, plan: &Plan, first: u32, last: u32) {
        let mut s = self.state.lock().unwrap();
        s.tick += 1;
        let tick = s.tick;
        let now = std::time::Instant::now();
        for &e in &plan.extents {
            s.active.entry(e).or_insert(Ext { inflight: 0, used: tick, last: now });
        }
        for e in first..=last {
            let x = s.active.entry(e).or_insert(Ext { inflight: 0, used: tick, last: now });
            x.inflight += 1;
            x.used = tick;
            x.last = now;
        }
    }

    /// Waits until some write leaves the log.
    pub async fn wait_left(&self) {
        let n = self.left.notified();
        tokio::select! {
            _ = n => {}
            _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
        }
    }

    /// The extents in the log now.
    pub fn active(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.state.lock().unwrap().active.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// The extents written within `window` before the newest write (and those with writes
    /// in flight).
    pub fn recent(&self, window: std::time::Duration) -> Vec<u32> {
        let s = self.state.lock().unwrap();
        let Some(newest) = s.active.values().map(|x| x.last).max() else { return vec![] };
        let mut v: Vec<u32> = s
            .active
            .iter()
            .filter(|(_, x)| x.inflight > 0 || newest.duration_since(x.last) <= window)
            .map(|(e, _)| *e)
            .collect();
        v.sort_unstable();
        v
    }

    pub fn len(&self) -> usize {
        self.state.lock().unwrap().active.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enter_plan_install_leave_evict() {
        let al = ActivityLog::default();
        assert_eq!(extents(0, 4096), (0, 0));
        assert_eq!(extents(AL_EXTENT - 1, 2), (0, 1));
        assert!(!al.try_enter(0, 1));
        let p = al.plan(0, 1).unwrap();
        assert_eq!(p.extents, vec![0, 1]);
        assert!(p.evicted.is_empty());
        al.install(&p, 0, 1);
        assert!(al.try_enter(1, 1));
        al.leave(0, 1);
        al.leave(1, 1);
        // Fill to capacity; extent 1 is busy, so 0 (idle, least recently used) goes first.
        assert!(al.try_enter(1, 1));
        for e in 2..AL_CAPACITY as u32 {
            let p = al.plan(e, e).unwrap();
            al.install(&p, e, e);
            al.leave(e, e);
        }
        assert_eq!(al.len(), AL_CAPACITY);
        let p = al.plan(5000, 5000).unwrap();
        assert_eq!(p.evicted, vec![0]);
        assert!(!p.extents.contains(&0) && p.extents.contains(&1) && p.extents.contains(&5000));
        al.install(&p, 5000, 5000);
        assert!(!al.try_enter(0, 0));
    }
}
