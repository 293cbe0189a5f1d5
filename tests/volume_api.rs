//! The agent API and the `peersan` CLI: a volume created through one node's API is created
//! on every replica node, serves I/O there, is listed with the state of each replica, and
//! is deleted everywhere; invalid requests are refused with a clear message. Attachment
//! records follow their sequence numbers durably; nodes report their pool's space and
//! refuse replicas that do not fit.

mod common;
use common::*;
use peersan_node_agent::api::pb;
use std::process::Command;
use std::time::Duration;

fn cli(c: &LocalCluster, node: usize, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_peersan"))
        .arg("--socket")
        .arg(c.members[node].api_socket())
        .args(args)
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn create_list_use_and_delete_a_volume_through_the_cli() {
    if !have("qemu-io") {
        return;
    }
    let dir = test_dir();
    let mut c = start_cluster(dir.path(), 3, vec![], |_| {});

    let (ok, out) = cli(&c, 0, &["volume", "create", "data", "--size", "16MiB", "--replicas", "node-1,node-2"]);
    assert!(ok, "{out}");
    assert!(out.contains("data") && out.contains("node-2"), "{out}");
    // The volume exists on node-2 too and becomes healthy.
    c.wait_healthy(1, "data", Duration::from_secs(20)).unwrap();
    let (ok, out) = cli(&c, 1, &["volume", "list"]);
    assert!(ok, "{out}");
    assert_eq!(out.matches("in-sync").count(), 2, "{out}");
    assert!(out.contains("healthy"), "{out}");
    // node-3 holds no replica.
    assert!(c.volume(2, "data").is_err());

    qemu_io(&c.members[0].nbd_uri("data"), &["write -P 0x42 0 1M".into(), "flush".into()]);
    qemu_io(&c.members[1].nbd_uri("data"), &["read -P 0x42 0 1M".into()]);

    // Creating it again with the same definition is accepted; with another one, refused.
    let (ok, out) = cli(&c, 1, &["volume", "create", "data", "--size", "16MiB", "--replicas", "node-2,node-1"]);
    assert!(ok, "{out}");
    let (ok, out) = cli(&c, 0, &["volume", "create", "data", "--size", "32MiB", "--replicas", "node-1,node-2"]);
    assert!(!ok && out.contains("already exists"), "{out}");

    // Invalid requests name the problem.
    for (args, want) in [
        (vec!["volume", "create", "Bad_Name", "--size", "16MiB", "--replicas", "node-1"], "lowercase"),
        (vec!["volume", "create", "v2", "--size", "1000", "--replicas", "node-1"], "multiple of 4096"),
        (vec!["volume", "create", "v2", "--size", "16MiB", "--replicas", "node-1,node-9"], "node-9"),
        (vec!["volume", "create", "v2", "--size", "16MiB", "--replicas", "node-2,node-3"], "not among them"),
        (vec!["volume", "create", "v2", "--size", "16MiB", "--replicas", "node-1,node-1"], "listed twice"),
        (vec!["volume", "show", "nosuch"], "does not exist"),
    ] {
        let (ok, out) = cli(&c, 0, &args);
        assert!(!ok && out.contains(want), "{args:?}: {out}");
    }

    let (ok, out) = cli(&c, 0, &["volume", "delete", "data"]);
    assert!(ok, "{out}");
    for i in 0..2 {
        assert!(c.volume(i, "data").is_err(), "volume still on node-{}", i + 1);
        assert!(!c.members[i].replica_path("data").exists(), "replica file left on node-{}", i + 1);
    }
    // Volumes created through the API survive a restart.
    let (ok, out) = cli(&c, 0, &["volume", "create", "kept", "--size", "8MiB", "--replicas", "node-1,node-3"]);
    assert!(ok, "{out}");
    c.stop(2);
    c.start(2).unwrap();
    c.wait_healthy(2, "kept", Duration::from_secs(20)).unwrap();
}

#[test]
fn agent_refuses_an_invalid_configuration_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("node.yaml");
    std::fs::write(&cfg, "node: { name: a }\npool: { path: /tmp/x }\nsecret_file: /tmp/s\nvolumes:\n  - { name: v, size: 1GiB, replicas: [a, b] }\n")
        .unwrap();
    let out = Command::new(agent_bin()).arg("--config").arg(&cfg).arg("--check").output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(text.contains("volumes[0].replicas[1]") && text.contains("\"b\""), "{text}");
    std::fs::write(&cfg, "node: { name: a }\npool: { path: /tmp/x }\nsecret_file: /tmp/s\nlisten: { peer: \"127.0.0.1:1\", nbd_tpc: x }\n").unwrap();
    let out = Command::new(agent_bin()).arg("--config").arg(&cfg).arg("--check").output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("unknown field `nbd_tpc`"), "{text}");
}

fn set_attachment(
    c: &LocalCluster,
    i: usize,
    volume: &str,
    node: &str,
    seq: u64,
) -> Result<(String, u64), tonic::Code> {
    let req = pb::SetAttachmentRequest { name: volume.into(), node: node.into(), seq };
    c.call(i, |mut cl| async move { cl.set_attachment(req).await.map(|r| r.into_inner()) })
        .map(|v| (v.attached_node, v.attachment_seq))
        .map_err(|e| e.code())
}

fn attachment(c: &LocalCluster, i: usize, volume: &str) -> (String, u64) {
    let v = c.volume(i, volume).unwrap();
    (v.attached_node, v.attachment_seq)
}

#[test]
fn attachment_records_are_replaced_by_higher_sequence_numbers_and_kept_durably() {
    let dir = test_dir();
    let mut c = start_cluster(dir.path(), 2, vec![VolumeDef::new("cfg", 8 * MIB, vec![0, 1])], |_| {});
    c.create(0, "att", 8 * MIB, &[0, 1]).unwrap();
    let rec = |n: &str, s: u64| Ok((n.to_owned(), s));
    assert_eq!(attachment(&c, 0, "att"), (String::new(), 0));
    assert_eq!(set_attachment(&c, 0, "att", "node-1", 1), rec("node-1", 1));
    // The same record again: accepted.
    assert_eq!(set_attachment(&c, 0, "att", "node-1", 1), rec("node-1", 1));
    // The same seq naming another node: refused, the record stays.
    assert_eq!(set_attachment(&c, 0, "att", "node-2", 1), Err(tonic::Code::Aborted));
    // An older seq: no error, and the record in force is returned unchanged.
    assert_eq!(set_attachment(&c, 0, "att", "node-2", 0), rec("node-1", 1));
    assert_eq!(set_attachment(&c, 0, "att", "node-2", 5), rec("node-2", 5));
    assert_eq!(attachment(&c, 0, "att"), ("node-2".to_owned(), 5));
    let list = c.api(0, |mut cl| async move { cl.list_volumes(pb::ListVolumesRequest {}).await }).unwrap().into_inner();
    let listed = list.volumes.iter().find(|v| v.name == "att").unwrap();
    assert_eq!((listed.attached_node.as_str(), listed.attachment_seq), ("node-2", 5));
    // Kept with this node's replica: node-2 has its own record.
    assert_eq!(attachment(&c, 1, "att"), (String::new(), 0));
    // Volumes of the configuration file have one too; an unknown volume has none.
    assert_eq!(set_attachment(&c, 0, "cfg", "node-1", 3), rec("node-1", 3));
    assert_eq!(set_attachment(&c, 0, "nosuch", "node-1", 1), Err(tonic::Code::NotFound));
    assert_eq!(set_attachment(&c, 0, "att", "bad\nname", 9), Err(tonic::Code::InvalidArgument));

    // Durable: it survives a kill -9.
    c.kill(0);
    c.start(0).unwrap();
    assert_eq!(attachment(&c, 0, "att"), ("node-2".to_owned(), 5));
    assert_eq!(attachment(&c, 0, "cfg"), ("node-1".to_owned(), 3));
    // Detached: attached nowhere.
    assert_eq!(set_attachment(&c, 0, "att", "", 6), rec("", 6));
    // Deleting the volume removes the record: created again, it starts afresh.
    c.api(0, |mut cl| async move { cl.delete_volume(pb::DeleteVolumeRequest { name: "att".into() }).await }).unwrap();
    c.create(0, "att", 8 * MIB, &[0, 1]).unwrap();
    assert_eq!(attachment(&c, 0, "att"), (String::new(), 0));
}

/// A tmpfs mounted for the life of the value (a pool with little space).
struct SmallPool(std::path::PathBuf);

impl SmallPool {
    fn mount(path: &std::path::Path, bytes: u64) -> SmallPool {
        std::fs::create_dir_all(path).unwrap();
        run(Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"]).arg(path));
        SmallPool(path.to_owned())
    }
}

impl Drop for SmallPool {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn nodes_report_their_pool_space_and_refuse_what_does_not_fit() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to mount a small pool (tmpfs); CI runs as root");
        return;
    }
    let dir = test_dir();
    let mut small = None;
    let c = start_cluster(dir.path(), 3, vec![], |c| small = Some(SmallPool::mount(&c.members[2].pool(), 64 * MIB)));
    let _small = small;

    // An empty pool: its filesystem's size, nothing allocated.
    let n = c.node(0).unwrap();
    assert!(n.capacity_bytes > 0 && n.allocated_bytes == 0 && n.free_bytes > 0 && n.free_bytes <= n.capacity_bytes);
    // A replica counts at its full size, metadata area included.
    c.create(0, "data", 16 * MIB, &[0, 1]).unwrap();
    let n = c.node(0).unwrap();
    let len = std::fs::metadata(c.members[0].replica_path("data")).unwrap().len();
    assert_eq!(n.allocated_bytes, len);
    assert!(len > 16 * MIB && n.free_bytes <= n.capacity_bytes - len, "{n:?}");

    // More than this node has: refused before anything is created.
    let huge = (n.free_bytes / 4096 + 1) * 4096;
    let e = c.create(0, "huge", huge, &[0, 1]).unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("node-1 lacks the space") && e.message().contains("bytes free"), "{e:?}");
    for i in 0..2 {
        assert!(c.volume(i, "huge").is_err());
        assert!(!c.members[i].replica_path("huge").exists());
    }

    // A peer without the space refuses its replica, and says so.
    let n3 = c.node(2).unwrap();
    assert_eq!((n3.capacity_bytes, n3.allocated_bytes), (64 * MIB, 0), "{n3:?}");
    let e = c.create(0, "big", 100 * MIB, &[0, 2]).unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("node-3 lacks the space") && e.message().contains("DeleteVolume"), "{e:?}");
    assert!(c.volume(2, "big").is_err() && !c.members[2].replica_path("big").exists());
    c.api(0, |mut cl| async move { cl.delete_volume(pb::DeleteVolumeRequest { name: "big".into() }).await }).unwrap();
    assert!(!c.members[0].replica_path("big").exists());

    // What fits is created; growth beyond the pool's space is refused and changes nothing.
    c.create(0, "small", 16 * MIB, &[0, 2]).unwrap();
    let n3 = c.node(2).unwrap();
    let len = std::fs::metadata(c.members[2].replica_path("small")).unwrap().len();
    assert_eq!(n3.allocated_bytes, len);
    assert_eq!(n3.free_bytes, 64 * MIB - len, "{n3:?}");
    let e = c.expand(2, "small", 64 * MIB).unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("node-3 lacks the space to grow"), "{e:?}");
    assert_eq!(c.volume(2, "small").unwrap().size_bytes, 16 * MIB);
    let v = c.expand(2, "small", 32 * MIB).unwrap();
    assert_eq!(v.size_bytes, 32 * MIB);
    assert_eq!(c.node(2).unwrap().allocated_bytes, len + 16 * MIB);
}
