//! FUSE frontend: serves a [`BlockDevice`] as a single regular file in a FUSE mount of
//! its own, so that the kernel's loop driver can turn it into a block device
//! (`losetup --direct-io=on`, see [`crate::frontend`]) on nodes without the `nbd` module.
//!
//! # The crate: `fuser`
//!
//! The protocol and the mount are done by [`fuser`] (0.18, default features: no libfuse,
//! the mount is a plain `mount(2)` done here, which needs root — the agent is root).
//! Why `fuser` rather than the async `fuse3` crate, after reading both:
//!
//! * `fuser` reads `/dev/fuse` on a thread of its own (or several, with cloned descriptors:
//!   see [`FuseConfig::threads`]), and its reply objects can be sent from any thread: the
//!   reader parses a request, hands the device call to the tokio runtime and goes back to
//!   reading; the task that finishes the call writes the reply. `fuse3`
//!   (0.10) has one reader serialised by a lock, hands every single read of `/dev/fuse` to
//!   `spawn_blocking` (a thread hand-off per request, which costs more than the disk on
//!   this 2-vCPU machine), and copies write payloads twice.
//! * `fuser` lets the filesystem set what matters for a block device at `INIT`:
//!   `FUSE_ASYNC_DIO`, `max_write`, `max_background`.
//! * `fuser` supports the workspace's Rust version; `fuse3` 0.10 needs a newer one.
//!
//! No unsafe code is needed here: the mount is `rustix::mount::mount` with `fd=` of a
//! `/dev/fuse` opened by std, handed to [`fuser::Session::from_fd`]; unmounting is ours too
//! (`umount`, and `MNT_DETACH` when busy), so fuser never unmounts behind our back.
//!
//! # Correctness traps (QEMU's FUSE export corrupted data on this machine)
//!
//! * Many requests in flight: the kernel sends loop I/O as asynchronous direct I/O
//!   (`FUSE_ASYNC_DIO`), up to `max_background` requests at a time; each is handed to the
//!   runtime as its own task with its own buffer (write data is copied out of the reader's
//!   buffer before the reader takes the next request; read data is the device's buffer).
//! * Never a short read or write: a write reaching past the end fails whole with ENOSPC;
//!   a device that returns fewer bytes than asked gets EIO; a read is cut only at the end
//!   of the file (a read at or past the end finds end-of-file, as with any file).
//! * The file is opened with `FOPEN_DIRECT_IO` (no page cache; the loop device's
//!   `O_DIRECT` reaches the device and nothing is cached twice) and
//!   `FOPEN_PARALLEL_DIRECT_WRITES`.
//! * `fsync` and `flush` (every `close`) call [`BlockDevice::flush`]; a write with
//!   `O_SYNC`/`O_DSYNC` (or `RWF_DSYNC`) is a FUA write.
//! * `fallocate(PUNCH_HOLE | KEEP_SIZE)` trims, `fallocate(ZERO_RANGE)` writes zeros
//!   (the loop driver turns discard and write-zeroes into these); other modes get
//!   EOPNOTSUPP.
//! * `getattr` reports [`BlockDevice::size`] on every call and attributes are never cached,
//!   so a volume that grew shows its new size at the next `stat`.
//! * Device errors map to an errno in one place, [`errno_for`].
//!
//! # Mount
//!
//! Type `fuse.peersan`, source `peersan`, options `default_permissions` (the kernel checks
//! the file's mode: root only), `nosuid,nodev,noexec,noatime`; no `allow_other` (the
//! agent, the loop driver's workers and the CSI code all run as root, the mount's owner).
//! The root directory (mode 0700) holds the file [`FILE_NAME`] (mode 0600, owned by root).

mod fs;

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{BackgroundSession, Errno, Session, SessionACL};
use rustix::mount::{MountFlags, UnmountFlags};
use tokio::runtime::Handle;
use tracing::{debug, info, warn};

use crate::block::{BlockDevice, BlockErrorKind};

/// Name of the file that holds the device, in the root of the mount.
pub const FILE_NAME: &str = "disk";
/// File system type of the mounts, as `/proc/self/mountinfo` shows it.
pub const FS_TYPE: &str = "fuse.peersan";
/// Mount source, as `/proc/self/mountinfo` shows it.
pub const FS_SOURCE: &str = "peersan";

/// Tunables of a FUSE server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuseConfig {
    /// Threads reading requests from `/dev/fuse` (each with its own cloned descriptor and
    /// request buffer). They only parse and dispatch; device calls run on the runtime, so
    /// one keeps up: on the 2-vCPU development machine one reader gave 30-36k 4k random
    /// writes per second at QD32 on a 2-way volume, two readers 16-22k (they compete with
    /// the runtime's workers and the loop driver for the CPUs).
    pub threads: usize,
    /// Largest write (and read) request the kernel sends, in bytes. The kernel caps it
    /// at `fs.fuse.max_pages_limit` pages (256: 1 MiB).
    pub max_write: u32,
    /// Most asynchronous requests the kernel keeps in flight (loop I/O is asynchronous
    /// direct I/O, which counts as background requests).
    pub max_background: u16,
}

impl Default for FuseConfig {
    fn default() -> Self {
        FuseConfig { threads: 1, max_write: 1 << 20, max_background: 256 }
    }
}

/// What went wrong, in kinds a caller can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FuseErrorKind {
    /// FUSE is not available here (no `/dev/fuse`, no permission to mount).
    Unavailable,
    /// The mount point is busy or in a state that prevents the operation.
    Busy,
    /// Any other failure.
    Io,
}

/// A failure to start or stop a FUSE server.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("cannot open /dev/fuse: {0}")]
    Device(#[source] io::Error),
    #[error("mounting FUSE at {}: {source}", path.display())]
    Mount { path: PathBuf, source: io::Error },
    #[error("FUSE session at {}: {source}", path.display())]
    Session { path: PathBuf, source: io::Error },
    #[error("unmounting {}: {source}", path.display())]
    Unmount { path: PathBuf, source: io::Error },
}

impl FuseError {
    pub fn kind(&self) -> FuseErrorKind {
        let e = match self {
            FuseError::Device(e) => e,
            FuseError::Mount { source, .. } | FuseError::Session { source, .. } | FuseError::Unmount { source, .. } => {
                source
            }
        };
        match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => FuseErrorKind::Unavailable,
            io::ErrorKind::ResourceBusy => FuseErrorKind::Busy,
            _ => FuseErrorKind::Io,
        }
    }
}

/// The errno a FUSE request gets for a block-device error. Every device error and every
/// range check of the server goes through this mapping.
pub fn errno_for(kind: BlockErrorKind) -> Errno {
    match kind {
        BlockErrorKind::OutOfRange | BlockErrorKind::Invalid => Errno::EINVAL,
        BlockErrorKind::Io => Errno::EIO,
        BlockErrorKind::ReadOnly => Errno::EROFS,
        // Fenced or without quorum: the volume may come back, so a plain I/O error (the
        // loop driver turns anything but a few errnos into BLK_STS_IOERR anyway).
        BlockErrorKind::Unavailable => Errno::EIO,
        BlockErrorKind::NoSpace => Errno::ENOSPC,
    }
}

/// Marks the calling thread, and every thread it creates from now on, as part of the block
/// I/O path (`PR_SET_IO_FLUSHER`): memory they allocate is reclaimed without waiting for
/// I/O, which could be I/O to a loop device this process serves itself — a deadlock under
/// memory pressure. A process serving FUSE + loop devices should call it on every thread
/// of its runtime (tokio's `on_thread_start`), where the engine runs;
/// [`FuseExport::mount`] calls it for the FUSE reader threads. Needs `CAP_SYS_RESOURCE`.
pub fn become_io_flusher() -> io::Result<()> {
    rustix::process::configure_io_flusher_behavior(true).map_err(io::Error::from)
}

/// How a server's mount went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// Unmounted and the server's threads have ended.
    Clean,
    /// The mount was busy (the file is still open, e.g. by a loop device): it was detached
    /// from the namespace, and the server keeps answering until the last user closes the
    /// file; then its threads end by themselves.
    Lazy,
}

/// A running FUSE server for one device, mounted at `mountpoint`. Dropping it unmounts
/// (lazily if busy), as [`FuseExport::stop`] does.
pub struct FuseExport {
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
}

impl std::fmt::Debug for FuseExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseExport").field("mountpoint", &self.mountpoint).finish_non_exhaustive()
    }
}

impl FuseExport {
    /// Mounts a FUSE file system serving `dev` at `mountpoint` (an existing, empty
    /// directory) and starts its reader threads. Device calls run on `rt`.
    ///
    /// Blocking (the mount and the `INIT` exchange with the kernel): call it from
    /// `spawn_blocking` in async code.
    pub fn mount<D: BlockDevice>(
        dev: Arc<D>,
        mountpoint: &Path,
        rt: Handle,
        config: &FuseConfig,
    ) -> Result<FuseExport, FuseError> {
        let fuse = OpenOptions::new().read(true).write(true).open("/dev/fuse").map_err(FuseError::Device)?;
        let options = format!(
            "fd={},rootmode=40000,user_id={},group_id={},default_permissions",
            fuse.as_raw_fd(),
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        );
        let options = std::ffi::CString::new(options).expect("no NUL in mount options");
        let flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC | MountFlags::NOATIME;
        rustix::mount::mount(FS_SOURCE, mountpoint, FS_TYPE, flags, options.as_c_str())
            .map_err(|e| FuseError::Mount { path: mountpoint.into(), source: e.into() })?;
        let session_err = |source| FuseError::Session { path: mountpoint.into(), source };
        let fs = fs::VolumeFs { dev, rt, config: config.clone(), created: SystemTime::now() };
        let mut session_config = fuser::Config::default();
        session_config.n_threads = Some(config.threads.max(1));
        session_config.clone_fd = true;
        // The reader threads are created by this one and inherit the flag.
        if let Err(e) = become_io_flusher() {
            warn!(error = %e, "cannot mark the FUSE server as an I/O flusher; it may deadlock under memory pressure");
        }
        // The kernel queued INIT when the mount was made; `from_fd` answers it.
        let started = Session::from_fd(fs, OwnedFd::from(fuse), SessionACL::Owner, session_config)
            .and_then(|s| s.spawn())
            .map_err(session_err);
        match started {
            Ok(session) => {
                info!(mountpoint = %mountpoint.display(), "FUSE server started");
                Ok(FuseExport { mountpoint: mountpoint.into(), session: Some(session) })
            }
            Err(e) => {
                // The descriptor is closed by now, so the mount is dead: take it away.
                if let Err(u) = unmount(mountpoint) {
                    warn!(mountpoint = %mountpoint.display(), error = %u, "cannot unmount after a failed start");
                }
                Err(e)
            }
        }
    }

    /// The mount point.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The file that holds the device.
    pub fn file(&self) -> PathBuf {
        self.mountpoint.join(FILE_NAME)
    }

    /// Unmounts, lazily if the file is still in use (see [`Unmounted`]). Blocking (waits
    /// for the reader threads after a clean unmount).
    pub fn stop(mut self) -> Result<Unmounted, FuseError> {
        self.stop_inner()
    }

    /// Gives up unmounting: the server keeps serving until its mount is unmounted by
    /// someone else or the process exits (then the mount is left dead, for a later
    /// [`crate::frontend::Frontends::detach`] to clean up).
    pub fn keep_serving(mut self) {
        if let Some(session) = self.session.take() {
            // Dropping the join handle leaves the threads running.
            drop(session);
        }
    }

    fn stop_inner(&mut self) -> Result<Unmounted, FuseError> {
        let Some(session) = self.session.take() else {
            return Ok(Unmounted::Clean);
        };
        match unmount(&self.mountpoint) {
            Ok(Unmounted::Clean) => {
                // Unmounting aborted the connection: the readers get ENODEV and return.
                if let Err(e) = session.join() {
                    warn!(mountpoint = %self.mountpoint.display(), error = %e, "FUSE server ended with an error");
                }
                info!(mountpoint = %self.mountpoint.display(), "FUSE server stopped");
                Ok(Unmounted::Clean)
            }
            Ok(Unmounted::Lazy) => {
                warn!(mountpoint = %self.mountpoint.display(), "FUSE mount busy; detached lazily, serving until its file is closed");
                drop(session);
                Ok(Unmounted::Lazy)
            }
            Err(e) => {
                self.session = Some(session);
                Err(e)
            }
        }
    }
}

impl Drop for FuseExport {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            warn!(error = %e, "FUSE server not unmounted");
            if let Some(session) = self.session.take() {
                drop(session);
            }
        }
    }
}

/// Unmounts `path`; when it is busy, detaches it lazily (`umount -l`). A path that is not
/// a mount point (any more) counts as unmounted.
pub fn unmount(path: &Path) -> Result<Unmounted, FuseError> {
    let err = |e: rustix::io::Errno| FuseError::Unmount { path: path.into(), source: e.into() };
    match rustix::mount::unmount(path, UnmountFlags::empty()) {
        Ok(()) => Ok(Unmounted::Clean),
        Err(rustix::io::Errno::BUSY) => {
            rustix::mount::unmount(path, UnmountFlags::DETACH).map_err(err)?;
            Ok(Unmounted::Lazy)
        }
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => {
            debug!(path = %path.display(), "not mounted");
            Ok(Unmounted::Clean)
        }
        Err(e) => Err(err(e)),
    }
}

/// A mount as `/proc/self/mountinfo` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub fs_type: String,
    pub source: String,
}

/// The mounts of this process's mount namespace.
pub fn mounts() -> io::Result<Vec<MountEntry>> {
    Ok(parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// Parses `/proc/<pid>/mountinfo` (see proc(5)); malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mountpoint = before.split(' ').nth(4)?;
            let mut after = after.split(' ');
            let fs_type = after.next()?;
            let source = after.next()?;
            Some(MountEntry {
                mountpoint: PathBuf::from(unescape(mountpoint)),
                fs_type: unescape(fs_type),
                source: unescape(source),
            })
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    use std::os::unix::ffi::OsStringExt;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |acc, c| acc.wrapping_mul(8).wrapping_add(c - b'0')));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    std::ffi::OsString::from_vec(out).to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo() {
        let text = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    97 22 0:52 / /run/peersan/frontends/n1/my\\040vol rw,nosuid,nodev,noexec,noatime - fuse.peersan peersan rw,user_id=0,group_id=0,default_permissions\n\
                    garbage\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].mountpoint, PathBuf::from("/run/peersan/frontends/n1/my vol"));
        assert_eq!(m[1].fs_type, FS_TYPE);
        assert_eq!(m[1].source, FS_SOURCE);
        assert_eq!(m[0].fs_type, "ext4");
    }

    #[test]
    fn every_kind_has_an_errno() {
        use BlockErrorKind::*;
        for (k, e) in [
            (OutOfRange, Errno::EINVAL),
            (Invalid, Errno::EINVAL),
            (Io, Errno::EIO),
            (ReadOnly, Errno::EROFS),
            (Unavailable, Errno::EIO),
            (NoSpace, Errno::ENOSPC),
        ] {
            assert_eq!(errno_for(k), e, "{k:?}");
        }
    }
}
