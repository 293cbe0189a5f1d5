//! The agent API and the `peersan` CLI: a volume created through one node's API is created
//! on every replica node, serves I/O there, is listed with the state of each replica, and
//! is deleted everywhere; invalid requests are refused with a clear message.

mod common;
use common::*;
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
