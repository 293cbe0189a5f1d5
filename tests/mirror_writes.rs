//! 2-way and 3-way mirroring: random writes of varied sizes and offsets (unaligned too,
//! FUA, write-zeroes, discard) through a real NBD client; every replica equals the image
//! the test kept, byte for byte.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn two_way_random_writes_match_expected_image() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let size = 48 * MIB;
    let (dir, mut c) = cluster(2, "vol", size, &[0, 1]);
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    let mut image = Image::new(size);
    random_writes(&c.members[0].nbd_uri("vol"), &mut image, 300, 1, dir.path());
    // Every node serves the same data.
    assert_same("read through node-2", &read_volume(&c.members[1].nbd_uri("vol"), dir.path()), &image.data);
    let v = c.volume(0, "vol").unwrap();
    assert_eq!(v.health, "healthy", "{v:?}");
    assert_replicas_equal(&mut c, "vol", &[0, 1], &image.data);
}

#[test]
fn three_way_writes_through_every_node() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let size = 32 * MIB;
    let (dir, mut c) = cluster(3, "vol", size, &[0, 1, 2]);
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    let mut image = Image::new(size);
    for (round, node) in [0usize, 1, 2, 0].into_iter().enumerate() {
        // Only the holder of write priority writes: hand it to the next node each round.
        let v = c.promote(node, "vol").unwrap();
        assert_eq!(v.writer, c.members[node].name, "{v:?}");
        assert_eq!(v.epoch, round as u64, "{v:?}");
        random_writes(&c.members[node].nbd_uri("vol"), &mut image, 120, 10 + round as u64, dir.path());
    }
    c.wait_healthy(0, "vol", Duration::from_secs(30)).unwrap();
    for i in 0..3 {
        assert_same(
            &format!("read through node-{}", i + 1),
            &read_volume(&c.members[i].nbd_uri("vol"), dir.path()),
            &image.data,
        );
    }
    assert_replicas_equal(&mut c, "vol", &[0, 1, 2], &image.data);
}
