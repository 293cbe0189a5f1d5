//! Harness of the end-to-end control-plane tests: a real API server (tests/k8s), the
//! operator, one node agent per node in Kubernetes mode and the CSI controller, each a
//! separate `peersan` process; Node objects stand in for kubelets. Data goes through the
//! agents' NBD sockets with qemu-io.
//!
//! Include it beside the API server harness:
//!
//! ```ignore
//! mod common;
//! #[path = "k8s/harness.rs"]
//! mod k8s;
//! #[path = "common/kube.rs"]
//! mod kube_cluster;
//! ```
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, NodeAddress, NodeStatus};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use peersan_crds::{MirrorVolume, SANNode, VirtualSAN};
use peersan_csi_driver::pb::controller_client::ControllerClient;
use tonic::transport::Channel;

use crate::common::{run, test_dir};
use crate::k8s::ApiServer;

/// Heartbeat Lease duration of the agents: short, so that node loss is noticed in seconds.
pub const LEASE_SECS: u64 = 2;
/// Namespace of the Leases.
pub const NAMESPACE: &str = "peersan-system";

/// The `peersan` multi-call binary.
pub fn peersan_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_peersan"))
}

/// A process killed (SIGKILL) when dropped, with its log in a file.
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
    pub args: Vec<String>,
}

impl Proc {
    fn spawn(name: &str, args: Vec<String>, kubeconfig: &Path, log: PathBuf) -> Proc {
        let mut p = Proc { name: name.to_owned(), child: None, log, args };
        p.start(kubeconfig);
        p
    }

    /// Starts (again) with the same arguments, appending to the log.
    pub fn start(&mut self, kubeconfig: &Path) {
        assert!(self.child.is_none(), "{} is running", self.name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(peersan_bin())
            .args(&self.args)
            .env("KUBECONFIG", kubeconfig)
            .env("PEERSAN_LOG", "info,peersan_node_agent=debug,peersan_operator=debug")
            .env("RUST_LOG", "info,peersan_csi_driver=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.name));
        self.child = Some(child);
    }

    /// SIGKILL, as a crash or a power loss would stop it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Panics with the end of the log when the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(c) = &mut self.child
            && let Ok(Some(status)) = c.try_wait()
        {
            panic!("{} exited ({status}):\n{}", self.name, tail(&self.log, 40));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One simulated Kubernetes node with its agent.
pub struct NodeProc {
    pub name: String,
    /// The node's cluster address (its Node object's InternalIP).
    pub ip: String,
    pub dir: PathBuf,
    pub agent: Proc,
}

impl NodeProc {
    pub fn pool(&self) -> PathBuf {
        self.dir.join("pool")
    }
    pub fn nbd_socket(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }
    /// NBD URI of a volume through this node's agent.
    pub fn nbd_uri(&self, volume: &str) -> String {
        format!("nbd+unix:///{volume}?socket={}", self.nbd_socket().display())
    }
}

/// API server, operator, CSI controller, and agents on `nodes`.
pub struct KubeCluster {
    pub dir: tempfile::TempDir,
    pub server: ApiServer,
    pub client: Client,
    pub rt: tokio::runtime::Runtime,
    pub operator: Proc,
    pub csi: Proc,
    pub csi_socket: PathBuf,
    pub nodes: Vec<NodeProc>,
    pub peer_port: u16,
}

/// Starts the API server with the CRDs; `None` (after printing why) when none can run here.
pub fn start_server(rt: &tokio::runtime::Runtime) -> Option<(ApiServer, Client)> {
    let server = match ApiServer::start() {
        Ok(s) => s,
        Err(reason) => {
            eprintln!("SKIPPED: no Kubernetes API server: {reason}");
            return None;
        }
    };
    server.install_crds();
    let client = rt.block_on(server.client());
    Some((server, client))
}

/// A free TCP port on 127.0.0.1 (the agents bind it on their own addresses).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl KubeCluster {
    /// Starts everything for nodes `names` (cluster addresses 127.0.0.11, .12, ...).
    pub fn start(names: &[&str]) -> Option<KubeCluster> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (server, client) = start_server(&rt)?;
        let dir = test_dir();
        let secret = dir.path().join("peer-secret");
        std::fs::write(&secret, "a-test-secret-of-enough-bytes\n").unwrap();
        rt.block_on(async {
            let ns = Namespace {
                metadata: ObjectMeta { name: Some(NAMESPACE.into()), ..Default::default() },
                ..Default::default()
            };
            Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("namespace");
        });
        let kubeconfig = server.kubeconfig.clone();
        let peer_port = free_port();
        let operator = Proc::spawn(
            "operator",
            vec!["operator".into(), format!("--namespace={NAMESPACE}"), format!("--peer-port={peer_port}")],
            &kubeconfig,
            dir.path().join("operator.log"),
        );
        let csi_socket = dir.path().join("csi-controller.sock");
        let csi = Proc::spawn(
            "csi-controller",
            vec![
                "csi-controller".into(),
                "--kubernetes".into(),
                format!("--namespace={NAMESPACE}"),
                format!("--endpoint=unix://{}", csi_socket.display()),
                "--wait=20s".into(),
            ],
            &kubeconfig,
            dir.path().join("csi-controller.log"),
        );
        let mut c = KubeCluster { dir, server, client, rt, operator, csi, csi_socket, nodes: Vec::new(), peer_port };
        for (i, name) in names.iter().enumerate() {
            c.add_node(name, &format!("127.0.0.{}", 11 + i), &secret);
        }
        Some(c)
    }

    /// Creates the Node object of `name` (labels `peersan.io/test: "true"`) and starts its agent.
    pub fn add_node(&mut self, name: &str, ip: &str, secret: &Path) {
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(BTreeMap::from([("peersan.io/test".to_owned(), "true".to_owned())])),
                ..Default::default()
            },
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress { type_: "InternalIP".into(), address: ip.into() }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let client = self.client.clone();
        self.rt.block_on(async {
            let nodes = Api::<Node>::all(client);
            let created = nodes.create(&PostParams::default(), &node).await.expect("create Node");
            // The status subresource: addresses are not taken from a create.
            let mut with_status = created.clone();
            with_status.status = node.status.clone();
            nodes.replace_status(name, &PostParams::default(), &with_status).await.expect("Node status");
        });
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let args = vec![
            "agent".into(),
            "--kubernetes".into(),
            format!("--node-name={name}"),
            format!("--namespace={NAMESPACE}"),
            format!("--secret-file={}", secret.display()),
            format!("--api-socket={}", dir.join("api.sock").display()),
            format!("--nbd-socket={}", dir.join("nbd.sock").display()),
            format!("--lease-duration={LEASE_SECS}s"),
            "--status-interval=200ms".into(),
        ];
        let agent = Proc::spawn(&format!("agent {name}"), args, &self.server.kubeconfig, dir.join("agent.log"));
        self.nodes.push(NodeProc { name: name.into(), ip: ip.into(), dir, agent });
    }

    pub fn node(&self, name: &str) -> &NodeProc {
        self.nodes.iter().find(|n| n.name == name).expect("node")
    }

    pub fn node_mut(&mut self, name: &str) -> &mut NodeProc {
        self.nodes.iter_mut().find(|n| n.name == name).expect("node")
    }

    /// A VirtualSAN over the test's nodes, each with its own pool directory.
    pub fn virtual_san(&self, name: &str, nodes: &[&str], replicas: u32, link: serde_json::Value) -> serde_json::Value {
        let pools: Vec<serde_json::Value> =
            nodes.iter().map(|n| serde_json::json!({ "node": n, "pool": { "path": self.node(n).pool() } })).collect();
        serde_json::json!({
            "apiVersion": "peersan.io/v1alpha1",
            "kind": "VirtualSAN",
            "metadata": { "name": name },
            "spec": {
                "nodes": { "names": nodes },
                "pool": { "path": "/var/lib/peersan-unused" },
                "nodePools": pools,
                "replicas": replicas,
                "replicationLink": link,
            }
        })
    }

    /// `kubectl apply` of an object given as JSON.
    pub fn apply(&self, obj: &serde_json::Value) -> String {
        let path = self.dir.path().join(format!("apply-{}.json", std::process::id()));
        std::fs::write(&path, serde_json::to_vec_pretty(obj).unwrap()).unwrap();
        run(self.server.kubectl().arg("apply").arg("-f").arg(&path))
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        run(self.server.kubectl().args(args))
    }

    /// Polls `probe` until it returns Some, failing after `timeout` with the last thing it
    /// saw and the ends of the processes' logs.
    pub fn wait<T>(&mut self, what: &str, timeout: Duration, mut probe: impl FnMut(&Self) -> Result<T, String>) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            self.operator.assert_running();
            self.csi.assert_running();
            let last = match probe(self) {
                Ok(v) => return v,
                Err(seen) => seen,
            };
            if Instant::now() > deadline {
                let mut logs = String::new();
                for p in [&self.operator, &self.csi].into_iter().chain(self.nodes.iter().map(|n| &n.agent)) {
                    logs += &format!("\n--- {} ---\n{}", p.name, tail(&p.log, 25));
                }
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}{logs}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn get_san(&self, name: &str) -> Option<VirtualSAN> {
        self.rt.block_on(Api::<VirtualSAN>::all(self.client.clone()).get_opt(name)).expect("get VirtualSAN")
    }
    pub fn get_sannode(&self, name: &str) -> Option<SANNode> {
        self.rt.block_on(Api::<SANNode>::all(self.client.clone()).get_opt(name)).expect("get SANNode")
    }
    pub fn get_volume(&self, name: &str) -> Option<MirrorVolume> {
        self.rt.block_on(Api::<MirrorVolume>::all(self.client.clone()).get_opt(name)).expect("get MirrorVolume")
    }
    pub fn get_lease(&self, name: &str) -> Option<Lease> {
        self.rt.block_on(Api::<Lease>::namespaced(self.client.clone(), NAMESPACE).get_opt(name)).expect("get Lease")
    }

    /// The holder and epoch of a volume's write-priority Lease.
    pub fn write_priority(&self, volume: &str) -> Option<(String, u64)> {
        let l = self.get_lease(&peersan_crds::lease::volume_lease_name(volume).unwrap())?;
        let holder = l.spec.as_ref()?.holder_identity.clone()?;
        let epoch = peersan_crds::lease::epoch_of(l.metadata.annotations.as_ref()).ok()??;
        Some((holder, epoch))
    }

    /// A client of the CSI controller (connecting once it accepts connections: its socket
    /// file appears at bind(), a moment before listen()).
    pub fn controller(&mut self) -> ControllerClient<Channel> {
        let socket = self.csi_socket.clone();
        self.wait("the CSI controller's socket", Duration::from_secs(30), |_| {
            std::os::unix::net::UnixStream::connect(&socket).map(drop).map_err(|e| e.to_string())
        });
        let ch = self.rt.block_on(peersan_csi_driver::serve::channel(&socket)).expect("CSI controller channel");
        ControllerClient::new(ch)
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}

/// Condition `type` of a list of conditions, as `(status, reason, message)`.
pub fn condition(conds: &[peersan_crds::Condition], type_: &str) -> Option<(String, String, String)> {
    conds.iter().find(|c| c.type_ == type_).map(|c| {
        let status = serde_json::to_value(c.status).unwrap().as_str().unwrap().to_owned();
        (status, c.reason.clone(), c.message.clone())
    })
}

/// Runs qemu-io commands; Ok(output) when every command succeeded, Err(output) otherwise.
pub fn try_qemu_io(uri: &str, ops: &[String]) -> Result<String, String> {
    let ops: Vec<&str> = ops.iter().map(String::as_str).collect();
    match crate::common::qemu_io_try(uri, &ops) {
        (true, out) => Ok(out),
        (false, out) => Err(out),
    }
}
