//! Out-of-sync bitmaps: one bit per 4 KiB block of a volume, kept in memory and written to
//! the replica's metadata area page by page.
//!
//! Byte `j` bit `i` is block `8 * j + i` (the bytes of little-endian 64-bit words), which is
//! also the layout on disk and on the wire (`GetBitmap`).
//!
//! Granularity: one bit per 4 KiB block costs 32 MiB of bitmap per TiB of volume and per
//! peer, and makes a resync copy exactly the blocks that were written (random 4 KiB writes
//! over 1 % of a volume resynchronise 1 % of it). Coarser bits would shrink the bitmap but
//! multiply the data copied after small random writes by the ratio.

use crate::replica::BLOCK_SIZE;

/// Bytes of bitmap in one on-disk page.
pub const PAGE_BYTES: usize = 4096;
const WORDS_PER_PAGE: usize = PAGE_BYTES / 8;
/// Blocks covered by one page of bitmap (128 MiB of data).
pub const BLOCKS_PER_PAGE: u64 = (PAGE_BYTES * 8) as u64;

/// A bitmap of the blocks of a volume, with the pages changed since they were last written.
#[derive(Debug, Clone)]
pub struct Bitmap {
    words: Vec<u64>,
    blocks: u64,
    set: u64,
    dirty: Vec<bool>,
}

/// Bytes of bitmap (whole pages) for a volume of `size` bytes.
pub fn bitmap_bytes(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE).div_ceil(BLOCKS_PER_PAGE) * PAGE_BYTES as u64
}

impl Bitmap {
    /// An empty bitmap for a volume of `size` bytes.
    pub fn new(size: u64) -> Bitmap {
        let blocks = size.div_ceil(BLOCK_SIZE);
        let pages = blocks.div_ceil(BLOCKS_PER_PAGE) as usize;
        Bitmap { words: vec![0; pages * WORDS_PER_PAGE], blocks, set: 0, dirty: vec![false; pages] }
    }

    /// A bitmap read back from disk (`bytes` = [`bitmap_bytes`] bytes). Bits beyond the
    /// volume's end are ignored.
    pub fn from_bytes(size: u64, bytes: &[u8]) -> Bitmap {
        let mut b = Bitmap::new(size);
        b.or_bytes(0, bytes);
        b.dirty.iter_mut().for_each(|d| *d = false);
        b
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Extends the bitmap to a volume of `size` bytes (a volume that grew). The new blocks
    /// are clear and their pages are not dirty: on disk they are zero already (see
    /// `Replica::grow`). A `size` not larger than the current one changes nothing.
    pub fn grow(&mut self, size: u64) {
        let blocks = size.div_ceil(BLOCK_SIZE);
        if blocks <= self.blocks {
            return;
        }
        let pages = blocks.div_ceil(BLOCKS_PER_PAGE) as usize;
        // Bits past the old last block are clear (every update is clamped to `blocks`), so
        // the blocks that join in the last word start clear too.
        self.words.resize(pages * WORDS_PER_PAGE, 0);
        self.dirty.resize(pages, false);
        self.blocks = blocks;
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.set
    }

    pub fn is_empty(&self) -> bool {
        self.set == 0
    }

    pub fn contains(&self, block: u64) -> bool {
        block < self.blocks && self.words[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    fn update(&mut self, start: u64, end: u64, set: bool) {
        let end = end.min(self.blocks);
        let mut b = start;
        while b < end {
            let w = (b / 64) as usize;
            let lo = b % 64;
            let hi = (end - (b - lo)).min(64);
            let mask = if hi - lo == 64 { u64::MAX } else { ((1u64 << (hi - lo)) - 1) << lo };
            let old = self.words[w];
            let new = if set { old | mask } else { old & !mask };
            if new != old {
                self.set = self.set + u64::from(new.count_ones()) - u64::from(old.count_ones());
                self.words[w] = new;
                self.dirty[w / WORDS_PER_PAGE] = true;
            }
            b = b - lo + hi;
        }
    }

    /// Sets the blocks `[start, end)`.
    pub fn set_blocks(&mut self, start: u64, end: u64) {
        self.update(start, end, true);
    }

    /// Clears the blocks `[start, end)`.
    pub fn clear_blocks(&mut self, start: u64, end: u64) {
        self.update(start, end, false);
    }

    /// Sets every block that the byte range `[offset, offset + len)` touches.
    pub fn set_bytes(&mut self, offset: u64, len: u64) {
        if len > 0 {
            self.set_blocks(offset / BLOCK_SIZE, (offset + len).div_ceil(BLOCK_SIZE));
        }
    }

    /// Clears every block that the byte range `[offset, offset + len)` covers entirely.
    pub fn clear_covered(&mut self, offset: u64, len: u64) {
        let start = offset.div_ceil(BLOCK_SIZE);
        let end = (offset + len) / BLOCK_SIZE;
        if start < end {
            self.clear_blocks(start, end);
        }
    }

    pub fn set_all(&mut self) {
        self.set_blocks(0, self.blocks);
    }

    pub fn clear_all(&mut self) {
        self.clear_blocks(0, self.blocks);
    }

    /// ORs `other` into this bitmap.
    pub fn or(&mut self, other: &Bitmap) {
        for (i, (w, o)) in self.words.iter_mut().zip(&other.words).enumerate() {
            let new = *w | *o;
            if new != *w {
                self.set += u64::from(new.count_ones() - w.count_ones());
                *w = new;
                self.dirty[i / WORDS_PER_PAGE] = true;
            }
        }
    }

    /// ORs raw bitmap bytes starting at byte `offset` of the bitmap. Bits beyond the
    /// volume's last block are ignored.
    pub fn or_bytes(&mut self, offset: usize, bytes: &[u8]) {
        for (k, &byte) in bytes.iter().enumerate() {
            if byte == 0 {
                continue;
            }
            let j = offset + k;
            let base = (j / 8) as u64 * 64;
            if base >= self.blocks {
                break;
            }
            let valid = self.blocks - base;
            let limit = if valid >= 64 { u64::MAX } else { (1u64 << valid) - 1 };
            let w = &mut self.words[j / 8];
            let old = *w;
            let new = old | ((u64::from(byte) << ((j % 8) * 8)) & limit);
            if new != old {
                self.set += u64::from(new.count_ones() - old.count_ones());
                *w = new;
                self.dirty[j / 8 / WORDS_PER_PAGE] = true;
            }
        }
    }

    /// Bitmap bytes `[offset, offset + len)` (zeros beyond the end).
    pub fn bytes(&self, offset: usize, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        for (k, o) in out.iter_mut().enumerate() {
            let j = offset + k;
            if let Some(w) = self.words.get(j / 8) {
                *o = (w >> ((j % 8) * 8)) as u8;
            }
        }
        out
    }

    /// Total bytes of the bitmap (whole pages).
    pub fn len_bytes(&self) -> usize {
        self.words.len() * 8
    }

    /// The first run of set blocks at or after `from`, at most `max` blocks long:
    /// `(start, count)`.
    pub fn next_run(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let mut b = from;
        // Find the first set bit, skipping whole zero words.
        loop {
            if b >= self.blocks {
                return None;
            }
            let w = self.words[(b / 64) as usize] >> (b % 64);
            if w == 0 {
                b = (b / 64 + 1) * 64;
                continue;
            }
            b += u64::from(w.trailing_zeros());
            break;
        }
        if b >= self.blocks {
            return None;
        }
        let start = b;
        while b < self.blocks && b - start < max {
            let w = !self.words[(b / 64) as usize] >> (b % 64);
            let run = if w == 0 { 64 - b % 64 } else { u64::from(w.trailing_zeros()) };
            if run == 0 {
                break;
            }
            b += run;
        }
        let end = b.min(self.blocks).min(start + max);
        Some((start, end - start))
    }

    /// Takes the indices of pages changed since the last call.
    pub fn take_dirty_pages(&mut self) -> Vec<usize> {
        let mut out = Vec::new();
        for (i, d) in self.dirty.iter_mut().enumerate() {
            if std::mem::take(d) {
                out.push(i);
            }
        }
        out
    }

    /// Marks a page as still needing to be written (after a failed write).
    pub fn mark_dirty(&mut self, page: usize) {
        if let Some(d) = self.dirty.get_mut(page) {
            *d = true;
        }
    }

    pub fn has_dirty_pages(&self) -> bool {
        self.dirty.iter().any(|d| *d)
    }

    /// The on-disk bytes of page `page`.
    pub fn page(&self, page: usize) -> Vec<u8> {
        self.bytes(page * PAGE_BYTES, PAGE_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn set_clear_count_runs() {
        let mut b = Bitmap::new(1 << 30); // 262144 blocks, 8 pages
        assert_eq!(b.len_bytes(), 8 * PAGE_BYTES);
        b.set_bytes(4096 * 10, 4096 * 3 + 1); // blocks 10..14
        assert_eq!(b.count(), 4);
        assert_eq!(b.next_run(0, 100), Some((10, 4)));
        assert_eq!(b.next_run(12, 100), Some((12, 2)));
        assert_eq!(b.next_run(10, 2), Some((10, 2)));
        b.set_blocks(60, 200);
        assert_eq!(b.next_run(14, 1000), Some((60, 140)));
        b.clear_covered(4096 * 61, 4096 * 2 - 1); // covers block 61 only
        assert!(b.contains(60) && !b.contains(61) && b.contains(62));
        assert_eq!(b.count(), 4 + 139);
        assert_eq!(b.take_dirty_pages(), vec![0]);
        assert!(b.take_dirty_pages().is_empty());
        b.set_blocks(BLOCKS_PER_PAGE * 3, BLOCKS_PER_PAGE * 3 + 1);
        assert_eq!(b.take_dirty_pages(), vec![3]);
        b.clear_all();
        assert!(b.is_empty());
        assert_eq!(b.next_run(0, 10), None);
    }

    #[test]
    fn bytes_round_trip_and_tail_is_ignored() {
        // 10 blocks: bits beyond block 10 in the bytes must not count.
        let mut b = Bitmap::new(10 * 4096);
        b.set_blocks(3, 10);
        let bytes = b.bytes(0, 2);
        assert_eq!(bytes, vec![0b1111_1000, 0b0000_0011]);
        let c = Bitmap::from_bytes(10 * 4096, &[0xff; PAGE_BYTES]);
        assert_eq!(c.count(), 10);
        assert!(!c.has_dirty_pages());
    }

    #[test]
    fn grow_keeps_bits_and_adds_clear_blocks() {
        // 10 blocks, then 300 (same page), then 3 pages' worth.
        let mut b = Bitmap::new(10 * 4096);
        b.set_blocks(0, 10);
        b.take_dirty_pages();
        b.grow(300 * 4096);
        assert_eq!((b.blocks(), b.count(), b.len_bytes()), (300, 10, PAGE_BYTES));
        assert!(!b.contains(10) && !b.has_dirty_pages());
        assert_eq!(b.next_run(0, 1000), Some((0, 10)));
        // The new blocks can be set, up to the new end and no further.
        b.set_blocks(290, 400);
        assert_eq!(b.count(), 20);
        b.grow(BLOCKS_PER_PAGE * 4096 * 2 + 4096);
        assert_eq!(b.len_bytes(), 3 * PAGE_BYTES);
        assert_eq!(b.count(), 20);
        b.set_all();
        assert_eq!(b.count(), BLOCKS_PER_PAGE * 2 + 1);
        assert_eq!(b.take_dirty_pages(), vec![0, 1, 2]);
        // Shrinking is not a thing: a smaller size changes nothing.
        b.grow(4096);
        assert_eq!(b.blocks(), BLOCKS_PER_PAGE * 2 + 1);
        // A grown bitmap round-trips through its bytes like a new one of that size.
        let c = Bitmap::from_bytes(BLOCKS_PER_PAGE * 4096 * 2 + 4096, &b.bytes(0, b.len_bytes()));
        assert_eq!(c.count(), b.count());
    }

    proptest! {
        #[test]
        fn matches_a_model(ops in proptest::collection::vec((any::<bool>(), 0u64..300, 0u64..80), 1..40)) {
            let blocks = 300u64;
            let mut b = Bitmap::new(blocks * 4096);
            let mut model = vec![false; blocks as usize];
            for (set, start, n) in ops {
                let end = (start + n).min(blocks);
                if set { b.set_blocks(start, end) } else { b.clear_blocks(start, end) }
                for m in &mut model[start as usize..end as usize] { *m = set; }
            }
            prop_assert_eq!(b.count(), model.iter().filter(|m| **m).count() as u64);
            // Runs reproduce the model.
            let mut seen = vec![false; blocks as usize];
            let mut at = 0;
            while let Some((s, n)) = b.next_run(at, 7) {
                prop_assert!((1..=7).contains(&n));
                for k in s..s + n { seen[k as usize] = true; }
                at = s + n;
            }
            prop_assert_eq!(&seen, &model);
            let round = Bitmap::from_bytes(blocks * 4096, &b.bytes(0, b.len_bytes()));
            prop_assert_eq!(round.count(), b.count());
        }
    }
}
