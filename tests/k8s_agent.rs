//! The node agent in Kubernetes mode against a real kube-apiserver (v1.20.2): three agents
//! as real processes (`peersan-node-agent --kubernetes`) on 127.0.0.11-13, configured by
//! their SANNodes (the test plays the operator and the CSI controller), with volumes from a
//! MirrorVolume and write priority from its Lease: heartbeat Leases are renewed, SANNode
//! status is reported, replicas are created, grown and deleted with the MirrorVolume, every
//! agent reports its replica, a moved Lease moves write priority (the old holder's writes
//! are refused, even when it missed the move), and a killed agent's heartbeat stops.
//!
//! Skipped (with the reason printed) where no API server can run here, unless `CI` is set.

#[path = "k8s/harness.rs"]
mod k8s;

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{MIB, have, qemu_io, qemu_io_try, test_dir};
use k8s::ApiServer;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};

use peersan_crds::mirrorvolume::{ReplicaState, ReplicaStatus};
use peersan_crds::sannode::Peer;
use peersan_crds::{ConditionStatus, MirrorVolume, SANNode};
use peersan_csi_driver::pb as csi;
use peersan_csi_driver::pb::identity_client::IdentityClient;
use peersan_csi_driver::pb::node_client::NodeClient;
use peersan_node_agent::api::pb;
use serde_json::json;

const NS: &str = "peersan";
const NODES: [&str; 3] = ["a", "b", "c"];
const WAIT: Duration = Duration::from_secs(40);

/// The agent processes, killed when dropped.
struct Agents {
    dir: PathBuf,
    kubeconfig: PathBuf,
    children: BTreeMap<&'static str, Child>,
}

impl Agents {
    fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.join(node)
    }
    fn pool(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("pool")
    }
    fn log(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("agent.log")
    }
    fn nbd_uri(&self, node: &str, volume: &str) -> String {
        format!("nbd+unix:///{volume}?socket={}", self.node_dir(node).join("nbd.sock").display())
    }

    fn start(&mut self, node: &'static str) {
        std::fs::create_dir_all(self.node_dir(node)).unwrap();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log(node)).unwrap();
        let d = self.node_dir(node);
        let child = Command::new(env!("CARGO_BIN_EXE_peersan-node-agent"))
            .arg("--kubernetes")
            .args(["--node-name", node, "--namespace", NS])
            .arg("--secret-file")
            .arg(self.dir.join("peer-secret"))
            .arg("--api-socket")
            .arg(d.join("api.sock"))
            .arg("--nbd-socket")
            .arg(d.join("nbd.sock"))
            .args(["--lease-duration", "2s", "--status-interval", "200ms"])
            .arg("--csi-socket")
            .arg(d.join("csi.sock"))
            .arg("--csi-state-dir")
            .arg(d.join("csi-state"))
            .arg("--fuse-dir")
            .arg(d.join("fuse"))
            .env("KUBECONFIG", &self.kubeconfig)
            .env("PEERSAN_LOG", "info,peersan_node_agent=debug")
            .env_remove("NODE_NAME")
            .env_remove("POD_NAMESPACE")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting peersan-node-agent");
        self.children.insert(node, child);
    }

    /// Fails the test, with the agent's log, when an agent exited.
    fn check_alive(&mut self) {
        for (node, child) in &mut self.children {
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(self.dir.join(node).join("agent.log")).unwrap_or_default();
                panic!("agent {node} exited with {status}; its log:\n{log}");
            }
        }
    }

    fn signal(&self, node: &str, sig: rustix::process::Signal) {
        let pid = self.children[node].id();
        rustix::process::kill_process(rustix::process::Pid::from_raw(pid as i32).unwrap(), sig).unwrap();
    }

    /// Waits until the agent exits by itself; its exit status.
    async fn wait_exit(&mut self, node: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        let child = self.children.get_mut(node).unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.children.remove(node);
                return status;
            }
            assert!(Instant::now() < deadline, "agent {node} still runs after {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The state of `replica` as the agent on `node` sees it (its agent API).
    async fn replica_state(&self, node: &str, volume: &str, replica: &str) -> Option<String> {
        let mut api = peersan_node_agent::api::connect(&self.node_dir(node).join("api.sock")).await.ok()?;
        let v = api.get_volume(pb::GetVolumeRequest { name: volume.into() }).await.ok()?.into_inner();
        v.replicas.into_iter().find(|r| r.node == replica).map(|r| r.state)
    }

    fn kill(&mut self, node: &str) {
        if let Some(mut c) = self.children.remove(node) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for c in self.children.values_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            for node in NODES {
                if let Ok(log) = std::fs::read_to_string(self.log(node)) {
                    let tail: Vec<&str> = log.lines().rev().take(40).collect();
                    eprintln!("--- agent {node}, last lines:");
                    for l in tail.iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }
}

/// Polls `check` (which returns what it saw and whether that is what is expected) until it
/// holds; fails with what was expected and what was seen last.
macro_rules! wait_until {
    ($agents:expr, $what:expr, $check:expr) => {{
        let deadline = Instant::now() + WAIT;
        loop {
            let (ok, seen) = $check;
            if ok {
                break seen;
            }
            $agents.check_alive();
            assert!(Instant::now() < deadline, "expected {} within {WAIT:?}; last seen: {seen:#?}", $what);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }};
}

/// A loopback port free on `ip` a moment ago.
fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

fn renew_time(l: &Option<Lease>) -> Option<MicroTime> {
    l.as_ref().and_then(|l| l.spec.as_ref()).and_then(|s| s.renew_time.clone())
}

fn entry<'a>(mv: &'a Option<MirrorVolume>, node: &str) -> Option<&'a ReplicaStatus> {
    mv.as_ref().and_then(|m| m.status.as_ref()).and_then(|s| s.replicas.iter().find(|r| r.node == node))
}

/// Every agent's entry is in sync with the given size, epoch and writer.
fn all_entries(mv: &Option<MirrorVolume>, size: i64, epoch: i64, writer: &str, nodes: &[&str]) -> bool {
    nodes.iter().all(|n| {
        entry(mv, n).is_some_and(|e| {
            e.state == ReplicaState::InSync
                && e.size_bytes == Some(size)
                && e.epoch == Some(epoch)
                && e.writer.as_deref() == Some(writer)
        })
    })
}

/// Moves the volume Lease to `holder` at `epoch`, as the CSI controller or the operator do.
async fn move_lease(leases: &Api<Lease>, name: &str, holder: &str, epoch: u64) {
    let mut l = leases.get(name).await.unwrap();
    l.metadata
        .annotations
        .get_or_insert_default()
        .insert(peersan_crds::lease::EPOCH_ANNOTATION.to_owned(), peersan_crds::lease::epoch_value(epoch));
    let spec = l.spec.get_or_insert_default();
    spec.holder_identity = Some(holder.to_owned());
    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    leases.replace(name, &PostParams::default(), &l).await.unwrap();
}

fn sannode(node: &str, pool: &Path, addresses: &BTreeMap<&str, String>) -> SANNode {
    let peers: Vec<Peer> = addresses
        .iter()
        .filter(|(n, _)| **n != node)
        .map(|(n, a)| Peer { name: (*n).to_owned(), address: a.clone() })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "peersan.io/v1alpha1", "kind": "SANNode",
        "metadata": { "name": node },
        "spec": {
            "virtualSAN": "san",
            "pool": { "path": pool.display().to_string() },
            "replicationAddress": addresses[node],
            "peers": peers,
        },
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_follow_sannodes_mirrorvolumes_and_leases() {
    if !have("qemu-io") {
        return;
    }
    let server = match ApiServer::start() {
        Ok(s) => s,
        Err(reason) => {
            eprintln!("SKIPPED: {reason}");
            return;
        }
    };
    server.install_crds();
    let client = server.client().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": NS } })).unwrap();
    namespaces.create(&PostParams::default(), &ns).await.unwrap();

    let dir = test_dir();
    std::fs::write(dir.path().join("peer-secret"), "k8s-agent-test-shared-secret-0123456789").unwrap();
    let mut agents =
        Agents { dir: dir.path().to_owned(), kubeconfig: server.kubeconfig.clone(), children: BTreeMap::new() };

    // The operator's part: a SANNode per node with its replication address and its peers.
    let addresses: BTreeMap<&str, String> = NODES
        .iter()
        .zip(["127.0.0.11", "127.0.0.12", "127.0.0.13"])
        .map(|(n, ip)| (*n, format!("{ip}:{}", free_port(ip))))
        .collect();
    let sannodes: Api<SANNode> = Api::all(client.clone());
    // The agents start before their SANNodes exist: they wait for them, and their heartbeats
    // run from the start.
    for node in NODES {
        agents.start(node);
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    for node in NODES {
        let name = peersan_crds::lease::node_lease_name(node).unwrap();
        wait_until!(agents, format!("heartbeat Lease {name} before any SANNode exists"), {
            let l = leases.get_opt(&name).await.unwrap();
            (l.is_some(), l)
        });
    }
    for node in NODES {
        sannodes.create(&PostParams::default(), &sannode(node, &agents.pool(node), &addresses)).await.unwrap();
    }

    // Heartbeats: each Lease is held by its node and its renewTime advances.
    for node in NODES {
        let name = peersan_crds::lease::node_lease_name(node).unwrap();
        let first = wait_until!(agents, format!("heartbeat Lease {name}"), {
            let l = leases.get_opt(&name).await.unwrap();
            (renew_time(&l).is_some(), l)
        });
        let spec = first.as_ref().unwrap().spec.clone().unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some(node));
        assert_eq!(spec.lease_duration_seconds, Some(2));
        let t0 = renew_time(&first).unwrap();
        wait_until!(agents, format!("{name}'s renewTime to advance past {t0:?}"), {
            let l = leases.get_opt(&name).await.unwrap();
            (renew_time(&l).is_some_and(|t| t.0 > t0.0), l)
        });
    }

    // Registration: every SANNode reports its addresses, pool, version, and Ready.
    for node in NODES {
        let sn = wait_until!(agents, format!("SANNode {node} Ready with its status"), {
            let sn = sannodes.get(node).await.unwrap();
            let ok = sn.status.as_ref().is_some_and(|s| {
                s.observed_generation == sn.metadata.generation
                    && s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == ConditionStatus::True)
            });
            (ok, sn)
        });
        let s = sn.status.unwrap();
        assert!(s.addresses.iter().any(|a| a.interface == "lo" && a.ip == "127.0.0.1"), "{:?}", s.addresses);
        let pool = s.pool.expect("status.pool");
        assert!(pool.capacity_bytes > 0 && pool.free_bytes > 0, "{pool:?}");
        assert_eq!(s.agent_version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
        assert_eq!(s.volumes, Some(0));

        // The CSI Identity and Node services are served, as in standalone mode.
        let channel = peersan_csi_driver::serve::channel(&agents.node_dir(node).join("csi.sock")).await.unwrap();
        let info = IdentityClient::new(channel.clone())
            .get_plugin_info(csi::GetPluginInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.name, peersan_crds::CSI_DRIVER_NAME);
        let node_info = NodeClient::new(channel).node_get_info(csi::NodeGetInfoRequest {}).await.unwrap().into_inner();
        assert_eq!(node_info.node_id, node);
    }

    // The CSI controller's part: a MirrorVolume on a, b, c and its Lease (holder a, epoch 1).
    let vol = "vol1";
    let mvs: Api<MirrorVolume> = Api::all(client.clone());
    let mv: MirrorVolume = serde_json::from_value(json!({
        "apiVersion": "peersan.io/v1alpha1", "kind": "MirrorVolume",
        "metadata": { "name": vol },
        "spec": { "virtualSAN": "san", "sizeBytes": 64 * MIB, "replicas": ["a", "b", "c"] },
    }))
    .unwrap();
    // The Lease first: the engines take it when they start.
    let lease_name = peersan_crds::lease::volume_lease_name(vol).unwrap();
    let vol_lease: Lease = serde_json::from_value(json!({
        "metadata": { "name": lease_name, "annotations": { peersan_crds::lease::EPOCH_ANNOTATION: "1" } },
        "spec": { "holderIdentity": "a", "leaseTransitions": 0 },
    }))
    .unwrap();
    leases.create(&PostParams::default(), &vol_lease).await.unwrap();
    mvs.create(&PostParams::default(), &mv).await.unwrap();
    let size = 64 * MIB as i64;
    wait_until!(agents, "every replica in sync, 64 MiB, epoch 1, writer a", {
        let mv = mvs.get_opt(vol).await.unwrap();
        (all_entries(&mv, size, 1, "a", &NODES), mv)
    });
    for node in NODES {
        assert!(agents.pool(node).join(format!("{vol}.replica")).is_file(), "replica file on {node}");
    }
    let sn = sannodes.get("b").await.unwrap();
    wait_until!(agents, "SANNode b to count its volume", {
        let sn = sannodes.get("b").await.unwrap();
        (sn.status.as_ref().and_then(|s| s.volumes) == Some(1), sn)
    });
    drop(sn);

    // a holds write priority: its writes are mirrored.
    qemu_io(&agents.nbd_uri("a", vol), &["write -P 0x11 0 1M".into(), "flush".into()]);
    qemu_io(&agents.nbd_uri("c", vol), &["read -P 0x11 0 1M".into()]);

    // The Lease moves to b at epoch 2: every engine takes it; a's writes are refused.
    move_lease(&leases, &lease_name, "b", 2).await;
    wait_until!(agents, "every replica at epoch 2, writer b", {
        let mv = mvs.get_opt(vol).await.unwrap();
        (all_entries(&mv, size, 2, "b", &NODES), mv)
    });
    let (ok, out) = qemu_io_try(&agents.nbd_uri("a", vol), &["write -P 0x99 0 4096"]);
    assert!(!ok, "a write through a, which lost write priority, succeeded:\n{out}");
    qemu_io(&agents.nbd_uri("b", vol), &["write -P 0x22 1M 1M".into(), "write -P 0x33 2M 64k".into(), "flush".into()]);
    qemu_io(&agents.nbd_uri("c", vol), &["read -P 0x11 0 1M".into(), "read -P 0x22 1M 1M".into()]);

    // The holder b is frozen while the Lease moves to c (epoch 3): when it resumes, it may
    // not have seen the move, and its write must still be refused (fencing by epoch).
    agents.signal("b", rustix::process::Signal::STOP);
    move_lease(&leases, &lease_name, "c", 3).await;
    wait_until!(agents, "a and c at epoch 3, writer c", {
        let mv = mvs.get_opt(vol).await.unwrap();
        (all_entries(&mv, size, 3, "c", &["a", "c"]), mv)
    });
    agents.signal("b", rustix::process::Signal::CONT);
    let (ok, out) = qemu_io_try(&agents.nbd_uri("b", vol), &["write -P 0x44 2M 64k"]);
    assert!(!ok, "a write through b after it lost write priority while frozen succeeded:\n{out}");
    let (ok, out) = qemu_io_try(&agents.nbd_uri("a", vol), &["write -P 0x44 2M 64k"]);
    assert!(!ok, "a write through a (not the holder) succeeded:\n{out}");
    // Nothing of the refused writes is visible; the new holder writes.
    qemu_io(&agents.nbd_uri("c", vol), &["read -P 0x33 2M 64k".into(), "write -P 0x55 3M 64k".into()]);
    wait_until!(agents, "every replica back in sync at epoch 3, writer c", {
        let mv = mvs.get_opt(vol).await.unwrap();
        (all_entries(&mv, size, 3, "c", &NODES), mv)
    });
    qemu_io(&agents.nbd_uri("b", vol), &["read -P 0x33 2M 64k".into(), "read -P 0x55 3M 64k".into()]);

    // An entry overwritten by someone else (the operator marks an offline node's replica
    // disconnected) is taken back.
    let overwrite = json!({
        "apiVersion": "peersan.io/v1alpha1", "kind": "MirrorVolume", "metadata": { "name": vol },
        "status": { "replicas": [{ "node": "a", "state": "disconnected" }] },
    });
    mvs.patch_status(vol, &PatchParams::apply("peersan-operator").force(), &Patch::Apply(&overwrite)).await.unwrap();
    wait_until!(agents, "a to take its entry back", {
        let mv = mvs.get_opt(vol).await.unwrap();
        (entry(&mv, "a").is_some_and(|e| e.state == ReplicaState::InSync), mv)
    });

    // Growth: every replica grows to the new size; the holder writes past the old end.
    let grown = 96 * MIB as i64;
    mvs.patch(vol, &PatchParams::default(), &Patch::Merge(json!({ "spec": { "sizeBytes": grown } }))).await.unwrap();
    wait_until!(agents, "every replica at 96 MiB", {
        let mv = mvs.get_opt(vol).await.unwrap();
        (all_entries(&mv, grown, 3, "c", &NODES), mv)
    });
    qemu_io(&agents.nbd_uri("c", vol), &["write -P 0x66 90M 64k".into(), "flush".into()]);
    qemu_io(&agents.nbd_uri("a", vol), &["read -P 0x66 90M 64k".into()]);

    // A Lease whose epoch is not an epoch is ignored (and logged): nothing changes.
    let mut l = leases.get(&lease_name).await.unwrap();
    l.metadata
        .annotations
        .get_or_insert_default()
        .insert(peersan_crds::lease::EPOCH_ANNOTATION.to_owned(), "four".to_owned());
    l.spec.get_or_insert_default().holder_identity = Some("a".to_owned());
    leases.replace(&lease_name, &PostParams::default(), &l).await.unwrap();
    for node in NODES {
        let log = agents.log(node);
        wait_until!(agents, format!("{node} to log the invalid epoch"), {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            (text.contains("ignoring the volume Lease: its epoch is invalid"), log.clone())
        });
    }
    let mv = mvs.get_opt(vol).await.unwrap();
    assert!(all_entries(&mv, grown, 3, "c", &NODES), "an invalid Lease changed write priority: {mv:#?}");
    move_lease(&leases, &lease_name, "c", 4).await;
    wait_until!(agents, "every replica at epoch 4, writer c", {
        let mv = mvs.get_opt(vol).await.unwrap();
        (all_entries(&mv, grown, 4, "c", &NODES), mv)
    });

    // c's replication address changes: c needs a restart and exits non-zero (after a clean
    // shutdown); started again, it binds the new address. a and b learn it from their
    // SANNodes' peers, live, and reconnect to c there.
    let mut moved = addresses.clone();
    moved.insert("c", format!("127.0.0.13:{}", free_port("127.0.0.13")));
    let c_spec = json!({ "spec": { "replicationAddress": moved["c"] } });
    sannodes.patch("c", &PatchParams::default(), &Patch::Merge(c_spec)).await.unwrap();
    let status = agents.wait_exit("c").await;
    assert!(!status.success(), "c exited with {status} after its replicationAddress changed");
    let log = std::fs::read_to_string(agents.log("c")).unwrap();
    assert!(log.contains("needs a restart"), "c's log does not say why it exited:\n{log}");
    for node in ["a", "b"] {
        assert_eq!(agents.replica_state(node, vol, "c").await.as_deref(), Some("disconnected"), "{node}'s view of c");
        let peers = sannode(node, &agents.pool(node), &moved).spec.peers;
        let patch = json!({ "spec": { "peers": peers } });
        sannodes.patch(node, &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    }
    agents.start("c");
    for node in ["a", "b"] {
        wait_until!(agents, format!("{node} to reach c at its new address"), {
            let s = agents.replica_state(node, vol, "c").await;
            (s.as_deref() == Some("in-sync"), s)
        });
        let sn = wait_until!(agents, format!("SANNode {node} to observe its new peers"), {
            let sn = sannodes.get(node).await.unwrap();
            (sn.status.as_ref().and_then(|s| s.observed_generation) == sn.metadata.generation, sn)
        });
        assert_eq!(sn.metadata.generation, Some(2), "{node}'s spec changed once");
    }
    wait_until!(agents, "SANNode c Ready with its new address", {
        let sn = sannodes.get("c").await.unwrap();
        let ok = sn.status.as_ref().is_some_and(|s| {
            s.observed_generation == sn.metadata.generation
                && s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == ConditionStatus::True)
        });
        (ok, sn)
    });
    wait_until!(agents, "every replica in sync after c's restart", {
        let mv = mvs.get_opt(vol).await.unwrap();
        (all_entries(&mv, grown, 4, "c", &NODES), mv)
    });
    qemu_io(&agents.nbd_uri("c", vol), &["write -P 0x77 91M 64k".into(), "flush".into()]);
    qemu_io(&agents.nbd_uri("b", vol), &["read -P 0x77 91M 64k".into(), "read -P 0x66 90M 64k".into()]);

    // A volume larger than a pool: the replica is not created, and the entry says why.
    let huge: MirrorVolume = serde_json::from_value(json!({
        "apiVersion": "peersan.io/v1alpha1", "kind": "MirrorVolume",
        "metadata": { "name": "huge" },
        "spec": { "virtualSAN": "san", "sizeBytes": 1i64 << 50, "replicas": ["a"] },
    }))
    .unwrap();
    mvs.create(&PostParams::default(), &huge).await.unwrap();
    let seen = wait_until!(agents, "a to report that it cannot hold the huge volume", {
        let mv = mvs.get_opt("huge").await.unwrap();
        (entry(&mv, "a").is_some_and(|e| e.state == ReplicaState::Diskless), mv)
    });
    let detail = entry(&seen, "a").unwrap().detail.clone().unwrap_or_default();
    assert!(detail.contains("cannot create the replica on a"), "{detail}");
    assert!(!agents.pool("a").join("huge.replica").exists());
    mvs.delete("huge", &DeleteParams::default()).await.unwrap();

    // Deletion: every replica file leaves its pool.
    mvs.delete(vol, &DeleteParams::default()).await.unwrap();
    leases.delete(&lease_name, &DeleteParams::default()).await.unwrap();
    for node in NODES {
        let path = agents.pool(node).join(format!("{vol}.replica"));
        wait_until!(agents, format!("{} to be deleted", path.display()), (!path.exists(), path.clone()));
    }

    // A killed agent's heartbeat stops while the others' go on.
    agents.kill("b");
    let b_name = peersan_crds::lease::node_lease_name("b").unwrap();
    let a_name = peersan_crds::lease::node_lease_name("a").unwrap();
    let b_last = renew_time(&leases.get_opt(&b_name).await.unwrap()).unwrap();
    for _ in 0..3 {
        let a_now = renew_time(&leases.get_opt(&a_name).await.unwrap()).unwrap();
        wait_until!(agents, "a's heartbeat to go on", {
            let l = leases.get_opt(&a_name).await.unwrap();
            (renew_time(&l).is_some_and(|t| t.0 > a_now.0), l)
        });
    }
    let b_now = renew_time(&leases.get_opt(&b_name).await.unwrap()).unwrap();
    assert_eq!(b_now, b_last, "the heartbeat of the killed agent b was renewed");

    // SIGTERM: a clean shutdown and a successful exit.
    agents.signal("a", rustix::process::Signal::TERM);
    let status = agents.wait_exit("a").await;
    assert!(status.success(), "a exited with {status} after SIGTERM");
    assert!(!agents.node_dir("a").join("nbd.sock").exists(), "a left its NBD socket behind");
}
