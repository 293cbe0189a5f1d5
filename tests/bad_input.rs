//! Bad input: malformed NBD requests, malformed or corrupted peer frames, an incompatible
//! peer version, a peer without the shared secret, and multi-writer writes and policing
//! requests that break the region-grant rules get errors; nothing is written and the agent
//! keeps serving.

mod common;
use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use peersan_node_agent::peer::handshake::{HandshakeConfig, HandshakeError, client_handshake, client_handshake_with};
use peersan_node_agent::peer::proto::{
    ErrorCode, Frame, PeerCodec, ReplicaStateMsg, Reply, Request, Tags, encode_request,
};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::Framed;

// ---- a raw NBD client --------------------------------------------------------------------

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REQ_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;

struct RawNbd {
    s: UnixStream,
    size: u64,
}

impl RawNbd {
    fn connect(path: &std::path::Path, export: &str) -> RawNbd {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
        // NBD_OPT_GO
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&7u32.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        s.write_all(&opt).unwrap();
        let mut size = 0;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).unwrap();
            let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).unwrap();
            match ty {
                1 => break, // ACK
                3 if body.len() >= 10 && body[..2] == [0, 0] => {
                    size = u64::from_be_bytes(body[2..10].try_into().unwrap())
                }
                3 => {}
                t => panic!("NBD_OPT_GO failed with reply type {t:#x}: {}", String::from_utf8_lossy(&body)),
            }
        }
        RawNbd { s, size }
    }

    fn send(&mut self, flags: u16, ty: u16, handle: u64, off: u64, len: u32, payload: &[u8]) {
        let mut r = Vec::new();
        r.extend_from_slice(&REQ_MAGIC.to_be_bytes());
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&ty.to_be_bytes());
        r.extend_from_slice(&handle.to_be_bytes());
        r.extend_from_slice(&off.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(payload);
        self.s.write_all(&r).unwrap();
    }

    /// Reads a simple reply: (handle, error).
    fn reply(&mut self) -> (u64, u32) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), REPLY_MAGIC);
        (u64::from_be_bytes(h[8..16].try_into().unwrap()), u32::from_be_bytes(h[4..8].try_into().unwrap()))
    }

    fn read(&mut self, handle: u64, off: u64, len: u32) -> Vec<u8> {
        self.send(0, 0, handle, off, len, &[]);
        let (h, err) = self.reply();
        assert_eq!((h, err), (handle, 0));
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        d
    }
}

const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

#[test]
fn malformed_nbd_requests_get_errors_and_the_agent_keeps_serving() {
    if !have("qemu-io") {
        return;
    }
    let size = 8 * MIB;
    let (_dir, c) = cluster(2, "vol", size, &[0, 1]);
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    let sock = c.members[0].nbd_socket();
    let mut n = RawNbd::connect(&sock, "vol");
    assert_eq!(n.size, size);

    // Read past the end: EINVAL.
    n.send(0, 0, 1, size - 512, 4096, &[]);
    assert_eq!(n.reply(), (1, EINVAL));
    // Offset + length overflowing u64: EINVAL.
    n.send(0, 0, 2, u64::MAX - 10, 4096, &[]);
    assert_eq!(n.reply(), (2, EINVAL));
    // Write past the end: ENOSPC (its payload is consumed, the stream stays in sync).
    n.send(0, 1, 3, size, 4096, &[0xee; 4096]);
    assert_eq!(n.reply(), (3, ENOSPC));
    // Unknown command type: EINVAL.
    n.send(0, 99, 4, 0, 0, &[]);
    assert_eq!(n.reply(), (4, EINVAL));
    // Trim past the end: EINVAL.
    n.send(0, 4, 5, size - 4096, 8192, &[]);
    assert_eq!(n.reply().1, EINVAL);
    // The same connection still works, and nothing was written.
    n.send(0, 1, 6, 4096, 4096, &[0x5a; 4096]);
    assert_eq!(n.reply(), (6, 0));
    assert_eq!(n.read(7, 4096, 4096), vec![0x5a; 4096]);
    assert!(n.read(8, size - 4096, 4096).iter().all(|&b| b == 0));

    // A bad request magic ends that connection only.
    n.s.write_all(&[0xde, 0xad, 0xbe, 0xef]).unwrap();
    n.s.write_all(&[0u8; 24]).unwrap();
    let mut buf = [0u8; 1];
    assert!(matches!(n.s.read(&mut buf), Ok(0) | Err(_)), "connection should be closed after a bad magic");
    // An unknown export is refused during negotiation; other clients are served.
    qemu_io(&c.members[0].nbd_uri("vol"), &["read -P 0x5a 4096 4096".into()]);
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", &c.members[0].nbd_uri("nosuchvolume"), "-c", "read 0 512"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "opening an unknown export must fail");
    qemu_io(&c.members[1].nbd_uri("vol"), &["read -P 0x5a 4096 4096".into()]);
}

// ---- peer protocol -------------------------------------------------------------------------

fn peer_cfg(name: &str, secret: Vec<u8>) -> HandshakeConfig {
    HandshakeConfig { node_name: name.into(), secret: Arc::new(secret), timeout: Duration::from_secs(5) }
}

fn state() -> ReplicaStateMsg {
    // The state of a fresh, never-written replica, like the volume under test: opening the
    // volume with it changes nothing on the node.
    ReplicaStateMsg {
        consistent: true,
        generation: 0,
        size: 8 * MIB,
        outdated_peers: vec![],
        local_ok: true,
        epoch: 0,
        holder: String::new(),
        dirty_peers: vec![],
        flag_epoch: 0,
    }
}

/// Connects to a node's peer port as "node-2" (knowing the secret) and opens "vol".
async fn open_as_peer(addr: &str, secret: &[u8]) -> Framed<tokio::net::TcpStream, PeerCodec> {
    open_volume_as_peer(addr, secret, "vol").await
}

async fn open_volume_as_peer(addr: &str, secret: &[u8], volume: &str) -> Framed<tokio::net::TcpStream, PeerCodec> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    client_handshake(&mut s, &peer_cfg("node-2", secret.to_vec())).await.unwrap();
    let mut f = Framed::new(s, PeerCodec);
    let open = Request::Open { volume: volume.into(), from_node: "node-2".into(), state: state() };
    f.send(Frame::Request { id: 1, req: open }).await.unwrap();
    assert!(matches!(f.next().await, Some(Ok(Frame::Reply { id: 1, reply: Reply::Opened { .. } }))));
    f
}

#[test]
fn corrupted_and_malformed_peer_frames_are_refused() {
    if !have("qemu-io") {
        return;
    }
    let size = 8 * MIB;
    let (_dir, mut c) = cluster(2, "vol", size, &[0, 1]);
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    // This test speaks as node-2: the real node-2 is stopped meanwhile (a node's newest
    // connection for a volume replaces its older ones, so the two would take turns).
    c.stop(1);
    let secret = std::fs::read(&c.secret_file).unwrap().trim_ascii().to_vec();
    let addr = format!("127.0.0.1:{}", c.members[0].peer_port);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // An authenticated peer (it knows the secret) sends a write whose payload fails its CRC.
        let mut f = open_as_peer(&addr, &secret).await;
        let write = |fill: u8| Request::Write {
            offset: 65536,
            flags: 0,
            insync: 3,
            sent: 3,
            epoch: 0,
            data: vec![fill; 4096].into(),
            tags: Tags::default(),
        };
        let mut buf = BytesMut::new();
        encode_request(2, &write(0x77), &mut buf).unwrap();
        let last = buf.len() - 1;
        buf[last] ^= 0x01; // corrupt the payload
        f.get_mut().write_all(&buf).await.unwrap();
        match f.next().await {
            Some(Ok(Frame::Reply { id: 2, reply: Reply::Error { code: ErrorCode::Checksum, .. } })) => {}
            other => panic!("expected a Checksum error for the corrupted frame, got {other:?}"),
        }
        // The connection survives; a well-framed request of an unknown kind gets an error too.
        let mut buf = BytesMut::new();
        encode_request(3, &Request::Ping, &mut buf).unwrap();
        buf[8] = 0x7e;
        let hcrc = crc32c::crc32c(&buf[..28]);
        buf[28..32].copy_from_slice(&hcrc.to_le_bytes());
        f.get_mut().write_all(&buf).await.unwrap();
        match f.next().await {
            Some(Ok(Frame::Reply { id: 3, reply: Reply::Error { code: ErrorCode::Invalid, .. } })) => {}
            other => panic!("expected an Invalid error for an unknown kind, got {other:?}"),
        }
        f.send(Frame::Request { id: 4, req: Request::Ping }).await.unwrap();
        assert!(matches!(f.next().await, Some(Ok(Frame::Reply { id: 4, reply: Reply::Pong }))));
        // A truncated frame followed by a close: the agent drops this connection only.
        let mut buf = BytesMut::new();
        encode_request(5, &write(0x66), &mut buf).unwrap();
        f.get_mut().write_all(&buf[..buf.len() / 2]).await.unwrap();
        drop(f);

        // A frame with a corrupted header: the connection is closed.
        let mut f = open_as_peer(&addr, &secret).await;
        let mut buf = BytesMut::new();
        encode_request(6, &write(0x55), &mut buf).unwrap();
        buf[13] ^= 0xff; // inside the request id: header CRC mismatch
        f.get_mut().write_all(&buf).await.unwrap();
        assert!(matches!(f.next().await, None | Some(Err(_))), "a corrupted header must close the connection");

        // A peer speaking other protocol versions is refused with a message naming both.
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let e = client_handshake_with(&mut s, &peer_cfg("node-2", secret.clone()), (7, 9), 0).await.unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, HandshakeError::Refused(_) | HandshakeError::VersionMismatch { .. }), "{e:?}");
        assert!(msg.contains("7..9") && msg.contains("3..3"), "{msg}");

        // A process without the secret is refused and can neither write nor read.
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let e = client_handshake(&mut s, &peer_cfg("node-2", b"not-the-secret-at-all".to_vec())).await.unwrap_err();
        assert!(matches!(e, HandshakeError::AuthFailed(_) | HandshakeError::Refused(_)), "{e:?}");
        let mut f = Framed::new(s, PeerCodec);
        let _ = f
            .send(Frame::Request {
                id: 1,
                req: Request::Open { volume: "vol".into(), from_node: "node-2".into(), state: state() },
            })
            .await;
        let _ = f.send(Frame::Request { id: 2, req: write(0x44) }).await;
        assert!(matches!(f.next().await, None | Some(Err(_))), "an unauthenticated peer got an answer");

        // Raw garbage instead of a handshake.
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut f = Framed::new(s, PeerCodec);
        assert!(matches!(f.next().await, None | Some(Err(_))));
    });
    // None of the refused writes reached the replica, and the agent still serves.
    c.start(1).unwrap();
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    let uri = c.members[0].nbd_uri("vol");
    qemu_io(&uri, &["read -P 0 65536 4096".into(), "write -P 0x11 0 4096".into(), "read -P 0x11 0 4096".into()]);
    qemu_io(&c.members[1].nbd_uri("vol"), &["read -P 0x11 0 4096".into(), "read -P 0 65536 4096".into()]);
    let v = c.volume(0, "vol").unwrap();
    assert_eq!(v.health, "healthy", "{v:?}");
}

/// Sends one request and returns its reply.
async fn ask(f: &mut Framed<tokio::net::TcpStream, PeerCodec>, id: u64, req: Request) -> Reply {
    f.send(Frame::Request { id, req }).await.unwrap();
    match f.next().await {
        Some(Ok(Frame::Reply { id: got, reply })) if got == id => reply,
        other => panic!("expected the reply to request {id}, got {other:?}"),
    }
}

#[test]
fn policing_requests_and_region_grants_are_checked() {
    if !have("qemu-io") {
        return;
    }
    let size = 8 * MIB;
    let region = 64 * 1024;
    let dir = test_dir();
    let mut c = start_cluster(
        dir.path(),
        2,
        vec![
            peersan_node_agent::localcluster::VolumeDef::new("vol", size, vec![0, 1]),
            peersan_node_agent::localcluster::VolumeDef::new("mw", size, vec![0, 1]).multi_writer(Some(region)),
        ],
        |_| {},
    );
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    c.wait_healthy(0, "mw", Duration::from_secs(20)).unwrap();
    // This test speaks as node-2 (see above); node-1 holds write priority at epoch 0 and
    // arbitrates the multi-writer volume.
    c.stop(1);
    let secret = std::fs::read(&c.secret_file).unwrap().trim_ascii().to_vec();
    let addr = format!("127.0.0.1:{}", c.members[0].peer_port);
    // Sent to node-1 only (the real node-2 is down): what node-1 executes, node-2 is
    // recorded as having missed.
    let write = |offset: u64, fill: u8, tags: Tags| Request::Write {
        offset,
        flags: 0,
        insync: 3,
        sent: 1,
        epoch: 0,
        data: vec![fill; 4096].into(),
        tags,
    };
    let tags = |shift: u8, list: &[(u64, u64)]| Tags { shift, list: list.to_vec() };
    let is_error = |r: &Reply, want: ErrorCode| matches!(r, Reply::Error { code, .. } if *code == want);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // A single-writer volume takes no policing requests and no grants.
        let mut f = open_volume_as_peer(&addr, &secret, "vol").await;
        let r = ask(&mut f, 2, Request::Acquire { epoch: 0, region: 0 }).await;
        assert!(is_error(&r, ErrorCode::Invalid), "{r:?}");
        // (Refused by the epoch check first: node-1 holds write priority.)
        let r = ask(&mut f, 3, write(0, 0x21, tags(16, &[(0, 1)]))).await;
        assert!(is_error(&r, ErrorCode::Invalid) || matches!(r, Reply::Fenced { .. }), "{r:?}");
        drop(f);

        let mut f = open_volume_as_peer(&addr, &secret, "mw").await;
        // Writes without grants, or with grants of another region size or region, are refused.
        let r = ask(&mut f, 2, write(0, 0x31, Tags::default())).await;
        assert!(is_error(&r, ErrorCode::Invalid), "{r:?}");
        let r = ask(&mut f, 3, write(0, 0x32, tags(20, &[(0, 1)]))).await;
        assert!(is_error(&r, ErrorCode::Invalid), "{r:?}");
        let r = ask(&mut f, 4, write(region, 0x33, tags(16, &[(0, 1)]))).await;
        assert!(is_error(&r, ErrorCode::Invalid), "{r:?}");
        // A region past the end, another epoch.
        let r = ask(&mut f, 5, Request::Acquire { epoch: 0, region: size / region }).await;
        assert!(is_error(&r, ErrorCode::OutOfRange), "{r:?}");
        let r = ask(&mut f, 6, Request::Acquire { epoch: 7, region: 0 }).await;
        assert!(matches!(&r, Reply::Fenced { epoch: 0, holder } if holder == "node-1"), "{r:?}");
        // Region 0 granted; a write under the grant is executed.
        let Reply::Granted { grant } = ask(&mut f, 7, Request::Acquire { epoch: 0, region: 0 }).await else {
            panic!("region 0 not granted");
        };
        assert!(grant >= 1);
        assert_eq!(ask(&mut f, 8, write(0, 0x41, tags(16, &[(0, grant)]))).await, Reply::Ok);
        // An older grant is refused whole (nothing of the write is executed).
        let r = ask(&mut f, 9, write(4096, 0x42, tags(16, &[(0, grant - 1)]))).await;
        assert!(is_error(&r, ErrorCode::StaleGrant), "{r:?}");
        // Only the arbiter recovers regions.
        let r = ask(
            &mut f,
            10,
            Request::Recover { epoch: 0, region: 1, grant: grant + 5, shift: 16, data: vec![0x43; 4096].into() },
        )
        .await;
        assert!(matches!(r, Reply::Fenced { .. }), "{r:?}");
        // A revoke for a grant this node does not hold is answered at once.
        let r = ask(&mut f, 11, Request::Revoke { epoch: 0, region: 3, grant: 99 }).await;
        assert_eq!(r, Reply::Released { dirty: false });
        // Give region 0 back; node-1 takes it (it is free) and writes.
        let r = ask(&mut f, 12, Request::Release { epoch: 0, region: 0, grant, dirty: false }).await;
        assert_eq!(r, Reply::Ok);
    });
    qemu_io(&c.members[0].nbd_uri("mw"), &["write -P 0x51 8192 4096".into()]);
    c.start(1).unwrap();
    c.wait_healthy(0, "mw", Duration::from_secs(20)).unwrap();
    c.wait_healthy(1, "mw", Duration::from_secs(20)).unwrap();
    for i in 0..2 {
        let uri = c.members[i].nbd_uri("mw");
        qemu_io(
            &uri,
            &[
                "read -P 0x41 0 4096".into(),
                "read -P 0 4096 4096".into(),
                "read -P 0x51 8192 4096".into(),
                format!("read -P 0 {region} 4096"),
            ],
        );
        qemu_io(&c.members[i].nbd_uri("vol"), &["read -P 0 0 4096".into()]);
    }
    assert_replicas_identical(&mut c, "mw", &[0, 1]);
}
