//! A restart of all agents keeps the data, and the replicas' metadata says which of them
//! are in sync.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn restart_of_all_agents_keeps_data() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let size = 16 * MIB;
    let (dir, mut c) = cluster(3, "vol", size, &[0, 1, 2]);
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    let mut image = Image::new(size);
    random_writes(&c.members[0].nbd_uri("vol"), &mut image, 100, 41, dir.path());

    // Graceful restart of everything.
    for i in 0..3 {
        c.stop(i);
    }
    c.start_all().unwrap();
    let v = c.wait_healthy(1, "vol", Duration::from_secs(20)).unwrap();
    assert!(v.replicas.iter().any(|r| r.local && r.generation > 0), "{v:?}");
    assert_same("after graceful restart", &read_volume(&c.members[1].nbd_uri("vol"), dir.path()), &image.data);

    // kill -9 of everything.
    c.promote(2, "vol").unwrap();
    random_writes(&c.members[2].nbd_uri("vol"), &mut image, 50, 42, dir.path());
    for i in 0..3 {
        c.kill(i);
    }
    c.start_all().unwrap();
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    assert_same("after kill -9 of every agent", &read_volume(&c.members[0].nbd_uri("vol"), dir.path()), &image.data);
    assert_replicas_equal(&mut c, "vol", &[0, 1, 2], &image.data);
}

#[test]
fn outdated_replica_stays_outdated_across_restart() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let size = 8 * MIB;
    let (dir, mut c) = cluster(2, "vol", size, &[0, 1]);
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    let mut image = Image::new(size);
    c.kill(1);
    random_writes(&c.members[0].nbd_uri("vol"), &mut image, 40, 51, dir.path());
    // node-1 recorded durably that node-2 missed writes. Restart both, node-2 first: when
    // node-1 returns, node-2 learns from node-1's record that it is out of date and is
    // resynchronised from node-1.
    c.stop(0);
    c.start(1).unwrap();
    c.start(0).unwrap();
    c.wait_healthy(1, "vol", Duration::from_secs(30)).unwrap();
    assert_same("node-2 after resync", &read_volume(&c.members[1].nbd_uri("vol"), dir.path()), &image.data);
    assert_replicas_equal(&mut c, "vol", &[0, 1], &image.data);
}
