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
