//! Block-device frontends: how this node's kernel sees a volume as a block device. The CSI
//! Node service attaches a volume here before it makes a filesystem on it or mounts it.
//!
//! # FUSE + loop ([`FrontendKind::FuseLoop`])
//!
//! The volume is served as the regular file `<run_dir>/<volume>/disk` by a FUSE server in
//! this process (see [`crate::fuse`]), mounted at `<run_dir>/<volume>`, and that file is
//! attached to a loop device with `losetup --direct-io=on --find --show`. Works on any
//! kernel with `fuse` and `loop`.
//!
//! Detaching finds what to undo from the file system, not only from memory, so it also
//! cleans up after an earlier agent process that was killed: its FUSE mount is then dead
//! (ENOTCONN) and its loop device still bound to the mount's file. Loop devices are found
//! through `/sys/block/loop*/loop/backing_file` (`losetup -j` would have to `stat` the
//! dead file) and mounts through `/proc/self/mountinfo`.
//!
//! Operations on one volume are serialised; different volumes proceed in parallel.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::process::Command;
use tracing::{info, warn};

use crate::block::BlockDevice;
use crate::fuse::{self, FILE_NAME, FuseConfig, FuseError, FuseExport};

/// How long `detach` waits for the kernel to release a loop device after `losetup -d`.
const LOOP_RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// The kind of frontend an attachment uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrontendKind {
    /// A file in a FUSE mount served by this process, attached to a loop device.
    FuseLoop,
}

impl FrontendKind {
    /// The name used in volume status and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            FrontendKind::FuseLoop => "fuse-loop",
        }
    }

    /// Whether this node can use the frontend; if not, why not.
    pub fn available(self) -> Result<(), String> {
        match self {
            FrontendKind::FuseLoop => {
                for dev in ["/dev/fuse", "/dev/loop-control"] {
                    if !Path::new(dev).exists() {
                        return Err(format!("{dev} does not exist (kernel module not loaded?)"));
                    }
                }
                if !rustix::process::geteuid().is_root() {
                    return Err("mounting FUSE and attaching loop devices needs root".into());
                }
                Ok(())
            }
        }
    }
}

impl std::fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A volume attached as a block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub volume: String,
    /// The block device (`/dev/loopN`).
    pub device: PathBuf,
    pub kind: FrontendKind,
    /// Where the volume's FUSE server is mounted.
    pub fuse_mount: PathBuf,
    /// The file that holds the volume, backing the loop device.
    pub file: PathBuf,
    /// Whether the loop device does direct I/O on the file (it should; without it every
    /// request is sent synchronously, which is correct but slow).
    pub direct_io: bool,
}

/// What went wrong, in kinds the CSI service maps to gRPC codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontendErrorKind {
    /// The request itself is wrong (bad volume name).
    InvalidArgument,
    /// The volume is not attached by this process.
    NotFound,
    /// The device or mount is in use; retry after its user let go.
    Busy,
    /// The node lacks what the frontend needs (kernel module, tool, privilege).
    Unavailable,
    /// Anything else.
    Internal,
}

/// A failure of a frontend operation.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("invalid volume name: {0}")]
    InvalidName(String),
    #[error("volume {0:?} is not attached by this agent")]
    NotAttached(String),
    #[error("{what} is in use: {detail}")]
    Busy { what: String, detail: String },
    #[error(transparent)]
    Fuse(#[from] FuseError),
    #[error("cannot run `{command}`: {source}")]
    Spawn { command: String, source: std::io::Error },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command { command: String, status: std::process::ExitStatus, stderr: String },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("{0}")]
    Unexpected(String),
}

impl FrontendError {
    pub fn kind(&self) -> FrontendErrorKind {
        match self {
            FrontendError::InvalidName(_) => FrontendErrorKind::InvalidArgument,
            FrontendError::NotAttached(_) => FrontendErrorKind::NotFound,
            FrontendError::Busy { .. } => FrontendErrorKind::Busy,
            FrontendError::Fuse(e) => match e.kind() {
                fuse::FuseErrorKind::Unavailable => FrontendErrorKind::Unavailable,
                fuse::FuseErrorKind::Busy => FrontendErrorKind::Busy,
                fuse::FuseErrorKind::Io => FrontendErrorKind::Internal,
            },
            FrontendError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                FrontendErrorKind::Unavailable
            }
            FrontendError::Spawn { .. }
            | FrontendError::Command { .. }
            | FrontendError::Io { .. }
            | FrontendError::Unexpected(_) => FrontendErrorKind::Internal,
        }
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> FrontendError {
    let context = context.into();
    move |source| FrontendError::Io { context, source }
}

/// An attachment made by this process.
struct Live {
    attached: Attached,
    /// None only while it is being torn down.
    export: Option<FuseExport>,
    /// The device's current size.
    size: Box<dyn Fn() -> u64 + Send + Sync>,
}

/// The block-device attachments of one agent, with their FUSE servers.
pub struct Frontends {
    run_dir: PathBuf,
    fuse: FuseConfig,
    live: Mutex<HashMap<String, Live>>,
    /// One lock per volume name, held for a whole attach / detach / refresh.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Frontends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.live.lock().unwrap().keys().cloned().collect();
        f.debug_struct("Frontends").field("run_dir", &self.run_dir).field("attached", &names).finish()
    }
}

impl Frontends {
    /// Frontends whose FUSE mount points are directories under `run_dir` (e.g.
    /// `/run/peersan/frontends/<node>`), one per volume, named after it. The directory is
    /// created when needed.
    pub fn new(run_dir: PathBuf) -> Self {
        Self::with_fuse_config(run_dir, FuseConfig::default())
    }

    /// Like [`Frontends::new`], with FUSE servers tuned by `fuse`.
    pub fn with_fuse_config(run_dir: PathBuf, fuse: FuseConfig) -> Self {
        Frontends { run_dir, fuse, live: Mutex::new(HashMap::new()), locks: Mutex::new(HashMap::new()) }
    }

    /// The directory holding the mount points.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Attaches `volume` as a block device. Idempotent: a volume already attached by this
    /// process returns the same attachment (whatever `dev` is passed the second time).
    ///
    /// Leftovers of an earlier process for the same volume (a dead FUSE mount, loop
    /// devices bound to its file) are cleaned up first. If anything fails after the loop
    /// device was created, it is detached again before the error is returned.
    ///
    /// Must be called inside a tokio runtime: the FUSE server runs its device calls on it.
    pub async fn attach<D: BlockDevice>(&self, name: &str, dev: Arc<D>) -> Result<Attached, FrontendError> {
        check_name(name)?;
        let lock = self.lock(name);
        let _guard = lock.lock().await;
        if let Some(a) = self.attached(name) {
            return Ok(a);
        }
        let (mountpoint, file) = self.paths(name).await?;
        self.cleanup(name, &mountpoint, &file).await?;
        match tokio::fs::create_dir(&mountpoint).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(format!("creating {}", mountpoint.display()))(e)),
        }

        let size = {
            let dev = dev.clone();
            Box::new(move || dev.size())
        };
        let (rt, config, mp) = (tokio::runtime::Handle::current(), self.fuse.clone(), mountpoint.clone());
        let mounted = tokio::task::spawn_blocking(move || FuseExport::mount(dev, &mp, rt, &config))
            .await
            .map_err(|e| FrontendError::Unexpected(format!("FUSE mount task: {e}")))?;
        let export = match mounted {
            Ok(e) => e,
            Err(e) => {
                let _ = tokio::fs::remove_dir(&mountpoint).await;
                return Err(e.into());
            }
        };

        let device = match attach_loop(&file).await {
            Ok(d) => d,
            Err(e) => {
                // losetup may have bound a device before failing: none may be left behind.
                if let Err(c) = detach_loops(&file).await {
                    warn!(volume = %name, error = %c, "cannot detach a loop device after a failed attach");
                }
                stop_export(export).await;
                let _ = tokio::fs::remove_dir(&mountpoint).await;
                return Err(e);
            }
        };
        let direct_io = loop_attr(&device, "dio").is_some_and(|v| v == "1");
        if !direct_io {
            warn!(volume = %name, device = %device.display(), "loop device does not do direct I/O on the FUSE file");
        }
        let attached = Attached {
            volume: name.to_owned(),
            device,
            kind: FrontendKind::FuseLoop,
            fuse_mount: mountpoint,
            file,
            direct_io,
        };
        info!(volume = %name, device = %attached.device.display(), file = %attached.file.display(), "volume attached");
        self.live
            .lock()
            .unwrap()
            .insert(name.to_owned(), Live { attached: attached.clone(), export: Some(export), size });
        Ok(attached)
    }

    /// Detaches: `losetup -d` of the loop device(s) backed by the volume's file, then
    /// unmounts its FUSE mount and removes the mount point.
    ///
    /// Also works for an attachment made by an earlier agent process that was killed (see
    /// the module documentation). Idempotent: detaching something not attached succeeds.
    /// A loop device that is mounted or otherwise claimed exclusively is left alone and
    /// the call fails with [`FrontendErrorKind::Busy`].
    pub async fn detach(&self, name: &str) -> Result<(), FrontendError> {
        check_name(name)?;
        let lock = self.lock(name);
        let _guard = lock.lock().await;
        let (mountpoint, file) = self.paths(name).await?;
        self.cleanup(name, &mountpoint, &file).await
    }

    /// Current attachment of a volume by this process, if any.
    pub fn attached(&self, name: &str) -> Option<Attached> {
        self.live.lock().unwrap().get(name).map(|l| l.attached.clone())
    }

    /// Every attachment of this process.
    pub fn list(&self) -> Vec<Attached> {
        self.live.lock().unwrap().values().map(|l| l.attached.clone()).collect()
    }

    /// After a volume grew: makes the loop device see the new size (`losetup -c`).
    pub async fn refresh_size(&self, name: &str) -> Result<(), FrontendError> {
        check_name(name)?;
        let lock = self.lock(name);
        let _guard = lock.lock().await;
        let (attached, want) = {
            let live = self.live.lock().unwrap();
            let l = live.get(name).ok_or_else(|| FrontendError::NotAttached(name.to_owned()))?;
            (l.attached.clone(), (l.size)())
        };
        // The loop driver takes the size from the kernel's inode; attributes are never
        // cached, so a `stat` brings the inode up to date. A size reply racing with a
        // write may be ignored by the kernel, hence the retries.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let seen = tokio::fs::metadata(&attached.file)
                .await
                .map_err(io_err(format!("stat {}", attached.file.display())))?
                .len();
            if seen == want {
                break;
            }
            if Instant::now() > deadline {
                return Err(FrontendError::Unexpected(format!(
                    "{} shows {seen} bytes, the volume has {want}",
                    attached.file.display()
                )));
            }
            tokio::task::yield_now().await;
        }
        run(Command::new("losetup").arg("-c").arg(&attached.device)).await?;
        let sectors =
            loop_attr_path(&sys_block(&attached.device).join("size")).and_then(|s| s.parse::<u64>().ok()).ok_or_else(
                || FrontendError::Unexpected(format!("cannot read the size of {}", attached.device.display())),
            )?;
        if sectors * 512 != want {
            return Err(FrontendError::Unexpected(format!(
                "{} has {} bytes after `losetup -c`, the volume has {want}",
                attached.device.display(),
                sectors * 512
            )));
        }
        info!(volume = %name, size = want, device = %attached.device.display(), "loop device resized");
        Ok(())
    }

    fn lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().unwrap().entry(name.to_owned()).or_default().clone()
    }

    /// The mount point and file of a volume, with `run_dir` resolved (the kernel reports
    /// loop devices' backing files by their canonical paths) and created if missing.
    async fn paths(&self, name: &str) -> Result<(PathBuf, PathBuf), FrontendError> {
        tokio::fs::create_dir_all(&self.run_dir)
            .await
            .map_err(io_err(format!("creating {}", self.run_dir.display())))?;
        let run_dir = tokio::fs::canonicalize(&self.run_dir)
            .await
            .map_err(io_err(format!("resolving {}", self.run_dir.display())))?;
        let mountpoint = run_dir.join(name);
        let file = mountpoint.join(FILE_NAME);
        Ok((mountpoint, file))
    }

    /// Undoes every trace of an attachment of `name`: ours (in `live`) or an earlier
    /// process's.
    async fn cleanup(&self, name: &str, mountpoint: &Path, file: &Path) -> Result<(), FrontendError> {
        // Loop devices first (they hold the file open), each checked before any is touched.
        // (By the file's path only: a device number alone may have been reused since.)
        let loops = loops_backed_by(file);
        for dev in &loops {
            check_not_claimed(dev)?;
        }
        if !loops.is_empty() {
            for dev in &loops {
                run(Command::new("losetup").arg("-d").arg(dev)).await.or_else(|e| {
                    // Gone in the meantime is fine.
                    if loop_attr(dev, "backing_file").is_none() { Ok(String::new()) } else { Err(e) }
                })?;
                info!(volume = %name, device = %dev.display(), "loop device detached");
            }
            wait_released(file).await?;
        }

        let ours = self.live.lock().unwrap().get_mut(name).and_then(|l| l.export.take());
        if let Some(export) = ours {
            let stopped = tokio::task::spawn_blocking(move || export.stop())
                .await
                .map_err(|e| FrontendError::Unexpected(format!("FUSE stop task: {e}")))?;
            stopped?;
        } else if is_our_mount(mountpoint)? {
            // An earlier process's server: dead (ENOTCONN) after a crash.
            let mp = mountpoint.to_owned();
            let how = tokio::task::spawn_blocking(move || fuse::unmount(&mp))
                .await
                .map_err(|e| FrontendError::Unexpected(format!("unmount task: {e}")))??;
            info!(volume = %name, mountpoint = %mountpoint.display(), ?how, "stale FUSE mount removed");
        }
        self.live.lock().unwrap().remove(name);
        match tokio::fs::remove_dir(mountpoint).await {
            Ok(()) => info!(volume = %name, "volume detached"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("removing {}", mountpoint.display()))(e)),
        }
        Ok(())
    }
}

impl Drop for Frontends {
    /// Servers whose loop device is still bound keep serving until the process exits:
    /// unmounting them now would detach the mount lazily and leave a loop device nobody
    /// could find by path any more. After the process ends they are dead mounts that a
    /// later [`Frontends::detach`] cleans up.
    fn drop(&mut self) {
        for (name, mut live) in self.live.get_mut().unwrap().drain() {
            let Some(export) = live.export.take() else { continue };
            if loops_backed_by(&live.attached.file).is_empty() {
                drop(export);
            } else {
                warn!(volume = %name, device = %live.attached.device.display(), "still attached; its FUSE server keeps serving");
                export.keep_serving();
            }
        }
    }
}

async fn stop_export(export: FuseExport) {
    match tokio::task::spawn_blocking(move || export.stop()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => warn!(error = %e, "cannot stop a FUSE server"),
        Err(e) => warn!(error = %e, "FUSE stop task failed"),
    }
}

/// Volume names become directory names: the agent's rule for names keeps them safe.
fn check_name(name: &str) -> Result<(), FrontendError> {
    crate::config::check_name("volume", name).map_err(|e| FrontendError::InvalidName(e.to_string()))
}

/// Runs a command; returns its standard output, or an error with its standard error.
async fn run(cmd: &mut Command) -> Result<String, FrontendError> {
    let command = format!("{:?}", cmd.as_std()).replace('"', "");
    let out = cmd
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| FrontendError::Spawn { command: command.clone(), source })?;
    if !out.status.success() {
        return Err(FrontendError::Command {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn attach_loop(file: &Path) -> Result<PathBuf, FrontendError> {
    let out = run(Command::new("losetup").args(["--direct-io=on", "--find", "--show"]).arg(file)).await?;
    let dev = PathBuf::from(out.trim());
    if !dev.starts_with("/dev") || loop_attr(&dev, "backing_file").is_none() {
        return Err(FrontendError::Unexpected(format!("losetup printed {out:?}, not a bound loop device")));
    }
    Ok(dev)
}

/// Detaches every loop device backed by `file`.
async fn detach_loops(file: &Path) -> Result<(), FrontendError> {
    for dev in loops_backed_by(file) {
        run(Command::new("losetup").arg("-d").arg(&dev)).await?;
    }
    Ok(())
}

/// `/sys/block/loopN` of `/dev/loopN`.
fn sys_block(dev: &Path) -> PathBuf {
    Path::new("/sys/block").join(dev.file_name().unwrap_or_default())
}

fn loop_attr(dev: &Path, attr: &str) -> Option<String> {
    loop_attr_path(&sys_block(dev).join("loop").join(attr))
}

fn loop_attr_path(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim_end_matches('\n').to_owned())
}

/// Loop devices whose backing file is `file` (by the path the kernel recorded).
fn loops_backed_by(file: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("loop"))
        .filter(|n| {
            loop_attr_path(&Path::new("/sys/block").join(n).join("loop/backing_file"))
                .is_some_and(|b| Path::new(b.strip_suffix(" (deleted)").unwrap_or(&b)) == file)
        })
        .map(|n| Path::new("/dev").join(n))
        .collect();
    found.sort();
    found
}

/// Fails with `Busy` when a block device is mounted or claimed by another user (an
/// exclusive open fails with EBUSY then).
fn check_not_claimed(dev: &Path) -> Result<(), FrontendError> {
    use rustix::fs::{Mode, OFlags};
    match rustix::fs::open(dev, OFlags::RDONLY | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NONBLOCK, Mode::empty()) {
        Ok(_fd) => Ok(()),
        Err(rustix::io::Errno::BUSY) => Err(FrontendError::Busy {
            what: dev.display().to_string(),
            detail: "it is mounted or held by another user; unmount it first".into(),
        }),
        // Vanished: nothing to do for it.
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::NXIO) => Ok(()),
        Err(e) => Err(io_err(format!("opening {}", dev.display()))(e.into())),
    }
}

/// Waits until no loop device is backed by `file` any more. A loop device that someone
/// still has open is released only when they close it (`losetup -d` then only marks it
/// for auto-clear).
async fn wait_released(file: &Path) -> Result<(), FrontendError> {
    let deadline = Instant::now() + LOOP_RELEASE_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    loop {
        let left = loops_backed_by(file);
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(FrontendError::Busy {
                what: left.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "),
                detail: format!(
                    "still open {LOOP_RELEASE_TIMEOUT:?} after `losetup -d`; it is released when its last user closes it"
                ),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Whether `mountpoint` is a mount of ours (a FUSE mount of this frontend).
fn is_our_mount(mountpoint: &Path) -> Result<bool, FrontendError> {
    let mounts = fuse::mounts().map_err(io_err("reading /proc/self/mountinfo"))?;
    match mounts.iter().rev().find(|m| m.mountpoint == mountpoint) {
        None => Ok(false),
        Some(m) if m.fs_type == fuse::FS_TYPE => Ok(true),
        Some(m) => Err(FrontendError::Busy {
            what: mountpoint.display().to_string(),
            detail: format!("a {} file system from {} is mounted there, not a peersan FUSE mount", m.fs_type, m.source),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CSI service awaits these in tonic handlers, whose futures must be `Send`.
    #[allow(dead_code)]
    fn futures_are_send(f: &Frontends, v: Arc<crate::engine::Volume>) {
        fn send<T: Send>(_: T) {}
        send(f.attach("v", v));
        send(f.detach("v"));
        send(f.refresh_size("v"));
    }

    #[test]
    fn kind_names() {
        assert_eq!(FrontendKind::FuseLoop.as_str(), "fuse-loop");
        assert_eq!(FrontendKind::FuseLoop.to_string(), "fuse-loop");
    }

    #[test]
    fn names_must_be_safe_path_components() {
        for bad in ["", ".", "..", "a/b", "../x", "Vol", "a b", "-a"] {
            assert_eq!(check_name(bad).unwrap_err().kind(), FrontendErrorKind::InvalidArgument, "{bad:?}");
        }
        check_name("pvc-0123-abcd").unwrap();
    }

    #[test]
    fn missing_tool_is_unavailable() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let e = rt.block_on(run(&mut Command::new("/nonexistent/losetup"))).unwrap_err();
        assert_eq!(e.kind(), FrontendErrorKind::Unavailable, "{e}");
        let e = rt.block_on(run(Command::new("sh").args(["-c", "echo oops >&2; exit 3"]))).unwrap_err();
        assert_eq!(e.kind(), FrontendErrorKind::Internal);
        assert!(e.to_string().contains("oops"), "{e}");
    }
}
