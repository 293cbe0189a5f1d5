//! kill -9 of a peer during a write load: the load goes on; after restart the peer
//! resynchronises and all replicas converge byte for byte.

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn peer_killed_during_fio_load_resyncs_and_converges() {
    if !have("fio") {
        return;
    }
    let size = 48 * MIB;
    let (_dir, mut c) = cluster(3, "vol", size, &[0, 1, 2]);
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    let uri = c.members[0].nbd_uri("vol");
    // About 6 s of verified random writes at QD32.
    let fio = Command::new("fio")
        .args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=40M",
            "--rate_iops=2000",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--verify_fatal=1",
            "--output-format=json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill node-3 once the load is running (the volume has written blocks).
    c.wait_for(0, "vol", Duration::from_secs(20), |v| v.replicas.iter().any(|r| r.local && r.generation > 0)).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    c.kill(2);
    let killed_at = Instant::now();
    let degraded = c.wait_for(0, "vol", Duration::from_secs(10), |v| v.health == "degraded").unwrap();
    assert!(degraded.replicas.iter().any(|r| r.node == "node-3" && r.state != "in-sync"), "{degraded:?}");
    let out = fio.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("\"error\" : 0"),
        "fio failed after a peer was killed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(killed_at.elapsed() > Duration::from_secs(1), "the load ended before the kill had any effect");

    c.start(2).unwrap();
    c.wait_healthy(2, "vol", Duration::from_secs(60)).unwrap();
    c.wait_healthy(0, "vol", Duration::from_secs(10)).unwrap();
    let first = assert_replicas_identical(&mut c, "vol", &[0, 1, 2]);
    assert!(first.iter().any(|&b| b != 0), "the load wrote nothing");
}

#[test]
fn writes_while_peer_down_reach_it_after_restart() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let size = 16 * MIB;
    let (dir, mut c) = cluster(2, "vol", size, &[0, 1]);
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    let mut image = Image::new(size);
    random_writes(&c.members[0].nbd_uri("vol"), &mut image, 50, 7, dir.path());
    c.kill(1);
    random_writes(&c.members[0].nbd_uri("vol"), &mut image, 80, 8, dir.path());
    let v = c.volume(0, "vol").unwrap();
    assert_eq!(v.health, "degraded", "{v:?}");
    c.start(1).unwrap();
    c.wait_healthy(1, "vol", Duration::from_secs(30)).unwrap();
    assert_same(
        "read through node-2 after resync",
        &read_volume(&c.members[1].nbd_uri("vol"), dir.path()),
        &image.data,
    );
    assert_replicas_equal(&mut c, "vol", &[0, 1], &image.data);
}

#[test]
fn peer_that_stops_answering_is_dropped_after_the_timeout() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let size = 16 * MIB;
    let dir = test_dir();
    let mut c = start_cluster(dir.path(), 2, vec![VolumeDef::new("vol", size, vec![0, 1])], |c| {
        c.peer_io_timeout = Duration::from_secs(2)
    });
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    let mut image = Image::new(size);
    random_writes(&c.members[0].nbd_uri("vol"), &mut image, 20, 61, dir.path());

    // Freeze node-2: its TCP connections stay open but it answers nothing.
    let pid = c.pid(1).unwrap().to_string();
    run(Command::new("kill").args(["-STOP", &pid]));
    let started = Instant::now();
    random_writes(&c.members[0].nbd_uri("vol"), &mut image, 20, 62, dir.path());
    let took = started.elapsed();
    // The writes waited for the timeout once, then went on without node-2.
    assert!(took >= Duration::from_secs(2), "writes completed in {took:?} although a peer could not have answered");
    assert!(took < Duration::from_secs(15), "writes took {took:?}: the stalled peer was not dropped");
    let v = c.volume(0, "vol").unwrap();
    assert_eq!(v.health, "degraded", "{v:?}");

    // When it wakes up it learns that it missed writes and is resynchronised.
    run(Command::new("kill").args(["-CONT", &pid]));
    // node-1 recorded that node-2 missed writes, so it reports the volume healthy only
    // once node-2 has been resynchronised.
    c.wait_healthy(0, "vol", Duration::from_secs(30)).unwrap();
    c.wait_healthy(1, "vol", Duration::from_secs(30)).unwrap();
    assert_same(
        "read through node-2 after it woke up",
        &read_volume(&c.members[1].nbd_uri("vol"), dir.path()),
        &image.data,
    );
    assert_replicas_equal(&mut c, "vol", &[0, 1], &image.data);
}
