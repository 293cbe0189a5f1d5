//! Multi-writer volumes through the control plane, on a real API server with the operator,
//! node agents in Kubernetes mode and the CSI controller as separate processes: a
//! ReadWriteMany block volume of a MultiWriter VirtualSAN is published on a second node
//! without moving its Lease, and both nodes write it at once through their NBD exports (the live-migration pattern: published on the target, then
//! unpublished on the source, and the Lease stays with its holder throughout, until the
//! holder's node dies and failover moves it); a ReadWriteMany filesystem is refused, and so
//! are several writers on a volume of a SingleWriter VirtualSAN.

mod common;
#[path = "k8s/harness.rs"]
mod k8s;
#[path = "common/kube.rs"]
mod kube_cluster;

use std::time::Duration;

use kube_cluster::{KubeCluster, LEASE_SECS, condition, try_qemu_io};
use peersan_crds::WritePolicy;
use peersan_crds::mirrorvolume::VolumeHealth;
use peersan_csi_driver::pb;
use peersan_csi_driver::pb::volume_capability::access_mode::Mode;
use serde_json::json;
use tonic::Code;

const MIB: i64 = 1 << 20;
const T: Duration = Duration::from_secs(60);

/// `cap` with access mode `mode`.
fn with_mode(mut cap: pb::VolumeCapability, mode: Mode) -> pb::VolumeCapability {
    cap.access_mode = Some(pb::volume_capability::AccessMode { mode: mode as i32 });
    cap
}

/// What kubelet and the sidecars pass for a ReadWriteMany claim with volumeMode Block.
fn rwx_block() -> pb::VolumeCapability {
    with_mode(common::csi::block_cap(), Mode::MultiNodeMultiWriter)
}

fn create_request(name: &str, san: &str, cap: pb::VolumeCapability) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange { required_bytes: 32 * MIB, limit_bytes: 0 }),
        volume_capabilities: vec![cap],
        parameters: [("virtualSAN".to_owned(), san.to_owned())].into(),
        ..Default::default()
    }
}

fn publish_request(volume: &str, node: &str, cap: pb::VolumeCapability) -> pb::ControllerPublishVolumeRequest {
    pb::ControllerPublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn unpublish_request(volume: &str, node: &str) -> pb::ControllerUnpublishVolumeRequest {
    pb::ControllerUnpublishVolumeRequest { volume_id: volume.into(), node_id: node.into(), ..Default::default() }
}

fn validate_request(volume: &str, cap: pb::VolumeCapability) -> pb::ValidateVolumeCapabilitiesRequest {
    pb::ValidateVolumeCapabilitiesRequest {
        volume_id: volume.into(),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

/// The error of a call that must fail, checking that its message names `reason`.
fn refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, reason: &str) {
    match r {
        Ok(v) => panic!("expected {code:?} ({reason}), got {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{s:?}");
            assert!(s.message().contains(reason), "the message should say {reason:?}: {}", s.message());
        }
    }
}

fn attached_nodes(c: &KubeCluster, volume: &str) -> Vec<String> {
    c.get_volume(volume).and_then(|v| v.status).map(|s| s.attached_nodes).unwrap_or_default()
}

/// The epoch a node's agent reports for its replica of `volume`.
fn reported_epoch(c: &KubeCluster, volume: &str, node: &str) -> Option<i64> {
    c.get_volume(volume)?.status?.replicas.into_iter().find(|r| r.node == node)?.epoch
}

/// Waits until the two-node VirtualSAN reports Ready=True with both members ready.
fn wait_ready(c: &mut KubeCluster, san: &str) {
    c.wait(&format!("VirtualSAN {san} Ready with 2 ready nodes"), T, |c| {
        let st = c.get_san(san).and_then(|s| s.status).ok_or("no status")?;
        match condition(&st.conditions, "Ready") {
            Some((s, ..)) if s == "True" && st.ready_nodes.as_deref() == Some("2/2") => Ok(()),
            other => Err(format!("Ready={other:?} readyNodes={:?}", st.ready_nodes)),
        }
    });
}

#[test]
fn multi_writer_volume_is_published_on_two_nodes_without_moving_its_lease() {
    let names = ["node-a", "node-b"];
    if !common::have("qemu-io") {
        return;
    }
    let Some(mut c) = KubeCluster::start(&names) else { return };
    let mut san = c.virtual_san("vms", &names, 2, json!({ "mode": "Cluster" }));
    san["spec"]["writePolicy"] = json!("MultiWriter");
    c.apply(&san);
    wait_ready(&mut c, "vms");
    let mut csi = c.controller();

    // A ReadWriteMany filesystem is refused before anything is created: ext4 mounted on two
    // nodes would be corrupted.
    let rwx_fs = with_mode(common::csi::mount_cap("ext4"), Mode::MultiNodeMultiWriter);
    refused(
        c.block_on(csi.create_volume(create_request("pvc-rwx-fs", "vms", rwx_fs.clone()))),
        Code::InvalidArgument,
        "not cluster filesystems",
    );
    assert!(c.get_volume("pvc-rwx-fs").is_none(), "nothing created for a refused request");

    // A ReadWriteMany block volume: a MultiWriter MirrorVolume on both nodes.
    let vol = "pvc-vm-disk";
    let created = c.block_on(csi.create_volume(create_request(vol, "vms", rwx_block()))).expect("CreateVolume");
    assert_eq!(created.into_inner().volume.unwrap().accessible_topology.len(), 2);
    let mv = c.get_volume(vol).expect("MirrorVolume");
    assert_eq!(mv.spec.write_policy, WritePolicy::MultiWriter, "copied from the VirtualSAN");
    let validated = c.block_on(csi.validate_volume_capabilities(validate_request(vol, rwx_block()))).unwrap();
    assert!(validated.into_inner().confirmed.is_some(), "RWX block is confirmed for a multi-writer volume");
    let validated = c.block_on(csi.validate_volume_capabilities(validate_request(vol, rwx_fs.clone()))).unwrap();
    let validated = validated.into_inner();
    assert!(validated.confirmed.is_none() && validated.message.contains("not cluster filesystems"), "{validated:?}");

    // The Lease starts with the first replica at epoch 1; the source of the migration is the
    // other node, so that its publish visibly moves the Lease.
    let (holder, epoch) = c.write_priority(vol).expect("the volume's Lease");
    assert_eq!(epoch, 1);
    let source = names.iter().find(|n| **n != holder).unwrap().to_string();
    let target = holder;

    // Published on the source: the first publish moves the Lease there with a new epoch.
    let ctx = c.block_on(csi.controller_publish_volume(publish_request(vol, &source, rwx_block()))).unwrap();
    assert_eq!(ctx.into_inner().publish_context.get("epoch").map(String::as_str), Some("2"));
    assert_eq!(c.write_priority(vol), Some((source.clone(), 2)), "the first publish moves the Lease");

    // A second node with an access mode for one node is refused, naming the rule.
    refused(
        c.block_on(csi.controller_publish_volume(publish_request(vol, &target, common::csi::block_cap()))),
        Code::FailedPrecondition,
        "SINGLE_NODE_WRITER is for one node",
    );
    refused(
        c.block_on(csi.controller_publish_volume(publish_request(vol, &target, rwx_fs.clone()))),
        Code::InvalidArgument,
        "not cluster filesystems",
    );
    assert_eq!(attached_nodes(&c, vol), vec![source.clone()], "refused publishes record nothing");

    // Published on the target too: allowed, the Lease stays with the source at epoch 2, and
    // the call returned once the target's agent runs under that epoch.
    let ctx = c.block_on(csi.controller_publish_volume(publish_request(vol, &target, rwx_block()))).unwrap();
    let ctx = ctx.into_inner().publish_context;
    assert_eq!(ctx.get("epoch").map(String::as_str), Some("2"), "{ctx:?}");
    assert_eq!(ctx.get("node"), Some(&target), "{ctx:?}");
    assert_eq!(c.write_priority(vol), Some((source.clone(), 2)), "a later publish does not move the Lease");
    assert_eq!(reported_epoch(&c, vol, &target), Some(2), "the target's agent reports the Lease's epoch");
    let mut on = attached_nodes(&c, vol);
    on.sort();
    let mut both = vec![source.clone(), target.clone()];
    both.sort();
    assert_eq!(on, both);
    // Both write at once through their own NBD exports, and each reads the other's data:
    // disjoint regions (1 MiB each), then one region written by one node and, overlapping,
    // by the other (the region's grant moves between them).
    let write = |n: &str, ops: &[&str]| {
        let ops: Vec<String> = ops.iter().map(|o| o.to_string()).collect();
        (n.to_owned(), ops)
    };
    let writers = [write(&source, &["write -P 0x11 0 1M"]), write(&target, &["write -P 0x22 1M 1M"])];
    std::thread::scope(|s| {
        for (n, ops) in &writers {
            let uri = c.node(n).nbd_uri(vol);
            s.spawn(move || try_qemu_io(&uri, ops).unwrap_or_else(|e| panic!("writing through {n}: {e}")));
        }
    });
    for n in [&source, &target] {
        try_qemu_io(&c.node(n).nbd_uri(vol), &["read -P 0x11 0 1M".into(), "read -P 0x22 1M 1M".into()])
            .unwrap_or_else(|e| panic!("{n} reads both writers' data: {e}"));
    }
    try_qemu_io(&c.node(&target).nbd_uri(vol), &["write -P 0x33 2M 64k".into()]).expect("write on the target");
    try_qemu_io(&c.node(&source).nbd_uri(vol), &["write -P 0x44 2080k 64k".into()]).expect("overlapping write");
    for n in [&source, &target] {
        let checks = ["read -P 0x33 2M 32k", "read -P 0x44 2080k 64k", "read -P 0 2144k 32k"];
        try_qemu_io(&c.node(n).nbd_uri(vol), &checks.map(String::from))
            .unwrap_or_else(|e| panic!("{n} reads the overlapping writes in one order: {e}"));
    }

    // Both publishes again: idempotent, nothing moves.
    for n in [&target, &source] {
        let again = c.block_on(csi.controller_publish_volume(publish_request(vol, n, rwx_block()))).unwrap();
        assert_eq!(again.into_inner().publish_context.get("epoch").map(String::as_str), Some("2"));
    }
    assert_eq!(c.write_priority(vol), Some((source.clone(), 2)));
    let list = c.block_on(csi.list_volumes(pb::ListVolumesRequest::default())).unwrap().into_inner();
    let mut published = list.entries[0].status.as_ref().unwrap().published_node_ids.clone();
    published.sort();
    assert_eq!(published, both);

    // The source goes away: the Lease stays with it (its agent keeps arbitrating), the
    // target stays published, and nothing moves the Lease later while the source lives.
    c.block_on(csi.controller_unpublish_volume(unpublish_request(vol, &source))).expect("unpublish the source");
    assert_eq!(attached_nodes(&c, vol), vec![target.clone()]);
    assert_eq!(c.write_priority(vol), Some((source.clone(), 2)), "unpublishing the holder keeps the Lease");
    std::thread::sleep(Duration::from_secs(3 * LEASE_SECS));
    assert_eq!(c.write_priority(vol), Some((source.clone(), 2)), "no failover of a live holder");
    assert_eq!(reported_epoch(&c, vol, &target), Some(2));
    // The target keeps writing under the same epoch, the unpublished holder arbitrating.
    try_qemu_io(&c.node(&target).nbd_uri(vol), &["write -P 0x55 0 1M".into(), "read -P 0x22 1M 1M".into()])
        .expect("the target writes after the source let go");
    try_qemu_io(&c.node(&source).nbd_uri(vol), &["read -P 0x55 0 1M".into()]).expect("the source's replica has it");
    // Published again on the source and unpublished (a migration back and forth): no move.
    c.block_on(csi.controller_publish_volume(publish_request(vol, &source, rwx_block()))).expect("publish back");
    assert_eq!(c.write_priority(vol), Some((source.clone(), 2)));
    c.block_on(csi.controller_unpublish_volume(unpublish_request(vol, &source))).expect("unpublish again");

    // The holder's node dies while the target is published: the operator's failover moves
    // the Lease to the target, an in-sync replica on a live node, and its agent takes it.
    c.node_mut(&source).agent.kill();
    c.wait("the Lease moved to the target at a new epoch", T, |c| match c.write_priority(vol) {
        Some((h, e)) if h == target && e > 2 => Ok(()),
        other => Err(format!("Lease {other:?}")),
    });
    let (_, epoch) = c.write_priority(vol).unwrap();
    c.wait("the target's agent at the new epoch", T, |c| {
        let st = c.get_volume(vol).and_then(|v| v.status).ok_or("no status")?;
        let r = st.replicas.iter().find(|r| r.node == target).ok_or("no entry")?;
        if r.epoch == Some(epoch as i64) && r.writer.as_deref() == Some(target.as_str()) {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });
    assert_eq!(attached_nodes(&c, vol), vec![target.clone()], "the target stays published");
    try_qemu_io(&c.node(&target).nbd_uri(vol), &["write -P 0x66 3M 1M".into(), "read -P 0x55 0 1M".into()])
        .expect("the target writes as the new arbiter");
    // The source returns and copies what it missed.
    let kubeconfig = c.server.kubeconfig.clone();
    c.node_mut(&source).agent.start(&kubeconfig);
    wait_ready(&mut c, "vms");
    c.wait("the volume Healthy", T, |c| {
        let h = c.get_volume(vol).and_then(|v| v.status).and_then(|s| s.health);
        if h == Some(VolumeHealth::Healthy) { Ok(()) } else { Err(format!("{h:?}")) }
    });
    let checks = ["read -P 0x55 0 1M", "read -P 0x22 1M 1M", "read -P 0x33 2M 32k", "read -P 0x66 3M 1M"];
    try_qemu_io(&c.node(&source).nbd_uri(vol), &checks.map(String::from)).expect("the source resynchronised");
    c.block_on(csi.controller_unpublish_volume(unpublish_request(vol, &target))).expect("unpublish the target");
    assert!(attached_nodes(&c, vol).is_empty());

    // The VirtualSAN becomes SingleWriter: new ReadWriteMany volumes are refused, naming it;
    // the existing volume keeps the policy it was created with.
    c.kubectl(&["patch", "virtualsan", "vms", "--type=merge", "-p", r#"{"spec":{"writePolicy":"SingleWriter"}}"#]);
    refused(
        c.block_on(csi.create_volume(create_request("pvc-rwo", "vms", rwx_block()))),
        Code::InvalidArgument,
        "VirtualSAN vms has writePolicy SingleWriter",
    );
    assert!(c.get_volume("pvc-rwo").is_none());
    let again = c.block_on(csi.create_volume(create_request(vol, "vms", rwx_block()))).expect("CreateVolume again");
    assert_eq!(again.into_inner().volume.unwrap().volume_id, vol);

    // A volume of the SingleWriter VirtualSAN: ReadWriteMany is not confirmed, and a second
    // node is refused even with RWX block access.
    let rwo = "pvc-rwo";
    c.block_on(csi.create_volume(create_request(rwo, "vms", common::csi::block_cap()))).expect("CreateVolume RWO");
    assert_eq!(c.get_volume(rwo).unwrap().spec.write_policy, WritePolicy::SingleWriter);
    let validated = c.block_on(csi.validate_volume_capabilities(validate_request(rwo, rwx_block()))).unwrap();
    let validated = validated.into_inner();
    assert!(
        validated.confirmed.is_none() && validated.message.contains("has writePolicy SingleWriter"),
        "{validated:?}"
    );
    let (first, _) = c.write_priority(rwo).unwrap();
    let second = names.iter().find(|n| **n != first).unwrap().to_string();
    c.block_on(csi.controller_publish_volume(publish_request(rwo, &first, common::csi::block_cap())))
        .expect("publish RWO");
    refused(
        c.block_on(csi.controller_publish_volume(publish_request(rwo, &second, rwx_block()))),
        Code::FailedPrecondition,
        "single-writer volume (writePolicy SingleWriter of VirtualSAN vms)",
    );
    assert_eq!(attached_nodes(&c, rwo), vec![first.clone()]);
    assert_eq!(c.write_priority(rwo).map(|p| p.0), Some(first.clone()), "the refused publish moved nothing");
    c.block_on(csi.controller_unpublish_volume(unpublish_request(rwo, &first))).unwrap();

    for v in [vol, rwo] {
        c.block_on(csi.delete_volume(pb::DeleteVolumeRequest { volume_id: v.into(), ..Default::default() }))
            .expect("delete");
    }
}
