//! Small concurrency helpers of the mirror engine: a range lock that serialises
//! overlapping requests, and a bitset of 4 KiB blocks.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::replica::BLOCK_SIZE;

/// Serialises requests whose block-aligned ranges overlap; disjoint requests run freely.
/// Conflicts are detected at 4 KiB granularity so that two sub-block writes to one block
/// are ordered too.
#[derive(Default)]
pub struct RangeLocks {
    held: Mutex<Vec<Held>>,
}

struct Held {
    id: u64,
    start: u64,
    end: u64,
    released: Arc<Notify>,
}

/// Releases its range when dropped.
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    id: u64,
}

fn block_span(offset: u64, len: u64) -> (u64, u64) {
    let start = offset / BLOCK_SIZE * BLOCK_SIZE;
    let end = (offset + len.max(1)).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
    (start, end)
}

impl RangeLocks {
    pub async fn lock(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let (start, end) = block_span(offset, len);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        loop {
            let notify = {
                let mut held = self.held.lock().unwrap();
                match held.iter().find(|h| h.start < end && start < h.end) {
                    None => {
                        held.push(Held { id, start, end, released: Arc::new(Notify::new()) });
                        return RangeGuard { locks: self, id };
                    }
                    Some(h) => h.released.clone(),
                }
            };
            let wait = notify.notified();
            tokio::pin!(wait);
            wait.as_mut().enable();
            // The holder may have released between our check and enable(): check again.
            if self.held.lock().unwrap().iter().any(|h| Arc::ptr_eq(&h.released, &notify)) {
                wait.await;
            }
        }
    }

    pub fn in_flight(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap();
        if let Some(i) = held.iter().position(|h| h.id == self.id) {
            let h = held.swap_remove(i);
            h.released.notify_waiters();
        }
    }
}

/// A set of 4 KiB blocks of a volume.
#[derive(Debug, Clone)]
pub struct BlockSet {
    bits: Vec<u64>,
    blocks: u64,
}

impl BlockSet {
    pub fn new(size: u64) -> Self {
        let blocks = size.div_ceil(BLOCK_SIZE);
        Self { bits: vec![0; blocks.div_ceil(64) as usize], blocks }
    }

    /// Marks every block that `[offset, offset + len)` touches.
    pub fn insert_touched(&mut self, offset: u64, len: u64) {
        let (s, e) = block_span(offset, len);
        for b in s / BLOCK_SIZE..(e / BLOCK_SIZE).min(self.blocks) {
            self.bits[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    /// Marks the blocks that `[offset, offset + len)` covers entirely.
    pub fn insert_covered(&mut self, offset: u64, len: u64) {
        let first = offset.div_ceil(BLOCK_SIZE);
        let last = (offset + len) / BLOCK_SIZE;
        for b in first..last.min(self.blocks) {
            self.bits[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    pub fn contains_block(&self, block: u64) -> bool {
        block < self.blocks && self.bits[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|&w| w == 0)
    }

    /// The set as sorted, coalesced byte ranges `(offset, len)`.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (wi, &w) in self.bits.iter().enumerate() {
            if w == 0 {
                continue;
            }
            for bit in 0..64 {
                if w & (1 << bit) != 0 {
                    let off = (wi as u64 * 64 + bit) * BLOCK_SIZE;
                    match out.last_mut() {
                        Some((o, l)) if *o + *l == off => *l += BLOCK_SIZE,
                        _ => out.push((off, BLOCK_SIZE)),
                    }
                }
            }
        }
        out
    }

    pub fn clear(&mut self) {
        self.bits.iter_mut().for_each(|w| *w = 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blockset_ranges() {
        let mut s = BlockSet::new(1 << 20);
        s.insert_touched(100, 10);
        s.insert_touched(4096, 8192);
        s.insert_covered(20480, 4095); // covers nothing
        s.insert_covered(40000, 10000); // covers block 10 and 11? 40960..49152 -> blocks 10,11
        assert_eq!(s.ranges(), vec![(0, 12288), (40960, 8192)]);
        assert!(s.contains_block(10) && !s.contains_block(5));
    }

    #[tokio::test]
    async fn overlapping_ranges_wait() {
        let locks = Arc::new(RangeLocks::default());
        let g = locks.lock(0, 100).await;
        let l2 = locks.clone();
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let t = tokio::spawn(async move {
            let _g = l2.lock(4000, 10).await; // same 4 KiB block
            tx.send(()).unwrap();
        });
        let _other = locks.lock(4096, 4096).await; // disjoint: does not wait
        tokio::task::yield_now().await;
        assert!(rx.try_recv().is_err(), "overlapping lock acquired while held");
        drop(g);
        t.await.unwrap();
        assert_eq!(locks.in_flight(), 1);
    }
}
