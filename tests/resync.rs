//! Resynchronisation runs at the configured rate, reports its progress, and lets
//! foreground writes go on; afterwards the replicas are identical.

mod common;
use common::*;
use std::time::{Duration, Instant};

#[test]
fn resync_is_rate_limited_reports_progress_and_keeps_foreground_writes() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let size = 48 * MIB;
    let rate = 12 * MIB;
    let dir = test_dir();
    let mut c =
        start_cluster(dir.path(), 2, vec![VolumeDef::new("vol", size, vec![0, 1])], |c| c.resync_rate = Some(rate));
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    let mut image = Image::new(size);
    random_writes(&c.members[0].nbd_uri("vol"), &mut image, 40, 71, dir.path());
    c.kill(1);
    random_writes(&c.members[0].nbd_uri("vol"), &mut image, 40, 72, dir.path());

    c.start(1).unwrap();
    let started = Instant::now();
    // Progress is visible while it runs, and the copy keeps to the rate.
    let v = c
        .wait_for(1, "vol", Duration::from_secs(10), |v| {
            v.replicas.iter().any(|r| {
                r.local && r.state == "catching-up" && r.resync_done_bytes > 0 && r.resync_rate_bytes_per_sec > 0
            })
        })
        .unwrap();
    let local = v.replicas.iter().find(|r| r.local).unwrap();
    assert_eq!(local.resync_total_bytes, size, "{local:?}");
    assert!(
        local.resync_rate_bytes_per_sec < rate * 3 / 2,
        "resync runs at {} B/s, limit {rate}: {local:?}",
        local.resync_rate_bytes_per_sec
    );
    assert!(local.resync_eta_seconds > 0, "{local:?}");
    // Foreground writes through either node go on meanwhile.
    random_writes(&c.members[0].nbd_uri("vol"), &mut image, 30, 73, dir.path());
    random_writes(&c.members[1].nbd_uri("vol"), &mut image, 30, 74, dir.path());
    c.wait_healthy(1, "vol", Duration::from_secs(60)).unwrap();
    let took = started.elapsed();
    let floor = Duration::from_secs_f64(size as f64 / rate as f64 * 0.8);
    assert!(took >= floor, "a {size}-byte resync at {rate} B/s took only {took:?}");
    assert_same(
        "read through node-2 after resync",
        &read_volume(&c.members[1].nbd_uri("vol"), dir.path()),
        &image.data,
    );
    assert_replicas_equal(&mut c, "vol", &[0, 1], &image.data);
}
