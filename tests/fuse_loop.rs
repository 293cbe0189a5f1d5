//! The FUSE + loop frontend through the real kernel: a volume served as a file in a FUSE
//! mount of this process, attached with `losetup --direct-io=on`, driven by fio with
//! verification, by ext4 and xfs (mkfs, mount, write, remount, fsck), by discard and
//! zeroing, and by direct calls on the file; attach/detach idempotency, cleanup after a
//! killed attaching process, and a device that grows.
//!
//! Data tests use a real 2-way engine volume: node-1 runs inside the test process (the
//! frontend needs the volume as an object), node-2 as an agent process. Tests about the
//! file's semantics use a plain file-backed device that counts the calls it gets.
//!
//! Needs root, /dev/fuse, losetup and the tools named in each test (CI runs as root and
//! installs them); elsewhere the tests say why they skip.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use peersan_node_agent::agent::Node;
use peersan_node_agent::block::{BlockDevice, BlockError, BlockErrorKind, BlockResult, check_range};
use peersan_node_agent::frontend::{Attached, FrontendErrorKind, FrontendKind, Frontends};
use peersan_node_agent::localcluster::{start_node_in_process, stop_node_in_process};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------------
// Prerequisites and harness
// ---------------------------------------------------------------------------------------

/// Whether the test can run here; if not, says why (and fails in CI, which has it all).
fn can_run(tools: &[&str]) -> bool {
    let why = if !is_root() {
        Some("needs root (FUSE mount, loop devices)".to_string())
    } else if let Err(e) = FrontendKind::FuseLoop.available() {
        Some(e)
    } else {
        tools.iter().find(|t| which(t).is_none()).map(|t| format!("`{t}` is not installed"))
    };
    match why {
        None => true,
        Some(why) => {
            eprintln!("SKIPPED: {why}; .ci/run installs everything and runs as root");
            assert!(std::env::var_os("CI").is_none(), "CI must run this test: {why}");
            false
        }
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/sbin", "/usr/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// A runtime whose threads may serve a loop device of this process (see
/// `fuse::become_io_flusher`).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(|| {
            // Needs CAP_SYS_RESOURCE, which some sandboxes withhold even from root.
            let _ = peersan_node_agent::fuse::become_io_flusher();
        })
        .build()
        .unwrap()
}

/// A 2-way engine volume "vol": node-1 in this process, node-2 an agent process.
struct Mirrored {
    rt: tokio::runtime::Runtime,
    node: Arc<Node>,
    cluster: LocalCluster,
    frontends: Frontends,
    dir: tempfile::TempDir,
}

impl Mirrored {
    fn new(size: u64) -> Mirrored {
        let dir = test_dir();
        let mut c =
            LocalCluster::new(dir.path(), &agent_bin(), 2, vec![VolumeDef::new("vol", size, vec![0, 1])]).unwrap();
        c.log_filter = "info,peersan_node_agent=debug".into();
        c.peer_io_timeout = Duration::from_secs(5);
        c.write_configs().unwrap();
        c.start(1).unwrap();
        let rt = runtime();
        let node = rt.block_on(start_node_in_process(&c.members[0].config_path())).unwrap();
        c.wait_healthy(1, "vol", Duration::from_secs(30)).unwrap();
        let frontends = Frontends::new(dir.path().join("run"));
        Mirrored { rt, node, cluster: c, frontends, dir }
    }

    fn attach(&self) -> Attached {
        let vol = self.node.get("vol").unwrap();
        let a = self.rt.block_on(self.frontends.attach("vol", vol)).unwrap();
        assert!(a.direct_io, "{a:?}");
        a
    }

    fn detach(&self) {
        self.rt.block_on(self.frontends.detach("vol")).unwrap();
    }

    /// Detaches, stops both nodes and checks that the replicas are identical.
    fn finish(mut self) {
        self.detach();
        // Both nodes saw every write in sync (node-2 would call it degraded once node-1 stops).
        assert_eq!(self.node.get("vol").unwrap().health(), "healthy");
        let v = self.cluster.volume(1, "vol").unwrap();
        assert_eq!(v.health, "healthy", "{v:?}");
        self.rt.block_on(stop_node_in_process(&self.node));
        assert_replicas_identical(&mut self.cluster, "vol", &[0, 1]);
        drop(self.dir);
    }
}

/// A device over a sparse file, with a size that can grow, counting the calls it gets.
struct FileDevice {
    file: std::fs::File,
    size: AtomicU64,
    fua_writes: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    zeroes: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    /// Makes reads return one byte less than asked (a device bug the server must not pass on).
    short_reads: AtomicBool,
}

impl FileDevice {
    fn new(path: &Path, size: u64) -> Arc<FileDevice> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).unwrap();
        file.set_len(size).unwrap();
        Arc::new(FileDevice {
            file,
            size: AtomicU64::new(size),
            fua_writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            trims: AtomicU64::new(0),
            zeroes: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            short_reads: AtomicBool::new(false),
        })
    }

    fn grow(&self, size: u64) {
        self.file.set_len(size).unwrap();
        self.size.store(size, Ordering::SeqCst);
    }

    fn count(c: &AtomicU64) -> u64 {
        c.load(Ordering::SeqCst)
    }

    /// Runs blocking file I/O off the runtime, tracking how many calls overlap.
    async fn io<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&std::fs::File) -> std::io::Result<T> + Send + 'static,
    ) -> BlockResult<T> {
        let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(n, Ordering::SeqCst);
        let me = self.clone();
        let r = tokio::task::spawn_blocking(move || f(&me.file)).await.unwrap();
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        r.map_err(|e| BlockError::new(BlockErrorKind::Io, e.to_string()))
    }

    fn punch(file: &std::fs::File, offset: u64, len: u64, flags: rustix::fs::FallocateFlags) -> std::io::Result<()> {
        rustix::fs::fallocate(file, flags, offset, len).map_err(Into::into)
    }
}

/// `BlockDevice` for an `Arc<FileDevice>` (the trait's methods take `&self`).
struct Dev(Arc<FileDevice>);

impl BlockDevice for Dev {
    fn size(&self) -> u64 {
        self.0.size.load(Ordering::SeqCst)
    }

    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        check_range(offset, len.into(), self.size())?;
        let short = self.0.short_reads.load(Ordering::SeqCst);
        self.0
            .io(move |f| {
                let mut buf = vec![0; len as usize];
                f.read_exact_at(&mut buf, offset)?;
                if short {
                    buf.pop();
                }
                Ok(Bytes::from(buf))
            })
            .await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BlockResult<()> {
        check_range(offset, data.len() as u64, self.size())?;
        if fua {
            self.0.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        self.0
            .io(move |f| {
                f.write_all_at(&data, offset)?;
                if fua { f.sync_data() } else { Ok(()) }
            })
            .await
    }

    async fn flush(&self) -> BlockResult<()> {
        self.0.flushes.fetch_add(1, Ordering::SeqCst);
        self.0.io(|f| f.sync_data()).await
    }

    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> BlockResult<()> {
        check_range(offset, len, self.size())?;
        self.0.trims.fetch_add(1, Ordering::SeqCst);
        use rustix::fs::FallocateFlags as F;
        self.0.io(move |f| FileDevice::punch(f, offset, len, F::PUNCH_HOLE | F::KEEP_SIZE)).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> BlockResult<()> {
        check_range(offset, len, self.size())?;
        self.0.zeroes.fetch_add(1, Ordering::SeqCst);
        use rustix::fs::FallocateFlags as F;
        self.0.io(move |f| FileDevice::punch(f, offset, len, F::ZERO_RANGE | F::KEEP_SIZE)).await
    }
}

/// A file-backed device "disk" attached through the frontend.
struct Plain {
    rt: tokio::runtime::Runtime,
    dev: Arc<FileDevice>,
    frontends: Frontends,
    attached: Attached,
    dir: tempfile::TempDir,
}

impl Plain {
    fn new(size: u64) -> Plain {
        let dir = test_dir();
        let dev = FileDevice::new(&dir.path().join("backing.img"), size);
        let rt = runtime();
        let frontends = Frontends::new(dir.path().join("run"));
        let attached = rt.block_on(frontends.attach("disk", Arc::new(Dev(dev.clone())))).unwrap();
        Plain { rt, dev, frontends, attached, dir }
    }

    fn detach(&self) {
        self.rt.block_on(self.frontends.detach("disk")).unwrap();
    }
}

/// Runs fio; it exits non-zero when a job fails, a verification included. (No state file
/// is left in the working directory.)
fn fio(args: &[&str]) -> String {
    let out = run(Command::new("fio").args(args).args(["--verify_fatal=1", "--verify_state_save=0"]));
    assert!(!out.contains("verify: bad"), "fio reported a verify failure:\n{out}");
    out
}

/// Reads `len` bytes at `offset` of a block device, bypassing the page cache.
fn read_direct(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = OpenOptions::new().read(true).custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32).open(path).unwrap();
    let mut buf = AlignedBuf::new(len);
    f.read_exact_at(buf.as_mut(), offset).unwrap();
    buf.as_mut().to_vec()
}

/// Writes at `offset` of a block device, bypassing the page cache.
fn write_direct(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new().write(true).custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32).open(path).unwrap();
    let mut buf = AlignedBuf::new(data.len());
    buf.as_mut().copy_from_slice(data);
    f.write_all_at(buf.as_mut(), offset).unwrap();
}

/// A 4 KiB-aligned buffer for O_DIRECT.
struct AlignedBuf {
    v: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let v = vec![0u8; len + 4096];
        let start = v.as_ptr().align_offset(4096);
        AlignedBuf { v, start, len }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.start..self.start + self.len]
    }
}

fn random_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

fn blockdev_size(dev: &Path) -> u64 {
    run(Command::new("blockdev").arg("--getsize64").arg(dev)).trim().parse().unwrap()
}

/// Loop devices whose backing file is `file`, from sysfs.
fn loops_backed_by(file: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file"))
            && Path::new(b.trim_end().trim_end_matches(" (deleted)")) == file
        {
            v.push(name);
        }
    }
    v
}

fn mounted_at(path: &Path) -> bool {
    peersan_node_agent::fuse::mounts().unwrap().iter().any(|m| m.mountpoint == path)
}

fn wait_until(what: &str, max: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + max;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not reached within {max:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------
// Data through the loop device
// ---------------------------------------------------------------------------------------

#[test]
fn fio_verifies_on_a_mirrored_volume() {
    if !can_run(&["losetup", "fio"]) {
        return;
    }
    let m = Mirrored::new(256 * MIB);
    let a = m.attach();
    let dev = a.device.to_str().unwrap();
    let filename = format!("--filename={dev}");
    let common = [filename.as_str(), "--direct=1", "--ioengine=libaio", "--iodepth=32", "--verify=crc32c"];
    // 4k random writes at QD32, every block verified after.
    let mut args = vec!["--name=rand4k", "--rw=randwrite", "--bs=4k", "--size=96M", "--randseed=7"];
    args.extend(common);
    fio(&args);
    // Mixed sizes (4 KiB to 1 MiB, the largest request FUSE passes in one piece), overlapping
    // the previous run's area, verified too.
    let mut args = vec![
        "--name=mixed",
        "--rw=randwrite",
        "--bsrange=4k-1m",
        "--blockalign=4k",
        "--size=192M",
        "--offset=64M",
        "--randseed=8",
    ];
    args.extend(common);
    fio(&args);
    m.finish();
}

/// Writes files of varied sizes under `dir` and returns (name, sha256) of each.
fn write_files(dir: &Path, seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sums = Vec::new();
    for i in 0..24 {
        let len = match i % 4 {
            0 => rng.random_range(1..4096),
            1 => rng.random_range(4096..256 * 1024),
            2 => rng.random_range(256 * 1024..4 * 1024 * 1024),
            _ => 8 * 1024 * 1024,
        };
        let data = random_bytes(&mut rng, len);
        let name = format!("file-{i}.bin");
        std::fs::write(dir.join(&name), &data).unwrap();
        sums.push((name, Sha256::digest(&data).to_vec()));
    }
    sums
}

fn check_files(dir: &Path, sums: &[(String, Vec<u8>)]) {
    for (name, sum) in sums {
        let data = std::fs::read(dir.join(name)).unwrap();
        assert_eq!(&Sha256::digest(&data).to_vec(), sum, "{name} changed after remount");
    }
}

/// mkfs → mount → write → sync → umount → detach → attach (a new loop device and FUSE
/// server) → mount → checksums → umount → fsck finds nothing to repair.
fn filesystem_round_trip(m: &Mirrored, mkfs: &[&str], check: &[&str], seed: u64) {
    let a = m.attach();
    run(Command::new(mkfs[0]).args(&mkfs[1..]).arg(&a.device));
    let mnt = m.dir.path().join(format!("mnt-{seed}"));
    std::fs::create_dir_all(&mnt).unwrap();
    run(Command::new("mount").arg(&a.device).arg(&mnt));
    let sums = write_files(&mnt, seed);
    run(Command::new("sync").arg("-f").arg(&mnt));
    run(Command::new("umount").arg(&mnt));
    m.detach();

    let a = m.attach();
    run(Command::new("mount").arg(&a.device).arg(&mnt));
    check_files(&mnt, &sums);
    run(Command::new("umount").arg(&mnt));
    run(Command::new(check[0]).args(&check[1..]).arg(&a.device));
    m.detach();
}

#[test]
fn ext4_and_xfs_survive_remount_and_fsck() {
    if !can_run(&["losetup", "mkfs.ext4", "fsck.ext4", "mkfs.xfs", "xfs_repair", "mount", "umount"]) {
        return;
    }
    // xfs needs at least 300 MiB.
    let m = Mirrored::new(384 * MIB);
    filesystem_round_trip(&m, &["mkfs.ext4", "-F", "-q"], &["fsck.ext4", "-fn"], 1);
    filesystem_round_trip(&m, &["mkfs.xfs", "-f", "-q"], &["xfs_repair", "-n"], 2);
    m.finish();
}

#[test]
fn discard_and_zeroing_read_back_as_zeros() {
    if !can_run(&["losetup", "blkdiscard", "fallocate"]) {
        return;
    }
    let p = Plain::new(32 * MIB);
    let dev = &p.attached.device;
    let mut rng = StdRng::seed_from_u64(3);
    let pattern = random_bytes(&mut rng, 8 * MIB as usize);
    write_direct(dev, 0, &pattern);
    assert_eq!(read_direct(dev, 0, pattern.len()), pattern);

    // (command, offset, length, device call expected)
    let cases: [(&[&str], u64, u64, &AtomicU64); 4] = [
        (&["blkdiscard", "-o", "65536", "-l", "1048576"], 65536, MIB, &p.dev.trims),
        (&["blkdiscard", "-z", "-o", "2097152", "-l", "524288"], 2 * MIB, 512 * 1024, &p.dev.zeroes),
        (&["fallocate", "--punch-hole", "-o", "3145728", "-l", "1048576"], 3 * MIB, MIB, &p.dev.trims),
        (&["fallocate", "--zero-range", "-o", "5242880", "-l", "1052672"], 5 * MIB, MIB + 4096, &p.dev.zeroes),
    ];
    let mut expected = pattern.clone();
    for (cmd, off, len, counter) in cases {
        let before = FileDevice::count(counter);
        run(Command::new(cmd[0]).args(&cmd[1..]).arg(dev));
        assert!(FileDevice::count(counter) > before, "{cmd:?} did not reach the device as expected");
        expected[off as usize..(off + len) as usize].fill(0);
        assert_same(&format!("after {cmd:?}"), &read_direct(dev, 0, expected.len()), &expected);
    }
    // The same on the FUSE file itself.
    let file = &p.attached.file;
    let f = OpenOptions::new().read(true).write(true).open(file).unwrap();
    use rustix::fs::FallocateFlags as F;
    rustix::fs::fallocate(&f, F::PUNCH_HOLE | F::KEEP_SIZE, 7 * MIB, 4096).unwrap();
    rustix::fs::fallocate(&f, F::ZERO_RANGE, 7 * MIB + 8192, 4096).unwrap();
    expected[7 * MIB as usize..7 * MIB as usize + 4096].fill(0);
    expected[7 * MIB as usize + 8192..7 * MIB as usize + 12288].fill(0);
    let mut got = vec![0; expected.len()];
    f.read_exact_at(&mut got, 0).unwrap();
    assert_same("FUSE file after fallocate", &got, &expected);
    // Unsupported modes are refused cleanly.
    for mode in [F::empty(), F::KEEP_SIZE, F::COLLAPSE_RANGE, F::INSERT_RANGE, F::UNSHARE_RANGE] {
        let e = rustix::fs::fallocate(&f, mode, 0, 4096).unwrap_err();
        assert_eq!(e, rustix::io::Errno::OPNOTSUPP, "mode {mode:?}");
    }
    drop(f);
    p.detach();
}

// ---------------------------------------------------------------------------------------
// The file's semantics
// ---------------------------------------------------------------------------------------

#[test]
fn the_file_behaves_and_out_of_range_requests_fail_cleanly() {
    if !can_run(&["losetup"]) {
        return;
    }
    let size = 8 * MIB;
    let p = Plain::new(size);
    let file = &p.attached.file;
    assert_eq!(p.attached.kind, FrontendKind::FuseLoop);
    assert_eq!(p.attached.fuse_mount, file.parent().unwrap());
    assert!(p.attached.device.to_str().unwrap().starts_with("/dev/loop"), "{:?}", p.attached);

    let meta = std::fs::metadata(file).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.len(), size);
    assert_eq!(meta.mode() & 0o7777, 0o600);
    assert_eq!((meta.uid(), meta.gid()), (0, 0));
    assert_eq!(std::fs::read_dir(&p.attached.fuse_mount).unwrap().count(), 1);

    let f = OpenOptions::new().read(true).write(true).open(file).unwrap();
    let block = vec![0xabu8; 8192];
    // Writes reaching past the end fail whole: nothing written, never a short write.
    let e = f.write_at(&block, size - 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(28), "ENOSPC expected: {e}");
    let e = f.write_at(&block, size).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(28), "{e}");
    let e = f.write_at(&block, u64::MAX / 2).unwrap_err();
    assert!(e.raw_os_error().is_some(), "{e}");
    let mut tail = vec![1u8; 4096];
    f.read_exact_at(&mut tail, size - 4096).unwrap();
    assert!(tail.iter().all(|&b| b == 0), "a refused write changed the device");
    // Reads find end-of-file at the end, as for any file.
    let mut buf = vec![0u8; 8192];
    assert_eq!(f.read_at(&mut buf, size).unwrap(), 0);
    assert_eq!(f.read_at(&mut buf, size + MIB).unwrap(), 0);
    assert_eq!(f.read_at(&mut buf, size - 4096).unwrap(), 4096);
    // fallocate past the end without KEEP_SIZE would grow the file.
    use rustix::fs::FallocateFlags as F;
    assert_eq!(rustix::fs::fallocate(&f, F::ZERO_RANGE, size - 4096, 8192).unwrap_err(), rustix::io::Errno::NOSPC);
    // The size, owner and mode belong to the volume.
    assert_eq!(f.set_len(size / 2).unwrap_err().raw_os_error(), Some(1));
    let e = std::fs::set_permissions(file, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(1), "{e}");
    assert!(OpenOptions::new().write(true).create_new(true).open(p.attached.fuse_mount.join("other")).is_err());

    // A device that returns less than asked: the reader gets EIO, not the short data.
    p.dev.short_reads.store(true, Ordering::SeqCst);
    let e = f.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(5), "{e}");
    p.dev.short_reads.store(false, Ordering::SeqCst);

    // Still serving: data written is read back, through the file and the loop device.
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    f.write_all_at(&data, MIB).unwrap();
    f.read_exact_at(&mut buf, MIB).unwrap();
    assert_eq!(buf, data);
    assert_eq!(read_direct(&p.attached.device, MIB, 8192), data);

    // O_DSYNC writes are FUA writes; fsync flushes.
    let sync = OpenOptions::new().write(true).custom_flags(rustix::fs::OFlags::DSYNC.bits() as i32).open(file).unwrap();
    let fua = FileDevice::count(&p.dev.fua_writes);
    sync.write_all_at(&data, 2 * MIB).unwrap();
    assert_eq!(FileDevice::count(&p.dev.fua_writes), fua + 1);
    let flushes = FileDevice::count(&p.dev.flushes);
    f.sync_all().unwrap();
    assert!(FileDevice::count(&p.dev.flushes) > flushes);
    drop((f, sync));
    p.detach();
}

#[test]
fn requests_are_served_concurrently() {
    if !can_run(&["losetup", "fio"]) {
        return;
    }
    let p = Plain::new(64 * MIB);
    let filename = format!("--filename={}", p.attached.device.display());
    fio(&[
        "--name=qd32",
        &filename,
        "--direct=1",
        "--ioengine=libaio",
        "--iodepth=32",
        "--rw=randrw",
        "--bs=4k",
        "--size=64M",
        "--io_size=32M",
        "--verify=crc32c",
    ]);
    let max = FileDevice::count(&p.dev.max_in_flight);
    assert!(max >= 8, "at most {max} device calls were in flight at QD32");
    p.detach();
}

// ---------------------------------------------------------------------------------------
// Attach / detach
// ---------------------------------------------------------------------------------------

#[test]
fn attach_and_detach_are_idempotent_and_refuse_a_mounted_device() {
    if !can_run(&["losetup", "mkfs.ext4", "mount", "umount"]) {
        return;
    }
    let p = Plain::new(64 * MIB);
    let again = p.rt.block_on(p.frontends.attach("disk", Arc::new(Dev(p.dev.clone())))).unwrap();
    assert_eq!(again, p.attached);
    assert_eq!(p.frontends.attached("disk"), Some(p.attached.clone()));
    assert_eq!(loops_backed_by(&p.attached.file).len(), 1);

    // A mounted device is not pulled from under its filesystem.
    run(Command::new("mkfs.ext4").args(["-F", "-q"]).arg(&p.attached.device));
    let mnt = p.dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run(Command::new("mount").arg(&p.attached.device).arg(&mnt));
    let e = p.rt.block_on(p.frontends.detach("disk")).unwrap_err();
    assert_eq!(e.kind(), FrontendErrorKind::Busy, "{e}");
    assert_eq!(p.frontends.attached("disk"), Some(p.attached.clone()));
    std::fs::write(mnt.join("still-works"), b"yes").unwrap();
    run(Command::new("umount").arg(&mnt));

    p.detach();
    assert_eq!(p.frontends.attached("disk"), None);
    assert!(loops_backed_by(&p.attached.file).is_empty());
    assert!(!mounted_at(&p.attached.fuse_mount));
    assert!(!p.attached.fuse_mount.exists());
    p.detach();
    p.rt.block_on(p.frontends.detach("never-attached")).unwrap();
    let e = p.rt.block_on(p.frontends.detach("../etc")).unwrap_err();
    assert_eq!(e.kind(), FrontendErrorKind::InvalidArgument);
    let e = p.rt.block_on(p.frontends.refresh_size("disk")).unwrap_err();
    assert_eq!(e.kind(), FrontendErrorKind::NotFound);

    // Attach again after detach: a working device again.
    let a = p.rt.block_on(p.frontends.attach("disk", Arc::new(Dev(p.dev.clone())))).unwrap();
    write_direct(&a.device, 0, &[7u8; 4096]);
    assert_eq!(read_direct(&a.device, 0, 4096), vec![7u8; 4096]);
    p.detach();
}

const HELPER_ENV: &str = "PEERSAN_FUSE_LOOP_HELPER_DIR";

/// Not a test: the attaching process of `detach_cleans_up_after_a_killed_process`, started
/// by it with the test binary. Attaches a file-backed device, reports the attachment, and
/// serves until killed.
#[test]
#[ignore = "helper process of detach_cleans_up_after_a_killed_process"]
fn helper_attach_and_serve() {
    let Some(dir) = std::env::var_os(HELPER_ENV).map(PathBuf::from) else {
        return;
    };
    let rt = runtime();
    let dev = FileDevice::new(&dir.join("backing.img"), 16 * MIB);
    let frontends = Frontends::new(dir.join("run"));
    let a = rt.block_on(frontends.attach("crashed", Arc::new(Dev(dev)))).unwrap();
    let report = format!("{}\n{}\n{}\n", a.device.display(), a.file.display(), a.fuse_mount.display());
    std::fs::write(dir.join("attached.tmp"), report).unwrap();
    std::fs::rename(dir.join("attached.tmp"), dir.join("attached")).unwrap();
    rt.block_on(std::future::pending::<()>());
}

#[test]
fn detach_cleans_up_after_a_killed_process() {
    if !can_run(&["losetup"]) {
        return;
    }
    let dir = test_dir();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "helper_attach_and_serve", "--ignored", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let report = dir.path().join("attached");
    wait_until("the helper's attachment", Duration::from_secs(60), || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("helper exited early: {status}");
        }
        report.exists()
    });
    let text = std::fs::read_to_string(&report).unwrap();
    let mut lines = text.lines().map(PathBuf::from);
    let (device, file, mountpoint) = (lines.next().unwrap(), lines.next().unwrap(), lines.next().unwrap());
    write_direct(&device, 4096, &[9u8; 4096]);
    assert_eq!(read_direct(&device, 4096, 4096), vec![9u8; 4096]);

    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // What it leaves: a dead FUSE mount and a loop device bound to its file.
    let e = std::fs::metadata(&file).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(107), "ENOTCONN expected: {e}");
    assert!(mounted_at(&mountpoint));
    assert_eq!(loops_backed_by(&file), vec![device.file_name().unwrap().to_string_lossy().into_owned()]);

    // A fresh Frontends (as in a restarted agent) cleans it up.
    let rt = runtime();
    let frontends = Frontends::new(dir.path().join("run"));
    assert_eq!(frontends.attached("crashed"), None);
    rt.block_on(frontends.detach("crashed")).unwrap();
    assert!(loops_backed_by(&file).is_empty(), "loop device left behind");
    assert!(!mounted_at(&mountpoint), "dead FUSE mount left behind");
    assert!(!mountpoint.exists());
    rt.block_on(frontends.detach("crashed")).unwrap();

    // And the volume can be attached again by the new process.
    let dev = FileDevice::new(&dir.path().join("backing2.img"), 16 * MIB);
    let a = rt.block_on(frontends.attach("crashed", Arc::new(Dev(dev)))).unwrap();
    assert_eq!(read_direct(&a.device, 0, 4096), vec![0u8; 4096]);
    rt.block_on(frontends.detach("crashed")).unwrap();
}

#[test]
fn the_loop_device_follows_a_growing_device() {
    if !can_run(&["losetup", "blockdev"]) {
        return;
    }
    let p = Plain::new(16 * MIB);
    let dev = &p.attached.device;
    assert_eq!(blockdev_size(dev), 16 * MIB);
    p.dev.grow(40 * MIB);
    // The file shows the new size at once; the loop device after refresh_size.
    assert_eq!(std::fs::metadata(&p.attached.file).unwrap().len(), 40 * MIB);
    p.rt.block_on(p.frontends.refresh_size("disk")).unwrap();
    assert_eq!(blockdev_size(dev), 40 * MIB);
    // The new space is usable through the loop device.
    write_direct(dev, 40 * MIB - 4096, &[5u8; 4096]);
    assert_eq!(read_direct(dev, 40 * MIB - 4096, 4096), vec![5u8; 4096]);
    let mut back = vec![0u8; 4096];
    p.dev.file.read_exact_at(&mut back, 40 * MIB - 4096).unwrap();
    assert_eq!(back, vec![5u8; 4096]);
    p.detach();
}
