//! kill -9 of the writing agent under load: after failover and its return, the activity log
//! brings the replicas back to identical, and every write acknowledged before the crash is
//! there.

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn writer_killed_under_load_replicas_converge() {
    if !have("qemu-io") || !have("qemu-img") || !have("fio") {
        return;
    }
    let size = 64 * MIB;
    let (dir, mut c) = cluster(2, "vol", size, &[0, 1]);
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    let mut image = Image::new(size);
    // Acknowledged data in the second half, kept out of the load's way.
    let half = size / 2;
    let ops: Vec<String> = (0..8).map(|k| format!("write -P {} {} 1M", 0x40 + k, half + k * 2 * MIB)).collect();
    for k in 0..8u64 {
        image.write(half + k * 2 * MIB, &vec![0x40 + k as u8; MIB as usize]);
    }
    qemu_io(&c.members[0].nbd_uri("vol"), &ops);

    // Random writes at QD32 over the first half; the writer is killed in the middle.
    let fio = Command::new("fio")
        .args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={}", c.members[0].nbd_uri("vol")),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            &format!("--size={}", half),
            "--time_based",
            "--runtime=20",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    c.wait_for(0, "vol", Duration::from_secs(20), |v| v.replicas.iter().any(|r| r.local && r.generation > 0)).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    c.kill(0);
    let _ = { fio }.wait();

    // Failover: node-2 takes write priority and writes; node-1 returns.
    let v = c.promote(1, "vol").unwrap();
    assert_eq!(v.writer, "node-2", "{v:?}");
    qemu_io(&c.members[1].nbd_uri("vol"), &["write -P 0x99 0 64k".into()]);
    c.start(0).unwrap();
    c.wait_healthy(0, "vol", Duration::from_secs(60)).unwrap();
    c.wait_healthy(1, "vol", Duration::from_secs(60)).unwrap();
    let data = assert_replicas_identical(&mut c, "vol", &[0, 1]);
    assert!(data[..65536].iter().all(|&b| b == 0x99), "the write after failover is missing");
    assert_same("acknowledged data", &data[half as usize..], &image.data[half as usize..]);
    let _ = dir;
}
