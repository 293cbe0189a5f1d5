//! The control plane end to end on a real API server: the operator, node agents in
//! Kubernetes mode and the CSI controller, each a separate process. A VirtualSAN becomes
//! per-node configuration, a StorageClass and Ready status; volumes created through the CSI
//! controller get a MirrorVolume and a write-priority Lease; publishing to another node
//! moves the Lease, raises the epoch, and the replicas refuse the old holder's writes; a
//! dedicated replication link carries the mirroring over the addresses of the named
//! interfaces.

mod common;
#[path = "k8s/harness.rs"]
mod k8s;
#[path = "common/kube.rs"]
mod kube_cluster;

use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::storage::v1::StorageClass;
use kube::Api;
use kube_cluster::{KubeCluster, condition, try_qemu_io};
use peersan_crds::mirrorvolume::{ReplicaState, VolumeHealth};
use peersan_crds::virtualsan::MemberState;
use peersan_csi_driver::pb;
use serde_json::json;

const MIB: i64 = 1 << 20;
const T: Duration = Duration::from_secs(60);

fn create_request(name: &str, san: &str, size: i64) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange { required_bytes: size, limit_bytes: 0 }),
        volume_capabilities: vec![common::csi::mount_cap("ext4")],
        parameters: [("virtualSAN".to_owned(), san.to_owned())].into(),
        ..Default::default()
    }
}

fn publish_request(volume: &str, node: &str) -> pb::ControllerPublishVolumeRequest {
    pb::ControllerPublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        volume_capability: Some(common::csi::mount_cap("ext4")),
        ..Default::default()
    }
}

/// Waits until the VirtualSAN reports Ready=True with every member ready.
fn wait_ready(c: &mut KubeCluster, san: &str, members: usize) {
    c.wait(&format!("VirtualSAN {san} Ready with {members} ready nodes"), T, |c| {
        let s = c.get_san(san).ok_or("no VirtualSAN")?;
        let st = s.status.ok_or("no status")?;
        let ready = condition(&st.conditions, "Ready");
        let want = format!("{members}/{members}");
        match &ready {
            Some((status, ..)) if status == "True" && st.ready_nodes.as_deref() == Some(want.as_str()) => Ok(()),
            _ => Err(format!("Ready={ready:?} readyNodes={:?} nodes={:?}", st.ready_nodes, st.nodes)),
        }
    });
}

#[test]
fn virtual_san_volume_lifecycle_and_write_priority() {
    if !common::have("qemu-io") {
        return;
    }
    let names = ["node-a", "node-b", "node-c"];
    let Some(mut c) = KubeCluster::start(&names) else { return };

    // A VirtualSAN over the three nodes on the cluster network.
    let san = c.virtual_san("fast", &names, 2, json!({ "mode": "Cluster" }));
    c.apply(&san);
    wait_ready(&mut c, "fast", 3);

    // Per-node configuration: each node mirrors on its cluster address, knows the others,
    // and keeps its replicas in its own pool.
    let port = c.peer_port;
    for (i, n) in names.iter().enumerate() {
        let sn = c.get_sannode(n).expect("SANNode of every member");
        assert_eq!(sn.spec.virtual_san, "fast");
        assert_eq!(sn.spec.replication_address.as_deref(), Some(format!("127.0.0.{}:{port}", 11 + i).as_str()));
        let mut peers: Vec<(String, String)> =
            sn.spec.peers.iter().map(|p| (p.name.clone(), p.address.clone())).collect();
        peers.sort();
        let expected: Vec<(String, String)> = names
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(j, m)| (m.to_string(), format!("127.0.0.{}:{port}", 11 + j)))
            .collect();
        assert_eq!(peers, expected, "peers of {n}");
        assert_eq!(
            sn.spec.pool,
            peersan_crds::PoolSource::Path(c.node(n).pool().display().to_string()),
            "pool of {n} (nodePools)"
        );
        let st = sn.status.expect("the agent reports its node");
        assert!(st.pool.is_some_and(|p| p.capacity_bytes > 0), "{n}: pool capacity reported");
        assert!(st.addresses.iter().any(|a| a.ip == "127.0.0.1"), "{n}: addresses {:?}", st.addresses);
    }
    let st = c.get_san("fast").unwrap().status.unwrap();
    assert!(st.nodes.iter().all(|m| m.state == MemberState::Ready), "{:?}", st.nodes);
    // The StorageClass that names the VirtualSAN.
    let sc = c.block_on(Api::<StorageClass>::all(c.client.clone()).get("fast")).expect("StorageClass fast");
    assert_eq!(sc.provisioner, peersan_crds::CSI_DRIVER_NAME);
    assert_eq!(sc.parameters.as_ref().and_then(|p| p.get("virtualSAN")).map(String::as_str), Some("fast"));
    assert_eq!(sc.allow_volume_expansion, Some(true));
    let table = c.kubectl(&["get", "virtualsans"]);
    assert!(
        table.contains("fast") && table.contains("3/3") && table.contains("True"),
        "kubectl get virtualsans:\n{table}"
    );

    // A volume through the CSI controller: a MirrorVolume, replicas on two nodes, a Lease.
    let mut csi = c.controller();
    let vol = "pvc-0a1b2c3d";
    let created = c
        .block_on(csi.create_volume(create_request(vol, "fast", 64 * MIB)))
        .expect("CreateVolume")
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(created.capacity_bytes, 64 * MIB);
    assert_eq!(created.accessible_topology.len(), 2);
    let mv = c.get_volume(vol).expect("MirrorVolume");
    assert_eq!(mv.spec.virtual_san, "fast");
    assert_eq!(mv.spec.size_bytes, 64 * MIB);
    let replicas = mv.spec.replicas.clone();
    assert_eq!(replicas.len(), 2);
    for r in &replicas {
        assert!(c.node(r).pool().join(format!("{vol}.replica")).exists(), "replica file on {r}");
    }
    let (a, b) = (replicas[0].clone(), replicas[1].clone());
    let outsider = names.iter().find(|n| !replicas.contains(&n.to_string())).unwrap().to_string();
    assert_eq!(c.write_priority(vol), Some((a.clone(), 1)), "the first replica holds write priority at epoch 1");
    let owners = c.get_lease(&peersan_crds::lease::volume_lease_name(vol).unwrap()).unwrap().metadata.owner_references;
    assert_eq!(
        owners.unwrap_or_default().iter().map(|o| (o.kind.as_str(), o.uid.as_str())).collect::<Vec<_>>(),
        vec![("MirrorVolume", mv.metadata.uid.as_deref().unwrap())],
        "the Lease is owned by its MirrorVolume (garbage-collected with it)"
    );
    // The agents leave volumes and write priority to the control plane: their API refuses.
    let out = Command::new(kube_cluster::peersan_bin())
        .arg(format!("--socket={}", c.node(&b).api_socket().display()))
        .args(["volume", "promote", vol])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("Kubernetes mode"), "promote through the agent API: {text}");
    // The same create again is the same volume.
    let again = c.block_on(csi.create_volume(create_request(vol, "fast", 64 * MIB))).expect("CreateVolume again");
    assert_eq!(again.into_inner().volume.unwrap().volume_id, vol);

    // Published on A: A writes.
    c.block_on(csi.controller_publish_volume(publish_request(vol, &a))).expect("publish on A");
    try_qemu_io(&c.node(&a).nbd_uri(vol), &["write -P 0x11 0 1M".into()]).expect("write through the holder");
    c.wait("the volume Healthy", T, |c| {
        let h = c.get_volume(vol).and_then(|v| v.status).and_then(|s| s.health);
        if h == Some(VolumeHealth::Healthy) { Ok(()) } else { Err(format!("{h:?}")) }
    });

    // Single writer: another node while attached to A is refused.
    let e = c.block_on(csi.controller_publish_volume(publish_request(vol, &b))).unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    // A node without a replica is refused.
    let e = c.block_on(csi.controller_publish_volume(publish_request(vol, &outsider))).unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");

    // Moved to B: the Lease holder becomes B with a higher epoch, the operator mirrors it in
    // the MirrorVolume, and the replicas refuse A's writes.
    c.block_on(csi.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
        volume_id: vol.into(),
        node_id: a.clone(),
        ..Default::default()
    }))
    .expect("unpublish A");
    let ctx = c.block_on(csi.controller_publish_volume(publish_request(vol, &b))).expect("publish on B").into_inner();
    assert_eq!(ctx.publish_context.get("epoch").map(String::as_str), Some("2"));
    assert_eq!(c.write_priority(vol), Some((b.clone(), 2)));
    c.wait("the MirrorVolume to show writer B at epoch 2", T, |c| {
        let st = c.get_volume(vol).and_then(|v| v.status).ok_or("no status")?;
        let attached = st.attached_nodes.clone();
        if st.writer.as_deref() == Some(b.as_str()) && st.epoch == Some(2) && attached == vec![b.clone()] {
            Ok(())
        } else {
            Err(format!("writer {:?} epoch {:?} attached {attached:?}", st.writer, st.epoch))
        }
    });
    let refused = try_qemu_io(&c.node(&a).nbd_uri(vol), &["write -P 0x66 0 64k".into()]);
    assert!(refused.is_err(), "a write through the old holder must be refused: {refused:?}");
    try_qemu_io(&c.node(&b).nbd_uri(vol), &["read -P 0x11 0 1M".into(), "write -P 0x22 1M 1M".into()])
        .expect("B reads A's data and writes");
    try_qemu_io(&c.node(&a).nbd_uri(vol), &["read -P 0x11 0 1M".into(), "read -P 0x22 1M 1M".into()])
        .expect("A reads B's writes, and the refused write left nothing");

    // Online growth: the MirrorVolume grows and every replica reports the new size.
    let grown = c
        .block_on(csi.controller_expand_volume(pb::ControllerExpandVolumeRequest {
            volume_id: vol.into(),
            capacity_range: Some(pb::CapacityRange { required_bytes: 96 * MIB, limit_bytes: 0 }),
            ..Default::default()
        }))
        .expect("expand")
        .into_inner();
    assert_eq!(grown.capacity_bytes, 96 * MIB);
    let mv = c.get_volume(vol).unwrap();
    assert_eq!(mv.spec.size_bytes, 96 * MIB);
    assert!(
        mv.status.unwrap().replicas.iter().all(|r| r.size_bytes == Some(96 * MIB) && r.state == ReplicaState::InSync)
    );
    try_qemu_io(&c.node(&b).nbd_uri(vol), &["write -P 0x33 90M 1M".into(), "read -P 0x33 90M 1M".into()])
        .expect("writes past the old end");

    // Listing shows the volume, published on B.
    let list = c.block_on(csi.list_volumes(pb::ListVolumesRequest::default())).unwrap().into_inner();
    assert_eq!(list.entries.len(), 1);
    assert_eq!(list.entries[0].status.as_ref().unwrap().published_node_ids, vec![b.clone()]);

    // Deleting an attached volume is refused; after unpublish it goes with its Lease and
    // replicas.
    let e = c.block_on(csi.delete_volume(pb::DeleteVolumeRequest { volume_id: vol.into(), ..Default::default() }));
    assert_eq!(e.unwrap_err().code(), tonic::Code::FailedPrecondition);
    c.block_on(csi.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
        volume_id: vol.into(),
        node_id: b.clone(),
        ..Default::default()
    }))
    .expect("unpublish B");
    c.block_on(csi.delete_volume(pb::DeleteVolumeRequest { volume_id: vol.into(), ..Default::default() }))
        .expect("delete");
    assert!(c.get_volume(vol).is_none());
    assert!(c.write_priority(vol).is_none(), "the Lease goes with the volume");
    let files: Vec<_> = replicas.iter().map(|r| c.node(r).pool().join(format!("{vol}.replica"))).collect();
    c.wait("the replicas deleted from the pools", T, |_| {
        let left: Vec<_> = files.iter().filter(|f| f.exists()).collect();
        if left.is_empty() { Ok(()) } else { Err(format!("{left:?}")) }
    });

    // Deleting the VirtualSAN without volumes removes its configuration and StorageClass.
    c.kubectl(&["delete", "virtualsan", "fast", "--wait=false"]);
    c.wait("VirtualSAN fast, its SANNodes and StorageClass gone", T, |c| {
        let sc = c.block_on(Api::<StorageClass>::all(c.client.clone()).get_opt("fast")).unwrap();
        let left =
            (c.get_san("fast").is_some(), names.iter().filter(|n| c.get_sannode(n).is_some()).count(), sc.is_some());
        if left == (false, 0, false) { Ok(()) } else { Err(format!("(san, sannodes, storageclass) = {left:?}")) }
    });
}

/// A pair of veth interfaces in this network namespace, deleted when dropped.
struct Veth(String);

impl Veth {
    fn new(name: &str, ip: &str) -> Veth {
        let ok = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("ip");
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let _ = Command::new("ip").args(["link", "del", name]).output();
        ok(&["link", "add", name, "type", "veth", "peer", "name", &format!("{name}p")]);
        let v = Veth(name.to_owned());
        ok(&["addr", "add", &format!("{ip}/32"), "dev", name]);
        ok(&["link", "set", name, "up"]);
        ok(&["link", "set", &format!("{name}p"), "up"]);
        v
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

#[test]
fn dedicated_link_mirrors_over_the_named_interfaces() {
    if !common::is_root() {
        eprintln!("SKIPPED: creating network interfaces needs root; CI runs as root");
        assert!(std::env::var_os("CI").is_none(), "CI must run this test as root");
        return;
    }
    if !common::have("qemu-io") {
        return;
    }
    // Each node's dedicated interface, with an address outside the cluster network.
    let tag = std::process::id() % 10_000;
    let (if_d, if_e) = (format!("psd{tag}d"), format!("psd{tag}e"));
    let _vd = Veth::new(&if_d, "10.231.7.11");
    let _ve = Veth::new(&if_e, "10.231.7.12");
    let names = ["node-d", "node-e"];
    let Some(mut c) = KubeCluster::start(&names) else { return };
    let link =
        json!({ "mode": "Dedicated", "interface": if_d, "nodeInterfaces": [{ "node": "node-e", "interface": if_e }] });
    c.apply(&c.virtual_san("dedicated", &names, 2, link));
    wait_ready(&mut c, "dedicated", 2);
    let port = c.peer_port;
    let addr = |n: &str| c.get_sannode(n).unwrap().spec.replication_address.unwrap();
    assert_eq!(addr("node-d"), format!("10.231.7.11:{port}"), "not the cluster address 127.0.0.11");
    assert_eq!(addr("node-e"), format!("10.231.7.12:{port}"));
    assert_eq!(c.get_sannode("node-d").unwrap().spec.peers[0].address, format!("10.231.7.12:{port}"));

    // A mirrored volume: its replication connection runs between the dedicated addresses.
    let mut csi = c.controller();
    let vol = "pvc-dedicated";
    c.block_on(csi.create_volume(create_request(vol, "dedicated", 16 * MIB))).expect("CreateVolume");
    let holder = c.write_priority(vol).unwrap().0;
    let other = names.iter().find(|n| **n != holder).unwrap().to_string();
    c.block_on(csi.controller_publish_volume(publish_request(vol, &holder))).expect("publish");
    try_qemu_io(&c.node(&holder).nbd_uri(vol), &["write -P 0x5a 0 2M".into()]).expect("write");
    try_qemu_io(&c.node(&other).nbd_uri(vol), &["read -P 0x5a 0 2M".into()]).expect("read on the mirror");
    let ss =
        String::from_utf8(Command::new("ss").args(["-Htn", "state", "established"]).output().unwrap().stdout).unwrap();
    let on_link = ss
        .lines()
        .filter(|l| l.contains(&format!("10.231.7.11:{port}")) || l.contains(&format!("10.231.7.12:{port}")))
        .count();
    assert!(on_link > 0, "no replication connection on the dedicated addresses:\n{ss}");
    let on_cluster = ss
        .lines()
        .filter(|l| l.contains(&format!("127.0.0.11:{port}")) || l.contains(&format!("127.0.0.12:{port}")))
        .count();
    assert_eq!(on_cluster, 0, "replication must not use the cluster addresses:\n{ss}");
}
