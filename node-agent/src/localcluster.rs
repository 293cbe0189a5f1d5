//! A cluster of node agents on this machine, each a separate process with its own pool,
//! talking TCP on 127.0.0.1 (or, for fault tests, each in a network namespace of its own:
//! see [`Member::netns`] and [`Member::reach`]). Used by the demo, the benchmark and the
//! end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::api::pb;

/// A volume to declare in every member's configuration.
#[derive(Debug, Clone)]
pub struct VolumeDef {
    pub name: String,
    pub size: u64,
    /// Indices of the member nodes that hold a replica.
    pub nodes: Vec<usize>,
    /// Raw block devices to use instead of pool files, per member index.
    pub devices: Vec<(usize, PathBuf)>,
    /// Several nodes write at once (`write_policy: multi-writer`), with this region size
    /// (None: the default).
    pub multi_writer: Option<Option<u64>>,
}

impl VolumeDef {
    /// A multi-writer volume (`region`: its region size, None for the default).
    pub fn multi_writer(mut self, region: Option<u64>) -> Self {
        self.multi_writer = Some(region);
        self
    }

    pub fn new(name: &str, size: u64, nodes: Vec<usize>) -> Self {
        VolumeDef { name: name.into(), size, nodes, devices: vec![], multi_writer: None }
    }
}

#[derive(Debug)]
pub struct Member {
    pub name: String,
    pub peer_port: u16,
    pub dir: PathBuf,
    pub child: Option<Child>,
    /// Network namespace the agent runs in (`ip netns exec`); None: the caller's.
    pub netns: Option<String>,
    /// Address the agent's peer listener binds.
    pub listen_host: String,
    /// For each member index, the address this member reaches it at.
    pub reach: Vec<String>,
}

impl Member {
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("node.yaml")
    }
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }
    pub fn nbd_socket(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }
    pub fn pool(&self) -> PathBuf {
        self.dir.join("pool")
    }
    pub fn replica_path(&self, volume: &str) -> PathBuf {
        self.pool().join(format!("{volume}.replica"))
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }
    /// The CSI socket (served when the cluster's `csi` is set).
    pub fn csi_socket(&self) -> PathBuf {
        self.dir.join("csi.sock")
    }
    /// Where the agent mounts the FUSE exports of staged volumes.
    pub fn fuse_dir(&self) -> PathBuf {
        self.dir.join("fuse")
    }
    /// `nbd+unix:///VOLUME?socket=...`
    pub fn nbd_uri(&self, volume: &str) -> String {
        format!("nbd+unix:///{volume}?socket={}", self.nbd_socket().display())
    }
}

/// Reserves distinct free TCP ports on 127.0.0.1.
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners: Vec<std::net::TcpListener> =
        (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    listeners.iter().map(|l| l.local_addr().map(|a| a.port())).collect()
}

#[derive(Debug)]
pub struct LocalCluster {
    pub dir: PathBuf,
    /// The program that runs an agent, and the arguments that come before `--config`.
    pub agent_bin: PathBuf,
    pub agent_args: Vec<String>,
    pub members: Vec<Member>,
    pub volumes: Vec<VolumeDef>,
    pub secret_file: PathBuf,
    pub peer_io_timeout: Duration,
    /// Resync rate limit in bytes per second (None: the agent's default).
    pub resync_rate: Option<u64>,
    /// Extra top-level lines for every node's configuration (YAML).
    pub extra_config: String,
    pub log_filter: String,
    /// Serve the CSI Node service on each member's `csi_socket()`.
    pub csi: bool,
}

impl LocalCluster {
    /// Lays out `n` members (`node-1` ... `node-n`) under `dir` and writes their configs.
    pub fn new(dir: &Path, agent_bin: &Path, n: usize, volumes: Vec<VolumeDef>) -> std::io::Result<LocalCluster> {
        std::fs::create_dir_all(dir)?;
        let secret_file = dir.join("peer-secret");
        let secret: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
        std::fs::write(&secret_file, secret)?;
        let ports = free_ports(n)?;
        let members = (0..n)
            .map(|i| Member {
                name: format!("node-{}", i + 1),
                peer_port: ports[i],
                dir: dir.join(format!("node-{}", i + 1)),
                child: None,
                netns: None,
                listen_host: "127.0.0.1".into(),
                reach: vec!["127.0.0.1".into(); n],
            })
            .collect();
        let c = LocalCluster {
            dir: dir.to_owned(),
            agent_bin: agent_bin.to_owned(),
            agent_args: Vec::new(),
            members,
            volumes,
            secret_file,
            peer_io_timeout: Duration::from_secs(3),
            resync_rate: None,
            extra_config: String::new(),
            log_filter: "info".into(),
            csi: false,
        };
        c.write_configs()?;
        Ok(c)
    }

    pub fn write_configs(&self) -> std::io::Result<()> {
        for (i, m) in self.members.iter().enumerate() {
            std::fs::create_dir_all(&m.dir)?;
            let mut y = String::new();
            y += &format!("node:\n  name: {}\n", m.name);
            y += &format!(
                "listen:\n  peer: \"{}:{}\"\n  api: {}\n  nbd_unix: {}\n",
                m.listen_host,
                m.peer_port,
                m.api_socket().display(),
                m.nbd_socket().display()
            );
            y += &format!("pool:\n  path: {}\n", m.pool().display());
            y += &format!("secret_file: {}\n", self.secret_file.display());
            y += &format!("timeouts:\n  peer_io: {}ms\n  connect: 1s\n", self.peer_io_timeout.as_millis());
            if self.csi {
                y += &format!("csi:\n  socket: {}\n  fuse_dir: {}\n", m.csi_socket().display(), m.fuse_dir().display());
            }
            if let Some(rate) = self.resync_rate {
                y += &format!("resync:\n  rate: {rate}\n");
            }
            y += &self.extra_config;
            y += "peers:\n";
            for (j, p) in self.members.iter().enumerate() {
                if j != i {
                    y += &format!("  - name: {}\n    address: \"{}:{}\"\n", p.name, m.reach[j], p.peer_port);
                }
            }
            let mine: Vec<&VolumeDef> = self.volumes.iter().filter(|v| v.nodes.contains(&i)).collect();
            if mine.is_empty() {
                y += "volumes: []\n";
            } else {
                y += "volumes:\n";
                for v in mine {
                    let reps: Vec<&str> = v.nodes.iter().map(|&k| self.members[k].name.as_str()).collect();
                    y += &format!("  - name: {}\n    size: {}\n    replicas: [{}]\n", v.name, v.size, reps.join(", "));
                    if let Some((_, dev)) = v.devices.iter().find(|(k, _)| *k == i) {
                        y += &format!("    device: {}\n", dev.display());
                    }
                    if let Some(region) = v.multi_writer {
                        y += "    write_policy: multi-writer\n";
                        if let Some(r) = region {
                            y += &format!("    region_size: {r}\n");
                        }
                    }
                }
            }
            std::fs::write(m.config_path(), y)?;
        }
        Ok(())
    }

    fn spawn(&mut self, i: usize) -> std::io::Result<()> {
        let m = &mut self.members[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(m.log_path())?;
        let mut cmd = match &m.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.agent_bin);
                c
            }
            None => Command::new(&self.agent_bin),
        };
        let child = cmd
            .args(&self.agent_args)
            .arg("--config")
            .arg(m.config_path())
            .env("PEERSAN_LOG", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        m.child = Some(child);
        Ok(())
    }

    /// Starts member `i` and waits until its API answers.
    pub fn start(&mut self, i: usize) -> std::io::Result<()> {
        self.spawn(i)?;
        self.wait_api(i, Duration::from_secs(30))
    }

    pub fn start_all(&mut self) -> std::io::Result<()> {
        // Start every process first so that they find each other while settling.
        for i in 0..self.members.len() {
            self.spawn(i)?;
        }
        for i in 0..self.members.len() {
            self.wait_api(i, Duration::from_secs(30))?;
        }
        Ok(())
    }

    fn wait_api(&mut self, i: usize, max: Duration) -> std::io::Result<()> {
        let deadline = Instant::now() + max;
        loop {
            if let Some(Some(status)) = self.members[i].child.as_mut().map(|c| c.try_wait().ok().flatten()) {
                return Err(std::io::Error::other(format!(
                    "{} exited with {status} during start; log: {}",
                    self.members[i].name,
                    self.members[i].log_path().display()
                )));
            }
            if self.api(i, |mut c| async move { c.get_node(pb::GetNodeRequest {}).await.map(|_| ()) }).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!("{} did not start within {max:?}", self.members[i].name)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9 of member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM to member `i` and wait for it to exit.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(|c| c.id())
    }

    /// Runs one API call against member `i` on a private runtime.
    pub fn api<T, F, Fut>(&self, i: usize, f: F) -> Result<T, String>
    where
        F: FnOnce(pb::agent_client::AgentClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        self.call(i, f).map_err(|e| e.message().to_owned())
    }

    /// Like [`LocalCluster::api`], keeping the gRPC status of a failure (its code).
    pub fn call<T, F, Fut>(&self, i: usize, f: F) -> Result<T, tonic::Status>
    where
        F: FnOnce(pb::agent_client::AgentClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        let path = self.members[i].api_socket();
        rt.block_on(async move {
            let client = crate::api::connect(&path).await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            f(client).await
        })
    }

    /// Creates `volume` through member `i`'s API with replicas on the members `nodes`.
    pub fn create(&self, i: usize, volume: &str, size: u64, nodes: &[usize]) -> Result<pb::Volume, tonic::Status> {
        let req = pb::CreateVolumeRequest {
            name: volume.to_owned(),
            size_bytes: size,
            replicas: nodes.iter().map(|&k| self.members[k].name.clone()).collect(),
        };
        self.call(i, |mut c| async move { c.create_volume(req).await.map(|r| r.into_inner()) })
    }

    /// Grows member `i`'s replica of `volume` to `size` bytes (ExpandVolume).
    pub fn expand(&self, i: usize, volume: &str, size: u64) -> Result<pb::Volume, tonic::Status> {
        let req = pb::ExpandVolumeRequest { name: volume.to_owned(), size_bytes: size };
        self.call(i, |mut c| async move { c.expand_volume(req).await.map(|r| r.into_inner()) })
    }

    /// Member `i`'s identity and pool space (GetNode).
    pub fn node(&self, i: usize) -> Result<pb::Node, tonic::Status> {
        self.call(i, |mut c| async move { c.get_node(pb::GetNodeRequest {}).await.map(|r| r.into_inner()) })
    }

    pub fn volume(&self, i: usize, name: &str) -> Result<pb::Volume, String> {
        let name = name.to_owned();
        self.api(i, |mut c| async move { c.get_volume(pb::GetVolumeRequest { name }).await.map(|r| r.into_inner()) })
    }

    /// Gives member `i` write priority for `volume` (a new fencing epoch).
    pub fn promote(&self, i: usize, volume: &str) -> Result<pb::Volume, String> {
        let name = volume.to_owned();
        self.api(i, |mut c| async move { c.promote(pb::PromoteRequest { name }).await.map(|r| r.into_inner()) })
    }

    /// Resolves a split brain of `volume` in favour of member `keep`, asking member `i`.
    pub fn resolve_split_brain(&self, i: usize, volume: &str, keep: usize) -> Result<pb::Volume, String> {
        let name = volume.to_owned();
        let keep = self.members[keep].name.clone();
        self.api(i, |mut c| async move {
            c.resolve_split_brain(pb::ResolveSplitBrainRequest { name, keep }).await.map(|r| r.into_inner())
        })
    }

    /// Waits until member `i` reports every replica of `volume` in sync.
    pub fn wait_healthy(&self, i: usize, volume: &str, max: Duration) -> Result<pb::Volume, String> {
        self.wait_for(i, volume, max, |v| v.replicas.iter().all(|r| r.state == "in-sync"))
    }

    pub fn wait_for(
        &self,
        i: usize,
        volume: &str,
        max: Duration,
        pred: impl Fn(&pb::Volume) -> bool,
    ) -> Result<pb::Volume, String> {
        let deadline = Instant::now() + max;
        let mut last = Err("no answer".to_string());
        while Instant::now() < deadline {
            last = self.volume(i, volume);
            if let Ok(v) = &last
                && pred(v)
            {
                return Ok(v.clone());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("{} / {volume}: condition not reached within {max:?}; last state: {last:?}", self.members[i].name))
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// Reads the data area of a replica file (without its metadata).
pub fn read_replica_data(path: &Path) -> std::io::Result<Vec<u8>> {
    crate::replica::read_data(path).map_err(std::io::Error::other)
}

/// Runs the node of a member's configuration file inside this process, on the current
/// tokio runtime, instead of as a separate agent: it serves the peer protocol on its
/// configured port and returns once its volumes have tried each peer (as the agent does
/// before serving I/O). Used where the caller needs the engine's volumes as objects (the
/// FUSE frontend's tests and benchmark); the other members run as processes.
pub async fn start_node_in_process(config: &Path) -> std::io::Result<std::sync::Arc<crate::agent::Node>> {
    let config = crate::config::Config::load(config).map_err(std::io::Error::other)?;
    let listener = tokio::net::TcpListener::bind(config.listen.peer).await?;
    let node = crate::agent::Node::new(config).map_err(std::io::Error::other)?;
    let handshake = std::sync::Arc::new(node.ctx.handshake.clone());
    tokio::spawn(crate::peer::server::serve(listener, handshake, node.clone()));
    node.settle().await;
    Ok(node)
}

/// Stops a node started by [`start_node_in_process`] as the agent does at shutdown: every
/// volume flushed, engines stopped, bitmaps written.
pub async fn stop_node_in_process(node: &crate::agent::Node) {
    node.shutdown().await;
}
