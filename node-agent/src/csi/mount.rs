//! What the CSI Node service asks of the kernel: the mount table, mounting, unmounting,
//! probing and creating filesystems, growing them. External tools (`mount`, `blkid`,
//! `mkfs.*`, `resize2fs`, `xfs_growfs`) are run with their exit status checked and their
//! stderr in the error; unmounting is a syscall, so that "not mounted" is told by errno.

use std::path::{Path, PathBuf};

use peersan_csi_driver::error::CsiError;

/// One line of /proc/self/mountinfo, the fields the node service needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Path inside the mounted filesystem that is mounted here ("/" for a whole
    /// filesystem; the device name for a bind-mounted device node).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub options: String,
    pub fs_type: String,
    pub source: String,
}

impl MountEntry {
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if l.len() < 6 || r.len() < 2 {
                return None;
            }
            Some(MountEntry {
                root: PathBuf::from(unescape(l[3])),
                mount_point: PathBuf::from(unescape(l[4])),
                options: l[5].to_owned(),
                fs_type: r[0].to_owned(),
                source: unescape(r[1]),
            })
        })
        .collect()
}

/// The current mount table of this process's mount namespace.
pub fn mounts() -> Result<Vec<MountEntry>, CsiError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| CsiError::Internal(format!("reading /proc/self/mountinfo: {e}")))?;
    Ok(parse_mountinfo(&text))
}

/// The topmost mount at `path`, if `path` is a mount point.
pub fn mount_at(path: &Path) -> Result<Option<MountEntry>, CsiError> {
    Ok(mounts()?.into_iter().rev().find(|m| m.mount_point == path))
}

/// Runs a command; its stderr (or stdout) becomes the error message on failure.
pub async fn run(program: &str, args: &[&str]) -> Result<std::process::Output, CsiError> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| CsiError::Internal(format!("cannot run {program}: {e}")))?;
    Ok(out)
}

fn failed(program: &str, args: &[&str], out: &std::process::Output) -> CsiError {
    let mut msg = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if msg.is_empty() {
        msg = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    }
    CsiError::Internal(format!("{program} {} failed ({}): {msg}", args.join(" "), out.status))
}

/// Runs a command that must succeed.
pub async fn run_ok(program: &str, args: &[&str]) -> Result<std::process::Output, CsiError> {
    let out = run(program, args).await?;
    if !out.status.success() {
        return Err(failed(program, args, &out));
    }
    Ok(out)
}

/// What a block device holds, as `blkid -p` probes it (bypassing blkid's cache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Nothing recognisable: safe to format.
    Blank,
    /// A filesystem of this type.
    Filesystem(String),
    /// Something else (a partition table, a RAID member, ...): never formatted over.
    Other(String),
}

pub async fn probe(device: &Path) -> Result<Content, CsiError> {
    let dev = device.to_string_lossy();
    let args = ["-p", "-o", "export", dev.as_ref()];
    let out = run("blkid", &args).await?;
    match out.status.code() {
        // 2: nothing found.
        Some(2) => return Ok(Content::Blank),
        Some(0) => {}
        _ => return Err(failed("blkid", &args, &out)),
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let get =
        |k: &str| text.lines().find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix('='))).map(str::to_owned);
    match (get("TYPE"), get("USAGE")) {
        (Some(t), Some(u)) if u == "filesystem" => Ok(Content::Filesystem(t)),
        (Some(t), None) => Ok(Content::Filesystem(t)),
        _ => Ok(Content::Other(text.lines().filter(|l| !l.starts_with("DEVNAME")).collect::<Vec<_>>().join(" "))),
    }
}

/// Creates a filesystem of `fs_type` with the extra `options` (split at whitespace).
pub async fn mkfs(device: &Path, fs_type: &str, options: Option<&str>) -> Result<(), CsiError> {
    let dev = device.to_string_lossy().into_owned();
    let program = format!("mkfs.{fs_type}");
    let mut args: Vec<&str> = match fs_type {
        "ext4" => vec!["-F", "-q"],
        "xfs" => vec!["-f", "-q"],
        other => return Err(CsiError::InvalidArgument(format!("cannot create a {other} filesystem"))),
    };
    args.extend(options.unwrap_or("").split_whitespace());
    args.push(&dev);
    let out = run(&program, &args).await?;
    if !out.status.success() {
        // mkfs options come from the StorageClass: a wrong one is the caller's error.
        let e = failed(&program, &args, &out);
        return Err(CsiError::InvalidArgument(e.to_string()));
    }
    Ok(())
}

/// Mounts `source` at `target` with `mount -t fs_type -o options`.
pub async fn mount(source: &Path, target: &Path, fs_type: Option<&str>, options: &[String]) -> Result<(), CsiError> {
    let src = source.to_string_lossy().into_owned();
    let tgt = target.to_string_lossy().into_owned();
    let opts = options.join(",");
    let mut args: Vec<&str> = Vec::new();
    if let Some(t) = fs_type {
        args.extend(["-t", t]);
    }
    if !opts.is_empty() {
        args.extend(["-o", &opts]);
    }
    args.extend([src.as_str(), tgt.as_str()]);
    run_ok("mount", &args).await.map(|_| ())
}

/// Bind-mounts `source` (a directory or a device node) at `target`, read-only if asked.
pub async fn bind(source: &Path, target: &Path, read_only: bool) -> Result<(), CsiError> {
    mount(source, target, None, &["bind".to_owned()]).await?;
    if read_only {
        let tgt = target.to_string_lossy().into_owned();
        if let Err(e) = run_ok("mount", &["-o", "remount,bind,ro", &tgt]).await {
            let _ = unmount(target);
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts `target`. `Ok(false)` when nothing was mounted there; EBUSY becomes
/// FAILED_PRECONDITION (something still uses it).
pub fn unmount(target: &Path) -> Result<bool, CsiError> {
    match rustix::mount::unmount(target, rustix::mount::UnmountFlags::empty()) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => Ok(false),
        Err(rustix::io::Errno::BUSY) => Err(CsiError::FailedPrecondition(format!(
            "{} is busy (still used by a process or another mount)",
            target.display()
        ))),
        Err(e) => Err(CsiError::Internal(format!("unmounting {}: {e}", target.display()))),
    }
}

/// Linux capability number of CAP_SYS_RESOURCE.
const CAP_SYS_RESOURCE: u32 = 24;

/// True when this process has `cap` in its effective set (from /proc/self/status).
pub fn has_capability(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|bits| bits & (1 << cap) != 0)
}

/// Grows the filesystem mounted at `mount_point` from `device` to fill the device.
pub async fn grow(fs_type: &str, device: &Path, mount_point: &Path) -> Result<(), CsiError> {
    match fs_type {
        "ext4" => {
            // The kernel refuses online ext4 growth without CAP_SYS_RESOURCE (EPERM, which
            // resize2fs reports as "permission denied"); say what is missing instead.
            if !has_capability(CAP_SYS_RESOURCE) {
                return Err(CsiError::FailedPrecondition(
                    "growing a mounted ext4 filesystem needs CAP_SYS_RESOURCE, which the node agent lacks; \
                     run it with that capability (a privileged container has it)"
                        .into(),
                ));
            }
            run_ok("resize2fs", &[&device.to_string_lossy()]).await.map(|_| ())
        }
        "xfs" => run_ok("xfs_growfs", &[&mount_point.to_string_lossy()]).await.map(|_| ()),
        other => Err(CsiError::InvalidArgument(format!("cannot grow a {other} filesystem"))),
    }
}

/// Total, available and used amounts of one unit (bytes or inodes).
pub type Usage = (u64, u64, u64);

/// Bytes and inodes of the filesystem at `path`.
pub fn fs_usage(path: &Path) -> Result<(Usage, Usage), CsiError> {
    let s = rustix::fs::statvfs(path).map_err(|e| CsiError::Internal(format!("statvfs {}: {e}", path.display())))?;
    let f = s.f_frsize;
    let bytes = (s.f_blocks * f, s.f_bavail * f, (s.f_blocks - s.f_bfree) * f);
    let inodes = (s.f_files, s.f_favail, s.f_files - s.f_ffree);
    Ok((bytes, inodes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_parsing() {
        let text = "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    100 29 7:3 / /var/lib/kubelet/x\\040y rw,relatime shared:5 - ext4 /dev/loop3 rw\n\
                    101 29 0:5 /loop3 /var/lib/kubelet/dev/pv rw,nosuid - devtmpfs udev rw\n\
                    garbage line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].mount_point, PathBuf::from("/var/lib/kubelet/x y"));
        assert_eq!(m[1].source, "/dev/loop3");
        assert_eq!(m[1].fs_type, "ext4");
        assert_eq!(m[2].root, PathBuf::from("/loop3"));
        assert!(!m[0].read_only());
    }
}
