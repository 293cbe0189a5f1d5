//! CSI with filesystems on real kernel paths: a 2-way volume is created by the controller,
//! published, staged (a loop device over the agent's FUSE export appears, mkfs runs, it is
//! mounted) and published into a pod directory on one node; files written and synced there
//! are read back, unchanged, after the volume moved to the other replica node. For ext4
//! and xfs, and for a read-only publish.

mod common;
use common::csi::*;
use common::*;

/// Indices of the members holding the volume's replicas, from its accessible topology.
fn replica_nodes(h: &CsiCluster, v: &peersan_csi_driver::pb::Volume) -> Vec<usize> {
    let mut out: Vec<usize> = v
        .accessible_topology
        .iter()
        .map(|t| {
            let name = &t.segments[peersan_csi_driver::TOPOLOGY_NODE_KEY];
            h.c.members.iter().position(|m| m.name == *name).unwrap()
        })
        .collect();
    out.sort();
    out
}

fn files_move_between_nodes(fs: &str, size: u64) {
    if !can_stage() {
        return;
    }
    let h = CsiCluster::start(3);
    let cap = mount_cap(fs);
    let id = format!("pvc-{fs}-move");
    let vol = h.create(&id, size, &[("replicas", "2")], &cap).expect("CreateVolume");
    assert_eq!(vol.capacity_bytes as u64, size);
    let nodes = replica_nodes(&h, &vol);
    assert_eq!(nodes.len(), 2, "two replicas on distinct nodes: {vol:?}");
    let (a, b) = (nodes[0], nodes[1]);

    let target = h.attach_pod(&vol, a, "pod-1", &cap, false);
    // Staged: the staging path is a mount of a loop device holding the filesystem asked
    // for, and the pod's target is a mount of the same filesystem.
    let staging = h.staging(a, &id);
    let mounts = mounts_under(&h.c.dir);
    let staged = mounts.iter().find(|m| m.mount_point == staging).expect("staging path is mounted");
    assert!(staged.source.starts_with("/dev/loop"), "{staged:?}");
    assert_eq!(staged.fs_type, fs);
    let published = mounts.iter().find(|m| m.mount_point == target).expect("target is mounted");
    assert_eq!(published.source, staged.source);
    assert_eq!(loop_devices_under(&h.c.dir).len(), 1, "one loop device, backed by the FUSE export");

    let sums = write_files(&target, 6, 7);
    h.detach_pod(&id, a, "pod-1");
    // Everything is undone on node A: no mount, no loop device, no FUSE export.
    assert!(mounts_under(&h.c.dir).is_empty(), "left mounted: {:?}", mounts_under(&h.c.dir));
    assert!(loop_devices_under(&h.c.dir).is_empty(), "loop device left: {:?}", loop_devices_under(&h.c.dir));
    assert!(!target.exists(), "the target path is removed");

    // On the other replica node the filesystem is found (not formatted again) and holds
    // the same files.
    let target_b = h.attach_pod(&vol, b, "pod-2", &cap, false);
    assert_eq!(read_sums(&target_b), sums, "files on node {} differ from what node {} wrote", b + 1, a + 1);
    // And it is writable there.
    let more = write_files(&target_b.join("more"), 2, 8);
    assert_eq!(read_sums(&target_b.join("more")), more);
    h.detach_pod(&id, b, "pod-2");

    h.block_on(
        h.controller()
            .delete_volume(peersan_csi_driver::pb::DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() }),
    )
    .expect("DeleteVolume");
    assert!(h.c.volume(a, &id).is_err() && h.c.volume(b, &id).is_err(), "replicas deleted");
}

#[test]
fn ext4_files_move_between_nodes() {
    files_move_between_nodes("ext4", 256 * MIB);
}

#[test]
fn xfs_files_move_between_nodes() {
    // mkfs.xfs refuses filesystems smaller than 300 MiB.
    files_move_between_nodes("xfs", 320 * MIB);
}

#[test]
fn read_only_publish_refuses_writes_and_serves_reads() {
    if !can_stage() {
        return;
    }
    let h = CsiCluster::start(2);
    let cap = mount_cap("ext4");
    let id = "pvc-read-only";
    let vol = h.create(id, 128 * MIB, &[], &cap).expect("CreateVolume");
    let target = h.attach_pod(&vol, 0, "writer", &cap, false);
    let sums = write_files(&target, 3, 11);
    h.detach_pod(id, 0, "writer");

    let target = h.attach_pod(&vol, 1, "reader", &cap, true);
    let m = mounts_under(&h.c.dir).into_iter().find(|m| m.mount_point == target).unwrap();
    assert!(m.read_only(), "{m:?}");
    assert_eq!(read_sums(&target), sums);
    let err = std::fs::write(target.join("new-file"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(30), "EROFS expected, got {err}");
    // Publishing the same target read-write is refused.
    let e = h.node_publish(1, id, "reader", &cap, false).unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    h.detach_pod(id, 1, "reader");
    assert!(mounts_under(&h.c.dir).is_empty());
}
