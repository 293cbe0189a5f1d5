//! CSI with volumeMode Block: the device node is bind-mounted at the pod's target path;
//! data written there with O_DIRECT on one node reads back identically on the other.

mod common;
use common::csi::*;
use common::*;
use std::process::Command;

#[test]
fn raw_block_data_moves_between_nodes() {
    if !can_stage() {
        return;
    }
    let h = CsiCluster::start(2);
    let cap = block_cap();
    let id = "pvc-block";
    let vol = h.create(id, 64 * MIB, &[("replicas", "2")], &cap).expect("CreateVolume");

    let target = h.attach_pod(&vol, 0, "pod-1", &cap, false);
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(&target).unwrap().file_type().is_block_device(), "target is the device node");
    assert_eq!(
        run(Command::new("blockdev").arg("--getsize64").arg(&target)).trim(),
        (64 * MIB).to_string(),
        "the device has the volume's size"
    );
    // 24 MiB of seeded data, written through the target with O_DIRECT at offset 8 MiB.
    let data = {
        use rand::{Rng, SeedableRng};
        let mut b = vec![0u8; 24 << 20];
        rand::rngs::StdRng::seed_from_u64(5).fill(&mut b[..]);
        b
    };
    let src = h.c.dir.join("pattern");
    std::fs::write(&src, &data).unwrap();
    run(Command::new("dd").arg(format!("if={}", src.display())).arg(format!("of={}", target.display())).args([
        "bs=1M",
        "seek=8",
        "oflag=direct",
        "conv=notrunc,fsync",
        "status=none",
    ]));
    h.detach_pod(id, 0, "pod-1");
    assert!(loop_devices_under(&h.c.dir).is_empty());
    assert!(mounts_under(&h.c.dir).is_empty());

    let target = h.attach_pod(&vol, 1, "pod-2", &cap, false);
    let back = h.c.dir.join("back");
    run(Command::new("dd").arg(format!("if={}", target.display())).arg(format!("of={}", back.display())).args([
        "bs=1M",
        "skip=8",
        "count=24",
        "iflag=direct",
        "status=none",
    ]));
    assert_same("block data read on node 2", &std::fs::read(&back).unwrap(), &data);
    // The rest of the device is still zero.
    run(Command::new("dd").arg(format!("if={}", target.display())).arg(format!("of={}", back.display())).args([
        "bs=1M",
        "count=8",
        "iflag=direct",
        "status=none",
    ]));
    assert!(std::fs::read(&back).unwrap().iter().all(|b| *b == 0));
    h.detach_pod(id, 1, "pod-2");
}

/// What kubelet passes for a ReadWriteMany claim with volumeMode Block: the node stages and
/// publishes it like any block volume, on two nodes at once, and refuses it for a
/// filesystem. (The controller with a nodes file publishes volumes on one node, so the
/// volume is published there with a single-node mode; kubelet's calls come straight to the
/// node service.)
#[test]
fn multi_writer_block_access_is_staged_on_two_nodes() {
    if !can_stage() {
        return;
    }
    use peersan_csi_driver::pb::volume_capability::AccessMode;
    use peersan_csi_driver::pb::volume_capability::access_mode::Mode;
    let h = CsiCluster::start(2);
    let id = "pvc-rwx-block";
    let vol = h.create(id, 32 * MIB, &[("replicas", "2")], &block_cap()).expect("CreateVolume");
    let pctx = h.publish(id, 0, &block_cap(), false).expect("ControllerPublishVolume");
    let mut rwx = block_cap();
    rwx.access_mode = Some(AccessMode { mode: Mode::MultiNodeMultiWriter as i32 });
    let mut rwx_fs = mount_cap("ext4");
    rwx_fs.access_mode = rwx.access_mode;

    let e = h.stage(1, id, &rwx_fs, &vol.volume_context, &pctx).unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("not cluster filesystems"), "{e:?}");

    let targets: Vec<_> = (0..2)
        .map(|n| {
            h.stage(n, id, &rwx, &vol.volume_context, &pctx).expect("NodeStageVolume");
            h.node_publish(n, id, "vm", &rwx, false).expect("NodePublishVolume")
        })
        .collect();
    assert_eq!(loop_devices_under(&h.c.dir).len(), 2, "one device per node");
    // Written on node 1 (the writer), read on node 2 while both are published.
    let data: Vec<u8> = (0..(4 << 20)).map(|i: u32| (i % 251) as u8).collect();
    let src = h.c.dir.join("pattern");
    std::fs::write(&src, &data).unwrap();
    run(Command::new("dd").arg(format!("if={}", src.display())).arg(format!("of={}", targets[0].display())).args([
        "bs=1M",
        "seek=2",
        "oflag=direct",
        "conv=notrunc,fsync",
        "status=none",
    ]));
    let back = h.c.dir.join("back");
    run(Command::new("dd").arg(format!("if={}", targets[1].display())).arg(format!("of={}", back.display())).args([
        "bs=1M",
        "skip=2",
        "count=4",
        "iflag=direct",
        "status=none",
    ]));
    assert_same("data read on node 2", &std::fs::read(&back).unwrap(), &data);
    for n in 0..2 {
        h.node_unpublish(n, id, "vm").expect("NodeUnpublishVolume");
        h.unstage(n, id).expect("NodeUnstageVolume");
    }
    h.unpublish(id, 0).unwrap();
    assert!(loop_devices_under(&h.c.dir).is_empty() && mounts_under(&h.c.dir).is_empty());
}
