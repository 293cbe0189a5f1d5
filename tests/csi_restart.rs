//! A node agent killed (SIGKILL) and restarted between stage and unstage: its FUSE export
//! died with it; kubelet's unpublish and unstage still undo everything (mounts, the loop
//! device, the dead FUSE mount), the data synced before the kill is on the other replica,
//! and the volume can be staged again on the restarted node.

mod common;
use common::csi::*;
use common::*;

#[test]
fn unstage_after_the_agent_was_killed_cleans_everything() {
    if !can_stage() {
        return;
    }
    let mut h = CsiCluster::start(2);
    let cap = mount_cap("ext4");
    let id = "pvc-restart";
    let vol = h.create(id, 128 * MIB, &[("replicas", "2")], &cap).unwrap();
    let target = h.attach_pod(&vol, 0, "pod-1", &cap, false);
    let sums = write_files(&target, 4, 21);
    let fuse_dir = h.c.members[0].fuse_dir();
    assert!(mounts_under(&fuse_dir).len() == 1, "the FUSE export is mounted: {:?}", mounts_under(&fuse_dir));

    h.c.kill(0);
    h.c.start(0).unwrap();
    // Staging again before cleaning up is refused with an explanation, not a hang.
    let e = h.stage(0, id, &cap, &vol.volume_context, &Default::default()).unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");

    h.node_unpublish(0, id, "pod-1").expect("NodeUnpublishVolume after restart");
    h.unstage(0, id).expect("NodeUnstageVolume after restart");
    assert!(mounts_under(&h.c.dir).is_empty(), "left mounted: {:?}", mounts_under(&h.c.dir));
    assert!(loop_devices_under(&h.c.dir).is_empty(), "loop device left: {:?}", loop_devices_under(&h.c.dir));
    h.unpublish(id, 0).unwrap();

    // What was synced before the kill is on node 2.
    let t2 = h.attach_pod(&vol, 1, "pod-2", &cap, false);
    assert_eq!(read_sums(&t2), sums);
    h.detach_pod(id, 1, "pod-2");
    // And node 1 can stage it again.
    let t1 = h.attach_pod(&vol, 0, "pod-3", &cap, false);
    assert_eq!(read_sums(&t1), sums);
    h.detach_pod(id, 0, "pod-3");
    assert!(mounts_under(&h.c.dir).is_empty() && loop_devices_under(&h.c.dir).is_empty());
}
