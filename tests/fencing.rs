//! Write priority and fencing: only the node holding write priority writes; promoting
//! another node raises the epoch, and the old holder's writes are then refused by the
//! replicas and fail at its client instead of being acknowledged.

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn only_the_holder_writes_and_promotion_fences_the_old_holder() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let size = 16 * MIB;
    let (_dir, mut c) = cluster(2, "vol", size, &[0, 1]);
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    let v = c.volume(1, "vol").unwrap();
    assert_eq!((v.writer.as_str(), v.epoch), ("node-1", 0), "{v:?}");

    // node-2 does not hold write priority: its writes fail, its reads work.
    let (ok, out) = qemu_io_try(&c.members[1].nbd_uri("vol"), &["write -P 0x22 0 4096"]);
    assert!(!ok, "a write through a node without write priority succeeded:\n{out}");
    qemu_io(&c.members[0].nbd_uri("vol"), &["write -P 0x11 0 65536".into()]);
    qemu_io(&c.members[1].nbd_uri("vol"), &["read -P 0x11 0 65536".into()]);

    // A client of node-1 writes, pauses while node-2 is promoted, and writes again: the
    // second write must fail, not be acknowledged.
    let client = Command::new("qemu-io")
        .args(["-f", "raw", &c.members[0].nbd_uri("vol")])
        .args(["-c", "write -P 0x33 4096 4096", "-c", "sleep 3000", "-c", "write -P 0x44 8192 4096"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.wait_for(1, "vol", Duration::from_secs(10), |v| v.replicas.iter().all(|r| r.state == "in-sync")).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let v = c.promote(1, "vol").unwrap();
    assert_eq!((v.writer.as_str(), v.epoch), ("node-2", 1), "{v:?}");
    let out = client.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("wrote 4096/4096 bytes at offset 4096"), "{text}");
    assert!(text.contains("write failed"), "the fenced holder acknowledged a write:\n{text}");

    // node-1 knows it lost priority; node-2 writes.
    let v = c.wait_for(0, "vol", Duration::from_secs(10), |v| v.writer == "node-2").unwrap();
    assert_eq!(v.epoch, 1, "{v:?}");
    qemu_io(&c.members[1].nbd_uri("vol"), &["write -P 0x55 12288 4096".into()]);
    let (ok, out) = qemu_io_try(&c.members[0].nbd_uri("vol"), &["write -P 0x66 12288 4096"]);
    assert!(!ok, "node-1 wrote after losing priority:\n{out}");

    // The epoch survives a restart of the fenced node.
    c.stop(0);
    c.start(0).unwrap();
    let v = c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    assert_eq!((v.writer.as_str(), v.epoch), ("node-2", 1), "{v:?}");
    let (ok, out) = qemu_io_try(&c.members[0].nbd_uri("vol"), &["write -P 0x66 12288 4096"]);
    assert!(!ok, "node-1 wrote after a restart:\n{out}");

    // Every replica holds what was acknowledged, and nothing of the refused write.
    for i in 0..2 {
        qemu_io(
            &c.members[i].nbd_uri("vol"),
            &[
                "read -P 0x11 0 4096".into(),
                "read -P 0x33 4096 4096".into(),
                "read -P 0x11 8192 4096".into(),
                "read -P 0x55 12288 4096".into(),
            ],
        );
    }
    let data = assert_replicas_identical(&mut c, "vol", &[0, 1]);
    assert!(data[8192..12288].iter().all(|&b| b == 0x11), "the refused write reached a replica");
}
