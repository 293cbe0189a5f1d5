//! Kubernetes mode (`peersan-node-agent --kubernetes`): the node agent takes its
//! configuration from the API server instead of a file.
//!
//! - **Heartbeat** ([`heartbeat`]): the Lease `peersan-node-<node>` is renewed every quarter of
//!   `--lease-duration` from process start, whatever else fails.
//! - **Registration**: the agent waits for its `SANNode` and reports in its status the node's
//!   interface addresses, its version and why it is not ready yet. Once the spec has a
//!   `replicationAddress` and a pool, the node starts exactly as in standalone mode (peer
//!   listener bound to that address, settle, NBD, agent API, CSI) and the status reports the
//!   generation it runs, the pool's space and the replicas held. A later change of
//!   `replicationAddress` or `pool` stops the agent with an error (it needs a restart); a
//!   change of `peers` is applied live.
//! - **Volumes** ([`volumes`]): every `MirrorVolume` that lists this node gets a local replica,
//!   grown with `spec.sizeBytes` and deleted with the object; the volume Leases feed the
//!   engines their write priority (epoch and holder); the local replica's state is written
//!   into the MirrorVolume's `status.replicas` entry of this node.

pub mod heartbeat;
pub mod status;
pub mod volumes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use peersan_crds::{PoolSource, SANNode};
use tokio::sync::watch;

use crate::config::{
    ByteSize, Config, CsiConfig, ListenConfig, NodeConfig, PeerConfig, PoolConfig, ResyncConfig, Timeouts,
    parse_duration,
};
use crate::daemon::{self, Daemon, DaemonError};
use status::{NodeReport, NodeReporter, NotReady};

/// Field manager of the SANNode status (server-side apply).
pub const NODE_MANAGER: &str = "peersan-node-agent";

/// Field manager of this node's entry in MirrorVolume statuses: `peersan-node-agent-<node>`.
pub fn replica_manager(node: &str) -> String {
    format!("{NODE_MANAGER}-{node}")
}

/// How long one status write may take before it is given up (and tried again at the next
/// check): a slow API server must not hold up the agent's other work.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A request to the API server, given up after [`WRITE_TIMEOUT`].
pub(crate) async fn bounded<T>(
    request: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(WRITE_TIMEOUT, request).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer from the API server within {WRITE_TIMEOUT:?}")),
    }
}

/// How long a spec that could not start (its address cannot be bound yet) waits before the
/// next attempt.
const START_RETRY: Duration = Duration::from_secs(5);

/// Settings of Kubernetes mode (flags of `peersan-node-agent --kubernetes`).
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Kubernetes mode (--kubernetes)")]
pub struct KubeArgs {
    /// This node's Kubernetes name (its SANNode and heartbeat Lease are named after it).
    #[arg(long, env = "NODE_NAME", required_if_eq("kubernetes", "true"))]
    pub node_name: Option<String>,
    /// Namespace of the Leases (the one peersan runs in).
    #[arg(long, env = "POD_NAMESPACE", required_if_eq("kubernetes", "true"))]
    pub namespace: Option<String>,
    /// Serve the CSI Identity and Node services on this unix socket.
    #[arg(long)]
    pub csi_socket: Option<PathBuf>,
    /// File with the peers' shared secret (at least 16 bytes).
    #[arg(long, default_value = "/etc/peersan/peer-secret")]
    pub secret_file: PathBuf,
    /// The agent API's unix socket.
    #[arg(long, default_value = "/run/peersan/api.sock")]
    pub api_socket: PathBuf,
    /// The NBD frontend's unix socket.
    #[arg(long, default_value = "/run/peersan/nbd.sock")]
    pub nbd_socket: PathBuf,
    /// Duration of the heartbeat Lease (whole seconds, at least 1s); renewed every quarter
    /// of it.
    #[arg(long, default_value = "40s", value_parser = parse_lease_duration)]
    pub lease_duration: Duration,
    /// How often the status of the node and of its replicas is checked (and written when
    /// it changed).
    #[arg(long, default_value = "2s", value_parser = parse_interval)]
    pub status_interval: Duration,
    /// Where CSI keeps its stage records (default: `<pool>/csi`).
    #[arg(long)]
    pub csi_state_dir: Option<PathBuf>,
    /// Where the FUSE exports of staged volumes are mounted (default:
    /// `/run/peersan/<node>/fuse`).
    #[arg(long)]
    pub fuse_dir: Option<PathBuf>,
}

fn parse_lease_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) || d.subsec_nanos() != 0 {
        return Err(format!("{s:?}: a Lease's duration is a whole number of seconds, at least 1s"));
    }
    Ok(d)
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(10) {
        return Err(format!("{s:?}: at least 10ms"));
    }
    Ok(d)
}

/// What Kubernetes mode runs with (the flags, checked).
#[derive(Debug, Clone)]
pub struct Options {
    pub node: String,
    pub namespace: String,
    pub csi_socket: Option<PathBuf>,
    pub secret_file: PathBuf,
    pub api_socket: PathBuf,
    pub nbd_socket: PathBuf,
    pub lease_duration: Duration,
    pub status_interval: Duration,
    pub csi_state_dir: Option<PathBuf>,
    pub fuse_dir: Option<PathBuf>,
}

impl KubeArgs {
    /// The options, once the flags that Kubernetes mode needs are known to be there.
    pub fn options(&self) -> Result<Options, KubeError> {
        let missing = |flag: &str| KubeError::Invalid(format!("--kubernetes needs {flag}"));
        let node = self.node_name.clone().filter(|n| !n.is_empty()).ok_or_else(|| missing("--node-name"))?;
        let namespace = self.namespace.clone().filter(|n| !n.is_empty()).ok_or_else(|| missing("--namespace"))?;
        // The Lease name check is the Kubernetes object-name check of the node name.
        peersan_crds::lease::node_lease_name(&node)?;
        for (flag, p) in [
            ("--csi-socket", self.csi_socket.as_ref()),
            ("--csi-state-dir", self.csi_state_dir.as_ref()),
            ("--fuse-dir", self.fuse_dir.as_ref()),
            ("--api-socket", Some(&self.api_socket)),
            ("--nbd-socket", Some(&self.nbd_socket)),
        ] {
            if let Some(p) = p
                && !p.is_absolute()
            {
                return Err(KubeError::Invalid(format!("{flag}: {} must be an absolute path", p.display())));
            }
        }
        Ok(Options {
            node,
            namespace,
            csi_socket: self.csi_socket.clone(),
            secret_file: self.secret_file.clone(),
            api_socket: self.api_socket.clone(),
            nbd_socket: self.nbd_socket.clone(),
            lease_duration: self.lease_duration,
            status_interval: self.status_interval,
            csi_state_dir: self.csi_state_dir.clone(),
            fuse_dir: self.fuse_dir.clone(),
        })
    }
}

/// Errors of Kubernetes mode.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// A flag's value is unusable.
    #[error("{0}")]
    Invalid(String),
    /// The node name cannot name Kubernetes objects.
    #[error(transparent)]
    Name(#[from] peersan_crds::Error),
    /// No client for the API server (kubeconfig or in-cluster configuration).
    #[error("cannot reach the Kubernetes API: {0}")]
    Client(#[source] kube::Error),
    /// The node could not start.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The SANNode's spec changed in a way that is applied only at start.
    #[error(
        "SANNode {node}: spec.{field} changed from {from} to {to}; the node agent needs a restart to apply it, so it exits"
    )]
    NeedsRestart { node: String, field: &'static str, from: String, to: String },
    /// Waiting for a termination signal failed.
    #[error("signal handling: {0}")]
    Signal(#[source] std::io::Error),
}

/// What a SANNode's spec makes of the node's configuration, or why it cannot run yet.
pub fn spec_config(node: &SANNode, opts: &Options) -> Result<Config, NotReady> {
    let spec = &node.spec;
    let Some(address) = spec.replication_address.as_deref() else {
        return Err(NotReady::new(
            "WaitingForAddress",
            "spec.replicationAddress is not set yet (the operator sets it once it knows the node's address on the replication link)",
        ));
    };
    let path = match &spec.pool {
        PoolSource::Path(p) => PathBuf::from(p),
        PoolSource::Device(d) => {
            return Err(NotReady::new(
                "UnsupportedPool",
                format!(
                    "spec.pool.device {d}: a pool on a raw block device is not supported by this node agent yet; use pool.path (a directory)"
                ),
            ));
        }
    };
    let peer: SocketAddr = address.parse().map_err(|_| {
        NotReady::new(
            "InvalidSpec",
            format!("spec.replicationAddress {address:?} is not ip:port (an IPv6 address in brackets)"),
        )
    })?;
    let rate = ByteSize::parse(&spec.resync_rate)
        .map_err(|e| NotReady::new("InvalidSpec", format!("spec.resyncRate: {e}")))?;
    let config = Config {
        node: NodeConfig { name: opts.node.clone() },
        listen: ListenConfig {
            peer,
            api: opts.api_socket.clone(),
            nbd_unix: opts.nbd_socket.clone(),
            nbd_tcp: None,
            nbd_tcp_allow_remote: false,
        },
        pool: PoolConfig { path },
        secret_file: opts.secret_file.clone(),
        peers: peers_of(node, &opts.node),
        volumes: Vec::new(),
        timeouts: Timeouts::default(),
        resync: ResyncConfig { rate },
        degraded_writes: match spec.degraded_writes {
            peersan_crds::DegradedWrites::Allow => crate::config::DegradedWrites::Allow,
            peersan_crds::DegradedWrites::Refuse => crate::config::DegradedWrites::Refuse,
        },
        csi: opts.csi_socket.as_ref().map(|socket| CsiConfig {
            socket: socket.clone(),
            state_dir: opts.csi_state_dir.clone(),
            fuse_dir: opts.fuse_dir.clone(),
        }),
        kubernetes: true,
    };
    config.validate().map_err(|e| NotReady::new("InvalidSpec", e.to_string()))?;
    Ok(config)
}

/// The other members in a SANNode's spec.
fn peers_of(node: &SANNode, me: &str) -> Vec<PeerConfig> {
    node.spec
        .peers
        .iter()
        .filter(|p| p.name != me)
        .map(|p| PeerConfig { name: p.name.clone(), address: p.address.clone() })
        .collect()
}

/// A spec change that the running node cannot take live: its replication address or its
/// pool (the values of the spec it started with first).
fn restart_needed(running: &SANNode, next: &SANNode) -> Option<(&'static str, String, String)> {
    let show = |a: &Option<String>| a.clone().unwrap_or_else(|| "(unset)".into());
    if running.spec.replication_address != next.spec.replication_address {
        return Some((
            "replicationAddress",
            show(&running.spec.replication_address),
            show(&next.spec.replication_address),
        ));
    }
    if running.spec.pool != next.spec.pool {
        return Some(("pool", format!("{:?}", running.spec.pool), format!("{:?}", next.spec.pool)));
    }
    None
}

/// Follows the SANNode named `node` into `tx` (None while it does not exist).
async fn follow_sannode(api: Api<SANNode>, node: String, tx: watch::Sender<Option<Arc<SANNode>>>) {
    use futures::StreamExt;
    let cfg = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let mut events = std::pin::pin!(watcher(api, cfg).default_backoff());
    let mut listed = false;
    while let Some(ev) = events.next().await {
        match ev {
            Ok(watcher::Event::Init) => listed = false,
            Ok(watcher::Event::InitApply(n) | watcher::Event::Apply(n)) => {
                listed = true;
                tx.send_replace(Some(Arc::new(n)));
            }
            Ok(watcher::Event::InitDone) => {
                if !listed {
                    tx.send_replace(None);
                }
            }
            Ok(watcher::Event::Delete(_)) => {
                tx.send_replace(None);
            }
            Err(e) => tracing::warn!(sannode = %node, error = %e, "watching the SANNode failed; retrying"),
        }
    }
}

/// Runs the node agent in Kubernetes mode until SIGTERM or SIGINT (a clean shutdown, as in
/// standalone mode), or until its SANNode's spec changes in a way that needs a restart
/// ([`KubeError::NeedsRestart`], after the same clean shutdown).
pub async fn run(opts: Options) -> Result<(), KubeError> {
    let client = Client::try_default().await.map_err(KubeError::Client)?;
    tracing::info!(node = %opts.node, namespace = %opts.namespace, "node agent starting in Kubernetes mode");
    let heartbeat =
        tokio::spawn(heartbeat::run(client.clone(), opts.namespace.clone(), opts.node.clone(), opts.lease_duration));
    let result = run_node(client, &opts).await;
    heartbeat.abort();
    result
}

async fn run_node(client: Client, opts: &Options) -> Result<(), KubeError> {
    let nodes: Api<SANNode> = Api::all(client.clone());
    let (spec_tx, mut spec_rx) = watch::channel(None);
    let follower = tokio::spawn(follow_sannode(nodes.clone(), opts.node.clone(), spec_tx));
    let _follower = AbortOnDrop(follower);
    let mut reporter = NodeReporter::new(nodes, &opts.node);
    let mut terminated = std::pin::pin!(daemon::terminated());
    let mut tick = tokio::time::interval(opts.status_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // Until a spec can run: report why not, with the node's addresses (the operator picks
    // the replication address among them).
    let mut follower_alive = true;
    let mut waiting_logged = false;
    let mut tried: Option<Arc<SANNode>> = None;
    let mut not_ready: Option<NotReady> = None;
    let mut next_attempt = tokio::time::Instant::now();
    let (daemon, mut running) = loop {
        let current = spec_rx.borrow_and_update().clone();
        match current {
            None => {
                if !waiting_logged {
                    tracing::info!(sannode = %opts.node, "waiting for the SANNode of this node");
                    waiting_logged = true;
                }
            }
            Some(sn) => {
                let fresh = tried.as_ref().is_none_or(|t| t.spec != sn.spec);
                if fresh || tokio::time::Instant::now() >= next_attempt {
                    tried = Some(sn.clone());
                    next_attempt = tokio::time::Instant::now() + START_RETRY;
                    match try_start(&sn, opts).await {
                        Ok(Ok(d)) => break (d, sn),
                        Ok(Err(nr)) => {
                            if not_ready.as_ref() != Some(&nr) {
                                tracing::info!(reason = nr.reason, message = %nr.message, "the node cannot run the SANNode's spec yet");
                            }
                            not_ready = Some(nr);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "the node failed to start");
                            reporter.report(&NodeReport::failed(&e), &sn).await;
                            return Err(e);
                        }
                    }
                }
                if let Some(nr) = &not_ready {
                    reporter.report(&NodeReport::not_ready(nr.clone()), &sn).await;
                }
            }
        }
        tokio::select! {
            r = &mut terminated => {
                r.map_err(KubeError::Signal)?;
                tracing::info!("terminated before the node started");
                return Ok(());
            }
            r = spec_rx.changed(), if follower_alive => follower_alive = r.is_ok(),
            _ = tick.tick() => {}
        }
    };

    let node = daemon.node.clone();
    let volumes = tokio::spawn(volumes::run(client.clone(), opts.clone(), node.clone()));
    let _volumes = AbortOnDrop(volumes);
    let mut generation = running.metadata.generation;
    let outcome = loop {
        reporter.report(&NodeReport::running(generation, &node), &running).await;
        tokio::select! {
            r = &mut terminated => break r.map_err(KubeError::Signal),
            r = spec_rx.changed(), if follower_alive => {
                if r.is_err() {
                    tracing::error!(sannode = %opts.node, "following the SANNode stopped; the node keeps running with the spec it has");
                    follower_alive = false;
                    continue;
                }
                let Some(next) = spec_rx.borrow_and_update().clone() else {
                    tracing::warn!(sannode = %opts.node, "the SANNode was deleted; the node keeps running with the spec it has");
                    continue;
                };
                if let Some((field, from, to)) = restart_needed(&running, &next) {
                    let e = KubeError::NeedsRestart { node: opts.node.clone(), field, from, to };
                    tracing::error!(error = %e, "exiting");
                    break Err(e);
                }
                if next.spec.resync_rate != running.spec.resync_rate {
                    tracing::warn!(from = %running.spec.resync_rate, to = %next.spec.resync_rate, "spec.resyncRate changed; it applies from the next start of the node agent");
                }
                if next.spec.degraded_writes != running.spec.degraded_writes {
                    tracing::info!(to = ?next.spec.degraded_writes, "spec.degradedWrites changed");
                    node.ctx.refuse_degraded.store(
                        next.spec.degraded_writes == peersan_crds::DegradedWrites::Refuse,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
                node.set_peers(&peers_of(&next, &opts.node));
                generation = next.metadata.generation;
                running = next;
            }
            _ = tick.tick() => {}
        }
    };
    drop(_volumes);
    daemon.shutdown().await;
    outcome
}

/// Starts the node of `sn`'s spec. `Ok(Err(why))` when the spec cannot run yet, or its
/// replication address cannot be bound yet (tried again later); an error when the node
/// failed to start (the process exits: a half-started node is not retried in place).
async fn try_start(sn: &SANNode, opts: &Options) -> Result<Result<Daemon, NotReady>, KubeError> {
    let config = match spec_config(sn, opts) {
        Ok(c) => c,
        Err(nr) => return Ok(Err(nr)),
    };
    let listener = match daemon::bind_peer("spec.replicationAddress", config.listen.peer).await {
        Ok(l) => l,
        Err(e) => return Ok(Err(NotReady::new("BindFailed", format!("{e}; trying again")))),
    };
    tracing::info!(generation = ?sn.metadata.generation, peer = %config.listen.peer, pool = %config.pool.path.display(), "starting the node with the SANNode's spec");
    Ok(Ok(Daemon::start(config, listener).await?))
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Options {
        Options {
            node: "a".into(),
            namespace: "peersan".into(),
            csi_socket: None,
            secret_file: "/etc/peersan/peer-secret".into(),
            api_socket: "/run/peersan/api.sock".into(),
            nbd_socket: "/run/peersan/nbd.sock".into(),
            lease_duration: Duration::from_secs(40),
            status_interval: Duration::from_secs(2),
            csi_state_dir: None,
            fuse_dir: None,
        }
    }

    fn sannode(spec: serde_json::Value) -> SANNode {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "peersan.io/v1alpha1", "kind": "SANNode",
            "metadata": { "name": "a", "generation": 3 },
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn a_complete_spec_makes_the_configuration() {
        let sn = sannode(serde_json::json!({
            "virtualSAN": "san", "pool": { "path": "/var/lib/peersan" },
            "replicationAddress": "10.0.0.1:7700", "resyncRate": "50MiB",
            "peers": [{ "name": "b", "address": "10.0.0.2:7700" }, { "name": "a", "address": "10.0.0.1:7700" }],
        }));
        let c = spec_config(&sn, &opts()).unwrap();
        assert_eq!(c.listen.peer, "10.0.0.1:7700".parse().unwrap());
        assert_eq!(c.pool.path, PathBuf::from("/var/lib/peersan"));
        assert_eq!(c.resync.rate, ByteSize(50 << 20));
        assert_eq!(c.peers.len(), 1, "this node is not its own peer: {:?}", c.peers);
        assert_eq!((c.peers[0].name.as_str(), c.peers[0].address.as_str()), ("b", "10.0.0.2:7700"));
        assert!(c.csi.is_none());
        let v6 = sannode(serde_json::json!({
            "virtualSAN": "san", "pool": { "path": "/p" }, "replicationAddress": "[fd00::1]:7700",
        }));
        assert_eq!(spec_config(&v6, &opts()).unwrap().listen.peer, "[fd00::1]:7700".parse().unwrap());
    }

    #[test]
    fn specs_that_cannot_run_say_why() {
        let no_address = sannode(serde_json::json!({ "virtualSAN": "san", "pool": { "path": "/p" } }));
        assert_eq!(spec_config(&no_address, &opts()).unwrap_err().reason, "WaitingForAddress");
        let device = sannode(serde_json::json!({
            "virtualSAN": "san", "pool": { "device": "/dev/vdb" }, "replicationAddress": "10.0.0.1:7700",
        }));
        let e = spec_config(&device, &opts()).unwrap_err();
        assert_eq!(e.reason, "UnsupportedPool");
        assert!(e.message.contains("/dev/vdb"), "{}", e.message);
        let name = sannode(serde_json::json!({
            "virtualSAN": "san", "pool": { "path": "/p" }, "replicationAddress": "node-a.example:7700",
        }));
        assert_eq!(spec_config(&name, &opts()).unwrap_err().reason, "InvalidSpec");
        let rate = sannode(serde_json::json!({
            "virtualSAN": "san", "pool": { "path": "/p" }, "replicationAddress": "10.0.0.1:7700", "resyncRate": "fast",
        }));
        assert!(spec_config(&rate, &opts()).unwrap_err().message.contains("resyncRate"));
    }

    #[test]
    fn only_address_and_pool_changes_need_a_restart() {
        let base = serde_json::json!({
            "virtualSAN": "san", "pool": { "path": "/p" }, "replicationAddress": "10.0.0.1:7700",
            "peers": [{ "name": "b", "address": "10.0.0.2:7700" }],
        });
        let running = sannode(base.clone());
        let mut peers = base.clone();
        peers["peers"] = serde_json::json!([{ "name": "b", "address": "10.0.0.9:7700" }, { "name": "c", "address": "10.0.0.3:7700" }]);
        assert_eq!(restart_needed(&running, &sannode(peers)), None);
        let mut moved = base.clone();
        moved["replicationAddress"] = "10.0.0.5:7700".into();
        assert_eq!(restart_needed(&running, &sannode(moved)).unwrap().0, "replicationAddress");
        let mut pool = base;
        pool["pool"] = serde_json::json!({ "path": "/q" });
        assert_eq!(restart_needed(&running, &sannode(pool)).unwrap().0, "pool");
    }

    #[test]
    fn lease_durations_are_whole_seconds() {
        assert_eq!(parse_lease_duration("40s").unwrap(), Duration::from_secs(40));
        assert_eq!(parse_lease_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_lease_duration("500ms").is_err());
        assert!(parse_lease_duration("1500ms").is_err());
        assert!(parse_lease_duration("0s").is_err());
    }
}
