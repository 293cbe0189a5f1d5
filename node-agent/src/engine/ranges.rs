//! A range lock that serialises overlapping requests of the mirror engine.

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

#[cfg(test)]
mod tests {
    use super::*;

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
