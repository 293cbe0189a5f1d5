//! Read failover: when the local replica is missing or returns I/O errors, reads through
//! that node return the acknowledged data from a peer.

mod common;
use common::disk::FailingDisk;
use common::*;
use std::time::Duration;

#[test]
fn deleted_replica_reads_come_from_peer() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    // A large sparse volume, so that the replacement replica's full resync is still running
    // while the test reads.
    let size = 256 * MIB;
    let (dir, mut c) = cluster(2, "vol", size, &[0, 1]);
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    let mut image = Image::new(size);
    random_writes(&c.members[0].nbd_uri("vol"), &mut image, 60, 21, dir.path());
    c.stop(0);
    std::fs::remove_file(c.members[0].replica_path("vol")).unwrap();
    c.start(0).unwrap();
    // The replacement is empty: node-1 must not serve reads from it.
    let v = c.volume(0, "vol").unwrap();
    let local = v.replicas.iter().find(|r| r.local).unwrap();
    assert_ne!(local.state, "in-sync", "an empty replacement replica claims to be in sync: {v:?}");
    // Read back the written region (and a bit more) through node-1 while it resyncs.
    let got = read_volume(&c.members[0].nbd_uri("vol"), dir.path());
    assert_same("read through node-1 with its replica deleted", &got, &image.data);
    c.wait_healthy(0, "vol", Duration::from_secs(120)).unwrap();
    assert_replicas_equal(&mut c, "vol", &[0, 1], &image.data);
}

#[test]
fn replica_returning_eio_fails_over_to_peer() {
    if !is_root() {
        eprintln!(
            "SKIPPED: needs root (FUSE mount and dropping the page cache) to make a disk return EIO; CI runs as root"
        );
        return;
    }
    if !have("qemu-io") || !have("qemu-img") || !have("nbdkit") || !have("nbdfuse") {
        return;
    }
    let size = 32 * MIB;
    let dir = test_dir();
    let dev = FailingDisk::new(dir.path(), size + 2 * MIB);
    let mut vol = VolumeDef::new("vol", size, vec![0, 1]);
    vol.devices.push((0, dev.path()));
    let mut c = start_cluster(dir.path(), 2, vec![vol], |_| {});
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    let mut image = Image::new(size);
    random_writes(&c.members[0].nbd_uri("vol"), &mut image, 60, 31, dir.path());

    dev.fail();
    // Reads and writes through node-1 go on; the node is reported diskless.
    let got = read_volume(&c.members[0].nbd_uri("vol"), dir.path());
    assert_same("read through node-1 with a failing disk", &got, &image.data);
    random_writes(&c.members[0].nbd_uri("vol"), &mut image, 30, 32, dir.path());
    assert_same(
        "read after writes with a failing disk",
        &read_volume(&c.members[0].nbd_uri("vol"), dir.path()),
        &image.data,
    );
    let v = c.volume(0, "vol").unwrap();
    let local = v.replicas.iter().find(|r| r.local).unwrap();
    assert_eq!(local.state, "diskless", "{v:?}");
    assert_eq!(v.health, "degraded", "{v:?}");
    c.stop(0);
    c.stop(1);
    assert_same("replica on node-2", &read_replica_data(&c.members[1].replica_path("vol")).unwrap(), &image.data);
}
