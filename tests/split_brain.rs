//! Split brain: two replicas that each accepted writes the other missed are reported on
//! reconnect, never merged; the operator keeps one side and the other resynchronises.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn split_brain_is_reported_not_merged_and_resolved_by_the_operator() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let size = 16 * MIB;
    let (dir, mut c) = cluster(2, "vol", size, &[0, 1]);
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    let mut image = Image::new(size);
    random_writes(&c.members[0].nbd_uri("vol"), &mut image, 30, 91, dir.path());

    // node-1 writes alone ...
    c.stop(1);
    qemu_io(&c.members[0].nbd_uri("vol"), &["write -P 0xa1 1M 64k".into()]);
    c.stop(0);
    // ... then node-2 comes up alone, is promoted, and writes alone too.
    c.start(1).unwrap();
    let v = c.promote(1, "vol").unwrap();
    assert_eq!(v.writer, "node-2", "{v:?}");
    qemu_io(&c.members[1].nbd_uri("vol"), &["write -P 0xb2 2M 64k".into()]);
    image.write(2 * MIB, &[0xb2; 65536]);

    // On reconnect both report split brain, and neither took the other's data.
    c.start(0).unwrap();
    for i in 0..2 {
        let v = c.wait_for(i, "vol", Duration::from_secs(20), |v| v.health == "split-brain").unwrap();
        assert!(v.replicas.iter().any(|r| r.state == "split-brain" && r.detail.contains("not merged")), "{v:?}");
    }
    let a = read_replica_data(&c.members[0].replica_path("vol")).unwrap();
    let b = read_replica_data(&c.members[1].replica_path("vol")).unwrap();
    assert!(a[MIB as usize..][..65536].iter().all(|&x| x == 0xa1), "node-1 lost its own writes");
    assert!(b[2 * MIB as usize..][..65536].iter().all(|&x| x == 0xb2), "node-2 lost its own writes");
    assert!(!b[MIB as usize..][..65536].iter().all(|&x| x == 0xa1), "node-1's writes were merged into node-2");

    // The operator keeps node-2 (asking it; it tells node-1 to discard its changes).
    c.resolve_split_brain(1, "vol", 1).unwrap();
    c.wait_healthy(0, "vol", Duration::from_secs(30)).unwrap();
    c.wait_healthy(1, "vol", Duration::from_secs(30)).unwrap();
    assert_same("read through node-1", &read_volume(&c.members[0].nbd_uri("vol"), dir.path()), &image.data);
    assert_replicas_equal(&mut c, "vol", &[0, 1], &image.data);
}

#[test]
fn resolving_on_the_discarded_side_and_bad_requests() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let size = 8 * MIB;
    let (dir, mut c) = cluster(2, "vol", size, &[0, 1]);
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    // Without a split brain there is nothing to resolve.
    let e = c.resolve_split_brain(0, "vol", 0).unwrap_err();
    assert!(e.contains("no connected replica is in split brain"), "{e}");
    let e = c
        .api(0, |mut cl| async move {
            cl.resolve_split_brain(peersan_node_agent::api::pb::ResolveSplitBrainRequest {
                name: "vol".into(),
                keep: "node-9".into(),
            })
            .await
        })
        .unwrap_err();
    assert!(e.contains("not a replica"), "{e}");

    let mut image = Image::new(size);
    c.stop(1);
    qemu_io(&c.members[0].nbd_uri("vol"), &["write -P 0xa1 0 64k".into()]);
    c.stop(0);
    c.start(1).unwrap();
    c.promote(1, "vol").unwrap();
    qemu_io(&c.members[1].nbd_uri("vol"), &["write -P 0xb2 1M 64k".into()]);
    c.start(0).unwrap();
    c.wait_for(0, "vol", Duration::from_secs(20), |v| v.health == "split-brain").unwrap();
    // Keep node-1's data this time, asking node-2 (the side that is discarded).
    c.resolve_split_brain(1, "vol", 0).unwrap();
    image.write(0, &[0xa1; 65536]);
    c.wait_healthy(1, "vol", Duration::from_secs(30)).unwrap();
    c.wait_healthy(0, "vol", Duration::from_secs(30)).unwrap();
    // node-2 still holds write priority; its data is now node-1's.
    assert_same("read through node-2", &read_volume(&c.members[1].nbd_uri("vol"), dir.path()), &image.data);
    assert_replicas_equal(&mut c, "vol", &[0, 1], &image.data);
}
