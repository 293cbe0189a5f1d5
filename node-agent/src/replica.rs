//! Replica store: one replica of a volume is a preallocated sparse file in the node's pool
//! directory, or a raw block device, with a metadata area in front of the data.
//!
//! ## On-disk layout
//!
//! ```text
//! offset 0       metadata slot A (4 KiB)
//! offset 4096    metadata slot B (4 KiB)
//! offset 1 MiB   data: `size` bytes, block size 4 KiB
//! ```
//!
//! Metadata updates alternate between the two slots, each carrying a sequence number and a
//! CRC32C, and are made durable with `fdatasync`; on open the valid slot with the highest
//! sequence wins, so a torn metadata write never loses the previous state.
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
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use rustix::fs::FallocateFlags;
use rustix::io::{Errno, ReadWriteFlags};

/// Block size of every replica.
pub const BLOCK_SIZE: u64 = 4096;
/// Offset of the data area.
pub const DATA_OFFSET: u64 = 1 << 20;
const SLOT_SIZE: usize = 4096;
const MAGIC: &[u8; 8] = b"PSANREPL";
const FORMAT_VERSION: u32 = 1;
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
        b.extend_from_slice(&DATA_OFFSET.to_le_bytes());
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.push(u8::from(self.consistent));
        put_str(&mut b, &self.volume)?;
        let n = u16::try_from(self.outdated_peers.len())
            .map_err(|_| ReplicaError::Invalid("too many outdated peers".into()))?;
        b.extend_from_slice(&n.to_le_bytes());
        for p in &self.outdated_peers {
            put_str(&mut b, p)?;
        }
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
        let end = r.pos;
        let crc = r.u32()?;
        if crc32c::crc32c(&slot[..end]) != crc || data_offset != DATA_OFFSET {
            return None;
        }
        Some(Ok((seq, ReplicaMeta { volume, size, block_size, generation, consistent, outdated_peers })))
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
    meta: Mutex<(u64, ReplicaMeta)>,
    /// Whether `RWF_NOWAIT` works for writes on this file (cleared at the first EOPNOTSUPP).
    nowait_writes: AtomicBool,
}

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
    /// lost one and must be resynchronised in full before it is read.
    ///
    /// With `in_place`, `path` is an existing block device or file that is used as it is
    /// (a device given in the configuration); otherwise a new sparse file is created.
    pub fn create(
        path: &Path,
        volume: &str,
        size: u64,
        consistent: bool,
        in_place: bool,
    ) -> Result<Replica, ReplicaError> {
        if size == 0 || !size.is_multiple_of(BLOCK_SIZE) {
            return Err(ReplicaError::Invalid(format!("size {size} is not a positive multiple of {BLOCK_SIZE}")));
        }
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
            f.set_len(DATA_OFFSET + size).map_err(io_err(&tmp))?;
            std::fs::rename(&tmp, path).map_err(io_err(path))?;
            f
        };
        if is_device || in_place {
            let available = device_size(&file).map_err(io_err(path))?;
            if available < DATA_OFFSET + size {
                return Err(ReplicaError::DeviceTooSmall { path: path.into(), available, needed: DATA_OFFSET + size });
            }
        }
        let meta = ReplicaMeta {
            volume: volume.to_owned(),
            size,
            block_size: BLOCK_SIZE as u32,
            generation: 0,
            consistent,
            outdated_peers: Vec::new(),
        };
        let r = Replica {
            path: path.to_owned(),
            file: Arc::new(file),
            size,
            is_device,
            meta: Mutex::new((0, meta.clone())),
            nowait_writes: AtomicBool::new(true),
        };
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
        Ok(Replica {
            path: path.to_owned(),
            file: Arc::new(file),
            size,
            is_device,
            meta: Mutex::new((seq, meta)),
            nowait_writes: AtomicBool::new(true),
        })
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
        let mut buf = BytesMut::zeroed(len);
        let pos = DATA_OFFSET + offset;
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
        let pos = DATA_OFFSET + offset;
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

    /// Zeroes `[offset, offset + len)`; with `punch` the space is also released (trim).
    pub async fn zero(&self, offset: u64, len: u64, punch: bool, fua: bool) -> io::Result<()> {
        let file = self.file.clone();
        let pos = DATA_OFFSET + offset;
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
        let r = Replica::create(&path, "v", 1 << 20, true, false).unwrap();
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
        let r = Replica::create(&path, "v", 1 << 20, true, false).unwrap();
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
    fn garbage_is_not_a_replica() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk");
        std::fs::write(&path, vec![0x5a; 3 * SLOT_SIZE]).unwrap();
        assert!(matches!(Replica::open(&path, "v", 4096), Err(ReplicaError::NotAReplica { .. })));
    }
}
