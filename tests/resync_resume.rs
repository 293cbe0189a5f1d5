//! Interrupted resync resumes without starting over (target or source killed mid-copy), and
//! back-to-back failures (A down, B down, A up, B up) converge with nothing lost.

mod common;
use common::*;
use std::time::Duration;

/// Writes `n` MiB of distinct 1 MiB patterns through `uri`, every other MiB.
fn write_mibs(uri: &str, image: &mut Image, n: u64, fill0: u8) {
    let ops: Vec<String> = (0..n)
        .map(|k| {
            let fill = fill0.wrapping_add(k as u8);
            image.write(2 * k * MIB, &vec![fill; MIB as usize]);
            format!("write -P {fill} {} 1M", 2 * k * MIB)
        })
        .collect();
    qemu_io(uri, &ops);
}

fn local_progress(c: &LocalCluster, i: usize) -> (u64, u64) {
    let v = c.volume(i, "vol").unwrap();
    let r = v.replicas.iter().find(|r| r.local).unwrap();
    (r.resync_done_bytes, r.resync_total_bytes)
}

#[test]
fn resync_resumes_after_the_target_or_the_source_is_killed() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let size = 64 * MIB;
    let rate = 4 * MIB;
    let dir = test_dir();
    let mut c =
        start_cluster(dir.path(), 2, vec![VolumeDef::new("vol", size, vec![0, 1])], |c| c.resync_rate = Some(rate));
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    let mut image = Image::new(size);
    c.stop(1);
    write_mibs(&c.members[0].nbd_uri("vol"), &mut image, 24, 1);
    c.start(1).unwrap();
    let (_, total) = local_progress(&c, 1);
    c.wait_for(1, "vol", Duration::from_secs(30), |v| {
        v.replicas.iter().any(|r| r.local && r.resync_done_bytes * 5 >= r.resync_total_bytes * 2)
    })
    .unwrap();
    let (done, total2) = local_progress(&c, 1);
    assert!(total == 0 || total == total2, "{total} vs {total2}");
    assert_eq!(total2, 24 * MIB, "the resync copies what node-2 missed");

    // kill -9 of the target: it resumes from its persisted record.
    c.kill(1);
    c.start(1).unwrap();
    let v = c
        .wait_for(1, "vol", Duration::from_secs(20), |v| {
            v.replicas.iter().any(|r| r.local && r.resync_total_bytes > 0) || v.health == "healthy"
        })
        .unwrap();
    let again = v.replicas.iter().find(|r| r.local).unwrap().resync_total_bytes;
    // At most what was left plus a second of copying and the requests in flight.
    let bound = total2 - done + rate + 8 * MIB;
    assert!(again <= bound, "restarted resync copies {again} bytes; {done} of {total2} were done (bound {bound})");

    // kill -9 of the source in the middle: the target continues where it was.
    c.wait_for(1, "vol", Duration::from_secs(30), |v| {
        v.replicas.iter().any(|r| r.local && r.resync_done_bytes >= 2 * MIB)
    })
    .unwrap();
    c.kill(0);
    c.start(0).unwrap();
    c.wait_healthy(1, "vol", Duration::from_secs(60)).unwrap();
    c.wait_healthy(0, "vol", Duration::from_secs(60)).unwrap();
    assert_replicas_equal(&mut c, "vol", &[0, 1], &image.data);
}

#[test]
fn back_to_back_failures_converge_without_losing_writes() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let size = 32 * MIB;
    let (dir, mut c) = cluster(3, "vol", size, &[0, 1, 2]);
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    let uri = c.members[0].nbd_uri("vol");
    let mut image = Image::new(size);
    random_writes(&uri, &mut image, 40, 101, dir.path());
    c.kill(1); // A down
    random_writes(&uri, &mut image, 40, 102, dir.path());
    c.kill(2); // B down
    random_writes(&uri, &mut image, 40, 103, dir.path());
    c.start(1).unwrap(); // A up
    random_writes(&uri, &mut image, 40, 104, dir.path());
    c.start(2).unwrap(); // B up
    random_writes(&uri, &mut image, 40, 105, dir.path());
    for i in 0..3 {
        c.wait_healthy(i, "vol", Duration::from_secs(60)).unwrap();
    }
    for i in 0..3 {
        assert_same(
            &format!("read through node-{}", i + 1),
            &read_volume(&c.members[i].nbd_uri("vol"), dir.path()),
            &image.data,
        );
    }
    assert_replicas_equal(&mut c, "vol", &[0, 1, 2], &image.data);
}
