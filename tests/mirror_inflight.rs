//! Many requests in flight: fio's nbd engine at QD32 with verification, and overlapping
//! asynchronous writes from qemu-io; replicas end identical.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

#[test]
fn fio_qd32_verify_three_way() {
    if !have("fio") {
        return;
    }
    let size = 32 * MIB;
    let (_dir, mut c) = cluster(3, "vol", size, &[0, 1, 2]);
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    let uri = c.members[0].nbd_uri("vol");
    let out = run(Command::new("fio").args([
        "--name=qd32",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bssplit=4k/50:8k/20:64k/20:1m/10",
        "--iodepth=32",
        "--size=32M",
        "--verify=crc32c",
        "--verify_state_save=0",
        "--verify_fatal=1",
        "--do_verify=1",
        "--output-format=json",
    ]));
    assert!(out.contains("\"error\" : 0"), "fio reported an error:\n{out}");
    let v = c.wait_healthy(0, "vol", Duration::from_secs(5)).unwrap();
    assert_eq!(v.health, "healthy");
    let first = assert_replicas_identical(&mut c, "vol", &[0, 1, 2]);
    assert!(first.iter().any(|&b| b != 0), "nothing was written");
}

#[test]
fn overlapping_writes_in_flight_leave_replicas_identical() {
    if !have("qemu-io") {
        return;
    }
    let size = 8 * MIB;
    let (_dir, mut c) = cluster(2, "vol", size, &[0, 1]);
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    // 96 writes in flight at once, heavily overlapping (all within 1 MiB, unaligned too).
    let mut ops = Vec::new();
    let mut writes = Vec::new();
    for i in 0..96u64 {
        let off = (i * 7919 * 13) % (1 << 20);
        let len = 512 + (i * 4099) % 65536;
        let pat = 1 + (i % 250) as u8;
        ops.push(format!("aio_write -P {pat} {off} {len}"));
        writes.push((off, len, pat));
    }
    ops.push("aio_flush".into());
    qemu_io(&c.members[0].nbd_uri("vol"), &ops);
    for i in 0..2 {
        c.stop(i);
    }
    let a = read_replica_data(&c.members[0].replica_path("vol")).unwrap();
    let b = read_replica_data(&c.members[1].replica_path("vol")).unwrap();
    assert_same("replica on node-2 vs node-1", &b, &a);
    // Every byte holds the pattern of one of the writes that covered it (or zero if none did).
    for (pos, &byte) in a.iter().enumerate().take(2 << 20) {
        let pos = pos as u64;
        let covering: Vec<u8> = writes.iter().filter(|(o, l, _)| *o <= pos && pos < o + l).map(|w| w.2).collect();
        if covering.is_empty() {
            assert_eq!(byte, 0, "byte {pos} was never written");
        } else {
            assert!(covering.contains(&byte), "byte {pos} = {byte} is from no write covering it ({covering:?})");
        }
    }
}
