//! `degraded_writes: refuse`: while a replica does not receive writes, writes fail instead
//! of going on without it; reads go on; once it is back and in sync, writes work again and
//! every replica holds what was acknowledged.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn refused_while_a_replica_is_missing_and_accepted_again_when_it_returns() {
    if !have("qemu-io") {
        return;
    }
    let size = 16 * MIB;
    let dir = test_dir();
    let mut c = start_cluster(dir.path(), 2, vec![VolumeDef::new("vol", size, vec![0, 1])], |c| {
        c.extra_config = "degraded_writes: refuse\n".into();
    });
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    qemu_io(&c.members[0].nbd_uri("vol"), &["write -P 0x11 0 1M".into()]);

    // node-2 dies: the writer's next writes fail (the first may find the link still up and
    // fail when node-2 does not execute it; then node-2 is known to be missing).
    c.kill(1);
    let (ok, out) = qemu_io_try(&c.members[0].nbd_uri("vol"), &["write -P 0x22 1M 64k"]);
    assert!(!ok, "a write was acknowledged without node-2:\n{out}");
    let (ok, out) = qemu_io_try(&c.members[0].nbd_uri("vol"), &["write -P 0x22 1M 64k"]);
    assert!(!ok, "a write was acknowledged without node-2:\n{out}");
    assert!(
        std::fs::read_to_string(c.members[0].log_path()).unwrap().contains("refuses degraded writes"),
        "the agent's log says why writes fail"
    );
    // Reads go on from the remaining in-sync replica.
    qemu_io(&c.members[0].nbd_uri("vol"), &["read -P 0x11 0 1M".into()]);

    // node-2 returns and catches up: writes are accepted again and reach both replicas.
    c.start(1).unwrap();
    c.wait_healthy(0, "vol", Duration::from_secs(30)).unwrap();
    qemu_io(&c.members[0].nbd_uri("vol"), &["write -P 0x33 2M 64k".into()]);
    c.wait_healthy(1, "vol", Duration::from_secs(30)).unwrap();
    qemu_io(&c.members[1].nbd_uri("vol"), &["read -P 0x11 0 1M".into(), "read -P 0x33 2M 64k".into()]);
    c.stop(0);
    c.stop(1);
    let a = read_replica_data(&c.members[0].replica_path("vol")).unwrap();
    let b = read_replica_data(&c.members[1].replica_path("vol")).unwrap();
    assert!(a == b, "the replicas differ after the refused writes and the resync");
}
