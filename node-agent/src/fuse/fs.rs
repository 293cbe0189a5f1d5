//! The filesystem: a root directory holding one regular file, [`FILE_NAME`], whose content
//! is the block device.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, WriteFlags,
};
use rustix::fs::{FallocateFlags, OFlags};
use tokio::runtime::Handle;
use tracing::{error, warn};

use super::{FILE_NAME, FuseConfig, errno_for};
use crate::block::{BlockDevice, BlockErrorKind, check_range};

const ROOT: INodeNo = INodeNo::ROOT;
const FILE: INodeNo = INodeNo(2);
/// Attributes are never cached: every `stat` asks for the device's current size.
const ATTR_TTL: Duration = Duration::ZERO;
/// The name → inode mapping never changes.
const ENTRY_TTL: Duration = Duration::from_secs(24 * 3600);
/// Block size reported by `stat` and `statfs` (the loop driver takes its discard
/// granularity from `statfs`).
const BLOCK: u32 = 4096;

/// Serves one block device as the file [`FILE_NAME`] in the root directory.
pub(super) struct VolumeFs<D> {
    pub(super) dev: Arc<D>,
    pub(super) rt: Handle,
    pub(super) config: FuseConfig,
    pub(super) created: SystemTime,
}

impl<D: BlockDevice> VolumeFs<D> {
    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            ROOT => (FileType::Directory, 0o700, 0, 2),
            FILE => (FileType::RegularFile, 0o600, self.dev.size(), 1),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        })
    }

    /// Runs a device call on the runtime and answers with `done` or the call's errno. The
    /// reader thread that received the request goes straight back to reading the next one.
    fn spawn<T, F, R>(&self, what: &'static str, call: F, reply: R, done: impl FnOnce(R, T) + Send + 'static)
    where
        F: Future<Output = crate::block::BlockResult<T>> + Send + 'static,
        R: ErrorReply + Send + 'static,
        T: Send + 'static,
    {
        self.rt.spawn(async move {
            match call.await {
                Ok(v) => done(reply, v),
                Err(e) => {
                    warn!(op = what, error = %e, "FUSE request failed");
                    reply.fail(errno_for(e.kind));
                }
            }
        });
    }
}

/// The replies that can carry an errno.
trait ErrorReply {
    fn fail(self, e: Errno);
}

macro_rules! error_reply {
    ($($t:ty),*) => {$(
        impl ErrorReply for $t {
            fn fail(self, e: Errno) {
                self.error(e)
            }
        }
    )*};
}
error_reply!(ReplyData, ReplyWrite, ReplyEmpty);

impl<D: BlockDevice> Filesystem for VolumeFs<D> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Without async direct I/O the kernel handles one request per caller at a time: the
        // loop driver would wait for each request before sending the next.
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO) {
            warn!(?missing, "the kernel lacks async direct I/O for FUSE; requests are sent one at a time");
        }
        if let Err(nearest) = config.set_max_write(self.config.max_write) {
            let _ = config.set_max_write(nearest);
        }
        // Asynchronous direct I/O requests are "background" requests: this bounds how many
        // the kernel keeps in flight.
        let _ = config.set_max_background(self.config.max_background);
        let _ = config.set_congestion_threshold(self.config.max_background.saturating_mul(3) / 4);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != ROOT || name != FILE_NAME {
            return reply.error(Errno::ENOENT);
        }
        let attr = self.attr(FILE).expect("the file exists");
        reply.entry_with_ttls(&ATTR_TTL, &ENTRY_TTL, &attr, Generation(0));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&ATTR_TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    /// Only no-op changes are accepted: the owner, mode and size belong to the volume
    /// (its size changes through the volume API). Time stamps are ignored.
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(a) = self.attr(ino) else {
            return reply.error(Errno::ENOENT);
        };
        // The kernel sends the whole mode, file type bits included.
        let same_mode = mode.is_none_or(|m| m & 0o7777 == u32::from(a.perm));
        if !same_mode || uid.is_some_and(|u| u != a.uid) || gid.is_some_and(|g| g != a.gid) {
            return reply.error(Errno::EPERM);
        }
        if size.is_some_and(|s| s != a.size) {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&ATTR_TTL, &a);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match ino {
            // No page cache: the loop device's direct I/O reaches the device, and nothing is
            // cached twice. Writes that do not extend the file may run in parallel.
            FILE => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES),
            ROOT => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE {
            return reply.error(Errno::EISDIR);
        }
        // A file's semantics: a read at or past the end finds end-of-file, a read across
        // it is cut at it. Any other read returns exactly what was asked for.
        let dev_size = self.dev.size();
        if offset >= dev_size || size == 0 {
            return reply.data(&[]);
        }
        let len = u64::from(size).min(dev_size - offset) as u32;
        let dev = self.dev.clone();
        let call = async move { dev.read(offset, len).await };
        self.spawn("read", call, reply, move |reply, data: Bytes| {
            if data.len() == len as usize {
                reply.data(&data);
            } else {
                // Never a short read: the kernel would hand it on as valid data.
                error!(offset, len, got = data.len(), "device returned a short read");
                reply.error(Errno::EIO);
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE {
            return reply.error(Errno::EISDIR);
        }
        let len = data.len() as u64;
        // The file cannot grow: a write reaching past the end fails whole (never a short
        // write, which the loop driver would take as success).
        if check_range(offset, len, self.dev.size()).is_err() {
            return reply.error(errno_for(BlockErrorKind::NoSpace));
        }
        if len == 0 {
            return reply.written(0);
        }
        // O_SYNC includes the O_DSYNC bit; the kernel sets it per request for RWF_DSYNC too.
        let fua = flags.0 & OFlags::DSYNC.bits() as i32 != 0;
        // The request buffer belongs to the reader thread and is reused for the next
        // request: the data is copied once into a buffer of this request's own.
        let buf = Bytes::copy_from_slice(data);
        let dev = self.dev.clone();
        let call = async move { dev.write(offset, buf, fua).await };
        self.spawn("write", call, reply, move |reply, ()| reply.written(len as u32));
    }

    /// Called at every `close` of a descriptor: makes completed writes durable, so that
    /// errors reach the closing process.
    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        let dev = self.dev.clone();
        self.spawn("flush", async move { dev.flush().await }, reply, |reply, ()| reply.ok());
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let dev = self.dev.clone();
        self.spawn("fsync", async move { dev.flush().await }, reply, |reply, ()| reply.ok());
    }

    /// `PUNCH_HOLE | KEEP_SIZE` trims, `ZERO_RANGE` (with or without `KEEP_SIZE`) writes
    /// zeros; both read back as zeros. The loop driver turns discard and write-zeroes into
    /// exactly these. With `KEEP_SIZE` a range past the end is cut at the end, as for any
    /// file; without it, a range past the end would grow the file and fails with ENOSPC.
    /// Every other mode (preallocation, collapse, insert, ...) gets EOPNOTSUPP.
    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != FILE {
            return reply.error(Errno::EISDIR);
        }
        let Some(op) = Zeroing::from_mode(mode) else {
            return reply.error(Errno::EOPNOTSUPP);
        };
        let dev_size = self.dev.size();
        let Some(end) = offset.checked_add(length) else {
            return reply.error(Errno::EINVAL);
        };
        if end > dev_size && !op.keep_size {
            return reply.error(errno_for(BlockErrorKind::NoSpace));
        }
        let end = end.min(dev_size);
        if offset >= end {
            return reply.ok();
        }
        let (dev, len) = (self.dev.clone(), end - offset);
        let call = async move {
            if op.punch { dev.trim(offset, len, false).await } else { dev.write_zeroes(offset, len, false).await }
        };
        self.spawn("fallocate", call, reply, |reply, ()| reply.ok());
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match ino {
            ROOT => reply.opened(FileHandle(0), FopenFlags::empty()),
            FILE => reply.error(Errno::ENOTDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (FILE, FileType::RegularFile, FILE_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.dev.size() / u64::from(BLOCK);
        reply.statfs(blocks, 0, 0, 1, 0, BLOCK, 255, BLOCK);
    }

    /// The kernel checks permissions itself (`default_permissions`).
    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        match ino {
            ROOT | FILE => reply.ok(),
            _ => reply.error(Errno::ENOENT),
        }
    }
}

/// The two `fallocate` modes the file supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Zeroing {
    /// Deallocate (trim) rather than write zeros.
    punch: bool,
    keep_size: bool,
}

impl Zeroing {
    fn from_mode(mode: i32) -> Option<Zeroing> {
        let flags = FallocateFlags::from_bits(mode as u32)?;
        let keep_size = flags.contains(FallocateFlags::KEEP_SIZE);
        match flags.difference(FallocateFlags::KEEP_SIZE) {
            // Punching a hole never changes the size, so fallocate(2) demands KEEP_SIZE.
            f if f == FallocateFlags::PUNCH_HOLE && keep_size => Some(Zeroing { punch: true, keep_size }),
            f if f == FallocateFlags::ZERO_RANGE => Some(Zeroing { punch: false, keep_size }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallocate_modes() {
        let m = |f: FallocateFlags| f.bits() as i32;
        let (keep, punch, zero) = (FallocateFlags::KEEP_SIZE, FallocateFlags::PUNCH_HOLE, FallocateFlags::ZERO_RANGE);
        assert_eq!(Zeroing::from_mode(m(punch | keep)), Some(Zeroing { punch: true, keep_size: true }));
        assert_eq!(Zeroing::from_mode(m(zero | keep)), Some(Zeroing { punch: false, keep_size: true }));
        assert_eq!(Zeroing::from_mode(m(zero)), Some(Zeroing { punch: false, keep_size: false }));
        assert_eq!(Zeroing::from_mode(m(punch)), None);
        assert_eq!(Zeroing::from_mode(0), None);
        assert_eq!(Zeroing::from_mode(m(keep)), None);
        assert_eq!(Zeroing::from_mode(m(punch | zero | keep)), None);
        assert_eq!(Zeroing::from_mode(m(FallocateFlags::COLLAPSE_RANGE)), None);
        assert_eq!(Zeroing::from_mode(m(FallocateFlags::INSERT_RANGE)), None);
        assert_eq!(Zeroing::from_mode(m(FallocateFlags::UNSHARE_RANGE | keep)), None);
        assert_eq!(Zeroing::from_mode(-1), None);
        assert_eq!(Zeroing::from_mode(1 << 30), None);
    }
}
