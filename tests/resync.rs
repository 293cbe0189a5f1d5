//! Resynchronisation copies only what the replica missed, runs at the configured rate,
//! reports its progress, and lets foreground writes go on; afterwards the replicas are
//! identical.

mod common;
use common::*;
use std::time::{Duration, Instant};

#[test]
fn resync_copies_only_missed_blocks_at_the_configured_rate_with_progress() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let size = 48 * MIB;
    let rate = MIB;
    let dir = test_dir();
    let mut c =
        start_cluster(dir.path(), 2, vec![VolumeDef::new("vol", size, vec![0, 1])], |c| c.resync_rate = Some(rate));
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    let mut image = Image::new(size);
    random_writes(&c.members[0].nbd_uri("vol"), &mut image, 40, 71, dir.path());
    c.stop(1);
    random_writes(&c.members[0].nbd_uri("vol"), &mut image, 40, 72, dir.path());
    // node-1 counts what node-2 missed: the blocks of those writes, not the volume.
    let missed = c.volume(0, "vol").unwrap().replicas.iter().find(|r| r.node == "node-2").unwrap().out_of_sync_bytes;
    assert!(missed > 0 && missed < size / 4, "node-2 missed {missed} bytes of {size}");

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
    assert_eq!(local.resync_total_bytes, missed, "{local:?}");
    assert!(
        local.resync_rate_bytes_per_sec < rate * 3 / 2,
        "resync runs at {} B/s, limit {rate}: {local:?}",
        local.resync_rate_bytes_per_sec
    );
    assert!(local.resync_eta_seconds > 0, "{local:?}");
    // The CLI follows it with a progress bar until the volume is healthy.
    let watch = std::process::Command::new(env!("CARGO_BIN_EXE_peersan"))
        .args(["--socket", &c.members[1].api_socket().display().to_string(), "volume", "watch", "vol"])
        .args(["--timeout", "60"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Foreground writes go on meanwhile (sub-block ones too, on blocks not copied yet).
    random_writes(&c.members[0].nbd_uri("vol"), &mut image, 30, 73, dir.path());
    c.wait_healthy(1, "vol", Duration::from_secs(60)).unwrap();
    let out = watch.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.lines().any(|l| l.contains("vol node-2: [#") && l.contains("% ") && l.contains("ETA")), "{text}");
    assert_eq!(text.lines().last(), Some("vol: healthy"), "{text}");
    let took = started.elapsed();
    let floor = Duration::from_secs_f64(missed as f64 / rate as f64 * 0.8);
    assert!(took >= floor, "a {missed}-byte resync at {rate} B/s took only {took:?}");
    assert_same(
        "read through node-2 after resync",
        &read_volume(&c.members[1].nbd_uri("vol"), dir.path()),
        &image.data,
    );
    assert_replicas_equal(&mut c, "vol", &[0, 1], &image.data);
}
