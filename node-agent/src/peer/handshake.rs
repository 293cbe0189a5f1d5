//! Peer protocol: the authenticated version handshake that precedes every frame.
//!
//! Mutual HMAC-SHA256 challenge-response over a shared secret; see `PROTOCOL.md` next to this
//! file for the exact messages. In short:
//!
//! ```text
//! client                                   server
//!   Hello{versions, name, features, Nc}  ->
//!                                        <-  HelloAck{version, name, features, Ns, server_mac}
//!                                            (or Refuse{reason} and close)
//!   verify server_mac
//!   ClientProof{client_mac}              ->
//!                                            verify client_mac (constant time)
//!                                        <-  Welcome (or Refuse{"authentication failed"})
//!   ... frames (super::proto) ...
//! ```
//!
//! The handshake reads exactly the bytes of its own messages (no read-ahead), so the caller
//! can hand the stream to the frame layer afterwards. Nothing here reads or writes a frame.
//!
//! What it does NOT provide: confidentiality or integrity of the frames that follow. An
//! active attacker on the path could hijack the TCP connection after the handshake; feature
//! bit 0 (TLS upgrade) is reserved for that and currently refused.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::{PROTOCOL_VERSION, check_name};

/// First eight bytes of every handshake message.
pub const HANDSHAKE_MAGIC: [u8; 8] = *b"PEERSAN\0";
/// Oldest frame protocol version this node speaks.
pub const MIN_VERSION: u16 = 3;
/// Newest frame protocol version this node speaks.
pub const MAX_VERSION: u16 = PROTOCOL_VERSION;
/// Feature bit 0: "upgrade the connection to TLS after the hello". Not implemented; a peer
/// asking for it is refused.
pub const FEATURE_TLS: u32 = 1 << 0;
/// Feature bits 0..=15 are *required*: a peer that does not know one must refuse. Bits
/// 16..=31 are *optional*: unknown ones are ignored (not echoed back).
pub const REQUIRED_FEATURES: u32 = 0x0000_ffff;
/// Features this implementation supports (none yet).
pub const SUPPORTED_FEATURES: u32 = 0;
/// Size of each side's random nonce.
pub const NONCE_LEN: usize = 32;
/// Size of an HMAC-SHA256 tag.
pub const MAC_LEN: usize = 32;
/// Length of a handshake message header (magic, type, reserved, body length).
pub const MSG_HEADER_LEN: usize = 12;
/// Largest handshake message body accepted.
pub const MAX_MSG_BODY: usize = 1024;
/// Longest refusal reason sent (longer ones are truncated).
pub const MAX_REASON_LEN: usize = 512;

const MSG_HELLO: u8 = 1;
const MSG_HELLO_ACK: u8 = 2;
const MSG_CLIENT_PROOF: u8 = 3;
const MSG_WELCOME: u8 = 4;
const MSG_REFUSE: u8 = 5;

/// Refusal codes (first byte of a Refuse body).
const REFUSE_VERSION: u8 = 1;
const REFUSE_FEATURE: u8 = 2;
const REFUSE_AUTH: u8 = 3;
const REFUSE_MALFORMED: u8 = 4;

type HmacSha256 = Hmac<Sha256>;

/// Local parameters of a handshake.
#[derive(Clone)]
pub struct HandshakeConfig {
    /// This node's name (1..=253 bytes, no control characters), sent to the peer.
    pub node_name: String,
    /// The cluster's shared secret (as read from the secret file). Must not be empty.
    pub secret: Arc<Vec<u8>>,
    /// Bound on the whole handshake, from the first byte to Welcome.
    pub timeout: Duration,
}

impl std::fmt::Debug for HandshakeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandshakeConfig")
            .field("node_name", &self.node_name)
            .field("secret", &format_args!("<{} bytes redacted>", self.secret.len()))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// What the handshake established about the peer. `node_name` is the name the peer
/// claimed; the handshake proves only that the peer knows the shared secret, so callers
/// that expect a particular peer must compare the name themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerHello {
    pub node_name: String,
    /// Negotiated frame protocol version.
    pub version: u16,
    /// Negotiated features (bits both sides support and the client asked for).
    pub features: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("peer handshake I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer handshake did not complete within {0:?}")]
    Timeout(Duration),
    #[error("peer is not speaking the peersan peer protocol (bad handshake magic)")]
    BadMagic,
    #[error(
        "no common peer protocol version: this node speaks {}..{}, peer speaks {}..{}",
        .ours.0, .ours.1, .theirs.0, .theirs.1
    )]
    VersionMismatch { ours: (u16, u16), theirs: (u16, u16) },
    #[error("peer authentication failed: {0}")]
    AuthFailed(String),
    #[error("peer refused the handshake: {0}")]
    Refused(String),
    #[error("malformed peer handshake: {0}")]
    Malformed(String),
    #[error("unsupported peer feature: {0}")]
    UnsupportedFeature(String),
}

/// Runs the client side of the handshake (the node that opened the TCP connection).
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    cfg: &HandshakeConfig,
) -> Result<PeerHello, HandshakeError> {
    client_handshake_with(s, cfg, (MIN_VERSION, MAX_VERSION), 0).await
}

/// Runs the server side of the handshake (the node that accepted the TCP connection).
pub async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    cfg: &HandshakeConfig,
) -> Result<PeerHello, HandshakeError> {
    server_handshake_with(s, cfg, (MIN_VERSION, MAX_VERSION)).await
}

async fn with_timeout<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, HandshakeError>>,
) -> Result<T, HandshakeError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(HandshakeError::Timeout(timeout)),
    }
}

fn check_config(cfg: &HandshakeConfig) -> Result<(), HandshakeError> {
    check_name(&cfg.node_name)
        .map_err(|e| HandshakeError::Malformed(format!("local node name {:?} is invalid: {e}", cfg.node_name)))?;
    if cfg.secret.is_empty() {
        return Err(HandshakeError::AuthFailed("the shared secret is empty; refusing to authenticate with it".into()));
    }
    Ok(())
}

/// Client side with explicit version range and requested features (tests use this to play
/// a newer or misconfigured peer).
pub async fn client_handshake_with<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    cfg: &HandshakeConfig,
    versions: (u16, u16),
    features: u32,
) -> Result<PeerHello, HandshakeError> {
    check_config(cfg)?;
    let res = with_timeout(cfg.timeout, client_inner(s, cfg, versions, features)).await;
    if let Err(e) = &res {
        tracing::debug!(error = %e, "peer handshake (client side) failed");
    }
    res
}

/// Server side with an explicit version range.
pub(crate) async fn server_handshake_with<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    cfg: &HandshakeConfig,
    versions: (u16, u16),
) -> Result<PeerHello, HandshakeError> {
    check_config(cfg)?;
    let res = with_timeout(cfg.timeout, server_inner(s, cfg, versions)).await;
    if let Err(e) = &res {
        tracing::debug!(error = %e, "peer handshake (server side) failed");
    }
    res
}

// ------------------------------------------------------------------------------------------
// Messages
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    pub features: u32,
    pub nonce: [u8; NONCE_LEN],
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HelloAck {
    pub version: u16,
    pub features: u32,
    pub nonce: [u8; NONCE_LEN],
    pub mac: [u8; MAC_LEN],
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refuse {
    pub code: u8,
    pub min_version: u16,
    pub max_version: u16,
    pub reason: String,
}

fn put_name(b: &mut Vec<u8>, name: &str) {
    b.push(name.len() as u8);
    b.extend_from_slice(name.as_bytes());
}

impl Hello {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(41 + self.name.len());
        b.extend_from_slice(&self.min_version.to_le_bytes());
        b.extend_from_slice(&self.max_version.to_le_bytes());
        b.extend_from_slice(&self.features.to_le_bytes());
        b.extend_from_slice(&self.nonce);
        put_name(&mut b, &self.name);
        b
    }

    fn decode(body: &[u8]) -> Result<Hello, HandshakeError> {
        let mut r = Rd::new(body, "Hello");
        let h = Hello {
            min_version: r.u16()?,
            max_version: r.u16()?,
            features: r.u32()?,
            nonce: r.array()?,
            name: r.name()?,
        };
        r.finish()?;
        Ok(h)
    }
}

impl HelloAck {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(71 + self.name.len());
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&self.features.to_le_bytes());
        b.extend_from_slice(&self.nonce);
        b.extend_from_slice(&self.mac);
        put_name(&mut b, &self.name);
        b
    }

    fn decode(body: &[u8]) -> Result<HelloAck, HandshakeError> {
        let mut r = Rd::new(body, "HelloAck");
        let h = HelloAck { version: r.u16()?, features: r.u32()?, nonce: r.array()?, mac: r.array()?, name: r.name()? };
        r.finish()?;
        Ok(h)
    }
}

impl Refuse {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut end = self.reason.len().min(MAX_REASON_LEN);
        while !self.reason.is_char_boundary(end) {
            end -= 1;
        }
        let reason = &self.reason.as_bytes()[..end];
        let mut b = Vec::with_capacity(7 + reason.len());
        b.push(self.code);
        b.extend_from_slice(&self.min_version.to_le_bytes());
        b.extend_from_slice(&self.max_version.to_le_bytes());
        b.extend_from_slice(&(reason.len() as u16).to_le_bytes());
        b.extend_from_slice(reason);
        b
    }

    fn decode(body: &[u8]) -> Result<Refuse, HandshakeError> {
        let mut r = Rd::new(body, "Refuse");
        let code = r.u8()?;
        let min_version = r.u16()?;
        let max_version = r.u16()?;
        let len = r.u16()? as usize;
        let raw = r.take(len)?;
        r.finish()?;
        Ok(Refuse { code, min_version, max_version, reason: sanitize(raw) })
    }
}

/// Peer-supplied text, made safe for logs: lossy UTF-8, control characters replaced.
fn sanitize(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// Bounds-checked reader over a handshake message body.
struct Rd<'a> {
    b: &'a [u8],
    msg: &'static str,
}

impl<'a> Rd<'a> {
    fn new(b: &'a [u8], msg: &'static str) -> Self {
        Rd { b, msg }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], HandshakeError> {
        if self.b.len() < n {
            return Err(HandshakeError::Malformed(format!("{} message is truncated", self.msg)));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, HandshakeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, HandshakeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, HandshakeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], HandshakeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn name(&mut self) -> Result<String, HandshakeError> {
        let len = self.u8()? as usize;
        let raw = self.take(len)?;
        let s = std::str::from_utf8(raw)
            .map_err(|_| HandshakeError::Malformed(format!("node name in {} is not UTF-8", self.msg)))?;
        check_name(s).map_err(|e| HandshakeError::Malformed(format!("node name in {} is invalid: {e}", self.msg)))?;
        Ok(s.to_owned())
    }
    fn finish(&self) -> Result<(), HandshakeError> {
        if !self.b.is_empty() {
            return Err(HandshakeError::Malformed(format!(
                "{} trailing byte(s) after {} message",
                self.b.len(),
                self.msg
            )));
        }
        Ok(())
    }
}

/// Writes one handshake message (header + body) and flushes.
pub(crate) async fn write_msg<S: AsyncWrite + Unpin>(s: &mut S, ty: u8, body: &[u8]) -> std::io::Result<()> {
    debug_assert!(body.len() <= MAX_MSG_BODY);
    let mut m = Vec::with_capacity(MSG_HEADER_LEN + body.len());
    m.extend_from_slice(&HANDSHAKE_MAGIC);
    m.push(ty);
    m.push(0);
    m.extend_from_slice(&(body.len() as u16).to_le_bytes());
    m.extend_from_slice(body);
    s.write_all(&m).await?;
    s.flush().await
}

/// Reads one handshake message: exactly its bytes, nothing more. A wrong magic is reported
/// as soon as the first differing byte arrives.
pub(crate) async fn read_msg<S: AsyncRead + Unpin>(s: &mut S) -> Result<(u8, Vec<u8>), HandshakeError> {
    let mut magic = [0u8; 8];
    let mut got = 0;
    while got < magic.len() {
        let n = s.read(&mut magic[got..]).await?;
        if n == 0 {
            return Err(if got == 0 {
                HandshakeError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "peer closed the connection during the handshake",
                ))
            } else {
                HandshakeError::BadMagic
            });
        }
        got += n;
        if magic[..got] != HANDSHAKE_MAGIC[..got] {
            return Err(HandshakeError::BadMagic);
        }
    }
    let mut hdr = [0u8; 4];
    s.read_exact(&mut hdr).await.map_err(eof_msg)?;
    let ty = hdr[0];
    if hdr[1] != 0 {
        return Err(HandshakeError::Malformed(format!(
            "reserved byte of handshake message is {:#04x}, expected 0",
            hdr[1]
        )));
    }
    let len = u16::from_le_bytes([hdr[2], hdr[3]]) as usize;
    if len > MAX_MSG_BODY {
        return Err(HandshakeError::Malformed(format!(
            "handshake message of {len} bytes exceeds the limit of {MAX_MSG_BODY}"
        )));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.map_err(eof_msg)?;
    Ok((ty, body))
}

fn eof_msg(e: std::io::Error) -> HandshakeError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        HandshakeError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "peer closed the connection in the middle of a handshake message",
        ))
    } else {
        HandshakeError::Io(e)
    }
}

/// Best-effort refusal: the connection is being abandoned anyway, so write errors are
/// ignored.
async fn send_refuse<S: AsyncWrite + Unpin>(s: &mut S, code: u8, ours: (u16, u16), reason: &str) {
    let body = Refuse { code, min_version: ours.0, max_version: ours.1, reason: reason.to_owned() }.encode();
    if let Err(e) = write_msg(s, MSG_REFUSE, &body).await {
        tracing::debug!(error = %e, "could not send handshake refusal");
    }
}

/// Maps a Refuse received from the peer to the error returned locally.
fn refused(body: &[u8], ours: (u16, u16)) -> HandshakeError {
    match Refuse::decode(body) {
        Ok(r) if r.code == REFUSE_VERSION => {
            HandshakeError::VersionMismatch { ours, theirs: (r.min_version, r.max_version) }
        }
        Ok(r) if r.code == REFUSE_FEATURE => HandshakeError::UnsupportedFeature(r.reason),
        Ok(r) => HandshakeError::Refused(r.reason),
        Err(e) => e,
    }
}

fn unexpected(ty: u8, wanted: &str) -> HandshakeError {
    HandshakeError::Malformed(format!("expected a {wanted} handshake message, got message type {ty}"))
}

/// Everything both MACs cover, in wire order.
pub(crate) struct Transcript<'a> {
    pub version: u16,
    pub client_min: u16,
    pub client_max: u16,
    pub client_features: u32,
    pub server_features: u32,
    pub client_nonce: &'a [u8; NONCE_LEN],
    pub server_nonce: &'a [u8; NONCE_LEN],
    pub client_name: &'a str,
    pub server_name: &'a str,
}

/// HMAC-SHA256(secret, "PEERSAN\0" | len(dir) dir | transcript) — see PROTOCOL.md.
pub(crate) fn transcript_mac(secret: &[u8], dir: &str, t: &Transcript<'_>) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut m =
        <HmacSha256 as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    m.update(&HANDSHAKE_MAGIC);
    m.update(&[dir.len() as u8]);
    m.update(dir.as_bytes());
    m.update(&t.version.to_le_bytes());
    m.update(&t.client_min.to_le_bytes());
    m.update(&t.client_max.to_le_bytes());
    m.update(&t.client_features.to_le_bytes());
    m.update(&t.server_features.to_le_bytes());
    m.update(t.client_nonce);
    m.update(t.server_nonce);
    m.update(&[t.client_name.len() as u8]);
    m.update(t.client_name.as_bytes());
    m.update(&[t.server_name.len() as u8]);
    m.update(t.server_name.as_bytes());
    m
}

fn tag(m: HmacSha256) -> [u8; MAC_LEN] {
    m.finalize().into_bytes().into()
}

fn fmt_features(f: u32) -> String {
    let mut names = vec![];
    if f & FEATURE_TLS != 0 {
        names.push("TLS upgrade (bit 0)".to_string());
    }
    for bit in 1..32 {
        if f & (1 << bit) != 0 {
            names.push(format!("bit {bit}"));
        }
    }
    names.join(", ")
}

async fn client_inner<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    cfg: &HandshakeConfig,
    ours: (u16, u16),
    features: u32,
) -> Result<PeerHello, HandshakeError> {
    let client_nonce: [u8; NONCE_LEN] = rand::random();
    let hello =
        Hello { min_version: ours.0, max_version: ours.1, features, nonce: client_nonce, name: cfg.node_name.clone() };
    write_msg(s, MSG_HELLO, &hello.encode()).await?;

    let (ty, body) = read_msg(s).await?;
    let ack = match ty {
        MSG_HELLO_ACK => HelloAck::decode(&body)?,
        MSG_REFUSE => return Err(refused(&body, ours)),
        _ => return Err(unexpected(ty, "HelloAck")),
    };
    let peer = ack.name.clone();
    if ack.version < ours.0 || ack.version > ours.1 {
        send_refuse(
            s,
            REFUSE_VERSION,
            ours,
            &format!(
                "node {:?} chose protocol version {}, this node ({:?}) speaks {}..{}",
                peer, ack.version, cfg.node_name, ours.0, ours.1
            ),
        )
        .await;
        return Err(HandshakeError::VersionMismatch { ours, theirs: (ack.version, ack.version) });
    }
    if ack.features & !features != 0 {
        let msg = format!(
            "peer {peer:?} enabled features that were not requested: {}",
            fmt_features(ack.features & !features)
        );
        send_refuse(s, REFUSE_MALFORMED, ours, &msg).await;
        return Err(HandshakeError::Malformed(msg));
    }
    let t = Transcript {
        version: ack.version,
        client_min: ours.0,
        client_max: ours.1,
        client_features: features,
        server_features: ack.features,
        client_nonce: &client_nonce,
        server_nonce: &ack.nonce,
        client_name: &cfg.node_name,
        server_name: &ack.name,
    };
    if transcript_mac(&cfg.secret, "server", &t).verify_slice(&ack.mac).is_err() {
        send_refuse(
            s,
            REFUSE_AUTH,
            ours,
            &format!(
                "authentication failed: node {:?} could not verify the proof of node {:?} (the shared secrets differ)",
                cfg.node_name, peer
            ),
        )
        .await;
        return Err(HandshakeError::AuthFailed(format!(
            "peer {peer:?} failed to prove it knows the shared secret (the shared secrets differ)"
        )));
    }
    let proof = tag(transcript_mac(&cfg.secret, "client", &t));
    write_msg(s, MSG_CLIENT_PROOF, &proof).await?;

    let (ty, body) = read_msg(s).await?;
    match ty {
        MSG_WELCOME if body.is_empty() => {}
        MSG_WELCOME => {
            return Err(HandshakeError::Malformed("Welcome message has a non-empty body".into()));
        }
        MSG_REFUSE => return Err(refused(&body, ours)),
        _ => return Err(unexpected(ty, "Welcome")),
    }
    tracing::debug!(peer = %peer, version = ack.version, "peer handshake complete (client side)");
    Ok(PeerHello { node_name: ack.name, version: ack.version, features: ack.features })
}

async fn server_inner<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    cfg: &HandshakeConfig,
    ours: (u16, u16),
) -> Result<PeerHello, HandshakeError> {
    let (ty, body) = match read_msg(s).await {
        Ok(m) => m,
        Err(e) => {
            if matches!(e, HandshakeError::BadMagic) {
                send_refuse(s, REFUSE_MALFORMED, ours, "bad handshake magic: this is a peersan peer port").await;
            } else if matches!(e, HandshakeError::Malformed(_)) {
                send_refuse(s, REFUSE_MALFORMED, ours, &e.to_string()).await;
            }
            return Err(e);
        }
    };
    let hello = match ty {
        MSG_HELLO => match Hello::decode(&body) {
            Ok(h) => h,
            Err(e) => {
                send_refuse(s, REFUSE_MALFORMED, ours, &e.to_string()).await;
                return Err(e);
            }
        },
        MSG_REFUSE => return Err(refused(&body, ours)),
        _ => {
            let e = unexpected(ty, "Hello");
            send_refuse(s, REFUSE_MALFORMED, ours, &e.to_string()).await;
            return Err(e);
        }
    };
    let peer = hello.name.clone();
    let theirs = (hello.min_version, hello.max_version);
    if theirs.0 > theirs.1 {
        let e = HandshakeError::Malformed(format!(
            "peer {peer:?} offered an empty version range {}..{}",
            theirs.0, theirs.1
        ));
        send_refuse(s, REFUSE_MALFORMED, ours, &e.to_string()).await;
        return Err(e);
    }
    let version = ours.1.min(theirs.1);
    if version < ours.0.max(theirs.0) {
        send_refuse(
            s,
            REFUSE_VERSION,
            ours,
            &format!(
                "peer {:?} speaks protocol versions {}..{}, this node ({:?}) speaks {}..{}",
                peer, theirs.0, theirs.1, cfg.node_name, ours.0, ours.1
            ),
        )
        .await;
        return Err(HandshakeError::VersionMismatch { ours, theirs });
    }
    let unknown_required = hello.features & REQUIRED_FEATURES & !SUPPORTED_FEATURES;
    if unknown_required != 0 {
        let msg = format!(
            "peer {:?} requires {}, which node {:?} does not support",
            peer,
            fmt_features(unknown_required),
            cfg.node_name
        );
        send_refuse(s, REFUSE_FEATURE, ours, &msg).await;
        return Err(HandshakeError::UnsupportedFeature(msg));
    }
    let features = hello.features & SUPPORTED_FEATURES;

    let server_nonce: [u8; NONCE_LEN] = rand::random();
    let t = Transcript {
        version,
        client_min: theirs.0,
        client_max: theirs.1,
        client_features: hello.features,
        server_features: features,
        client_nonce: &hello.nonce,
        server_nonce: &server_nonce,
        client_name: &hello.name,
        server_name: &cfg.node_name,
    };
    let ack = HelloAck {
        version,
        features,
        nonce: server_nonce,
        mac: tag(transcript_mac(&cfg.secret, "server", &t)),
        name: cfg.node_name.clone(),
    };
    write_msg(s, MSG_HELLO_ACK, &ack.encode()).await?;

    let (ty, body) = read_msg(s).await?;
    let proof = match ty {
        MSG_CLIENT_PROOF => body,
        MSG_REFUSE => return Err(refused(&body, ours)),
        _ => {
            let e = unexpected(ty, "ClientProof");
            send_refuse(s, REFUSE_MALFORMED, ours, &e.to_string()).await;
            return Err(e);
        }
    };
    // verify_slice is constant-time and also rejects a proof of the wrong length.
    if transcript_mac(&cfg.secret, "client", &t).verify_slice(&proof).is_err() {
        send_refuse(s, REFUSE_AUTH, ours, "authentication failed").await;
        return Err(HandshakeError::AuthFailed(format!("peer {peer:?} failed to prove it knows the shared secret")));
    }
    write_msg(s, MSG_WELCOME, &[]).await?;
    tracing::debug!(peer = %peer, version, "peer handshake complete (server side)");
    Ok(PeerHello { node_name: hello.name, version, features })
}

#[cfg(test)]
mod tests {
    use super::super::proto::{Frame, PeerCodec, Request, encode_request};
    use super::*;
    use bytes::BytesMut;
    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::codec::Decoder;

    fn cfg(name: &str, secret: &[u8]) -> HandshakeConfig {
        HandshakeConfig { node_name: name.into(), secret: Arc::new(secret.to_vec()), timeout: Duration::from_secs(5) }
    }

    // Owning wrappers so a config built inline lives as long as the handshake future.
    async fn cli(s: &mut TcpStream, c: HandshakeConfig) -> Result<PeerHello, HandshakeError> {
        client_handshake(s, &c).await
    }
    async fn srv(s: &mut TcpStream, c: HandshakeConfig) -> Result<PeerHello, HandshakeError> {
        server_handshake(s, &c).await
    }
    async fn cli_with(
        s: &mut TcpStream,
        c: HandshakeConfig,
        v: (u16, u16),
        f: u32,
    ) -> Result<PeerHello, HandshakeError> {
        client_handshake_with(s, &c, v, f).await
    }
    async fn srv_with(s: &mut TcpStream, c: HandshakeConfig, v: (u16, u16)) -> Result<PeerHello, HandshakeError> {
        server_handshake_with(s, &c, v).await
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.unwrap(), s.unwrap().0)
    }

    /// After a server-side handshake failure, the server must not have consumed anything
    /// beyond handshake messages: whatever the client sent afterwards is still unread.
    async fn leftover(s: &mut TcpStream) -> Vec<u8> {
        let mut v = vec![];
        let _ = tokio::time::timeout(Duration::from_millis(300), s.read_to_end(&mut v)).await;
        v
    }

    #[tokio::test]
    async fn success_both_ways_then_frames_flow() {
        let (mut c, mut s) = pair().await;
        let secret = b"correct horse battery staple";
        let (cr, sr) = tokio::join!(cli(&mut c, cfg("node-a", secret)), srv(&mut s, cfg("node-b", secret)),);
        let cr = cr.unwrap();
        let sr = sr.unwrap();
        assert_eq!(cr, PeerHello { node_name: "node-b".into(), version: PROTOCOL_VERSION, features: 0 });
        assert_eq!(sr.node_name, "node-a");
        assert_eq!(sr.version, PROTOCOL_VERSION);

        // The stream is clean for frames afterwards.
        let mut out = BytesMut::new();
        encode_request(1, &Request::Ping, &mut out).unwrap();
        c.write_all(&out).await.unwrap();
        let mut buf = BytesMut::new();
        let f = super::super::proto::read_frame(&mut s, &mut buf).await.unwrap();
        assert_eq!(f, Some(Frame::Request { id: 1, req: Request::Ping }));
    }

    #[tokio::test]
    async fn wrong_secret_on_client_fails_both_sides() {
        let (mut c, mut s) = pair().await;
        let client = async {
            let r = cli(&mut c, cfg("node-a", b"wrong")).await;
            // A confused client that keeps going anyway: the server must never see a frame.
            let mut out = BytesMut::new();
            encode_request(1, &Request::Flush, &mut out).unwrap();
            let _ = c.write_all(&out).await;
            r
        };
        let (cr, sr) = tokio::join!(client, srv(&mut s, cfg("node-b", b"right")));
        let ce = cr.unwrap_err();
        let se = sr.unwrap_err();
        assert!(
            matches!(&ce, HandshakeError::AuthFailed(m) if m.contains("node-b") && m.contains("failed to prove it knows the shared secret")),
            "{ce}"
        );
        assert!(matches!(&se, HandshakeError::Refused(m) if m.contains("authentication failed")), "{se}");
        // The frame the client sent afterwards was never read by the handshake.
        drop(c);
        let rest = leftover(&mut s).await;
        let mut buf = BytesMut::from(&rest[..]);
        assert!(matches!(PeerCodec.decode(&mut buf), Ok(Some(Frame::Request { req: Request::Flush, .. }))));
    }

    #[tokio::test]
    async fn wrong_secret_on_server_is_detected_by_client() {
        let (mut c, mut s) = pair().await;
        let (cr, sr) = tokio::join!(cli(&mut c, cfg("node-a", b"right")), srv(&mut s, cfg("node-b", b"wrong")),);
        assert!(
            matches!(cr, Err(HandshakeError::AuthFailed(ref m)) if m.contains("\"node-b\" failed to prove")),
            "{cr:?}"
        );
        assert!(matches!(sr, Err(HandshakeError::Refused(_))), "{sr:?}");
    }

    /// A client without the secret that skips verification and sends a bogus proof followed
    /// by a frame: the server answers Refuse("authentication failed") and reads no frame.
    #[tokio::test]
    async fn forged_client_proof_is_rejected_and_no_frame_is_read() {
        let (mut c, mut s) = pair().await;
        let attacker = async {
            let hello = Hello {
                min_version: MIN_VERSION,
                max_version: MAX_VERSION,
                features: 0,
                nonce: [7; 32],
                name: "mallory".into(),
            };
            write_msg(&mut c, MSG_HELLO, &hello.encode()).await.unwrap();
            let (ty, _) = read_msg(&mut c).await.unwrap();
            assert_eq!(ty, MSG_HELLO_ACK);
            let mut out = BytesMut::new();
            encode_request(1, &Request::Flush, &mut out).unwrap();
            write_msg(&mut c, MSG_CLIENT_PROOF, &[0u8; MAC_LEN]).await.unwrap();
            c.write_all(&out).await.unwrap();
            let (ty, body) = read_msg(&mut c).await.unwrap();
            assert_eq!(ty, MSG_REFUSE);
            Refuse::decode(&body).unwrap().reason
        };
        let (reason, sr) = tokio::join!(attacker, srv(&mut s, cfg("node-b", b"k")));
        assert_eq!(reason, "authentication failed");
        let se = sr.unwrap_err();
        assert!(
            matches!(&se, HandshakeError::AuthFailed(m) if m == "peer \"mallory\" failed to prove it knows the shared secret"),
            "{se}"
        );
        drop(c);
        let rest = leftover(&mut s).await;
        assert_eq!(rest.len(), 32, "the frame is still unread in the socket");
    }

    /// Replaying a captured ClientProof on a new connection fails (fresh server nonce).
    #[tokio::test]
    async fn replayed_transcript_is_rejected() {
        let secret = b"s3cret";
        // Capture: run a legitimate handshake by hand, recording the client's messages.
        let (mut c, mut s) = pair().await;
        let capture = async {
            let hello = Hello {
                min_version: MIN_VERSION,
                max_version: MAX_VERSION,
                features: 0,
                nonce: [1; 32],
                name: "node-a".into(),
            };
            write_msg(&mut c, MSG_HELLO, &hello.encode()).await.unwrap();
            let (_, body) = read_msg(&mut c).await.unwrap();
            let ack = HelloAck::decode(&body).unwrap();
            let t = Transcript {
                version: ack.version,
                client_min: MIN_VERSION,
                client_max: MAX_VERSION,
                client_features: 0,
                server_features: 0,
                client_nonce: &hello.nonce,
                server_nonce: &ack.nonce,
                client_name: "node-a",
                server_name: &ack.name,
            };
            let proof = tag(transcript_mac(secret, "client", &t));
            write_msg(&mut c, MSG_CLIENT_PROOF, &proof).await.unwrap();
            let (ty, _) = read_msg(&mut c).await.unwrap();
            assert_eq!(ty, MSG_WELCOME);
            (hello, proof)
        };
        let ((hello, proof), sr) = tokio::join!(capture, srv(&mut s, cfg("node-b", secret)));
        sr.unwrap();
        // Replay against a new connection, without knowing the secret.
        let (mut c, mut s) = pair().await;
        let replay = async {
            write_msg(&mut c, MSG_HELLO, &hello.encode()).await.unwrap();
            let _ = read_msg(&mut c).await.unwrap();
            write_msg(&mut c, MSG_CLIENT_PROOF, &proof).await.unwrap();
            read_msg(&mut c).await.unwrap().0
        };
        let (ty, sr) = tokio::join!(replay, srv(&mut s, cfg("node-b", secret)));
        assert_eq!(ty, MSG_REFUSE);
        assert!(matches!(sr, Err(HandshakeError::AuthFailed(_))));
        // Reflection: the server's own MAC is not a valid client proof.
        let t = Transcript {
            version: MAX_VERSION,
            client_min: MIN_VERSION,
            client_max: MAX_VERSION,
            client_features: 0,
            server_features: 0,
            client_nonce: &[0; 32],
            server_nonce: &[0; 32],
            client_name: "a",
            server_name: "b",
        };
        assert_ne!(tag(transcript_mac(secret, "server", &t)), tag(transcript_mac(secret, "client", &t)));
    }

    #[tokio::test]
    async fn version_mismatch_names_both_ranges() {
        assert_eq!((MIN_VERSION, MAX_VERSION), (3, 3));
        // A version 1 client against this server (3..3).
        let (mut c, mut s) = pair().await;
        let (cr, sr) =
            tokio::join!(cli_with(&mut c, cfg("node-a", b"k"), (1, 1), 0), srv(&mut s, cfg("node-b", b"k")),);
        let ce = cr.unwrap_err();
        let se = sr.unwrap_err();
        for e in [&ce, &se] {
            let m = e.to_string();
            assert!(m.contains("1..1") && m.contains("3..3"), "{m}");
        }
        assert!(matches!(ce, HandshakeError::VersionMismatch { ours: (1, 1), theirs: (3, 3) }));
        assert!(matches!(se, HandshakeError::VersionMismatch { ours: (3, 3), theirs: (1, 1) }));
        // This client (3..3) against a version 1 server.
        let (mut c, mut s) = pair().await;
        let (cr, sr) = tokio::join!(cli(&mut c, cfg("node-a", b"k")), srv_with(&mut s, cfg("node-b", b"k"), (1, 1)),);
        assert!(matches!(cr, Err(HandshakeError::VersionMismatch { ours: (3, 3), theirs: (1, 1) })), "{cr:?}");
        assert!(matches!(sr, Err(HandshakeError::VersionMismatch { ours: (1, 1), theirs: (3, 3) })), "{sr:?}");
        // A newer client (4..5) against this server (3..3).
        let (mut c, mut s) = pair().await;
        let (cr, sr) =
            tokio::join!(cli_with(&mut c, cfg("node-a", b"k"), (4, 5), 0), srv(&mut s, cfg("node-b", b"k")),);
        let ce = cr.unwrap_err();
        let se = sr.unwrap_err();
        for e in [&ce, &se] {
            let m = e.to_string();
            assert!(m.contains("4..5") && m.contains("3..3"), "{m}");
        }
        assert!(matches!(ce, HandshakeError::VersionMismatch { ours: (4, 5), theirs: (3, 3) }));
        assert!(matches!(se, HandshakeError::VersionMismatch { ours: (3, 3), theirs: (4, 5) }));
        // This client (3..3) against a newer server (4..5).
        let (mut c, mut s) = pair().await;
        let (cr, sr) = tokio::join!(cli(&mut c, cfg("node-a", b"k")), srv_with(&mut s, cfg("node-b", b"k"), (4, 5)),);
        assert!(matches!(cr, Err(HandshakeError::VersionMismatch { ours: (3, 3), theirs: (4, 5) })));
        assert!(sr.is_err());
        // Overlapping ranges pick the highest common version.
        let (mut c, mut s) = pair().await;
        let (cr, sr) = tokio::join!(
            cli_with(&mut c, cfg("node-a", b"k"), (1, 3), 0),
            srv_with(&mut s, cfg("node-b", b"k"), (2, 5)),
        );
        assert_eq!(cr.unwrap().version, 3);
        assert_eq!(sr.unwrap().version, 3);
    }

    #[tokio::test]
    async fn tls_feature_is_refused_clearly_and_optional_bits_are_ignored() {
        let (mut c, mut s) = pair().await;
        let (cr, sr) = tokio::join!(
            cli_with(&mut c, cfg("node-a", b"k"), (MIN_VERSION, MAX_VERSION), FEATURE_TLS),
            srv(&mut s, cfg("node-b", b"k")),
        );
        let ce = cr.unwrap_err();
        let se = sr.unwrap_err();
        for e in [&ce, &se] {
            assert!(matches!(e, HandshakeError::UnsupportedFeature(_)), "{e:?}");
            let m = e.to_string();
            assert!(m.contains("TLS") && m.contains("node-b"), "{m}");
        }
        // Optional (bit >= 16) features that the server does not know are simply not enabled.
        let (mut c, mut s) = pair().await;
        let (cr, sr) = tokio::join!(
            cli_with(&mut c, cfg("node-a", b"k"), (MIN_VERSION, MAX_VERSION), 1 << 20),
            srv(&mut s, cfg("node-b", b"k")),
        );
        assert_eq!(cr.unwrap().features, 0);
        assert_eq!(sr.unwrap().features, 0);
    }

    #[tokio::test]
    async fn silent_peers_time_out() {
        let (mut c, mut s) = pair().await;
        let mut short = cfg("node-b", b"k");
        short.timeout = Duration::from_millis(200);
        let t0 = std::time::Instant::now();
        let r = server_handshake(&mut s, &short).await;
        assert!(matches!(r, Err(HandshakeError::Timeout(_))), "{r:?}");
        assert!(t0.elapsed() < Duration::from_secs(2));
        // A silent server: the client times out too.
        let r = client_handshake(&mut c, &short).await;
        // (the server above has given up but not closed `s`; nobody answers)
        assert!(matches!(r, Err(HandshakeError::Timeout(_))), "{r:?}");
        drop(s);
    }

    #[tokio::test]
    async fn garbage_is_bad_magic_on_both_sides() {
        let (mut c, mut s) = pair().await;
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let r = srv(&mut s, cfg("node-b", b"k")).await;
        assert!(matches!(r, Err(HandshakeError::BadMagic)), "{r:?}");
        // The server told the garbage sender what it is talking to.
        let mut v = vec![0u8; 12];
        c.read_exact(&mut v).await.unwrap();
        assert_eq!(&v[..8], &HANDSHAKE_MAGIC);
        assert_eq!(v[8], MSG_REFUSE);

        // A client connecting to something that is not a peersan node.
        let (mut c, mut s) = pair().await;
        let srv = async {
            let mut b = [0u8; 64];
            let _ = s.read(&mut b).await;
            s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await.unwrap();
        };
        let (r, _) = tokio::join!(cli(&mut c, cfg("node-a", b"k")), srv);
        assert!(matches!(r, Err(HandshakeError::BadMagic)), "{r:?}");
    }

    #[tokio::test]
    async fn oversized_and_malformed_messages_are_bounded() {
        // A declared length over the cap is refused without reading the body.
        let (mut c, mut s) = pair().await;
        let mut m = HANDSHAKE_MAGIC.to_vec();
        m.extend_from_slice(&[MSG_HELLO, 0, 0xff, 0xff]);
        c.write_all(&m).await.unwrap();
        let r = srv(&mut s, cfg("node-b", b"k")).await;
        assert!(matches!(r, Err(HandshakeError::Malformed(ref m)) if m.contains("65535")), "{r:?}");

        // Name longer than 253 bytes.
        let (mut c, mut s) = pair().await;
        let mut body =
            Hello { min_version: MIN_VERSION, max_version: MAX_VERSION, features: 0, nonce: [0; 32], name: "n".into() }
                .encode();
        body.truncate(40);
        body.push(254);
        body.extend_from_slice(&[b'x'; 254]);
        write_msg(&mut c, MSG_HELLO, &body).await.unwrap();
        let r = srv(&mut s, cfg("node-b", b"k")).await;
        assert!(matches!(r, Err(HandshakeError::Malformed(ref m)) if m.contains("253")), "{r:?}");

        // Wrong first message type.
        let (mut c, mut s) = pair().await;
        write_msg(&mut c, MSG_WELCOME, &[]).await.unwrap();
        let r = srv(&mut s, cfg("node-b", b"k")).await;
        assert!(matches!(r, Err(HandshakeError::Malformed(_))), "{r:?}");

        // Invalid local configuration is reported before any I/O.
        let (mut c, _s) = pair().await;
        let r = cli(&mut c, cfg("", b"k")).await;
        assert!(matches!(r, Err(HandshakeError::Malformed(_))), "{r:?}");
        let r = cli(&mut c, cfg("a", b"")).await;
        assert!(matches!(r, Err(HandshakeError::AuthFailed(_))), "{r:?}");
    }

    /// The test vectors printed in PROTOCOL.md (cross-checked with an independent HMAC).
    #[test]
    fn documented_test_vectors() {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let t = Transcript {
            version: 2,
            client_min: 2,
            client_max: 2,
            client_features: 0,
            server_features: 0,
            client_nonce: &[0x11; 32],
            server_nonce: &[0x22; 32],
            client_name: "node-a",
            server_name: "node-b",
        };
        assert_eq!(
            hex(&tag(transcript_mac(b"secret", "server", &t))),
            "efdc75508201c4a746ece8384ed61aea3114b2d3721fe4788b3ab05100bc77c2"
        );
        assert_eq!(
            hex(&tag(transcript_mac(b"secret", "client", &t))),
            "3d03951cd9e1836e3b2295f6b7b487e89b1f989b2e9c233adead71ee596a0cbf"
        );
        let hello = Hello { min_version: 2, max_version: 2, features: 0, nonce: [0x11; 32], name: "node-a".into() };
        let body = hello.encode();
        assert_eq!(body.len(), 0x2f);
        assert_eq!(hex(&body[..8]), "0200020000000000");
        assert_eq!(hex(&body[40..]), "066e6f64652d61");
    }

    #[test]
    fn config_debug_redacts_the_secret() {
        let d = format!("{:?}", cfg("n", b"topsecret"));
        assert!(!d.contains("topsecret") && d.contains("redacted"), "{d}");
    }

    #[test]
    fn refuse_reason_is_sanitized_and_bounded() {
        let r = Refuse {
            code: REFUSE_AUTH,
            min_version: 1,
            max_version: 1,
            reason: format!("bad\nline\u{1b}[31m{}", "é".repeat(400)),
        };
        let d = Refuse::decode(&r.encode()).unwrap();
        assert!(!d.reason.contains('\n') && !d.reason.contains('\u{1b}'));
        assert!(d.reason.len() <= MAX_REASON_LEN);
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn run(input: Vec<u8>, server: bool) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            rt.block_on(async {
                let mut s = tokio::io::join(&input[..], tokio::io::sink());
                let c = cfg("node-x", b"k");
                let r = if server { server_handshake(&mut s, &c).await } else { client_handshake(&mut s, &c).await };
                // Random bytes can never authenticate.
                assert!(r.is_err());
            });
        }

        /// Magic + message type, so the random bytes reach the body parsers.
        fn valid_prefix(ty: u8) -> Vec<u8> {
            let mut v = HANDSHAKE_MAGIC.to_vec();
            v.extend_from_slice(&[ty, 0]);
            v
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]
            #[test]
            fn random_input_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), server in any::<bool>(), prefix in proptest::option::of(1u8..=5)) {
                let mut input = prefix.map(valid_prefix).unwrap_or_default();
                input.extend_from_slice(&bytes);
                run(input, server);
            }
        }
    }
}
