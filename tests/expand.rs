//! Online growth of a volume (ExpandVolume, one replica node at a time): I/O in flight goes
//! on, a new NBD connection sees the new size, writes past the old end reach every replica
//! that has grown and are marked for one that has not, which catches up once grown; the
//! size survives a restart; bad requests are refused with the right code and a clear
//! message, and change nothing.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

use peersan_node_agent::api::pb;
use tonic::Code;

const OLD: u64 = 16 * MIB;
const NEW: u64 = 48 * MIB;

/// The size a new NBD connection negotiates, as qemu-img reports it.
fn nbd_size(uri: &str) -> u64 {
    let out = run(Command::new("qemu-img").args(["info", "--output=json", "-f", "raw"]).arg(uri));
    let at = out.find("\"virtual-size\":").unwrap_or_else(|| panic!("no virtual-size in {out}"));
    let digits: String =
        out[at + 15..].chars().skip_while(|c| c.is_whitespace()).take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap()
}

fn replica<'a>(v: &'a pb::Volume, node: &str) -> &'a pb::Replica {
    v.replicas.iter().find(|r| r.node == node).unwrap_or_else(|| panic!("{node} not in {v:?}"))
}

/// Writes `pattern` at `off` through `uri` and records it in `image`.
fn write(uri: &str, image: &mut Image, pattern: u8, off: u64, len: u64) {
    qemu_io(uri, &[format!("write -P {pattern} {off} {len}"), "flush".into()]);
    image.write(off, &vec![pattern; len as usize]);
}

#[test]
fn a_two_way_volume_grows_online_and_keeps_its_size() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let dir = test_dir();
    let mut c = start_cluster(dir.path(), 2, vec![VolumeDef::new("cfg", 8 * MIB, vec![0, 1])], |_| {});
    c.create(0, "vol", OLD, &[0, 1]).unwrap();
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    let (uri1, uri2) = (c.members[0].nbd_uri("vol"), c.members[1].nbd_uri("vol"));
    let mut image = Image::new(NEW);

    // A client writes near the old end, and goes on writing while both replicas grow.
    let mut ops = Vec::new();
    for pass in 0..4u64 {
        for k in 0..64u64 {
            let off = OLD - 4 * MIB + k * 65536;
            let pattern = (pass * 64 + k) % 255 + 1;
            ops.push(format!("write -P {pattern} {off} 64k"));
            if pass == 3 {
                image.write(off, &vec![pattern as u8; 65536]);
            }
        }
    }
    ops.push("flush".into());
    let client = {
        let uri = uri1.clone();
        std::thread::spawn(move || qemu_io(&uri, &ops))
    };
    let v = c.expand(0, "vol", NEW).unwrap();
    assert_eq!(v.size_bytes, NEW);
    let v = c.expand(1, "vol", NEW).unwrap();
    assert_eq!(v.size_bytes, NEW);
    client.join().expect("the client writing during the growth failed");

    // Both know both have grown (node-1 no longer notes that node-2 is smaller).
    c.wait_for(0, "vol", Duration::from_secs(10), |v| {
        v.health == "healthy" && v.replicas.iter().all(|r| !r.detail.starts_with("sizes differ"))
    })
    .unwrap();
    assert_eq!(nbd_size(&uri1), NEW);
    assert_eq!(nbd_size(&uri2), NEW);

    // Writes past the old end, across it and up to the new end reach both replicas.
    write(&uri1, &mut image, 0x71, OLD - 65536, 131072);
    write(&uri1, &mut image, 0x72, OLD + 4 * MIB, 4 * MIB);
    write(&uri1, &mut image, 0x73, NEW - 4096, 4096);
    random_writes(&uri1, &mut image, 40, 501, dir.path());
    let v = c.volume(0, "vol").unwrap();
    assert_eq!(v.health, "healthy", "{v:?}");
    assert_eq!(replica(&v, "node-2").out_of_sync_bytes, 0, "{v:?}");
    assert_same("read through node-2", &read_volume(&uri2, dir.path()), &image.data);
    assert_replicas_equal(&mut c, "vol", &[0, 1], &image.data);

    // The size survives a restart of both agents.
    c.start_all().unwrap();
    for i in 0..2 {
        let v = c.wait_healthy(i, "vol", Duration::from_secs(20)).unwrap();
        assert_eq!(v.size_bytes, NEW, "{v:?}");
    }
    assert_same("read through node-2 after restart", &read_volume(&uri2, dir.path()), &image.data);

    // Bad requests: the right code, a clear message, and nothing changes.
    let code =
        |r: Result<pb::Volume, tonic::Status>| r.map(|v| v.size_bytes).map_err(|e| (e.code(), e.message().to_owned()));
    let (k, m) = code(c.expand(0, "vol", OLD)).unwrap_err();
    assert!(k == Code::InvalidArgument && m.contains("cannot shrink"), "{k:?} {m}");
    let (k, m) = code(c.expand(0, "vol", NEW + 1000)).unwrap_err();
    assert!(k == Code::InvalidArgument && m.contains("multiple of 4096"), "{k:?} {m}");
    let (k, m) = code(c.expand(0, "vol", 0)).unwrap_err();
    assert!(k == Code::InvalidArgument, "{k:?} {m}");
    let (k, m) = code(c.expand(0, "cfg", 16 * MIB)).unwrap_err();
    assert!(k == Code::InvalidArgument && m.contains("configuration file"), "{k:?} {m}");
    let (k, m) = code(c.expand(0, "nosuch", NEW)).unwrap_err();
    assert!(k == Code::NotFound, "{k:?} {m}");
    // Past what the replica's metadata area was sized for: the limit is named.
    let max = peersan_node_agent::replica::Layout::for_new(OLD, 2, None).unwrap().max_size();
    let (k, m) = code(c.expand(0, "vol", 1 << 40)).unwrap_err();
    assert!(k == Code::OutOfRange && m.contains(&format!("can grow to at most {max} bytes")), "{k:?} {m}");
    // The same size again succeeds (idempotent).
    assert_eq!(code(c.expand(0, "vol", NEW)), Ok(NEW));
    assert_eq!(code(c.expand(1, "vol", NEW)), Ok(NEW));
    let v = c.volume(1, "vol").unwrap();
    assert_eq!((v.size_bytes, v.health.as_str()), (NEW, "healthy"), "{v:?}");
    assert_same("after the refused requests", &read_volume(&uri1, dir.path()), &image.data);

    // The CLI grows a replica and says which others to grow.
    let out = Command::new(env!("CARGO_BIN_EXE_peersan"))
        .arg("--socket")
        .arg(c.members[0].api_socket())
        .args(["volume", "expand", "vol", "64MiB"])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("64.0 MiB") && text.contains("grow the replicas on node-2"), "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_peersan"))
        .arg("--socket")
        .arg(c.members[1].api_socket())
        .args(["volume", "expand", "vol", "32MiB"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("cannot shrink"), "{text}");
}

#[test]
fn a_replica_that_grows_later_catches_up_on_writes_past_its_end() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let dir = test_dir();
    let mut c = start_cluster(dir.path(), 2, vec![], |_| {});
    c.create(0, "vol", OLD, &[0, 1]).unwrap();
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    let (uri1, uri2) = (c.members[0].nbd_uri("vol"), c.members[1].nbd_uri("vol"));
    let mut image = Image::new(NEW);
    write(&uri1, &mut image, 0x11, 0, MIB);

    // The replica that does not write grows first: nothing changes for the writer, whose
    // writes all lie within both replicas.
    c.expand(1, "vol", 24 * MIB).unwrap();
    write(&uri1, &mut image, 0x12, OLD - MIB, MIB);
    let v = c
        .wait_for(0, "vol", Duration::from_secs(10), |v| replica(v, "node-2").detail.starts_with("sizes differ"))
        .unwrap();
    assert_eq!(v.health, "healthy", "{v:?}");
    assert_eq!(replica(&v, "node-2").out_of_sync_bytes, 0, "{v:?}");

    // The writer grows past it: writes within node-2's end reach it; a write past its end
    // does not, succeeds on node-1, and is marked for node-2 (and only it).
    c.expand(0, "vol", NEW).unwrap();
    write(&uri1, &mut image, 0x13, 20 * MIB, MIB);
    write(&uri1, &mut image, 0x14, 30 * MIB, 2 * MIB);
    write(&uri1, &mut image, 0x15, 2 * MIB, MIB);
    let v = c.volume(0, "vol").unwrap();
    let r2 = replica(&v, "node-2");
    assert_eq!(r2.out_of_sync_bytes, 2 * MIB, "{v:?}");
    assert!(r2.state == "outdated" || r2.state == "catching-up", "{v:?}");
    // node-2 knows it lacks writes and waits to be grown; meanwhile it serves what it can
    // from node-1.
    let v = c
        .wait_for(1, "vol", Duration::from_secs(10), |v| {
            let l = v.replicas.iter().find(|r| r.local).unwrap();
            l.state != "in-sync" && l.detail.contains("once both are grown")
        })
        .unwrap();
    assert_eq!(v.size_bytes, 24 * MIB);
    qemu_io(&uri2, &["read -P 0x13 20M 1M".into(), "read -P 0x15 2M 1M".into()]);

    // Grown, it copies exactly what it missed and the replicas converge.
    c.expand(1, "vol", NEW).unwrap();
    c.wait_healthy(1, "vol", Duration::from_secs(30)).unwrap();
    let v = c.wait_healthy(0, "vol", Duration::from_secs(10)).unwrap();
    assert!(v.replicas.iter().all(|r| r.out_of_sync_bytes == 0 && r.detail.is_empty()), "{v:?}");
    assert_same("read through node-2", &read_volume(&uri2, dir.path()), &image.data);
    assert_replicas_equal(&mut c, "vol", &[0, 1], &image.data);
}

#[test]
fn growth_while_a_peer_is_down_then_resync_after_it_grows() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let dir = test_dir();
    let mut c = start_cluster(dir.path(), 3, vec![], |_| {});
    c.create(0, "vol", OLD, &[0, 1, 2]).unwrap();
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    let uri1 = c.members[0].nbd_uri("vol");
    let mut old = Image::new(OLD);
    random_writes(&uri1, &mut old, 40, 511, dir.path());

    // node-3 is down (kill -9) while the others grow and take writes everywhere.
    c.kill(2);
    c.expand(0, "vol", NEW).unwrap();
    c.expand(1, "vol", NEW).unwrap();
    let mut image = Image::new(NEW);
    image.data[..OLD as usize].copy_from_slice(&old.data);
    random_writes(&uri1, &mut image, 60, 512, dir.path());
    write(&uri1, &mut image, 0x5e, NEW - MIB, MIB);
    let v = c.volume(0, "vol").unwrap();
    assert!(replica(&v, "node-3").out_of_sync_bytes > 0, "{v:?}");
    assert_eq!(replica(&v, "node-2").out_of_sync_bytes, 0, "{v:?}");

    // It returns at its old size: it learns it lacks writes, and waits to be grown.
    c.start(2).unwrap();
    let v = c
        .wait_for(2, "vol", Duration::from_secs(15), |v| {
            v.replicas.iter().any(|r| r.local && r.state != "in-sync" && r.detail.contains("once both are grown"))
        })
        .unwrap();
    assert_eq!(v.size_bytes, OLD);
    // What it serves meanwhile is current (read from an in-sync peer).
    let uri3 = c.members[2].nbd_uri("vol");
    assert_same("read through node-3 before it grew", &read_volume(&uri3, dir.path()), &image.data[..OLD as usize]);

    // Grown, it resynchronises and every replica converges.
    let v = c.expand(2, "vol", NEW).unwrap();
    assert_eq!(v.size_bytes, NEW);
    c.wait_healthy(2, "vol", Duration::from_secs(40)).unwrap();
    c.wait_healthy(0, "vol", Duration::from_secs(10)).unwrap();
    assert_same("read through node-3", &read_volume(&uri3, dir.path()), &image.data);
    assert_replicas_equal(&mut c, "vol", &[0, 1, 2], &image.data);
}

#[test]
fn a_peer_write_past_this_replicas_end_is_refused_and_changes_nothing() {
    use futures::{SinkExt, StreamExt};
    use peersan_node_agent::peer::handshake::{HandshakeConfig, client_handshake};
    use peersan_node_agent::peer::proto::{ErrorCode, Frame, PeerCodec, ReplicaStateMsg, Reply, Request, Tags};
    use std::sync::Arc;
    use tokio_util::codec::Framed;

    if !have("qemu-io") {
        return;
    }
    let dir = test_dir();
    let mut c = start_cluster(dir.path(), 2, vec![], |_| {});
    c.create(0, "vol", OLD, &[0, 1]).unwrap();
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    // This test speaks as node-2, grown already while node-1 has not.
    c.stop(1);
    let secret = std::fs::read(&c.secret_file).unwrap().trim_ascii().to_vec();
    let addr = format!("127.0.0.1:{}", c.members[0].peer_port);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let hs =
            HandshakeConfig { node_name: "node-2".into(), secret: Arc::new(secret), timeout: Duration::from_secs(5) };
        client_handshake(&mut s, &hs).await.unwrap();
        let mut f = Framed::new(s, PeerCodec);
        // A fresh replica's state, at the larger size: the replicas connect.
        let state = ReplicaStateMsg {
            consistent: true,
            generation: 0,
            size: NEW,
            outdated_peers: vec![],
            local_ok: true,
            epoch: 0,
            holder: String::new(),
            dirty_peers: vec![],
            flag_epoch: 0,
        };
        let open = Request::Open { volume: "vol".into(), from_node: "node-2".into(), state };
        f.send(Frame::Request { id: 1, req: open }).await.unwrap();
        match f.next().await {
            Some(Ok(Frame::Reply { id: 1, reply: Reply::Opened { state } })) => assert_eq!(state.size, OLD),
            other => panic!("expected Opened, got {other:?}"),
        }
        let write = Request::Write {
            offset: OLD,
            flags: 0,
            insync: 3,
            sent: 3,
            epoch: 0,
            data: vec![0xee; 4096].into(),
            tags: Tags::default(),
        };
        let across = Request::WriteZeroes {
            offset: OLD - 4096,
            len: 8192,
            flags: 0,
            insync: 3,
            sent: 3,
            epoch: 0,
            tags: Tags::default(),
        };
        let reqs = [
            write,
            across,
            Request::Read { offset: OLD - 4096, len: 8192 },
            Request::ResyncRead { offset: OLD, len: 4096 },
            Request::GetBitmap { offset: 0, len: 2 * 4096 },
        ];
        for (i, req) in reqs.into_iter().enumerate() {
            let id = 10 + i as u64;
            let what = format!("{req:?}").chars().take(40).collect::<String>();
            f.send(Frame::Request { id, req }).await.unwrap();
            match f.next().await {
                Some(Ok(Frame::Reply { id: got, reply: Reply::Error { code: ErrorCode::OutOfRange, .. } })) => {
                    assert_eq!(got, id)
                }
                other => panic!("{what}: expected OutOfRange, got {other:?}"),
            }
        }
        f.send(Frame::Request { id: 20, req: Request::Ping }).await.unwrap();
        assert!(matches!(f.next().await, Some(Ok(Frame::Reply { id: 20, reply: Reply::Pong }))));
    });
    // Nothing was written, and the volume serves as before once node-2 is back.
    c.start(1).unwrap();
    let v = c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    assert_eq!(v.size_bytes, OLD);
    let uri = c.members[0].nbd_uri("vol");
    qemu_io(&uri, &[format!("read -P 0 {} 4096", OLD - 4096), "write -P 0x11 0 4096".into()]);
    qemu_io(&c.members[1].nbd_uri("vol"), &["read -P 0x11 0 4096".into()]);
    let mut image = Image::new(OLD);
    image.write(0, &[0x11; 4096]);
    assert_replicas_equal(&mut c, "vol", &[0, 1], &image.data);
}

#[test]
fn a_volume_of_the_configuration_file_grows_when_its_size_there_does() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let dir = test_dir();
    let mut c = start_cluster(dir.path(), 2, vec![VolumeDef::new("cfg", OLD, vec![0, 1])], |_| {});
    c.wait_healthy(0, "cfg", Duration::from_secs(20)).unwrap();
    let uri = c.members[0].nbd_uri("cfg");
    let mut image = Image::new(NEW);
    write(&uri, &mut image, 0x21, OLD - MIB, MIB);
    for i in 0..2 {
        c.stop(i);
    }
    c.volumes[0].size = NEW;
    c.write_configs().unwrap();
    c.start_all().unwrap();
    let v = c.wait_healthy(1, "cfg", Duration::from_secs(20)).unwrap();
    assert_eq!(v.size_bytes, NEW);
    write(&uri, &mut image, 0x22, NEW - MIB, MIB);
    assert_same("read through node-2", &read_volume(&c.members[1].nbd_uri("cfg"), dir.path()), &image.data);
    assert_replicas_equal(&mut c, "cfg", &[0, 1], &image.data);
    // A smaller size is refused at start (volumes do not shrink), and the data stays.
    c.volumes[0].size = OLD;
    c.write_configs().unwrap();
    let e = c.start(0).unwrap_err().to_string();
    assert!(e.contains("exited"), "{e}");
    let log = std::fs::read_to_string(c.members[0].log_path()).unwrap();
    assert!(log.contains("cannot shrink to the 16777216 bytes configured"), "{log}");
    assert_same("after the refused start", &read_replica_data(&c.members[0].replica_path("cfg")).unwrap(), &image.data);
}
