//! Replica store: one replica of a volume is a preallocated sparse file in the node's pool
//! directory, or a raw block device, with a metadata area in front of the data.
//!
//! ## On-disk layout
//!
//! ```text
//! offset 0        metadata slot A (4 KiB)
//! offset 4096     metadata slot B (4 KiB)
//! offset 8192     activity log slot A (4 KiB)
//! offset 12288    activity log slot B (4 KiB)
//! offset 16384    out-of-sync bitmaps, one per replica of the volume (index = the replica's
//!                 index in the volume's sorted replica list), each in a slot of
//!                 `bitmap_stride` bytes of which the first `bitmap_bytes(size)` are used
//! data_offset     data: `size` bytes, block size 4 KiB; data_offset is the end of the
//!                 bitmap slots rounded up to 1 MiB
//! ```
//!
//! Metadata updates alternate between the two slots, each carrying a sequence number and a
//! CRC32C, and are made durable with `fdatasync`; on open the valid slot with the highest
//! sequence wins, so a torn metadata write never loses the previous state. The activity log
//! slots work the same way. Bitmap pages are plain bit arrays (see `engine::bitmap`); the
//! engine writes a page before the activity log stops covering the region it describes.
//!
//! ## Room to grow
//!
//! A volume grows online ([`Replica::grow`]) only while its data stays where it is, so the
//! bitmap slots of a new replica are sized for a volume of `max(4 × size, 64 GiB)` (plus
//! whatever the rounding of `data_offset` to 1 MiB leaves over), and the replica can grow
//! up to [`Layout::max_size`] without moving anything. On a pool file the unused part of
//! the slots is never written and takes no disk space (the file is sparse); it costs
//! 2 MiB of address space per replica of the volume for volumes up to 16 GiB (a 2-way
//! 16 GiB volume starts its data at 5 MiB, a 3-way one at 7 MiB), and 1/32768 of four
//! times the size above that (a 3-way 1 TiB volume: 384 MiB). On a raw device, where it
//! takes real space, the reservation is capped by the device: a replica never holds more
//! than its device, and when even that does not fit, the slots are as large as the volume
//! needs, widened to what the rounding to 1 MiB leaves over. Growing past `max_size` would
//! mean moving every bitmap and the data, and is refused with the limit named.
//!
//! Format 2 (replicas written before growth was possible) has no `bitmap_stride` field: its
//! slots are exactly `bitmap_bytes(size)` (growth up to the next 128 MiB boundary); it is
//! read as such and rewritten as format 4, with that stride, at the next metadata update.
//! Format 3 lacks the two multi-writer grant numbers of format 4 (read as zero).
//!
//! ## Local I/O
//!
//! Reads and writes are positional (`pread`/`pwrite`) on a shared descriptor, so any number
//! of requests run at once. Each request first tries the page cache without blocking
//! (`RWF_NOWAIT`), which completes on the calling task with no thread hand-off; a request
//! that would block (cache miss, writeback throttling) goes to tokio's blocking pool. FUA
//! writes use `RWF_DSYNC`; FLUSH is `fdatasync`. Trim punches a hole and write-zeroes zeroes
//! a range, both of which read back as zeros.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use rustix::fs::FallocateFlags;
use rustix::io::{Errno, ReadWriteFlags};

/// Block size of every replica.
pub const BLOCK_SIZE: u64 = 4096;
const SLOT_SIZE: usize = 4096;
const MAGIC: &[u8; 8] = b"PSANREPL";
const AL_MAGIC: &[u8; 8] = b"PSANALOG";
const FORMAT_VERSION: u32 = 4;
/// Format 3: format 4 without the multi-writer grant numbers (read as zero).
const FORMAT_VERSION_GRANTLESS: u32 = 3;
/// The previous format, still read: bitmap slots exactly as large as the volume's bitmaps.
const FORMAT_VERSION_FIXED: u32 = 2;
const MIB: u64 = 1 << 20;
/// A new replica's bitmap slots are sized for a volume of `max(GROWTH_FACTOR × size,
/// GROWTH_FLOOR)` bytes (see "Room to grow").
const GROWTH_FACTOR: u64 = 4;
const GROWTH_FLOOR: u64 = 64 << 30;
const AL_OFFSET: u64 = 2 * SLOT_SIZE as u64;
const BITMAPS_OFFSET: u64 = 4 * SLOT_SIZE as u64;
/// Most extents one activity log slot holds.
pub const AL_MAX_EXTENTS: usize = (SLOT_SIZE - 8 - 8 - 4 - 4) / 4;

/// Where the parts of a replica live on its file or device. Fixed for the life of the
/// replica: the volume may grow, the layout does not move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Number of out-of-sync bitmaps (one per replica of the volume).
    pub bitmaps: u32,
    /// Bytes reserved for each bitmap (whole pages): enough for a volume of
    /// [`Layout::max_size`] bytes.
    pub bitmap_stride: u64,
    pub data_offset: u64,
}

impl Layout {
    /// The layout with `stride` bytes per bitmap slot; None when it overflows.
    pub fn with_stride(bitmaps: u32, stride: u64) -> Option<Layout> {
        let end = u64::from(bitmaps).checked_mul(stride)?.checked_add(BITMAPS_OFFSET)?;
        Some(Layout { bitmaps, bitmap_stride: stride, data_offset: end.checked_next_multiple_of(MIB)? })
    }

    /// Slots with room for the bitmaps of a volume of `reserve` bytes, widened to use what
    /// the rounding of the data offset to 1 MiB leaves over (the data offset is the same).
    fn reserving(reserve: u64, bitmaps: u32) -> Option<Layout> {
        let tight = Self::with_stride(bitmaps, bitmap_bytes(reserve))?;
        let page = PAGE_BYTES as u64;
        let stride = (tight.data_offset - BITMAPS_OFFSET) / u64::from(bitmaps) / page * page;
        Self::with_stride(bitmaps, stride)
    }

    /// The layout of a new replica of a `size`-byte volume with `bitmaps` replicas (1 to
    /// 32), reserving room to grow (see "Room to grow" above). `device_bytes` is the size
    /// of the device that will hold it, if it is a device; the layout then fits it when
    /// anything can. None when the numbers overflow.
    pub fn for_new(size: u64, bitmaps: u32, device_bytes: Option<u64>) -> Option<Layout> {
        let wanted = size.saturating_mul(GROWTH_FACTOR).max(GROWTH_FLOOR);
        let fits =
            |l: &Layout| device_bytes.is_none_or(|d| l.data_offset.checked_add(size).is_some_and(|end| end <= d));
        let mut candidates = vec![wanted];
        candidates.extend(device_bytes.map(|d| d.clamp(size, wanted)));
        candidates.push(size);
        candidates
            .into_iter()
            .filter_map(|r| Self::reserving(r, bitmaps))
            .find(fits)
            .or_else(|| Self::with_stride(bitmaps, bitmap_bytes(size)))
    }

    /// The largest volume whose bitmaps fit the slots.
    pub fn max_size(&self) -> u64 {
        self.bitmap_stride.saturating_mul(8 * BLOCK_SIZE)
    }

    fn bitmap_offset(&self, k: u32) -> u64 {
        BITMAPS_OFFSET + u64::from(k) * self.bitmap_stride
    }
}

use crate::engine::bitmap::{PAGE_BYTES, bitmap_bytes};
const MAX_NAME: usize = 253;

/// Persistent state of a replica, stored in its metadata area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaMeta {
    pub volume: String,
    pub size: u64,
    pub block_size: u32,
    /// Raised whenever the replica's view of who holds current data changes.
    /// 0 means the replica was created empty and has never been written.
    pub generation: u64,
    /// The replica holds a complete image (false while it is being resynchronised or after
    /// it was created to replace a lost one).
    pub consistent: bool,
    /// Replicas that this replica knows missed writes (sorted, no duplicates).
    pub outdated_peers: Vec<String>,
    /// Number of replicas of the volume, and so of out-of-sync bitmaps.
    pub replicas: u32,
    /// Newest write-priority epoch this replica has seen, and the node holding it ("" = the
    /// volume's first replica, at epoch 0).
    pub epoch: u64,
    pub holder: String,
    /// The engine shut down cleanly: bitmaps on disk are complete and the activity log need
    /// not be replayed.
    pub clean: bool,
    /// The replica was created to replace a lost one and needs a full copy.
    pub needs_full: bool,
    /// Epoch under which a replica was last added to `outdated_peers`.
    pub flag_epoch: u64,
    /// Bytes reserved per out-of-sync bitmap (see [`Layout`]); fixed at creation.
    pub bitmap_stride: u64,
    /// Multi-writer volumes, at `epoch`: the newest region grant this replica adopted from a
    /// recovery (after a restart it refuses older grants for regions it knows nothing of;
    /// `engine/POLICING.md` §6.6).
    pub fence_grant: u64,
    /// Multi-writer volumes, at `epoch`, when this node arbitrates: every grant it has issued
    /// is at most this (a restarted arbiter continues above it).
    pub grant_limit: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a peersan replica (bad magic or no valid metadata slot)")]
    NotAReplica { path: PathBuf },
    #[error("{path}: replica metadata format {found} is not supported (this agent reads {FORMAT_VERSION})")]
    UnsupportedFormat { path: PathBuf, found: u32 },
    #[error("{path}: replica belongs to volume {found:?}, expected {expected:?}")]
    WrongVolume { path: PathBuf, found: String, expected: String },
    #[error("{path}: replica holds {found} bytes, the volume has {expected}")]
    WrongSize { path: PathBuf, found: u64, expected: u64 },
    #[error("{path}: device has {available} bytes, {needed} needed (metadata area + data)")]
    DeviceTooSmall { path: PathBuf, available: u64, needed: u64 },
    /// A replica cannot grow to `wanted` bytes; `max` is the largest size it can take.
    #[error("{path}: the replica can grow to at most {max} bytes ({why}); {wanted} bytes asked")]
    CannotGrow { path: PathBuf, wanted: u64, max: u64, why: &'static str },
    #[error("invalid replica: {0}")]
    Invalid(String),
}

impl ReplicaMeta {
    fn encode(&self, seq: u64) -> Result<Vec<u8>, ReplicaError> {
        self.encode_as(seq, FORMAT_VERSION)
    }

    /// Encodes a slot in format `version` (format 2 only in tests: it has no stride field,
    /// so it describes slots of exactly `bitmap_bytes(size)`).
    fn encode_as(&self, seq: u64, version: u32) -> Result<Vec<u8>, ReplicaError> {
        let mut b = Vec::with_capacity(SLOT_SIZE);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&seq.to_le_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&self.block_size.to_le_bytes());
        b.extend_from_slice(&self.layout()?.data_offset.to_le_bytes());
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.push(u8::from(self.consistent));
        put_str(&mut b, &self.volume)?;
        let n = u16::try_from(self.outdated_peers.len())
            .map_err(|_| ReplicaError::Invalid("too many outdated peers".into()))?;
        b.extend_from_slice(&n.to_le_bytes());
        for p in &self.outdated_peers {
            put_str(&mut b, p)?;
        }
        b.extend_from_slice(&self.replicas.to_le_bytes());
        b.extend_from_slice(&self.epoch.to_le_bytes());
        put_str(&mut b, &self.holder)?;
        b.push(u8::from(self.clean) | (u8::from(self.needs_full) << 1));
        b.extend_from_slice(&self.flag_epoch.to_le_bytes());
        if version >= FORMAT_VERSION_GRANTLESS {
            b.extend_from_slice(&self.bitmap_stride.to_le_bytes());
        }
        if version >= FORMAT_VERSION {
            b.extend_from_slice(&self.fence_grant.to_le_bytes());
            b.extend_from_slice(&self.grant_limit.to_le_bytes());
        }
        if b.len() + 4 > SLOT_SIZE {
            return Err(ReplicaError::Invalid("metadata does not fit in its slot".into()));
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.resize(SLOT_SIZE, 0);
        Ok(b)
    }

    /// The layout this metadata describes.
    fn layout(&self) -> Result<Layout, ReplicaError> {
        Layout::with_stride(self.replicas, self.bitmap_stride)
            .ok_or_else(|| ReplicaError::Invalid(format!("bitmap stride {} overflows", self.bitmap_stride)))
    }

    /// Decodes a slot; `None` when it is not a valid slot (blank, torn or corrupt).
    fn decode(slot: &[u8]) -> Option<Result<(u64, ReplicaMeta), u32>> {
        let mut r = Reader { b: slot, pos: 0 };
        if r.take(8)? != MAGIC {
            return None;
        }
        let version = r.u32()?;
        if !(FORMAT_VERSION_FIXED..=FORMAT_VERSION).contains(&version) {
            return Some(Err(version));
        }
        let seq = r.u64()?;
        let size = r.u64()?;
        let block_size = r.u32()?;
        let data_offset = r.u64()?;
        let generation = r.u64()?;
        let consistent = r.take(1)?[0] != 0;
        let volume = r.str()?;
        let n = r.u16()?;
        let mut outdated_peers = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            outdated_peers.push(r.str()?);
        }
        let replicas = r.u32()?;
        let epoch = r.u64()?;
        let holder = r.str()?;
        let flags = r.take(1)?[0];
        let flag_epoch = r.u64()?;
        let bitmap_stride = if version >= FORMAT_VERSION_GRANTLESS { r.u64()? } else { bitmap_bytes(size) };
        let (fence_grant, grant_limit) = if version >= FORMAT_VERSION { (r.u64()?, r.u64()?) } else { (0, 0) };
        let end = r.pos;
        let crc = r.u32()?;
        if crc32c::crc32c(&slot[..end]) != crc
            || replicas == 0
            || replicas > 32
            || !bitmap_stride.is_multiple_of(PAGE_BYTES as u64)
            || bitmap_stride < bitmap_bytes(size)
            || Layout::with_stride(replicas, bitmap_stride).is_none_or(|l| l.data_offset != data_offset)
        {
            return None;
        }
        Some(Ok((
            seq,
            ReplicaMeta {
                volume,
                size,
                block_size,
                generation,
                consistent,
                outdated_peers,
                replicas,
                epoch,
                holder,
                clean: flags & 1 != 0,
                needs_full: flags & 2 != 0,
                flag_epoch,
                bitmap_stride,
                fence_grant,
                grant_limit,
            },
        )))
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) -> Result<(), ReplicaError> {
    if s.len() > MAX_NAME {
        return Err(ReplicaError::Invalid(format!("name {s:?} is longer than {MAX_NAME} bytes")));
    }
    b.push(s.len() as u8);
    b.extend_from_slice(s.as_bytes());
    Ok(())
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn str(&mut self) -> Option<String> {
        let n = usize::from(self.take(1)?[0]);
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

/// One replica: its descriptor, size and metadata.
pub struct Replica {
    path: PathBuf,
    file: Arc<File>,
    /// The volume's size (it grows, see [`Replica::grow`]); the layout does not change.
    size: AtomicU64,
    is_device: bool,
    layout: Layout,
    meta: Mutex<(u64, ReplicaMeta)>,
    al_seq: std::sync::atomic::AtomicU64,
    /// Whether `RWF_NOWAIT` works for writes on this file (cleared at the first EOPNOTSUPP).
    nowait_writes: AtomicBool,
    /// A second descriptor with `O_DIRECT` for bulk copies (resync), opened on first use;
    /// None inside when the file does not support direct I/O.
    direct: std::sync::OnceLock<Option<File>>,
}

/// Reads of at least this size skip the non-blocking attempt (see [`Replica::read`]).
const LARGE_READ: usize = 256 << 10;

/// Largest buffered write done on the calling thread when the filesystem does not support
/// non-blocking buffered writes.
const INLINE_WRITE_MAX: usize = 64 << 10;

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").field("path", &self.path).field("size", &self.size()).finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ReplicaError + '_ {
    move |source| ReplicaError::Io { path: path.to_owned(), source }
}

impl Replica {
    /// Creates a replica at `path` (a new sparse file, or an existing block device whose
    /// metadata area is overwritten). `consistent` is false for a replica that replaces a
    /// lost one and must be resynchronised in full before it is read. `replicas` is the
    /// number of replicas of the volume (one out-of-sync bitmap each).
    ///
    /// With `in_place`, `path` is an existing block device or file that is used as it is
    /// (a device given in the configuration); otherwise a new sparse file is created.
    pub fn create(
        path: &Path,
        volume: &str,
        size: u64,
        replicas: u32,
        consistent: bool,
        in_place: bool,
    ) -> Result<Replica, ReplicaError> {
        if size == 0 || !size.is_multiple_of(BLOCK_SIZE) {
            return Err(ReplicaError::Invalid(format!("size {size} is not a positive multiple of {BLOCK_SIZE}")));
        }
        if replicas == 0 || replicas > 32 {
            return Err(ReplicaError::Invalid(format!("{replicas} replicas: 1 to 32 are supported")));
        }
        let is_device = std::fs::metadata(path).map(|m| m.file_type().is_block_device()).unwrap_or(false);
        let fixed = is_device || in_place;
        let existing = if fixed {
            let f = OpenOptions::new().read(true).write(true).open(path).map_err(io_err(path))?;
            let available = device_size(&f).map_err(io_err(path))?;
            Some((f, available))
        } else {
            None
        };
        let overflow = || ReplicaError::Invalid(format!("size {size} is too large"));
        let layout = Layout::for_new(size, replicas, existing.as_ref().map(|(_, n)| *n)).ok_or_else(overflow)?;
        let data_offset = layout.data_offset;
        let total = data_offset.checked_add(size).ok_or_else(overflow)?;
        let file = if let Some((f, available)) = existing {
            if available < total {
                return Err(ReplicaError::DeviceTooSmall { path: path.into(), available, needed: total });
            }
            // A device may hold an earlier user's bytes: blank the activity log and bitmaps.
            write_zeros(&f, AL_OFFSET, data_offset - AL_OFFSET).map_err(io_err(path))?;
            f
        } else {
            let tmp = path.with_extension("creating");
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(io_err(&tmp))?;
            if let Err(e) = f.set_len(total) {
                let _ = std::fs::remove_file(&tmp);
                return Err(io_err(&tmp)(e));
            }
            std::fs::rename(&tmp, path).map_err(io_err(path))?;
            f
        };
        let meta = ReplicaMeta {
            volume: volume.to_owned(),
            size,
            block_size: BLOCK_SIZE as u32,
            generation: 0,
            consistent,
            outdated_peers: Vec::new(),
            replicas,
            epoch: 0,
            holder: String::new(),
            clean: true,
            needs_full: !consistent,
            flag_epoch: 0,
            bitmap_stride: layout.bitmap_stride,
            fence_grant: 0,
            grant_limit: 0,
        };
        let r = Replica::from_parts(path, file, is_device, 0, meta.clone())?;
        // Write both slots so that a stale header from an earlier use of a device can't win.
        r.write_slot(0, &meta.encode(1)?)?;
        r.write_slot(1, &meta.encode(0)?)?;
        r.file.sync_all().map_err(io_err(path))?;
        *r.meta.lock().unwrap() = (1, meta);
        if let Some(dir) = path.parent().filter(|_| !fixed) {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))?;
        }
        Ok(r)
    }

    /// Opens an existing replica and checks that it belongs to `volume` of `size` bytes.
    pub fn open(path: &Path, volume: &str, size: u64) -> Result<Replica, ReplicaError> {
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(io_err(path))?;
        let is_device = file.metadata().map_err(io_err(path))?.file_type().is_block_device();
        let mut slots = vec![0u8; 2 * SLOT_SIZE];
        rustix::io::pread(&file, &mut slots, 0).map_err(|e| io_err(path)(e.into()))?;
        let mut best: Option<(u64, ReplicaMeta)> = None;
        for slot in slots.chunks(SLOT_SIZE) {
            match ReplicaMeta::decode(slot) {
                Some(Ok((seq, m))) if best.as_ref().is_none_or(|(s, _)| seq > *s) => best = Some((seq, m)),
                Some(Err(found)) => return Err(ReplicaError::UnsupportedFormat { path: path.into(), found }),
                _ => {}
            }
        }
        let (seq, meta) = best.ok_or_else(|| ReplicaError::NotAReplica { path: path.into() })?;
        if meta.volume != volume {
            return Err(ReplicaError::WrongVolume { path: path.into(), found: meta.volume, expected: volume.into() });
        }
        if meta.size != size {
            return Err(ReplicaError::WrongSize { path: path.into(), found: meta.size, expected: size });
        }
        let r = Replica::from_parts(path, file, is_device, seq, meta)?;
        let (al_seq, _) = r.read_al_slots();
        r.al_seq.store(al_seq, Ordering::Relaxed);
        Ok(r)
    }

    fn from_parts(
        path: &Path,
        file: File,
        is_device: bool,
        seq: u64,
        meta: ReplicaMeta,
    ) -> Result<Replica, ReplicaError> {
        Ok(Replica {
            path: path.to_owned(),
            file: Arc::new(file),
            size: AtomicU64::new(meta.size),
            is_device,
            layout: meta.layout()?,
            meta: Mutex::new((seq, meta)),
            al_seq: 0.into(),
            nowait_writes: AtomicBool::new(true),
            direct: std::sync::OnceLock::new(),
        })
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Bytes of each out-of-sync bitmap at the current size.
    pub fn bitmap_bytes(&self) -> u64 {
        bitmap_bytes(self.size())
    }

    /// Reads out-of-sync bitmap `k` (the bitmap of the replica with index `k`).
    pub fn read_bitmap(&self, k: u32) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; self.bitmap_bytes() as usize];
        if k < self.layout.bitmaps {
            read_exact_at(&self.file, &mut buf, self.layout.bitmap_offset(k))?;
        }
        Ok(buf)
    }

    /// Writes pages `(index, bytes)` of bitmap `k` and makes them durable. Pages past the
    /// bitmap's slot are refused (nothing is written).
    pub fn write_bitmap_pages(&self, k: u32, pages: &[(usize, Vec<u8>)]) -> io::Result<()> {
        if k >= self.layout.bitmaps || pages.is_empty() {
            return Ok(());
        }
        let slot_pages = self.layout.bitmap_stride / PAGE_BYTES as u64;
        if let Some((i, _)) = pages.iter().find(|(i, b)| *i as u64 >= slot_pages || b.len() != PAGE_BYTES) {
            return Err(io::Error::other(format!("bitmap page {i} is outside the bitmap's {slot_pages}-page slot")));
        }
        let base = self.layout.bitmap_offset(k);
        for (i, bytes) in pages {
            write_all_at(&self.file, bytes, base + (*i * PAGE_BYTES) as u64)?;
        }
        rustix::fs::fdatasync(&*self.file).map_err(io::Error::from)
    }

    /// The largest size this replica can grow to: what its bitmap slots describe, and on a
    /// device what the device holds.
    pub fn max_size(&self) -> Result<(u64, &'static str), ReplicaError> {
        let by_layout = self.layout.max_size();
        if self.is_device {
            let available = device_size(&self.file).map_err(io_err(&self.path))?;
            let by_device = available.saturating_sub(self.layout.data_offset) / BLOCK_SIZE * BLOCK_SIZE;
            if by_device < by_layout {
                return Ok((by_device, "the size of its device"));
            }
        }
        Ok((by_layout, "what its metadata area was sized for at creation"))
    }

    /// Grows the replica to `size` bytes, durably, without moving anything: a pool file is
    /// extended (the new range is a hole, zeros); on a device, where the range holds earlier
    /// bytes, it is zeroed. The bitmap pages that the growth brings into use are zeroed, then
    /// the size is recorded in the metadata; a crash in between leaves the old size (and a
    /// longer file, which is harmless). Idempotent; a smaller size is refused.
    ///
    /// Runs on the calling thread (it may write the whole new range on a device without
    /// write-zeroes support).
    pub fn grow(&self, size: u64) -> Result<(), ReplicaError> {
        let old = self.size();
        if size == old {
            return Ok(());
        }
        if size < old || !size.is_multiple_of(BLOCK_SIZE) {
            return Err(ReplicaError::Invalid(format!(
                "cannot grow from {old} to {size} bytes: the size must be a larger multiple of {BLOCK_SIZE}"
            )));
        }
        let (max, why) = self.max_size()?;
        if size > max {
            return Err(ReplicaError::CannotGrow { path: self.path.clone(), wanted: size, max, why });
        }
        let io = io_err(&self.path);
        let d = self.layout.data_offset;
        if self.is_device {
            zero_range(&self.file, d + old, size - old).map_err(io)?;
        } else {
            self.file.set_len(d + size).map_err(io)?;
        }
        let (from, to) = (bitmap_bytes(old), bitmap_bytes(size));
        for k in 0..self.layout.bitmaps {
            let at = self.layout.bitmap_offset(k);
            zero_range(&self.file, at + from, to - from).map_err(io_err(&self.path))?;
        }
        self.file.sync_all().map_err(io_err(&self.path))?;
        self.update_meta(|m| m.size = size)?;
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    /// The newest valid activity log slot: (sequence, extents).
    fn read_al_slots(&self) -> (u64, Vec<u32>) {
        let mut slots = vec![0u8; 2 * SLOT_SIZE];
        if read_exact_at(&self.file, &mut slots, AL_OFFSET).is_err() {
            return (0, vec![]);
        }
        let mut best: (u64, Vec<u32>) = (0, vec![]);
        for slot in slots.chunks(SLOT_SIZE) {
            let mut r = Reader { b: slot, pos: 0 };
            let parsed = (|| {
                if r.take(8)? != AL_MAGIC {
                    return None;
                }
                let seq = r.u64()?;
                let n = r.u32()? as usize;
                if n > AL_MAX_EXTENTS {
                    return None;
                }
                let mut ext = Vec::with_capacity(n);
                for _ in 0..n {
                    ext.push(r.u32()?);
                }
                let end = r.pos;
                (crc32c::crc32c(&slot[..end]) == r.u32()?).then_some((seq, ext))
            })();
            if let Some((seq, ext)) = parsed
                && seq > best.0
            {
                best = (seq, ext);
            }
        }
        best
    }

    /// The extents of the activity log as last written.
    pub fn read_al(&self) -> Vec<u32> {
        self.read_al_slots().1
    }

    /// Writes the activity log (the extents that may hold writes in flight) durably, in the
    /// slot not holding the newest copy.
    pub fn write_al(&self, extents: &[u32]) -> io::Result<()> {
        if extents.len() > AL_MAX_EXTENTS {
            return Err(io::Error::other(format!(
                "activity log of {} extents exceeds {AL_MAX_EXTENTS}",
                extents.len()
            )));
        }
        let seq = self.al_seq.fetch_add(1, Ordering::AcqRel) + 1;
        let mut b = Vec::with_capacity(SLOT_SIZE);
        b.extend_from_slice(AL_MAGIC);
        b.extend_from_slice(&seq.to_le_bytes());
        b.extend_from_slice(&(extents.len() as u32).to_le_bytes());
        for e in extents {
            b.extend_from_slice(&e.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.resize(SLOT_SIZE, 0);
        let pos = AL_OFFSET + (seq % 2) * SLOT_SIZE as u64;
        loop {
            match rustix::io::pwritev2(&*self.file, &[IoSlice::new(&b)], pos, ReadWriteFlags::DSYNC) {
                Ok(n) if n == b.len() => return Ok(()),
                Ok(_) => return write_all_at(&self.file, &b, pos).and_then(|()| self.file.sync_data()),
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub fn is_device(&self) -> bool {
        self.is_device
    }

    pub fn meta(&self) -> ReplicaMeta {
        self.meta.lock().unwrap().1.clone()
    }

    /// Applies `change` to the metadata and makes the result durable before returning.
    /// Returns false (and writes nothing) when `change` leaves the metadata as it was.
    /// Runs on the calling thread: metadata changes are rare (state transitions only).
    pub fn update_meta(&self, change: impl FnOnce(&mut ReplicaMeta)) -> Result<bool, ReplicaError> {
        let mut guard = self.meta.lock().unwrap();
        let mut next = guard.1.clone();
        change(&mut next);
        next.outdated_peers.sort();
        next.outdated_peers.dedup();
        if next == guard.1 {
            return Ok(false);
        }
        let seq = guard.0 + 1;
        self.write_slot((seq % 2) as usize, &next.encode(seq)?)?;
        rustix::fs::fdatasync(&*self.file).map_err(|e| io_err(&self.path)(e.into()))?;
        *guard = (seq, next);
        Ok(true)
    }

    fn write_slot(&self, index: usize, bytes: &[u8]) -> Result<(), ReplicaError> {
        write_all_at(&self.file, bytes, (index * SLOT_SIZE) as u64).map_err(io_err(&self.path))
    }

    /// Reads `len` bytes at volume offset `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let pos = self.layout.data_offset + offset;
        if len >= LARGE_READ {
            // Large reads (resync copies) go to the blocking pool into an uninitialised
            // buffer: zeroing megabytes first would cost as much as the read.
            let file = self.file.clone();
            return tokio::task::spawn_blocking(move || {
                let mut v: Vec<u8> = Vec::with_capacity(len);
                while v.len() < len {
                    let at = pos + v.len() as u64;
                    match rustix::io::pread(&*file, rustix::buffer::spare_capacity(&mut v), at) {
                        Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                        Ok(_) | Err(Errno::INTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(Bytes::from(v))
            })
            .await
            .map_err(io::Error::other)?;
        }
        let mut buf = BytesMut::zeroed(len);
        match rustix::io::preadv2(&*self.file, &mut [IoSliceMut::new(&mut buf)], pos, ReadWriteFlags::NOWAIT) {
            Ok(n) if n == len => return Ok(buf.freeze()),
            Ok(_) | Err(Errno::AGAIN) | Err(Errno::OPNOTSUPP) => {}
            Err(e) => return Err(e.into()),
        }
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            read_exact_at(&file, &mut buf, pos)?;
            Ok(buf.freeze())
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Writes `data` at volume offset `offset`; with `fua` the data is durable on return.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        let pos = self.layout.data_offset + offset;
        if !fua {
            let inline = if self.nowait_writes.load(Ordering::Relaxed) {
                rustix::io::pwritev2(&*self.file, &[IoSlice::new(&data)], pos, ReadWriteFlags::NOWAIT)
            } else if data.len() <= INLINE_WRITE_MAX {
                // The filesystem cannot tell whether a buffered write would block: a small
                // one into the page cache costs less than the hand-off to another thread.
                rustix::io::pwrite(&*self.file, &data, pos)
            } else {
                Err(Errno::AGAIN)
            };
            match inline {
                Ok(n) if n == data.len() => return Ok(()),
                Err(Errno::OPNOTSUPP) => self.nowait_writes.store(false, Ordering::Relaxed),
                Ok(_) | Err(Errno::AGAIN) | Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            let flags = if fua { ReadWriteFlags::DSYNC } else { ReadWriteFlags::empty() };
            let mut done = 0;
            while done < data.len() {
                match rustix::io::pwritev2(&*file, &[IoSlice::new(&data[done..])], pos + done as u64, flags) {
                    Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                    Ok(n) => done += n,
                    Err(Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Makes all completed writes durable.
    pub async fn flush(&self) -> io::Result<()> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || rustix::fs::fdatasync(&*file).map_err(io::Error::from))
            .await
            .map_err(io::Error::other)?
    }

    /// Writes a bulk copy at volume offset `offset` (blocking; for resync). Whole aligned
    /// blocks go through an `O_DIRECT` descriptor, which spares the page-cache copy that
    /// limits buffered writes; the page cache stays coherent (the kernel writes back and
    /// drops cached pages of the range first). Falls back to a buffered write where direct
    /// I/O is not supported.
    pub fn write_bulk(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        const ALIGN: usize = 4096;
        let pos = self.layout.data_offset + offset;
        let direct = self.direct.get_or_init(|| {
            OpenOptions::new().write(true).custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32).open(&self.path).ok()
        });
        let aligned = pos.is_multiple_of(ALIGN as u64) && data.len().is_multiple_of(ALIGN) && !data.is_empty();
        if let (Some(f), true) = (direct, aligned) {
            // A buffer whose start is aligned, as direct I/O requires (only the bytes before
            // the aligned start are zeroed).
            let mut buf: Vec<u8> = Vec::with_capacity(data.len() + ALIGN);
            let skip = (ALIGN - buf.as_ptr() as usize % ALIGN) % ALIGN;
            buf.resize(skip, 0);
            buf.extend_from_slice(data);
            match write_all_at(f, &buf[skip..skip + data.len()], pos) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(Errno::INVAL.raw_os_error()) => {}
                Err(e) => return Err(e),
            }
        }
        write_all_at(&self.file, data, pos)
    }

    /// Makes all completed writes durable, on the calling thread.
    pub fn flush_sync(&self) -> io::Result<()> {
        rustix::fs::fdatasync(&*self.file).map_err(io::Error::from)
    }

    /// Zeroes `[offset, offset + len)`; with `punch` the space is also released (trim).
    pub async fn zero(&self, offset: u64, len: u64, punch: bool, fua: bool) -> io::Result<()> {
        let file = self.file.clone();
        let pos = self.layout.data_offset + offset;
        tokio::task::spawn_blocking(move || {
            if punch {
                match rustix::fs::fallocate(&*file, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, pos, len) {
                    Ok(()) => {}
                    Err(Errno::OPNOTSUPP) | Err(Errno::INVAL) => write_zeros(&file, pos, len)?,
                    Err(e) => return Err(e.into()),
                }
            } else {
                zero_range(&file, pos, len)?;
            }
            if fua {
                rustix::fs::fdatasync(&*file)?;
            }
            Ok(())
        })
        .await
        .map_err(io::Error::other)?
    }
}

/// Zeroes `[pos, pos + len)` with `fallocate(ZERO_RANGE)` where supported, else by
/// writing zeros.
fn zero_range(file: &File, pos: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    match rustix::fs::fallocate(file, FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE, pos, len) {
        Ok(()) => Ok(()),
        Err(Errno::OPNOTSUPP) | Err(Errno::INVAL) => write_zeros(file, pos, len),
        Err(e) => Err(e.into()),
    }
}

fn write_zeros(file: &File, pos: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        write_all_at(file, &zeros[..n], pos + done)?;
        done += n as u64;
    }
    Ok(())
}

fn write_all_at(file: &File, mut buf: &[u8], mut pos: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match rustix::io::pwrite(file, buf, pos) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf = &buf[n..];
                pos += n as u64;
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn read_exact_at(file: &File, mut buf: &mut [u8], mut pos: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match rustix::io::pread(file, &mut *buf, pos) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                pos += n as u64;
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads the data area of a replica file (without its metadata area), e.g. to compare
/// replicas byte for byte.
pub fn read_data(path: &Path) -> Result<Vec<u8>, ReplicaError> {
    let (size, layout) = {
        let mut slots = vec![0u8; 2 * SLOT_SIZE];
        let f = File::open(path).map_err(io_err(path))?;
        read_exact_at(&f, &mut slots, 0).map_err(io_err(path))?;
        slots
            .chunks(SLOT_SIZE)
            .filter_map(|s| ReplicaMeta::decode(s).and_then(Result::ok))
            .max_by_key(|(seq, _)| *seq)
            .map(|(_, m)| m.layout().map(|l| (m.size, l)))
            .ok_or_else(|| ReplicaError::NotAReplica { path: path.into() })??
    };
    let off = layout.data_offset as usize;
    let mut d = std::fs::read(path).map_err(io_err(path))?;
    d.drain(..off.min(d.len()));
    d.truncate(size as usize);
    Ok(d)
}

fn device_size(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    let end = f.seek(SeekFrom::End(0))?;
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn create_write_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.replica");
        let r = Replica::create(&path, "v", 1 << 20, 2, true, false).unwrap();
        r.write(4096, Bytes::from(vec![7u8; 8192]), false).await.unwrap();
        r.update_meta(|m| {
            m.generation = 3;
            m.outdated_peers.push("b".into());
        })
        .unwrap();
        r.zero(4096, 4096, true, true).await.unwrap();
        drop(r);
        let r = Replica::open(&path, "v", 1 << 20).unwrap();
        assert_eq!(r.meta().generation, 3);
        assert_eq!(r.meta().outdated_peers, vec!["b".to_string()]);
        let d = r.read(4096, 8192).await.unwrap();
        assert!(d[..4096].iter().all(|&b| b == 0));
        assert!(d[4096..].iter().all(|&b| b == 7));
        assert!(matches!(Replica::open(&path, "w", 1 << 20), Err(ReplicaError::WrongVolume { .. })));
        assert!(matches!(Replica::open(&path, "v", 2 << 20), Err(ReplicaError::WrongSize { .. })));
    }

    #[test]
    fn torn_slot_falls_back_to_previous() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.replica");
        let r = Replica::create(&path, "v", 1 << 20, 2, true, false).unwrap();
        r.update_meta(|m| m.generation = 5).unwrap(); // seq 2 -> slot 0
        r.update_meta(|m| m.generation = 6).unwrap(); // seq 3 -> slot 1
        drop(r);
        // Corrupt slot 1 (the newest): the previous state must be found in slot 0.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        write_all_at(&f, &[0xff; 16], SLOT_SIZE as u64 + 24).unwrap();
        let r = Replica::open(&path, "v", 1 << 20).unwrap();
        assert_eq!(r.meta().generation, 5);
    }

    #[test]
    fn activity_log_and_bitmaps_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.replica");
        let size = 300 << 20;
        let r = Replica::create(&path, "v", size, 3, false, false).unwrap();
        assert!(r.meta().needs_full);
        assert!(r.read_al().is_empty());
        r.write_al(&[1, 5, 9]).unwrap();
        r.write_al(&[5, 9, 12]).unwrap();
        let mut page = vec![0u8; crate::engine::bitmap::PAGE_BYTES];
        page[0] = 0b101;
        r.write_bitmap_pages(2, &[(1, page.clone())]).unwrap();
        r.update_meta(|m| {
            m.epoch = 4;
            m.holder = "node-b".into();
            m.clean = false;
        })
        .unwrap();
        drop(r);
        // A torn newest activity-log slot falls back to the previous one.
        let r = Replica::open(&path, "v", size).unwrap();
        assert_eq!(r.read_al(), vec![5, 9, 12]);
        let m = r.meta();
        assert_eq!((m.epoch, m.holder.as_str(), m.clean, m.replicas), (4, "node-b", false, 3));
        let bm = r.read_bitmap(2).unwrap();
        assert_eq!(bm.len() as u64, r.bitmap_bytes());
        assert_eq!(bm[crate::engine::bitmap::PAGE_BYTES], 0b101);
        assert!(r.read_bitmap(1).unwrap().iter().all(|b| *b == 0));
        let seq = r.al_seq.load(Ordering::Relaxed);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        write_all_at(&f, &[0xff; 8], AL_OFFSET + (seq % 2) * SLOT_SIZE as u64 + 20).unwrap();
        drop(r);
        let r = Replica::open(&path, "v", size).unwrap();
        assert_eq!(r.read_al(), vec![1, 5, 9]);
        // Data sits after the bitmap slots (3 × 2 MiB, room for 64 GiB), and read_data finds it.
        assert_eq!(r.layout().data_offset, 7 << 20);
        drop(r);
        assert_eq!(read_data(&path).unwrap().len() as u64, size);
    }

    #[test]
    fn new_layouts_reserve_room_to_grow() {
        const GIB: u64 = 1 << 30;
        // Small volumes: slots for 64 GiB (2 MiB each), widened to what the 1 MiB rounding
        // leaves over.
        let l = Layout::for_new(16 << 20, 2, None).unwrap();
        assert_eq!(l.data_offset, 5 << 20);
        assert_eq!(l.bitmap_stride, ((5 << 20) - BITMAPS_OFFSET) / 2 / 4096 * 4096);
        assert!(l.max_size() >= 64 * GIB && l.max_size() < 80 * GIB, "{l:?}");
        let l = Layout::for_new(64 * GIB, 3, None).unwrap();
        assert_eq!(l.data_offset, 25 << 20, "four times 64 GiB: 8 MiB per bitmap");
        assert!(l.max_size() >= 256 * GIB);
        // Large volumes: four times the size.
        let l = Layout::for_new(GIB << 10, 3, None).unwrap();
        assert!(l.max_size() >= 4 * (GIB << 10));
        assert_eq!(l.data_offset, 385 << 20);
        // Every layout describes its own volume.
        for size in [4096, 1 << 20, 10 * GIB, 100 * GIB, 3 << 40] {
            for n in [1, 2, 3, 32] {
                let l = Layout::for_new(size, n, None).unwrap();
                assert!(l.max_size() >= size.saturating_mul(4).max(64 * GIB), "{size} {n}: {l:?}");
                assert!(l.data_offset.is_multiple_of(MIB) && l.bitmap_stride.is_multiple_of(4096));
                assert!(l.bitmap_offset(n) <= l.data_offset);
            }
        }
        // On a device the reservation shrinks to fit: the device's size, then the volume's.
        let l = Layout::for_new(24 << 20, 2, Some(28 << 20)).unwrap();
        assert_eq!(l.data_offset, 1 << 20);
        assert!(l.max_size() >= 28 << 20);
        let l = Layout::for_new(10 * GIB, 2, Some(10 * GIB + (1 << 20))).unwrap();
        assert_eq!(l.data_offset + 10 * GIB, 10 * GIB + (1 << 20));
        let l = Layout::for_new(GIB, 2, Some(300 * GIB)).unwrap();
        assert!(l.max_size() >= 64 * GIB, "a large device leaves the full reservation");
        // Absurd sizes overflow cleanly instead of panicking.
        assert!(
            Layout::for_new(u64::MAX - 4095, 32, None)
                .is_none_or(|l| l.data_offset.checked_add(u64::MAX - 4095).is_none())
        );
    }

    #[tokio::test]
    async fn grow_in_place_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.replica");
        let r = Replica::create(&path, "v", 8 << 20, 2, true, false).unwrap();
        r.write((8 << 20) - 4096, Bytes::from(vec![9u8; 4096]), false).await.unwrap();
        let mut page = vec![0u8; PAGE_BYTES];
        page[0] = 0xff;
        r.write_bitmap_pages(1, &[(0, page)]).unwrap();
        let layout = r.layout();
        // Within the reservation: the data and the bitmaps stay where they are.
        r.grow(300 << 20).unwrap();
        r.grow(300 << 20).unwrap(); // idempotent
        assert_eq!(r.size(), 300 << 20);
        assert_eq!(r.layout(), layout);
        assert_eq!(r.bitmap_bytes(), 3 * PAGE_BYTES as u64);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), layout.data_offset + (300 << 20));
        assert!(matches!(r.grow(200 << 20), Err(ReplicaError::Invalid(_))));
        assert!(matches!(r.grow((300 << 20) + 1), Err(ReplicaError::Invalid(_))));
        let too_big = layout.max_size() + 4096;
        match r.grow(too_big) {
            Err(ReplicaError::CannotGrow { max, wanted, .. }) => {
                assert_eq!((max, wanted), (layout.max_size(), too_big))
            }
            other => panic!("{other:?}"),
        }
        drop(r);
        assert!(
            matches!(Replica::open(&path, "v", 8 << 20), Err(ReplicaError::WrongSize { found, .. }) if found == 300 << 20)
        );
        let r = Replica::open(&path, "v", 300 << 20).unwrap();
        assert_eq!(r.read((8 << 20) - 4096, 4096).await.unwrap(), vec![9u8; 4096]);
        assert!(r.read(299 << 20, 1 << 20).await.unwrap().iter().all(|b| *b == 0));
        let bm = r.read_bitmap(1).unwrap();
        assert_eq!((bm.len(), bm[0], bm[PAGE_BYTES..].iter().all(|b| *b == 0)), (3 * PAGE_BYTES, 0xff, true));
        drop(r);
        assert_eq!(read_data(&path).unwrap().len(), 300 << 20);
    }

    #[test]
    fn a_fixed_size_backing_limits_growth() {
        // A file used in place (as a device is): 24 MiB of data on 28 MiB.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::File::create(&path).unwrap().set_len(28 << 20).unwrap();
        let r = Replica::create(&path, "v", 24 << 20, 2, true, true).unwrap();
        assert_eq!(r.layout().data_offset, 1 << 20);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 28 << 20, "a device is never resized");
        drop(r);
        // A device that is too small for even the exact layout is refused.
        let small = dir.path().join("small");
        std::fs::File::create(&small).unwrap().set_len(24 << 20).unwrap();
        assert!(matches!(
            Replica::create(&small, "v", 24 << 20, 2, true, true),
            Err(ReplicaError::DeviceTooSmall { .. })
        ));
    }

    /// Grows a replica on a loop device: only as far as the device holds. Needs root.
    #[test]
    fn grow_on_a_device_stops_at_its_end() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIPPED: needs root to attach a loop device");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("disk.img");
        std::fs::File::create(&backing).unwrap().set_len(40 << 20).unwrap();
        let Ok(out) = std::process::Command::new("losetup").args(["-f", "--show"]).arg(&backing).output() else {
            eprintln!("SKIPPED: losetup is not installed");
            return;
        };
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || dev.is_empty() {
            eprintln!("SKIPPED: cannot attach a loop device: {}", String::from_utf8_lossy(&out.stderr));
            return;
        }
        let res = std::panic::catch_unwind(|| {
            let path = Path::new(&dev);
            // Stale bytes where the volume will grow must read back as zeros afterwards.
            let f = OpenOptions::new().write(true).open(path).unwrap();
            write_all_at(&f, &vec![0x5a; 4 << 20], 30 << 20).unwrap();
            f.sync_all().unwrap();
            let r = Replica::create(path, "v", 24 << 20, 2, true, false).unwrap();
            assert!(r.is_device());
            let d = r.layout().data_offset;
            let (max, why) = r.max_size().unwrap();
            assert_eq!(max, (40 << 20) - d, "{why}");
            assert!(matches!(r.grow(max + 4096), Err(ReplicaError::CannotGrow { .. })));
            r.grow(max).unwrap();
            let mut buf = vec![1u8; 4 << 20];
            read_exact_at(&r.file, &mut buf, 30 << 20).unwrap();
            assert!(buf.iter().all(|b| *b == 0), "the grown range was not zeroed");
            drop(r);
            Replica::open(path, "v", max).unwrap();
        });
        let _ = std::process::Command::new("losetup").args(["-d", &dev]).status();
        if let Err(e) = res {
            std::panic::resume_unwind(e);
        }
    }

    #[test]
    fn format_2_replicas_are_read_and_grow_within_their_bitmaps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.replica");
        let size = 16 << 20;
        let meta = ReplicaMeta {
            volume: "v".into(),
            size,
            block_size: 4096,
            generation: 4,
            consistent: true,
            outdated_peers: vec![],
            replicas: 2,
            epoch: 1,
            holder: "a".into(),
            clean: true,
            needs_full: false,
            flag_epoch: 0,
            bitmap_stride: bitmap_bytes(size),
            fence_grant: 0,
            grant_limit: 0,
        };
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        f.set_len((1 << 20) + size).unwrap();
        write_all_at(&f, &meta.encode_as(1, FORMAT_VERSION_FIXED).unwrap(), 0).unwrap();
        drop(f);
        let r = Replica::open(&path, "v", size).unwrap();
        assert_eq!(r.meta(), meta);
        assert_eq!(r.layout(), Layout { bitmaps: 2, bitmap_stride: 4096, data_offset: 1 << 20 });
        // One bitmap page covers 128 MiB: that far it can grow, no further.
        assert!(matches!(r.grow(129 << 20), Err(ReplicaError::CannotGrow { max, .. }) if max == 128 << 20));
        r.grow(128 << 20).unwrap();
        drop(r);
        // It is now written in the current format, with the same layout.
        let r = Replica::open(&path, "v", 128 << 20).unwrap();
        assert_eq!(r.layout().data_offset, 1 << 20);
        assert_eq!(r.meta().bitmap_stride, 4096);
    }

    #[test]
    fn garbage_is_not_a_replica() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk");
        std::fs::write(&path, vec![0x5a; 3 * SLOT_SIZE]).unwrap();
        assert!(matches!(Replica::open(&path, "v", 4096), Err(ReplicaError::NotAReplica { .. })));
    }
}
