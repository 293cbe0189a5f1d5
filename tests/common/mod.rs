//! Shared harness of the end-to-end tests: node agents as separate processes (see
//! `peersan_node_agent::localcluster`), real NBD clients, and byte-for-byte checks.
#![allow(dead_code)]

pub mod csi;
pub mod disk;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub use peersan_node_agent::localcluster::{LocalCluster, VolumeDef, read_replica_data};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const MIB: u64 = 1 << 20;

pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_peersan-node-agent"))
}

/// Skips the test (returning false) when a tool is missing, saying why. CI installs them all.
pub fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success() || !o.stdout.is_empty())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIPPED: `{tool}` is not installed (Debian: fio qemu-utils libnbd-bin); .ci/run installs it");
        if std::env::var_os("CI").is_some() {
            panic!("{tool} is required in CI");
        }
    }
    ok
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A fresh directory for one test's cluster.
/// With `PEERSAN_KEEP_TEST_DIR` set, the directory (configs, logs, replicas) is kept.
pub fn test_dir() -> tempfile::TempDir {
    let mut d = tempfile::Builder::new().prefix("peersan-e2e-").tempdir_in(test_tmp()).unwrap();
    if std::env::var_os("PEERSAN_KEEP_TEST_DIR").is_some() {
        d.disable_cleanup(true);
        eprintln!("test directory kept: {}", d.path().display());
    }
    d
}

/// Lays out and starts `n` agents in `dir` with `volumes`; `tune` adjusts the cluster's
/// settings before the configurations are written.
pub fn start_cluster(
    dir: &Path,
    n: usize,
    volumes: Vec<VolumeDef>,
    tune: impl FnOnce(&mut LocalCluster),
) -> LocalCluster {
    let mut c = LocalCluster::new(dir, &agent_bin(), n, volumes).unwrap();
    c.log_filter = "info,peersan_node_agent=debug".into();
    c.peer_io_timeout = Duration::from_secs(5);
    tune(&mut c);
    c.write_configs().unwrap();
    c.start_all().unwrap();
    c
}

/// A cluster of `n` nodes in a temporary directory with one volume on the given nodes.
pub fn cluster(n: usize, volume: &str, size: u64, nodes: &[usize]) -> (tempfile::TempDir, LocalCluster) {
    let dir = test_dir();
    let c = start_cluster(dir.path(), n, vec![VolumeDef::new(volume, size, nodes.to_vec())], |_| {});
    (dir, c)
}

/// Test data lives on disk (not tmpfs) so that replicas behave as in production.
pub fn test_tmp() -> PathBuf {
    let p = std::env::var_os("PEERSAN_TEST_TMP").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/tmp"));
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Runs a command; panics with its output when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// Runs qemu-io commands against an NBD URI; fails on any reported error.
pub fn qemu_io(uri: &str, ops: &[String]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]).arg(uri);
    for op in ops {
        cmd.arg("-c").arg(op);
    }
    let out = run(&mut cmd);
    assert!(!out.contains("failed") && !out.contains("error"), "qemu-io reported an error:\n{out}");
    out
}

/// Runs qemu-io commands without asserting: whether every command succeeded, and the output.
pub fn qemu_io_try(uri: &str, ops: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]).arg(uri);
    for op in ops {
        cmd.arg("-c").arg(op);
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("qemu-io: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success() && !text.contains("failed") && !text.contains("error"), text)
}

/// A model of the volume's content, kept by the test.
pub struct Image {
    pub data: Vec<u8>,
}

impl Image {
    pub fn new(size: u64) -> Self {
        Image { data: vec![0; size as usize] }
    }
    pub fn write(&mut self, off: u64, bytes: &[u8]) {
        self.data[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
    }
    pub fn zero(&mut self, off: u64, len: u64) {
        self.data[off as usize..(off + len) as usize].fill(0);
    }
}

/// Writes `count` random writes (sizes 1 B .. 256 KiB, offsets unaligned too, some FUA, some
/// write-zeroes and discards) through `uri` with qemu-io, recording them in `image`.
pub fn random_writes(uri: &str, image: &mut Image, count: usize, seed: u64, scratch: &Path) {
    let mut rng = StdRng::seed_from_u64(seed);
    let size = image.data.len() as u64;
    let mut ops = Vec::new();
    for i in 0..count {
        let len: u64 = match rng.random_range(0..4) {
            0 => rng.random_range(1..=4096),
            1 => 4096 * rng.random_range(1..=16),
            2 => rng.random_range(1..=256 * 1024),
            _ => 512 * rng.random_range(1..=64),
        };
        let off = if rng.random_bool(0.5) {
            rng.random_range(0..size - len)
        } else {
            rng.random_range(0..(size - len) / 4096) * 4096
        };
        match rng.random_range(0..10) {
            0 => {
                ops.push(format!("write -z {off} {len}"));
                image.zero(off, len);
            }
            1 => {
                ops.push(format!("discard {off} {len}"));
                image.zero(off, len);
            }
            k => {
                let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                let f = scratch.join(format!("w{seed}-{i}.bin"));
                std::fs::write(&f, &bytes).unwrap();
                let fua = if k == 2 { "-f " } else { "" };
                ops.push(format!("write {fua}-s {} {off} {len}", f.display()));
                image.write(off, &bytes);
            }
        }
    }
    ops.push("flush".into());
    qemu_io(uri, &ops);
}

/// Reads the whole volume through `uri` with qemu-img and returns it.
pub fn read_volume(uri: &str, scratch: &Path) -> Vec<u8> {
    let out = scratch.join("volume-readback.raw");
    let _ = std::fs::remove_file(&out);
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(uri).arg(&out));
    let d = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    d
}

/// The first differing offset of two buffers, for readable failures.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if let Some(off) = first_difference(got, want) {
        panic!(
            "{what}: differs at byte {off} (block {}), got {:?}, expected {:?}",
            off / 4096,
            got.get(off..off + 16),
            want.get(off..off + 16)
        );
    }
}

/// Stops every agent (so replicas are quiescent) and compares each replica file with `image`.
pub fn assert_replicas_equal(c: &mut LocalCluster, volume: &str, nodes: &[usize], image: &[u8]) {
    for &i in nodes {
        c.stop(i);
    }
    for &i in nodes {
        let d = read_replica_data(&c.members[i].replica_path(volume)).unwrap();
        assert_same(&format!("replica on {}", c.members[i].name), &d, image);
    }
}

/// Stops every agent and checks that the replicas on `nodes` are identical byte for byte.
/// Returns the common content.
pub fn assert_replicas_identical(c: &mut LocalCluster, volume: &str, nodes: &[usize]) -> Vec<u8> {
    for &i in nodes {
        c.stop(i);
    }
    let first = read_replica_data(&c.members[nodes[0]].replica_path(volume)).unwrap();
    for &i in &nodes[1..] {
        let other = read_replica_data(&c.members[i].replica_path(volume)).unwrap();
        assert_same(&format!("replica on {} vs {}", c.members[i].name, c.members[nodes[0]].name), &other, &first);
    }
    first
}
