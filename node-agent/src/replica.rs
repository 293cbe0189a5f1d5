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
//!                 index in the volume's sorted replica list), each `bitmap_bytes(size)`
//! data_offset     data: `size` bytes, block size 4 KiB; data_offset is the end of the
//!                 bitmaps rounded up to 1 MiB (1 MiB for volumes up to 10 GiB with 2-3
//!                 replicas)
//! ```
//!
//! Metadata updates alternate between the two slots, each carrying a sequence number and a
//! CRC32C, and are made durable with `fdatasync`; on open the valid slot with the highest
//! sequence wins, so a torn metadata write never loses the previous state. The activity log
//! slots work the same way. Bitmap pages are plain bit arrays (see `engine::bitmap`); the
//! engine writes a page before the activity log stops covering the region it describes.
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use rustix::fs::FallocateFlags;
use rustix::io::{Errno, ReadWriteFlags};

/// Block size of every replica.
pub const BLOCK_SIZE: u64 = 4096;
const SLOT_SIZE: usize = 4096;
const MAGIC: &[u8; 8] = b"PSANREPL";
const AL_MAGIC: &[u8; 8] = b"PSANALOG";
const FORMAT_VERSION: u32 = 2;
const AL_OFFSET: u64 = 2 * SLOT_SIZE as u64;
const BITMAPS_OFFSET: u64 = 4 * SLOT_SIZE as u64;
/// Most extents one activity log slot holds.
pub const AL_MAX_EXTENTS: usize = (SLOT_SIZE - 8 - 8 - 4 - 4) / 4;

/// Where the parts of a replica live on its file or device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub bitmaps: u32,
    pub bitmap_bytes: u64,
    pub data_offset: u64,
}

impl Layout {
    pub fn new(size: u64, bitmaps: u32) -> Layout {
        let bitmap_bytes = crate::engine::bitmap::bitmap_bytes(size);
        let end = BITMAPS_OFFSET + u64::from(bitmaps) * bitmap_bytes;
        Layout { bitmaps, bitmap_bytes, data_offset: end.div_ceil(1 << 20) * (1 << 20) }
    }

    fn bitmap_offset(&self, k: u32) -> u64 {
        BITMAPS_OFFSET + u64::from(k) * self.bitmap_bytes
    }
}
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
    #[error("{path}: device has {available} bytes, {needed} needed (1 MiB metadata + data)")]
    DeviceTooSmall { path: PathBuf, available: u64, needed: u64 },
    #[error("invalid replica: {0}")]
    Invalid(String),
}

impl ReplicaMeta {
    fn encode(&self, seq: u64) -> Result<Vec<u8>, ReplicaError> {
        let mut b = Vec::with_capacity(SLOT_SIZE);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&seq.to_le_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&self.block_size.to_le_bytes());
        b.extend_from_slice(&Layout::new(self.size, self.replicas).data_offset.to_le_bytes());
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
        if b.len() + 4 > SLOT_SIZE {
            return Err(ReplicaError::Invalid("metadata does not fit in its slot".into()));
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.resize(SLOT_SIZE, 0);
        Ok(b)
    }

    /// Decodes a slot; `None` when it is not a valid slot (blank, torn or corrupt).
    fn decode(slot: &[u8]) -> Option<Result<(u64, ReplicaMeta), u32>> {
        let mut r = Reader { b: slot, pos: 0 };
        if r.take(8)? != MAGIC {
            return None;
        }
        let version = r.u32()?;
        if version != FORMAT_VERSION {
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
        let end = r.pos;
        let crc = r.u32()?;
        if crc32c::crc32c(&slot[..end]) != crc
            || replicas == 0
            || replicas > 32
            || data_offset != Layout::new(size, replicas).data_offset
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
    size: u64,
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
        f.debug_struct("Replica").field("path", &self.path).field("size", &self.size).finish()
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
        let layout = Layout::new(size, replicas);
        let data_offset = layout.data_offset;
        let is_device = std::fs::metadata(path).map(|m| m.file_type().is_block_device()).unwrap_or(false);
        let file = if is_device || in_place {
            OpenOptions::new().read(true).write(true).open(path).map_err(io_err(path))?
        } else {
            let tmp = path.with_extension("creating");
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(io_err(&tmp))?;
            f.set_len(data_offset + size).map_err(io_err(&tmp))?;
            std::fs::rename(&tmp, path).map_err(io_err(path))?;
            f
        };
        if is_device || in_place {
            let available = device_size(&file).map_err(io_err(path))?;
            if available < data_offset + size {
                return Err(ReplicaError::DeviceTooSmall { path: path.into(), available, needed: data_offset + size });
            }
            // A device may hold an earlier user's bytes: blank the activity log and bitmaps.
            write_zeros(&file, AL_OFFSET, data_offset - AL_OFFSET).map_err(io_err(path))?;
        }
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
        };
        let r = Replica::from_parts(path, file, is_device, 0, meta.clone());
        // Write both slots so that a stale header from an earlier use of a device can't win.
        r.write_slot(0, &meta.encode(1)?)?;
        r.write_slot(1, &meta.encode(0)?)?;
        r.file.sync_all().map_err(io_err(path))?;
        *r.meta.lock().unwrap() = (1, meta);
        if let Some(dir) = path.parent().filter(|_| !is_device && !in_place) {
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
        let r = Replica::from_parts(path, file, is_device, seq, meta);
        let (al_seq, _) = r.read_al_slots();
        r.al_seq.store(al_seq, Ordering::Relaxed);
        Ok(r)
    }

    fn from_parts(path: &Path, file: File, is_device: bool, seq: u64, meta: ReplicaMeta) -> Replica {
        Replica {
            path: path.to_owned(),
            file: Arc::new(file),
            size: meta.size,
            is_device,
            layout: Layout::new(meta.size, meta.replicas),
            meta: Mutex::new((seq, meta)),
            al_seq: 0.into(),
            nowait_writes: AtomicBool::new(true),
            direct: std::sync::OnceLock::new(),
        }
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Reads out-of-sync bitmap `k` (the bitmap of the replica with index `k`).
    pub fn read_bitmap(&self, k: u32) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; self.layout.bitmap_bytes as usize];
        if k < self.layout.bitmaps {
            read_exact_at(&self.file, &mut buf, self.layout.bitmap_offset(k))?;
        }
        Ok(buf)
    }

    /// Writes pages `(index, bytes)` of bitmap `k` and makes them durable.
    pub fn write_bitmap_pages(&self, k: u32, pages: &[(usize, Vec<u8>)]) -> io::Result<()> {
        if k >= self.layout.bitmaps || pages.is_empty() {
            return Ok(());
        }
        let base = self.layout.bitmap_offset(k);
        for (i, bytes) in pages {
            write_all_at(&self.file, bytes, base + (*i * crate::engine::bitmap::PAGE_BYTES) as u64)?;
        }
        rustix::fs::fdatasync(&*self.file).map_err(io::Error::from)
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
        self.size
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
            let flags = if punch {
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
            } else {
                FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
            };
            match rustix::fs::fallocate(&*file, flags, pos, len) {
                Ok(()) => {}
                Err(Errno::OPNOTSUPP) | Err(Errno::INVAL) => write_zeros(&file, pos, len)?,
                Err(e) => return Err(e.into()),
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
    let (size, replicas) = {
        let mut slots = vec![0u8; 2 * SLOT_SIZE];
        let f = File::open(path).map_err(io_err(path))?;
        read_exact_at(&f, &mut slots, 0).map_err(io_err(path))?;
        slots
            .chunks(SLOT_SIZE)
            .filter_map(|s| ReplicaMeta::decode(s).and_then(Result::ok))
            .max_by_key(|(seq, _)| *seq)
            .map(|(_, m)| (m.size, m.replicas))
            .ok_or_else(|| ReplicaError::NotAReplica { path: path.into() })?
    };
    let off = Layout::new(size, replicas).data_offset as usize;
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
        assert_eq!(bm.len() as u64, r.layout().bitmap_bytes);
        assert_eq!(bm[crate::engine::bitmap::PAGE_BYTES], 0b101);
        assert!(r.read_bitmap(1).unwrap().iter().all(|b| *b == 0));
        let seq = r.al_seq.load(Ordering::Relaxed);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        write_all_at(&f, &[0xff; 8], AL_OFFSET + (seq % 2) * SLOT_SIZE as u64 + 20).unwrap();
        drop(r);
        let r = Replica::open(&path, "v", size).unwrap();
        assert_eq!(r.read_al(), vec![1, 5, 9]);
        // Data sits after the bitmaps, and read_data finds it.
        assert_eq!(r.layout().data_offset, 1 << 20);
        drop(r);
        assert_eq!(read_data(&path).unwrap().len() as u64, size);
    }

    #[test]
    fn large_volumes_move_the_data_area() {
        // 64 GiB: 2 MiB of bitmap per replica.
        let l = Layout::new(64 << 30, 3);
        assert_eq!(l.bitmap_bytes, 2 << 20);
        assert_eq!(l.data_offset, 7 << 20);
    }

    #[test]
    fn garbage_is_not_a_replica() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk");
        std::fs::write(&path, vec![0x5a; 3 * SLOT_SIZE]).unwrap();
        assert!(matches!(Replica::open(&path, "v", 4096), Err(ReplicaError::NotAReplica { .. })));
    }
}
