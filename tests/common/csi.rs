//! Harness of the CSI tests: node agents serving CSI as separate processes, the
//! `peersan-csi-controller` binary as a process, and gRPC clients on their sockets that
//! call in the order Kubernetes' sidecars and kubelet do. Needs root (loop devices,
//! mounts, FUSE); a test without it says so and skips (CI runs as root).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use peersan_csi_driver::pb;
use peersan_csi_driver::pb::controller_client::ControllerClient;
use peersan_csi_driver::pb::identity_client::IdentityClient;
use peersan_csi_driver::pb::node_client::NodeClient;
use peersan_csi_driver::pb::volume_capability::access_mode::Mode;
use peersan_csi_driver::pb::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use tonic::transport::Channel;

use super::*;

/// True when this process may create loop devices and mounts; otherwise prints why the
/// test is skipped. In CI (root) a missing tool fails the test instead.
pub fn can_stage() -> bool {
    if !is_root() {
        eprintln!("SKIPPED: CSI node tests need root (loop devices, mount, FUSE); CI runs them as root");
        if std::env::var_os("CI").is_some() {
            panic!("CI must run the CSI tests as root");
        }
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIPPED: /dev/fuse is missing (modprobe fuse)");
        if std::env::var_os("CI").is_some() {
            panic!("/dev/fuse is required in CI");
        }
        return false;
    }
    ["losetup", "mkfs.ext4", "mkfs.xfs", "blkid", "resize2fs", "xfs_growfs"].iter().all(|t| have_cmd(t))
}

fn have_cmd(tool: &str) -> bool {
    let ok = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: `{tool}` is not installed (Debian: util-linux e2fsprogs xfsprogs); .ci/run installs it");
        if std::env::var_os("CI").is_some() {
            panic!("{tool} is required in CI");
        }
    }
    ok
}

pub struct CsiCluster {
    pub c: LocalCluster,
    pub controller: Option<Child>,
    pub controller_socket: PathBuf,
    pub kubelet_dir: PathBuf,
    pub rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl CsiCluster {
    /// `n` agents serving CSI, with no volumes, and the controller in front of them.
    pub fn start(n: usize) -> CsiCluster {
        let dir = test_dir();
        let c = start_cluster(dir.path(), n, vec![], |c| c.csi = true);
        let kubelet_dir = dir.path().join("kubelet");
        std::fs::create_dir_all(&kubelet_dir).unwrap();
        let nodes_file = dir.path().join("nodes.yaml");
        let mut y = String::from("nodes:\n");
        for m in &c.members {
            y += &format!("  - name: {}\n    api: {}\n", m.name, m.api_socket().display());
        }
        std::fs::write(&nodes_file, y).unwrap();
        let controller_socket = dir.path().join("controller.sock");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let mut h = CsiCluster { c, controller: None, controller_socket, kubelet_dir, rt, _dir: dir };
        h.start_controller(&nodes_file);
        h
    }

    fn start_controller(&mut self, nodes_file: &Path) {
        let log = std::fs::File::create(self.c.dir.join("controller.log")).unwrap();
        // `peersan csi-controller` runs the same entry point as `peersan-csi-controller`
        // (a binary of this package, so cargo builds it for these tests).
        let child = Command::new(env!("CARGO_BIN_EXE_peersan"))
            .arg("csi-controller")
            .arg("--endpoint")
            .arg(format!("unix://{}", self.controller_socket.display()))
            .arg("--nodes")
            .arg(nodes_file)
            .env("PEERSAN_LOG", "info,peersan_csi_driver=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.controller = Some(child);
        // Ready once it accepts a connection: the socket file appears at bind(), a moment
        // before listen(), and a connection attempt in between is refused.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.controller_socket).is_err() {
            assert!(Instant::now() < deadline, "the controller does not accept connections; see controller.log");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn channel(&self, path: &Path) -> Channel {
        self.rt.block_on(peersan_csi_driver::serve::channel(path)).unwrap()
    }

    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel(&self.controller_socket))
    }

    pub fn controller_identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel(&self.controller_socket))
    }

    pub fn node(&self, i: usize) -> NodeClient<Channel> {
        NodeClient::new(self.channel(&self.c.members[i].csi_socket()))
    }

    pub fn node_identity(&self, i: usize) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel(&self.c.members[i].csi_socket()))
    }

    pub fn node_id(&self, i: usize) -> String {
        self.c.members[i].name.clone()
    }

    /// Kubelet's staging directory for a volume (kubelet creates it).
    pub fn staging(&self, i: usize, volume: &str) -> PathBuf {
        let p = self.kubelet_dir.join(self.node_id(i)).join("staging").join(volume);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// A pod's target path (kubelet creates the parent; the driver the target).
    pub fn target(&self, i: usize, pod: &str) -> PathBuf {
        let parent = self.kubelet_dir.join(self.node_id(i)).join("pods").join(pod);
        std::fs::create_dir_all(&parent).unwrap();
        parent.join("volume")
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    // ---- the calls, as the sidecars and kubelet make them ----

    pub fn create(
        &self,
        name: &str,
        size: u64,
        params: &[(&str, &str)],
        cap: &pb::VolumeCapability,
    ) -> Result<pb::Volume, tonic::Status> {
        let req = pb::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(pb::CapacityRange { required_bytes: size as i64, limit_bytes: 0 }),
            volume_capabilities: vec![cap.clone()],
            parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        };
        self.block_on(self.controller().create_volume(req)).map(|r| r.into_inner().volume.unwrap())
    }

    pub fn publish(
        &self,
        volume: &str,
        node: usize,
        cap: &pb::VolumeCapability,
        readonly: bool,
    ) -> Result<HashMap<String, String>, tonic::Status> {
        let req = pb::ControllerPublishVolumeRequest {
            volume_id: volume.into(),
            node_id: self.node_id(node),
            volume_capability: Some(cap.clone()),
            readonly,
            ..Default::default()
        };
        self.block_on(self.controller().controller_publish_volume(req)).map(|r| r.into_inner().publish_context)
    }

    pub fn unpublish(&self, volume: &str, node: usize) -> Result<(), tonic::Status> {
        let req = pb::ControllerUnpublishVolumeRequest {
            volume_id: volume.into(),
            node_id: self.node_id(node),
            ..Default::default()
        };
        self.block_on(self.controller().controller_unpublish_volume(req)).map(|_| ())
    }

    pub fn stage(
        &self,
        node: usize,
        volume: &str,
        cap: &pb::VolumeCapability,
        ctx: &HashMap<String, String>,
        publish_ctx: &HashMap<String, String>,
    ) -> Result<(), tonic::Status> {
        let req = pb::NodeStageVolumeRequest {
            volume_id: volume.into(),
            publish_context: publish_ctx.clone(),
            staging_target_path: self.staging(node, volume).display().to_string(),
            volume_capability: Some(cap.clone()),
            volume_context: ctx.clone(),
            ..Default::default()
        };
        self.block_on(self.node(node).node_stage_volume(req)).map(|_| ())
    }

    pub fn unstage(&self, node: usize, volume: &str) -> Result<(), tonic::Status> {
        let req = pb::NodeUnstageVolumeRequest {
            volume_id: volume.into(),
            staging_target_path: self.staging(node, volume).display().to_string(),
        };
        self.block_on(self.node(node).node_unstage_volume(req)).map(|_| ())
    }

    pub fn node_publish(
        &self,
        node: usize,
        volume: &str,
        pod: &str,
        cap: &pb::VolumeCapability,
        readonly: bool,
    ) -> Result<PathBuf, tonic::Status> {
        let target = self.target(node, pod);
        let req = pb::NodePublishVolumeRequest {
            volume_id: volume.into(),
            staging_target_path: self.staging(node, volume).display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(cap.clone()),
            readonly,
            ..Default::default()
        };
        self.block_on(self.node(node).node_publish_volume(req)).map(|_| target)
    }

    pub fn node_unpublish(&self, node: usize, volume: &str, pod: &str) -> Result<(), tonic::Status> {
        let req = pb::NodeUnpublishVolumeRequest {
            volume_id: volume.into(),
            target_path: self.target(node, pod).display().to_string(),
        };
        self.block_on(self.node(node).node_unpublish_volume(req)).map(|_| ())
    }

    /// Controller publish, stage and publish on `node`, as for a pod starting there.
    pub fn attach_pod(
        &self,
        volume: &pb::Volume,
        node: usize,
        pod: &str,
        cap: &pb::VolumeCapability,
        readonly: bool,
    ) -> PathBuf {
        let pctx = self.publish(&volume.volume_id, node, cap, readonly).expect("ControllerPublishVolume");
        self.stage(node, &volume.volume_id, cap, &volume.volume_context, &pctx).expect("NodeStageVolume");
        self.node_publish(node, &volume.volume_id, pod, cap, readonly).expect("NodePublishVolume")
    }

    /// Unpublish, unstage and controller unpublish, as for the pod going away.
    pub fn detach_pod(&self, volume: &str, node: usize, pod: &str) {
        self.node_unpublish(node, volume, pod).expect("NodeUnpublishVolume");
        self.unstage(node, volume).expect("NodeUnstageVolume");
        self.unpublish(volume, node).expect("ControllerUnpublishVolume");
    }
}

impl Drop for CsiCluster {
    fn drop(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Leave no mounts or loop devices behind if a test failed half-way: unmount what
        // lies under this cluster's directory (deepest first), then detach its loops.
        let root = self.c.dir.clone();
        if let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") {
            let mut points: Vec<PathBuf> = peersan_node_agent::csi::mount::parse_mountinfo(&text)
                .into_iter()
                .map(|m| m.mount_point)
                .filter(|p| p.starts_with(&root))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
            for p in points {
                let _ = Command::new("umount").arg("-l").arg(&p).status();
            }
        }
        for dev in loop_devices_under(&root) {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
    }
}

pub fn mount_cap(fs: &str) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume { fs_type: fs.into(), ..Default::default() })),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    }
}

pub fn block_cap() -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    }
}

/// Loop devices whose backing file lies under `root` (as /sys reports it).
pub fn loop_devices_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/sys/block") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                continue;
            }
            if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file"))
                && Path::new(b.trim()).starts_with(root)
            {
                out.push(PathBuf::from(format!("/dev/{name}")));
            }
        }
    }
    out
}

/// Mount points under `root`.
pub fn mounts_under(root: &Path) -> Vec<peersan_node_agent::csi::mount::MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    peersan_node_agent::csi::mount::parse_mountinfo(&text)
        .into_iter()
        .filter(|m| m.mount_point.starts_with(root))
        .collect()
}

/// Writes `n` files of random sizes with seeded content under `dir`, fsyncs them and the
/// filesystem, and returns name -> SHA-256.
pub fn write_files(dir: &Path, n: usize, seed: u64) -> std::collections::BTreeMap<String, String> {
    use rand::{Rng, SeedableRng};
    use sha2::Digest;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut sums = std::collections::BTreeMap::new();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    for i in 0..n {
        let len = rng.random_range(1..(3 << 20));
        let mut buf = vec![0u8; len];
        rng.fill(&mut buf[..]);
        let name = format!("data/file-{i}");
        let mut f = std::fs::File::create(dir.join(&name)).unwrap();
        std::io::Write::write_all(&mut f, &buf).unwrap();
        f.sync_all().unwrap();
        sums.insert(name, format!("{:x}", sha2::Sha256::digest(&buf)));
    }
    assert!(Command::new("sync").arg("-f").arg(dir).status().unwrap().success());
    sums
}

/// name -> SHA-256 of the files `write_files` wrote.
pub fn read_sums(dir: &Path) -> std::collections::BTreeMap<String, String> {
    use sha2::Digest;
    let mut sums = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(dir.join("data")).unwrap() {
        let e = e.unwrap();
        let buf = std::fs::read(e.path()).unwrap();
        sums.insert(format!("data/{}", e.file_name().to_string_lossy()), format!("{:x}", sha2::Sha256::digest(&buf)));
    }
    sums
}
