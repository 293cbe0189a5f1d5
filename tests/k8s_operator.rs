//! The operator (`peersan-operator`, a real process) against a real kube-apiserver (v1.20.2,
//! tests/k8s/harness.rs), with the node agents played by the test: it writes each SANNode's
//! status as an agent would (Ready for the generation it read, pool usage, interface
//! addresses), renews heartbeat Leases (2 s) from a task, and writes its replicas' entries
//! in MirrorVolume status.
//!
//! - `topology_per_link_mode`: members by selector and by name, SANNodes with replication
//!   addresses and peers for a Cluster link, a Dedicated link by interface (with a per-node
//!   interface) and one by CIDR, the StorageClass, Ready with `3/3`, a node joining and
//!   leaving by its label, specs the schema cannot refuse (3 replicas over 2 nodes, a node
//!   another VirtualSAN has) reported as InvalidSpec, a foreign StorageClass of the SAN's
//!   name left alone, probes and metrics, a clean exit on SIGTERM.
//! - `node_loss_failover_and_deletion`: a member's heartbeat stops → offline, its replica
//!   disconnected, the volume degraded, write priority moved to the lowest in-sync replica
//!   at a higher epoch with an Event; with no in-sync replica left online it stays and the
//!   volume says why; the member returns and resyncs → ready again; a member that
//!   leaves keeps its SANNode while it holds a replica; deleting the VirtualSAN waits for
//!   its volume (DeletionBlocked), then removes SANNodes and StorageClass.
//!
//! Where no API server can run, each test prints `SKIPPED` and why, and passes, unless `CI`
//! is set.

#[path = "k8s/harness.rs"]
mod k8s;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::future::Future;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s::ApiServer;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt, ResourceExt};
use peersan_crds::virtualsan::MemberState;
use peersan_crds::{Condition, ConditionStatus, MirrorVolume, SANNode, VirtualSAN, lease};
use serde_json::{Value, json};

const NAMESPACE: &str = "peersan-system";
const PEER_PORT: u16 = 7700;
/// How long any one expected state may take to appear.
const WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Environment: API server, CRDs, namespace, the operator process.

struct Env {
    client: Client,
    operator: Operator,
    server: ApiServer,
}

async fn start() -> Option<Env> {
    let server = match ApiServer::start() {
        Ok(server) => server,
        Err(reason) => {
            println!("SKIPPED: {reason}");
            return None;
        }
    };
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let out = server.kubectl().arg("apply").arg("-f").arg(&crds).output().expect("running kubectl");
    assert!(out.status.success(), "kubectl apply -f crds/: {}", String::from_utf8_lossy(&out.stderr));
    let client = server.client().await;
    let crd_api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [VirtualSAN::crd_name(), MirrorVolume::crd_name(), SANNode::crd_name()] {
        eventually(&format!("CRD {name} Established"), || {
            let crd_api = crd_api.clone();
            async move {
                let crd = crd_api.get(name).await.map_err(|e| e.to_string())?;
                let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
                conditions
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
                    .ok_or_else(|| format!("{conditions:?}"))
            }
        })
        .await;
    }
    let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": NAMESPACE } })).unwrap();
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("create namespace");
    let operator = Operator::start(&server.kubeconfig, "operator-1");
    Some(Env { client, operator, server })
}

/// The operator process, killed when dropped; its log is printed if the test fails (or
/// always, with `PEERSAN_OPERATOR_LOG=1`).
struct Operator {
    child: Child,
    log: PathBuf,
    http: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Operator {
    /// Starts `peersan-operator` with the leader election identity `identity`.
    fn start(kubeconfig: &Path, identity: &str) -> Operator {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("operator.log");
        let http = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let child = Command::new(env!("CARGO_BIN_EXE_peersan-operator"))
            .args(["--namespace", NAMESPACE, "--peer-port", &PEER_PORT.to_string(), "--log", "info,kube=warn"])
            .arg(format!("--health-addr={http}"))
            .arg(format!("--metrics-addr={http}"))
            .env("KUBECONFIG", kubeconfig)
            .env_remove("POD_NAMESPACE")
            .env("POD_NAME", identity)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("starting peersan-operator");
        Operator { child, log, http, _dir: dir }
    }

    /// `GET path` on the operator's HTTP endpoint: status code and body.
    fn get(&self, path: &str) -> Result<(u16, String), String> {
        let mut s = std::net::TcpStream::connect(self.http).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
        let mut response = String::new();
        s.read_to_string(&mut response).map_err(|e| e.to_string())?;
        let code = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or("no status line")?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Ok((code, body))
    }
}

impl Operator {
    /// Sends SIGTERM and returns the exit status, failing if the process has not exited
    /// within `limit`.
    fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("running kill");
        assert!(sent.success(), "kill -TERM {pid}: {sent}");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the operator") {
                return status;
            }
            assert!(Instant::now() < deadline, "the operator did not exit within {limit:?} of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let all = std::env::var_os("PEERSAN_OPERATOR_LOG").is_some();
        if std::thread::panicking() || all {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines = if all { usize::MAX } else { 80 };
            let tail: Vec<&str> = log.lines().rev().take(lines).collect();
            eprintln!("--- operator log ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Polls `f` every 100 ms until it returns `Ok`, failing after [`WAIT`] with what was
/// expected and what was seen last.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(seen) if Instant::now() > deadline => panic!("expected {what} within {WAIT:?}; last seen: {seen}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn get<K>(api: &Api<K>, name: &str) -> Result<K, String>
where
    K: Clone + serde::de::DeserializeOwned + Debug,
{
    api.get_opt(name).await.map_err(|e| e.to_string())?.ok_or_else(|| format!("{name} does not exist"))
}

// ---------------------------------------------------------------------------------------
// Objects.

async fn create_node(client: &Client, name: &str, ip: &str, labels: &[(&str, &str)]) {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let node: Node = serde_json::from_value(json!({
        "metadata": { "name": name, "labels": labels },
        "status": { "addresses": [
            { "type": "Hostname", "address": name },
            { "type": "InternalIP", "address": ip },
        ] },
    }))
    .unwrap();
    let api = Api::<Node>::all(client.clone());
    let created = api.create(&PostParams::default(), &node).await.expect("create Node");
    // Status set at creation is kept for Nodes; write it again where it was not.
    if created.status.as_ref().and_then(|s| s.addresses.as_ref()).is_none_or(|a| a.is_empty()) {
        let patch = json!({ "status": node.status });
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("Node status");
    }
}

async fn create_vsan(client: &Client, name: &str, spec: Value) {
    let vsan: VirtualSAN = serde_json::from_value(json!({
        "apiVersion": "peersan.io/v1alpha1", "kind": "VirtualSAN",
        "metadata": { "name": name }, "spec": spec,
    }))
    .unwrap();
    Api::<VirtualSAN>::all(client.clone()).create(&PostParams::default(), &vsan).await.expect("create VirtualSAN");
}

fn condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Waits until VirtualSAN `name`'s status passes `check` (which says what it saw otherwise).
async fn wait_vsan(
    client: &Client,
    name: &str,
    what: &str,
    check: impl Fn(&VirtualSAN) -> Result<(), String>,
) -> VirtualSAN {
    let api = Api::<VirtualSAN>::all(client.clone());
    eventually(&format!("VirtualSAN {name}: {what}"), || {
        let api = api.clone();
        let check = &check;
        async move {
            let v = get(&api, name).await?;
            check(&v).map_err(|e| format!("{e}; status: {}", serde_json::to_string(&v.status).unwrap()))?;
            Ok(v)
        }
    })
    .await
}

fn ready_is(v: &VirtualSAN, status: ConditionStatus, reason: &str) -> Result<(), String> {
    let st = v.status.as_ref().ok_or("no status")?;
    let c = condition(&st.conditions, "Ready").ok_or("no Ready condition")?;
    if c.status != status || c.reason != reason {
        return Err(format!("Ready is {:?}/{}", c.status, c.reason));
    }
    if c.observed_generation != v.metadata.generation || st.observed_generation != v.metadata.generation {
        return Err("status is not for the current generation".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The node agents' part.

/// What the simulated agents do: which nodes renew their heartbeat, and which addresses each
/// reports.
#[derive(Default)]
struct Agents {
    alive: BTreeSet<String>,
    addresses: BTreeMap<String, Vec<(String, String)>>,
}

type SharedAgents = Arc<Mutex<Agents>>;

/// Plays the agents of the nodes in `agents`: one task renews the heartbeat Leases of the
/// live nodes every 250 ms (duration 2 s), all at once so that a slow request cannot let
/// another node's heartbeat lapse; another reports, every 250 ms, the status of every
/// SANNode of a live node whose spec generation it has not reported yet: Ready when its
/// replication address is set (else WaitingForAddress), pool usage, interface addresses.
fn spawn_agents(client: Client, agents: SharedAgents) -> (AbortOnDrop, AbortOnDrop) {
    let heartbeats = {
        let agents = agents.clone();
        let leases = Api::<Lease>::namespaced(client.clone(), NAMESPACE);
        tokio::spawn(async move {
            loop {
                let alive = agents.lock().unwrap().alive.clone();
                let renewals = alive.iter().map(|node| {
                    let leases = leases.clone();
                    async move {
                        let name = lease::node_lease_name(node).unwrap();
                        let now = MicroTime(Timestamp::now());
                        let patch = json!({
                            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                            "metadata": { "name": name },
                            "spec": { "holderIdentity": node, "leaseDurationSeconds": 2, "renewTime": now },
                        });
                        let params = PatchParams::apply("peersan-node-agent").force();
                        if let Err(e) = leases.patch(&name, &params, &Patch::Apply(&patch)).await {
                            eprintln!("heartbeat of {node}: {e}");
                        }
                    }
                });
                futures::future::join_all(renewals).await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let reports = tokio::spawn(async move {
        let san_nodes = Api::<SANNode>::all(client.clone());
        let mut reported: BTreeMap<String, (i64, bool)> = BTreeMap::new();
        loop {
            let (alive, addresses) = {
                let a = agents.lock().unwrap();
                (a.alive.clone(), a.addresses.clone())
            };
            if let Ok(list) = san_nodes.list(&ListParams::default()).await {
                for sn in list.items {
                    let node = sn.name_any();
                    let generation = sn.metadata.generation.unwrap_or(0);
                    let has_address = sn.spec.replication_address.is_some();
                    let observed = sn.status.as_ref().and_then(|s| s.observed_generation);
                    if !alive.contains(&node)
                        || (observed == Some(generation) && reported.get(&node) == Some(&(generation, has_address)))
                    {
                        continue;
                    }
                    let mut ifaces: Vec<Value> = vec![json!({ "interface": "lo", "ip": "127.0.0.1" })];
                    for (interface, ip) in addresses.get(&node).into_iter().flatten() {
                        ifaces.push(json!({ "interface": interface, "ip": ip }));
                    }
                    let (status, reason) =
                        if has_address { ("True", "Running") } else { ("False", "WaitingForAddress") };
                    let patch = json!({
                        "apiVersion": "peersan.io/v1alpha1", "kind": "SANNode",
                        "status": {
                            "observedGeneration": generation,
                            "addresses": ifaces,
                            "pool": { "capacityBytes": 10_737_418_240_i64, "allocatedBytes": 0, "freeBytes": 10_737_418_240_i64 },
                            "agentVersion": "test",
                            "conditions": [{ "type": "Ready", "status": status, "reason": reason, "message": "",
                                "lastTransitionTime": Timestamp::from_second(Timestamp::now().as_second()).unwrap(),
                                "observedGeneration": generation }],
                        },
                    });
                    let params = PatchParams::apply("peersan-node-agent").force();
                    match san_nodes.patch_status(&node, &params, &Patch::Apply(&patch)).await {
                        Ok(_) => {
                            reported.insert(node, (generation, has_address));
                        }
                        Err(e) => eprintln!("SANNode status of {node}: {e}"),
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    (AbortOnDrop(heartbeats), AbortOnDrop(reports))
}

/// An agent's entry in a MirrorVolume's status.replicas (its own field manager, force).
async fn write_replica(client: &Client, volume: &str, node: &str, entry: Value) {
    let mut entry = entry;
    entry["node"] = json!(node);
    let patch = json!({
        "apiVersion": "peersan.io/v1alpha1", "kind": "MirrorVolume",
        "status": { "replicas": [entry] },
    });
    let params = PatchParams::apply(&format!("peersan-node-agent-{node}")).force();
    Api::<MirrorVolume>::all(client.clone())
        .patch_status(volume, &params, &Patch::Apply(&patch))
        .await
        .unwrap_or_else(|e| panic!("replica entry of {node} in {volume}: {e}"));
}

async fn events(client: &Client, reason: &str, regarding: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), "kube-system")
        .list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(regarding))
        .collect()
}

async fn wait_event(client: &Client, reason: &str, regarding: &str) -> Event {
    eventually(&format!("an Event {reason} about {regarding}"), || async {
        let found = events(client, reason, regarding).await;
        found.into_iter().next().ok_or_else(|| "none".to_owned())
    })
    .await
}

fn peers(sn: &SANNode) -> Vec<(String, String)> {
    sn.spec.peers.iter().map(|p| (p.name.clone(), p.address.clone())).collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
}

// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn topology_per_link_mode() {
    let Some(env) = start().await else { return };
    let client = env.client.clone();
    let agents: SharedAgents = Arc::default();
    let _agents_tasks = spawn_agents(client.clone(), agents.clone());

    // Cluster link, members by label: n1..n3; n4 is not labelled.
    for (i, n) in ["n1", "n2", "n3"].iter().enumerate() {
        create_node(&client, n, &format!("127.0.0.{}", 11 + i), &[("peersan.io/san", "alpha")]).await;
    }
    create_node(&client, "n4", "127.0.0.14", &[]).await;
    // Dedicated link by interface (d2's is named differently), and by CIDR.
    for (n, ip) in [
        ("d1", "127.0.0.21"),
        ("d2", "127.0.0.22"),
        ("c1", "127.0.0.31"),
        ("c2", "127.0.0.32"),
        ("x1", "127.0.0.51"),
        ("x2", "127.0.0.52"),
    ] {
        create_node(&client, n, ip, &[]).await;
    }
    {
        let mut a = agents.lock().unwrap();
        for n in ["n1", "n2", "n3", "n4", "d1", "d2", "c1", "c2", "x1", "x2"] {
            a.alive.insert(n.to_owned());
        }
        a.addresses.insert("d1".into(), pairs(&[("eth0", "127.0.0.21"), ("eth1", "127.0.1.21")]));
        a.addresses
            .insert("d2".into(), pairs(&[("eth0", "127.0.0.22"), ("eth1", "127.0.2.22"), ("ens5", "127.0.1.22")]));
        a.addresses.insert("c1".into(), pairs(&[("eth0", "127.0.0.31"), ("eth2", "127.0.3.31")]));
        a.addresses.insert("c2".into(), pairs(&[("eth0", "127.0.0.32"), ("eth2", "127.0.3.32")]));
    }

    create_vsan(
        &client,
        "alpha",
        json!({
            "nodes": { "selector": { "matchLabels": { "peersan.io/san": "alpha" } } },
            "pool": { "path": "/var/lib/peersan" }, "replicas": 3,
        }),
    )
    .await;
    create_vsan(
        &client,
        "delta",
        json!({
            "nodes": { "names": ["d1", "d2"] },
            "pool": { "path": "/var/lib/peersan" },
            "nodePools": [{ "node": "d2", "pool": { "device": "/dev/vdb" } }],
            "replicationLink": { "mode": "Dedicated", "interface": "eth1",
                "nodeInterfaces": [{ "node": "d2", "interface": "ens5" }] },
        }),
    )
    .await;
    create_vsan(
        &client,
        "gamma",
        json!({
            "nodes": { "names": ["c1", "c2"] },
            "pool": { "path": "/srv/peersan" },
            "replicationLink": { "mode": "Dedicated", "cidr": "127.0.3.0/24" },
            "resyncRate": "10MiB", "degradedWrites": "Refuse",
        }),
    )
    .await;
    // Three replicas over two nodes: the schema cannot tell.
    create_vsan(
        &client,
        "bad",
        json!({
            "nodes": { "names": ["x1", "x2"] }, "pool": { "path": "/var/lib/peersan" }, "replicas": 3,
        }),
    )
    .await;

    // Cluster link: InternalIP:port, every other member as a peer.
    let v = wait_vsan(&client, "alpha", "Ready with 3/3 nodes", |v| {
        ready_is(v, ConditionStatus::True, "AllNodesReady")?;
        let st = v.status.as_ref().unwrap();
        (st.ready_nodes.as_deref() == Some("3/3")).then_some(()).ok_or("readyNodes".into())
    })
    .await;
    let st = v.status.unwrap();
    assert_eq!(st.storage_class.as_deref(), Some("alpha"));
    assert_eq!(st.volumes, Some(0));
    let addrs: Vec<(String, Option<String>, MemberState)> =
        st.nodes.iter().map(|n| (n.name.clone(), n.address.clone(), n.state)).collect();
    assert_eq!(
        addrs,
        [
            ("n1".into(), Some("127.0.0.11:7700".into()), MemberState::Ready),
            ("n2".into(), Some("127.0.0.12:7700".into()), MemberState::Ready),
            ("n3".into(), Some("127.0.0.13:7700".into()), MemberState::Ready),
        ]
    );
    assert!(st.nodes.iter().all(|n| n.capacity_bytes == Some(10_737_418_240)));
    for c in ["Degraded", "Resyncing", "SplitBrain"] {
        let c = condition(&st.conditions, c).unwrap_or_else(|| panic!("no {c} condition: {st:?}"));
        assert_eq!(c.status, ConditionStatus::False, "{c:?}");
    }
    let san_nodes = Api::<SANNode>::all(client.clone());
    let n1 = get(&san_nodes, "n1").await.unwrap();
    assert_eq!(n1.spec.virtual_san, "alpha");
    assert_eq!(n1.spec.replication_address.as_deref(), Some("127.0.0.11:7700"));
    assert_eq!(peers(&n1), pairs(&[("n2", "127.0.0.12:7700"), ("n3", "127.0.0.13:7700")]));
    assert_eq!(serde_json::to_value(&n1.spec.pool).unwrap(), json!({ "path": "/var/lib/peersan" }));
    let owner = n1.owner_references().first().expect("owner reference");
    assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("VirtualSAN", "alpha", Some(true)));
    assert!(san_nodes.get_opt("n4").await.unwrap().is_none(), "n4 is not a member");

    let sc = get(&Api::<StorageClass>::all(client.clone()), "alpha").await.unwrap();
    assert_eq!(sc.provisioner, "csi.peersan.io");
    assert_eq!(
        sc.parameters,
        Some(BTreeMap::from([("virtualSAN".to_owned(), "alpha".to_owned()), ("replicas".to_owned(), "3".to_owned())]))
    );
    assert_eq!(sc.allow_volume_expansion, Some(true));
    assert_eq!(sc.volume_binding_mode.as_deref(), Some("WaitForFirstConsumer"));
    assert_eq!(sc.reclaim_policy.as_deref(), Some("Delete"));
    assert_eq!(sc.labels().get("app.kubernetes.io/managed-by").map(String::as_str), Some("peersan-operator"));

    // Dedicated by interface: eth1 on d1, ens5 on d2 (not its eth1, not the InternalIP).
    wait_vsan(&client, "delta", "Ready", |v| ready_is(v, ConditionStatus::True, "AllNodesReady")).await;
    let d1 = get(&san_nodes, "d1").await.unwrap();
    let d2 = get(&san_nodes, "d2").await.unwrap();
    assert_eq!(d1.spec.replication_address.as_deref(), Some("127.0.1.21:7700"));
    assert_eq!(d2.spec.replication_address.as_deref(), Some("127.0.1.22:7700"));
    assert_eq!(peers(&d1), pairs(&[("d2", "127.0.1.22:7700")]));
    assert_eq!(peers(&d2), pairs(&[("d1", "127.0.1.21:7700")]));
    assert_eq!(serde_json::to_value(&d2.spec.pool).unwrap(), json!({ "device": "/dev/vdb" }));
    assert_eq!(serde_json::to_value(&d1.spec.pool).unwrap(), json!({ "path": "/var/lib/peersan" }));

    // Dedicated by CIDR.
    wait_vsan(&client, "gamma", "Ready", |v| ready_is(v, ConditionStatus::True, "AllNodesReady")).await;
    let c1 = get(&san_nodes, "c1").await.unwrap();
    assert_eq!(c1.spec.replication_address.as_deref(), Some("127.0.3.31:7700"));
    assert_eq!(peers(&c1), pairs(&[("c2", "127.0.3.32:7700")]));
    assert_eq!(c1.spec.resync_rate, "10MiB");
    assert_eq!(serde_json::to_value(c1.spec.degraded_writes).unwrap(), json!("Refuse"));

    // Invalid: Ready False with the reason and what is wrong; no StorageClass.
    let bad =
        wait_vsan(&client, "bad", "Ready False InvalidSpec", |v| ready_is(v, ConditionStatus::False, "InvalidSpec"))
            .await;
    let message = &condition(&bad.status.as_ref().unwrap().conditions, "Ready").unwrap().message;
    assert!(message.contains("spec.replicas is 3 but the SAN has 2 member node(s) (x1, x2)"), "{message}");
    assert!(get(&Api::<StorageClass>::all(client.clone()), "bad").await.is_err(), "an invalid SAN has no StorageClass");

    // A VirtualSAN naming a node another one has: InvalidSpec; that node's SANNode stays
    // with its SAN, the other members are configured.
    create_node(&client, "z1", "127.0.0.61", &[]).await;
    agents.lock().unwrap().alive.insert("z1".to_owned());
    create_vsan(
        &client,
        "zeta",
        json!({ "nodes": { "names": ["n1", "z1", "ghost"] }, "pool": { "path": "/var/lib/peersan" } }),
    )
    .await;
    let zeta =
        wait_vsan(&client, "zeta", "Ready False InvalidSpec", |v| ready_is(v, ConditionStatus::False, "InvalidSpec"))
            .await;
    let message = &condition(&zeta.status.as_ref().unwrap().conditions, "Ready").unwrap().message;
    assert!(message.contains("node n1 is already a member of VirtualSAN alpha"), "{message}");
    // A named node without a Node object is a pending member, and the message says why.
    assert!(message.contains("node ghost has no Node object"), "{message}");
    let ghost = zeta.status.as_ref().unwrap().nodes.iter().find(|n| n.name == "ghost").cloned();
    assert_eq!(ghost.map(|g| (g.state, g.address)), Some((MemberState::Pending, None)));
    let z1 = eventually("SANNode z1 of zeta", || async { get(&san_nodes, "z1").await }).await;
    assert_eq!(z1.spec.virtual_san, "zeta");
    assert_eq!(get(&san_nodes, "n1").await.unwrap().spec.virtual_san, "alpha");

    // A StorageClass of the SAN's name that the operator did not make is left alone.
    let foreign: StorageClass = serde_json::from_value(json!({
        "metadata": { "name": "eta" }, "provisioner": "example.com/other", "parameters": { "x": "y" },
    }))
    .unwrap();
    Api::<StorageClass>::all(client.clone()).create(&PostParams::default(), &foreign).await.unwrap();
    create_node(&client, "e1", "127.0.0.71", &[]).await;
    create_node(&client, "e2", "127.0.0.72", &[]).await;
    {
        let mut a = agents.lock().unwrap();
        a.alive.insert("e1".to_owned());
        a.alive.insert("e2".to_owned());
    }
    create_vsan(&client, "eta", json!({ "nodes": { "names": ["e1", "e2"] }, "pool": { "path": "/var/lib/peersan" } }))
        .await;
    wait_vsan(&client, "eta", "Ready False StorageClassConflict", |v| {
        ready_is(v, ConditionStatus::False, "StorageClassConflict")
    })
    .await;
    let sc = get(&Api::<StorageClass>::all(client.clone()), "eta").await.unwrap();
    assert_eq!(sc.provisioner, "example.com/other", "the foreign StorageClass is untouched");

    // A node joins by its label, and leaves again (no volume there: its SANNode goes).
    let nodes = Api::<Node>::all(client.clone());
    let label = |v: Option<&str>| json!({ "metadata": { "labels": { "peersan.io/san": v } } });
    nodes.patch("n4", &PatchParams::default(), &Patch::Merge(&label(Some("alpha")))).await.unwrap();
    wait_vsan(&client, "alpha", "Ready with 4/4 nodes", |v| {
        ready_is(v, ConditionStatus::True, "AllNodesReady")?;
        let rn = v.status.as_ref().unwrap().ready_nodes.clone();
        (rn.as_deref() == Some("4/4")).then_some(()).ok_or(format!("readyNodes {rn:?}"))
    })
    .await;
    let n1 = get(&san_nodes, "n1").await.unwrap();
    assert!(peers(&n1).contains(&("n4".into(), "127.0.0.14:7700".into())), "{:?}", peers(&n1));
    wait_event(&client, "NodeJoined", "alpha").await;
    let joined: Vec<String> = events(&client, "NodeJoined", "alpha").await.into_iter().filter_map(|e| e.note).collect();
    for n in ["n1", "n2", "n3"] {
        let note = format!("node {n} joined");
        assert_eq!(joined.iter().filter(|j| **j == note).count(), 1, "one Event per transition: {joined:?}");
    }
    nodes.patch("n4", &PatchParams::default(), &Patch::Merge(&label(None))).await.unwrap();
    eventually("SANNode n4 deleted after n4 left", || async {
        match san_nodes.get_opt("n4").await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    wait_vsan(&client, "alpha", "3/3 again", |v| {
        let rn = v.status.as_ref().and_then(|s| s.ready_nodes.clone());
        (rn.as_deref() == Some("3/3")).then_some(()).ok_or(format!("readyNodes {rn:?}"))
    })
    .await;

    // Probes and metrics.
    let (code, _) = env.operator.get("/healthz").unwrap();
    assert_eq!(code, 200);
    let (code, _) = env.operator.get("/readyz").unwrap();
    assert_eq!(code, 200);
    let (code, metrics) = env.operator.get("/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("peersan_operator_reconciles_total"), "{metrics}");
    assert!(metrics.contains("peersan_operator_reconcile_errors_total{kind=\"invalid_spec\"}"), "{metrics}");

    // Leader election: a second operator stands by (ready, not leading) while the first
    // holds the Lease.
    let mut env = env;
    let election = Api::<Lease>::namespaced(client.clone(), NAMESPACE);
    let holder = || async {
        let l = get(&election, "peersan-operator").await?;
        Ok::<_, String>(l.spec.and_then(|s| s.holder_identity).unwrap_or_default())
    };
    assert_eq!(holder().await.unwrap(), "operator-1");
    let mut second = Operator::start(&env.server.kubeconfig, "operator-2");
    eventually("the standby operator ready", || async {
        let (code, _) = second.get("/readyz")?;
        (code == 200).then_some(()).ok_or(format!("/readyz {code}"))
    })
    .await;
    assert_eq!(holder().await.unwrap(), "operator-1", "the standby must not take a held Lease");

    // SIGTERM: a clean exit well before the grace period, releasing the Lease, which the
    // standby takes and then reconciles.
    let status = env.operator.terminate(Duration::from_secs(8));
    assert!(status.success(), "operator exit status after SIGTERM: {status}");
    eventually("operator-2 leading", || async {
        let h = holder().await?;
        (h == "operator-2").then_some(()).ok_or(h)
    })
    .await;
    nodes.patch("n4", &PatchParams::default(), &Patch::Merge(&label(Some("alpha")))).await.unwrap();
    wait_vsan(&client, "alpha", "4/4 nodes under the new leader", |v| {
        let rn = v.status.as_ref().and_then(|s| s.ready_nodes.clone());
        (rn.as_deref() == Some("4/4")).then_some(()).ok_or(format!("readyNodes {rn:?}"))
    })
    .await;
    let status = second.terminate(Duration::from_secs(8));
    assert!(status.success(), "second operator exit status after SIGTERM: {status}");
}

#[tokio::test]
async fn node_loss_failover_and_deletion() {
    let Some(env) = start().await else { return };
    let client = env.client.clone();
    let agents: SharedAgents = Arc::default();
    let _agents_tasks = spawn_agents(client.clone(), agents.clone());
    for (n, ip) in [("a", "127.0.0.41"), ("b", "127.0.0.42"), ("c", "127.0.0.43")] {
        create_node(&client, n, ip, &[]).await;
        agents.lock().unwrap().alive.insert(n.to_owned());
    }
    create_vsan(
        &client,
        "beta",
        json!({
            "nodes": { "names": ["a", "b", "c"] }, "pool": { "path": "/var/lib/peersan" }, "replicas": 3,
        }),
    )
    .await;
    wait_vsan(&client, "beta", "Ready", |v| ready_is(v, ConditionStatus::True, "AllNodesReady")).await;

    // A volume as the CSI controller creates it: its write-priority Lease (holder a, epoch 1)
    // first, then the MirrorVolume; then its replicas as the agents report them.
    let leases = Api::<Lease>::namespaced(client.clone(), NAMESPACE);
    let vol_lease: Lease = serde_json::from_value(json!({
        "metadata": { "name": "peersan-vol-pvc-1", "annotations": { "peersan.io/epoch": "1" } },
        "spec": { "holderIdentity": "a", "leaseTransitions": 0 },
    }))
    .unwrap();
    leases.create(&PostParams::default(), &vol_lease).await.expect("create volume Lease");
    let volumes = Api::<MirrorVolume>::all(client.clone());
    let volume: MirrorVolume = serde_json::from_value(json!({
        "apiVersion": "peersan.io/v1alpha1", "kind": "MirrorVolume",
        "metadata": { "name": "pvc-1" },
        "spec": { "virtualSAN": "beta", "sizeBytes": 1_048_576, "replicas": ["a", "b", "c"] },
    }))
    .unwrap();
    volumes.create(&PostParams::default(), &volume).await.expect("create MirrorVolume");
    let in_sync = |epoch: i64, writer: &str| json!({ "state": "in-sync", "outOfSyncBytes": 0, "sizeBytes": 1_048_576, "epoch": epoch, "writer": writer });
    for n in ["a", "b", "c"] {
        write_replica(&client, "pvc-1", n, in_sync(1, "a")).await;
    }
    let healthy = eventually("pvc-1 healthy, writer a at epoch 1", || async {
        let v = get(&volumes, "pvc-1").await?;
        let st = v.status.clone().unwrap_or_default();
        let ok = serde_json::to_value(st.health).unwrap() == json!("healthy")
            && st.writer.as_deref() == Some("a")
            && st.epoch == Some(1)
            && st.observed_generation == v.metadata.generation
            && condition(&st.conditions, "Ready").is_some_and(|c| c.status == ConditionStatus::True);
        ok.then_some(v).ok_or_else(|| format!("{st:?}"))
    })
    .await;
    assert_eq!(healthy.status.unwrap().replicas.len(), 3, "the operator keeps the agents' entries");
    wait_vsan(&client, "beta", "1 volume", |v| {
        (v.status.as_ref().and_then(|s| s.volumes) == Some(1)).then_some(()).ok_or("volumes".into())
    })
    .await;

    // a's heartbeat stops.
    agents.lock().unwrap().alive.remove("a");
    wait_vsan(&client, "beta", "a offline, Degraded True, Ready False", |v| {
        let st = v.status.as_ref().ok_or("no status")?;
        let a = st.nodes.iter().find(|n| n.name == "a").ok_or("no node a")?;
        if a.state != MemberState::Offline {
            return Err(format!("a is {:?}", a.state));
        }
        let degraded = condition(&st.conditions, "Degraded").ok_or("no Degraded")?;
        if degraded.status != ConditionStatus::True {
            return Err("Degraded is not True".into());
        }
        ready_is(v, ConditionStatus::False, "NodesNotReady")?;
        (st.ready_nodes.as_deref() == Some("2/3")).then_some(()).ok_or("readyNodes".into())
    })
    .await;
    let moved = eventually("the volume Lease moved to b at epoch 2", || async {
        let l = get(&leases, "peersan-vol-pvc-1").await?;
        let spec = l.spec.clone().unwrap_or_default();
        let epoch = l.annotations().get("peersan.io/epoch").cloned();
        (spec.holder_identity.as_deref() == Some("b") && epoch.as_deref() == Some("2"))
            .then_some(l.clone())
            .ok_or_else(|| format!("holder {:?} epoch {epoch:?}", spec.holder_identity))
    })
    .await;
    assert_eq!(moved.spec.unwrap().lease_transitions, Some(1));
    let degraded = eventually("pvc-1 degraded, a disconnected, writer b at epoch 2", || async {
        let v = get(&volumes, "pvc-1").await?;
        let st = v.status.clone().unwrap_or_default();
        let a = st.replicas.iter().find(|r| r.node == "a").ok_or("no entry a")?;
        let ok = serde_json::to_value(st.health).unwrap() == json!("degraded")
            && serde_json::to_value(a.state).unwrap() == json!("disconnected")
            && st.writer.as_deref() == Some("b")
            && st.epoch == Some(2);
        ok.then_some(st.clone()).ok_or_else(|| format!("{st:?}"))
    })
    .await;
    assert_eq!(
        degraded.replicas.iter().filter(|r| serde_json::to_value(r.state).unwrap() == json!("in-sync")).count(),
        2,
        "{degraded:?}"
    );
    let event = wait_event(&client, "WritePriorityMoved", "pvc-1").await;
    assert_eq!(events(&client, "WritePriorityMoved", "pvc-1").await.len(), 1, "one move, one Event");
    let note = event.note.unwrap_or_default();
    assert!(note.contains("from a") && note.contains("to b") && note.contains("epoch 2"), "{note}");
    wait_event(&client, "NodeOffline", "beta").await;
    wait_event(&client, "VolumeDegraded", "pvc-1").await;
    let (_, metrics) = env.operator.get("/metrics").unwrap();
    assert!(metrics.lines().any(|l| l == "peersan_operator_failovers_total 1"), "{metrics}");
    assert!(metrics.lines().any(|l| l == "peersan_operator_nodes_offline{virtualsan=\"beta\"} 1"), "{metrics}");

    // c goes, then b: no in-sync replica on an online node is left, so write priority stays
    // with b and the volume says why. (c first, so that b's expiry finds no candidate.)
    agents.lock().unwrap().alive.remove("c");
    wait_vsan(&client, "beta", "c offline", |v| {
        let st = v.status.as_ref().ok_or("no status")?;
        let c = st.nodes.iter().find(|n| n.name == "c").ok_or("no node c")?;
        (c.state == MemberState::Offline).then_some(()).ok_or(format!("c is {:?}", c.state))
    })
    .await;
    agents.lock().unwrap().alive.remove("b");
    let stuck = eventually("pvc-1 unavailable, Ready False WriterOffline", || async {
        let v = get(&volumes, "pvc-1").await?;
        let st = v.status.clone().unwrap_or_default();
        let ready = condition(&st.conditions, "Ready").ok_or("no Ready")?;
        let ok = serde_json::to_value(st.health).unwrap() == json!("unavailable") && ready.reason == "WriterOffline";
        ok.then_some(ready.message.clone()).ok_or_else(|| format!("{st:?}"))
    })
    .await;
    assert!(stuck.contains("holder b is offline") && stuck.contains("the Lease stays with b"), "{stuck}");
    let l = get(&leases, "peersan-vol-pvc-1").await.unwrap();
    assert_eq!(l.spec.unwrap().holder_identity.as_deref(), Some("b"));
    assert_eq!(l.metadata.annotations.unwrap().get("peersan.io/epoch").map(String::as_str), Some("2"));
    // b and c return and take their entries back.
    {
        let mut a = agents.lock().unwrap();
        a.alive.insert("b".to_owned());
        a.alive.insert("c".to_owned());
    }
    for n in ["b", "c"] {
        write_replica(&client, "pvc-1", n, in_sync(2, "b")).await;
    }
    eventually("pvc-1 degraded again (a still away), writer b", || async {
        let st = get(&volumes, "pvc-1").await?.status.unwrap_or_default();
        let ok = serde_json::to_value(st.health).unwrap() == json!("degraded") && st.writer.as_deref() == Some("b");
        ok.then_some(()).ok_or_else(|| format!("{st:?}"))
    })
    .await;

    // a returns: its agent takes its entry back, catches up, then is in sync.
    agents.lock().unwrap().alive.insert("a".to_owned());
    write_replica(
        &client,
        "pvc-1",
        "a",
        json!({ "state": "catching-up", "outOfSyncBytes": 4096,
        "resyncDoneBytes": 0, "resyncTotalBytes": 4096, "sizeBytes": 1_048_576, "epoch": 2, "writer": "b" }),
    )
    .await;
    wait_vsan(&client, "beta", "a online again, Ready, Resyncing", |v| {
        ready_is(v, ConditionStatus::True, "AllNodesReady")?;
        let st = v.status.as_ref().unwrap();
        let resyncing = condition(&st.conditions, "Resyncing").ok_or("no Resyncing")?;
        (resyncing.status == ConditionStatus::True).then_some(()).ok_or("not resyncing".into())
    })
    .await;
    wait_event(&client, "NodeOnline", "beta").await;
    write_replica(&client, "pvc-1", "a", in_sync(2, "b")).await;
    wait_vsan(&client, "beta", "Degraded False, Resyncing False", |v| {
        ready_is(v, ConditionStatus::True, "AllNodesReady")?;
        let st = v.status.as_ref().unwrap();
        for c in ["Degraded", "Resyncing"] {
            if condition(&st.conditions, c).is_none_or(|c| c.status != ConditionStatus::False) {
                return Err(format!("{c} is not False"));
            }
        }
        Ok(())
    })
    .await;
    wait_event(&client, "ResyncDone", "pvc-1").await;
    let l = get(&leases, "peersan-vol-pvc-1").await.unwrap();
    assert_eq!(l.spec.unwrap().holder_identity.as_deref(), Some("b"), "write priority does not move back by itself");

    // c leaves the SAN (and the SAN drops to 2 replicas): its SANNode stays while pvc-1 has
    // a replica there, and the StorageClass is made again with the new parameters.
    let vsans = Api::<VirtualSAN>::all(client.clone());
    let san_nodes = Api::<SANNode>::all(client.clone());
    let shrink = json!({ "spec": { "nodes": { "names": ["a", "b"] }, "replicas": 2 } });
    vsans.patch("beta", &PatchParams::default(), &Patch::Merge(&shrink)).await.expect("shrink beta");
    let shrunk = wait_vsan(&client, "beta", "2/2 nodes, SANNode c kept", |v| {
        ready_is(v, ConditionStatus::True, "AllNodesReady")?;
        let st = v.status.as_ref().unwrap();
        let message = &condition(&st.conditions, "Ready").unwrap().message;
        (st.ready_nodes.as_deref() == Some("2/2") && message.contains("SANNode c is kept"))
            .then_some(())
            .ok_or(format!("readyNodes {:?}, message {message:?}", st.ready_nodes))
    })
    .await;
    let message = &condition(&shrunk.status.as_ref().unwrap().conditions, "Ready").unwrap().message;
    assert!(message.contains("volume(s) pvc-1 still have a replica there"), "{message}");
    let c = get(&san_nodes, "c").await.expect("SANNode c is kept");
    assert_eq!(c.spec.virtual_san, "beta");
    let classes = Api::<StorageClass>::all(client.clone());
    eventually("StorageClass beta with replicas 2", || async {
        let sc = get(&classes, "beta").await?;
        let replicas = sc.parameters.as_ref().and_then(|p| p.get("replicas")).cloned();
        (replicas.as_deref() == Some("2")).then_some(()).ok_or(format!("replicas {replicas:?}"))
    })
    .await;

    // Deleting the VirtualSAN waits for its volume.
    vsans.delete("beta", &DeleteParams::default()).await.expect("delete VirtualSAN");
    let blocked = wait_vsan(&client, "beta", "Ready False DeletionBlocked", |v| {
        let st = v.status.as_ref().ok_or("no status")?;
        let c = condition(&st.conditions, "Ready").ok_or("no Ready")?;
        (c.status == ConditionStatus::False && c.reason == "DeletionBlocked").then_some(()).ok_or("not blocked".into())
    })
    .await;
    assert!(blocked.metadata.deletion_timestamp.is_some());
    let message = &condition(&blocked.status.as_ref().unwrap().conditions, "Ready").unwrap().message;
    assert_eq!(message, "1 volume(s) still exist (pvc-1): delete their PersistentVolumeClaims first");
    wait_event(&client, "DeletionBlocked", "beta").await;
    for n in ["a", "b", "c"] {
        assert!(get(&san_nodes, n).await.is_ok(), "SANNode {n} must stay while the volume exists");
    }

    volumes.delete("pvc-1", &DeleteParams::default()).await.expect("delete MirrorVolume");
    eventually("VirtualSAN beta, its SANNodes and StorageClass gone", || async {
        let mut left = Vec::new();
        if vsans.get_opt("beta").await.map_err(|e| e.to_string())?.is_some() {
            left.push("VirtualSAN beta".to_owned());
        }
        for n in ["a", "b", "c"] {
            if san_nodes.get_opt(n).await.map_err(|e| e.to_string())?.is_some() {
                left.push(format!("SANNode {n}"));
            }
        }
        if Api::<StorageClass>::all(client.clone()).get_opt("beta").await.map_err(|e| e.to_string())?.is_some() {
            left.push("StorageClass beta".to_owned());
        }
        left.is_empty().then_some(()).ok_or_else(|| left.join(", "))
    })
    .await;
}

/// Aborts the task when dropped (the agents stop with the test).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
