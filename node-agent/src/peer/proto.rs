//! Peer protocol: the frame codec used between mirror engines once the authenticated
//! handshake (`super::handshake`) has completed.
//!
//! The exact byte layout is documented in `PROTOCOL.md` next to this file; keep the two in
//! sync. Summary: every frame is a fixed 32-byte little-endian header (magic `PSF1`, body
//! length, kind, flags, request id, body CRC32C, header CRC32C) followed by the body.
//!
//! * Decoding never panics on any input and never allocates more than [`MAX_BODY`] +
//!   [`HEADER_LEN`] bytes for a frame: the length is validated (after the header CRC) before
//!   any reservation is made.
//! * Data payloads (`Request::Write::data`, `Reply::Data::data`) are zero-copy slices of the
//!   receive buffer.
//! * Errors are split into *fatal* ones (the byte stream can no longer be framed, the
//!   connection must be closed) and *per-frame* ones (the frame was consumed exactly, its id is
//!   reported, the next frame can be decoded). See [`ProtoError::is_fatal`].
//!
//! Note on `tokio_util::codec::FramedRead`: after the decoder returns *any* error, `FramedRead`
//! yields that error, then `None` once, and afterwards only resumes decoding when new bytes
//! arrive from the socket. A frame that was already buffered behind a per-frame error would
//! therefore stall. Use [`read_frame`] (which keeps going after per-frame errors) for the
//! receive side, or treat every error from a `FramedRead` as fatal.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::codec::{Decoder, Encoder};

/// Version of the frame protocol described here (negotiated by the handshake).
pub const PROTOCOL_VERSION: u16 = 3;
/// Largest data payload of a `Write` request or a `Data` reply (and largest `Read` length).
pub const MAX_DATA: usize = 32 << 20;
/// Largest frame body accepted or produced: [`MAX_DATA`] plus room for the fixed fields.
pub const MAX_BODY: usize = MAX_DATA + 4096;
/// Frame header length in bytes.
pub const HEADER_LEN: usize = 32;
/// First four bytes of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"PSF1";
/// Longest volume / node / replica name, in bytes (a DNS subdomain / Kubernetes object name).
pub const MAX_NAME_LEN: usize = 253;
/// Most entries in `ReplicaStateMsg::outdated_peers` and `ReplicaStateMsg::dirty_peers`
/// (replica bitmasks are 32 bits wide).
pub const MAX_PEERS: usize = 32;
/// Longest `Reply::Error` message in bytes; longer messages are truncated by the encoder.
pub const MAX_MESSAGE_LEN: usize = 4096;
/// Size of the block that one bit of an out-of-sync bitmap stands for (`Request::GetBitmap`).
pub const BITMAP_BLOCK: u64 = 4096;
/// Most region grants one write carries (a multi-writer volume splits larger writes).
pub const MAX_TAGS: usize = 64;
/// Region sizes of multi-writer volumes: `1 << shift` bytes, 4 KiB to 4 MiB.
pub const MIN_REGION_SHIFT: u8 = 12;
pub const MAX_REGION_SHIFT: u8 = 22;

/// Write flags
pub const WF_FUA: u8 = 1; // durable before reply
/// Marks a resync copy pushed by a source. Resync is pulled by the target with `ResyncRead`, so
/// the engine never sets it; it is part of the format so that a pushing source can be added
/// compatibly.
pub const WF_RESYNC: u8 = 2;
/// All write flags defined by protocol version 2; any other bit is rejected.
pub const WF_ALL: u8 = WF_FUA | WF_RESYNC;

/// Frame kinds (header byte 8). Bit 7 set = reply.
pub mod kind {
    pub const OPEN: u8 = 0x01;
    pub const WRITE: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x03;
    pub const TRIM: u8 = 0x04;
    pub const READ: u8 = 0x05;
    pub const FLUSH: u8 = 0x06;
    pub const STATE: u8 = 0x07;
    pub const GET_BITMAP: u8 = 0x08;
    pub const PING: u8 = 0x09;
    pub const CREATE_VOLUME: u8 = 0x0a;
    pub const DELETE_VOLUME: u8 = 0x0b;
    pub const RESYNC_READ: u8 = 0x0c;
    pub const RESOLVE: u8 = 0x0d;
    pub const ACQUIRE: u8 = 0x0e;
    pub const REVOKE: u8 = 0x0f;
    pub const RELEASE: u8 = 0x10;
    pub const RECOVER: u8 = 0x11;

    pub const OK: u8 = 0x81;
    pub const OPENED: u8 = 0x82;
    pub const DATA: u8 = 0x83;
    pub const FENCED: u8 = 0x84;
    pub const PONG: u8 = 0x85;
    pub const ERROR: u8 = 0x86;
    pub const GRANTED: u8 = 0x87;
    pub const RELEASED: u8 = 0x88;

    /// True for reply kinds (bit 7 set).
    pub fn is_reply(kind: u8) -> bool {
        kind & 0x80 != 0
    }

    /// Human-readable name of a kind byte (for errors and logs).
    pub fn name(kind: u8) -> &'static str {
        match kind {
            OPEN => "Open",
            WRITE => "Write",
            WRITE_ZEROES => "WriteZeroes",
            TRIM => "Trim",
            READ => "Read",
            FLUSH => "Flush",
            STATE => "State",
            GET_BITMAP => "GetBitmap",
            PING => "Ping",
            CREATE_VOLUME => "CreateVolume",
            DELETE_VOLUME => "DeleteVolume",
            RESYNC_READ => "ResyncRead",
            RESOLVE => "Resolve",
            ACQUIRE => "Acquire",
            REVOKE => "Revoke",
            RELEASE => "Release",
            RECOVER => "Recover",
            OK => "Ok",
            OPENED => "Opened",
            DATA => "Data",
            FENCED => "Fenced",
            PONG => "Pong",
            ERROR => "Error",
            GRANTED => "Granted",
            RELEASED => "Released",
            _ => "unknown",
        }
    }
}

// ReplicaStateMsg flag bits.
const SF_CONSISTENT: u8 = 1;
const SF_LOCAL_OK: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStateMsg {
    pub consistent: bool, // replica holds a complete, consistent image
    pub generation: u64,
    pub size: u64,                   // volume size in bytes
    pub outdated_peers: Vec<String>, // names of replicas this replica knows missed writes
    pub local_ok: bool,              // the sender's local replica is usable (not failed/diskless)
    /// Newest write-priority epoch the sender knows.
    pub epoch: u64,
    /// Node holding write priority at `epoch`; empty if the sender does not know it.
    pub holder: String,
    /// Replicas for which the sender has out-of-sync bits but which it does not know to have
    /// missed acknowledged writes.
    pub dirty_peers: Vec<String>,
    /// Epoch under which the sender last recorded a replica in `outdated_peers` (two
    /// replicas that recorded each other under one epoch had one writer: not a split brain).
    pub flag_epoch: u64,
}

/// The region grants a write of a multi-writer volume is made under (`engine/POLICING.md`):
/// the volume's regions are `1 << shift` bytes, and `list` holds `(region, grant)` for every
/// region the write touches, in ascending region order. Empty for single-writer volumes
/// (`shift` is then 0).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tags {
    pub shift: u8,
    pub list: Vec<(u64, u64)>,
}

impl Tags {
    fn encoded_len(&self) -> usize {
        1 + 2 + 16 * self.list.len()
    }

    /// What the decoder checks: a shift in range (0 with no tags), at most [`MAX_TAGS`]
    /// entries, regions strictly ascending.
    fn check(&self) -> Result<(), String> {
        if self.list.is_empty() {
            return if self.shift == 0 { Ok(()) } else { Err(format!("region shift {} with no grants", self.shift)) };
        }
        if !(MIN_REGION_SHIFT..=MAX_REGION_SHIFT).contains(&self.shift) {
            return Err(format!(
                "region shift {} is outside {MIN_REGION_SHIFT}..={MAX_REGION_SHIFT} (4 KiB to 4 MiB regions)",
                self.shift
            ));
        }
        if self.list.len() > MAX_TAGS {
            return Err(format!("{} grants, the maximum is {MAX_TAGS}", self.list.len()));
        }
        if self.list.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err("regions are not strictly ascending".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// First request on a connection after the handshake: bind it to a volume.
    Open {
        volume: String,
        from_node: String,
        state: ReplicaStateMsg,
    },
    /// `insync` / `sent`: bitmasks of replica indices (volume's sorted replica list) that the
    /// origin considers in sync / that this write is being sent to. `epoch`: the writer's
    /// write-priority epoch; a receiver that knows a newer one answers `Reply::Fenced`.
    Write {
        offset: u64,
        flags: u8,
        insync: u32,
        sent: u32,
        epoch: u64,
        tags: Tags,
        data: Bytes,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        flags: u8,
        insync: u32,
        sent: u32,
        epoch: u64,
        tags: Tags,
    },
    Trim {
        offset: u64,
        len: u64,
        flags: u8,
        insync: u32,
        sent: u32,
        epoch: u64,
        tags: Tags,
    },
    Read {
        offset: u64,
        len: u32,
    },
    Flush,
    /// The sender announces its state changed (e.g. finished catching up).
    State {
        state: ReplicaStateMsg,
    },
    /// The sender asks for bytes `[offset, offset + len)` of the receiver's out-of-sync bitmap
    /// for the sender: one bit per [`BITMAP_BLOCK`] bytes of the volume, bit `i` of byte `j`
    /// standing for block `8 * j + i`. Answered with `Reply::Data`.
    GetBitmap {
        offset: u64,
        len: u32,
    },
    Ping,
    /// Volume lifecycle (first and only request on a connection, no `Open`): create the
    /// local replica of a volume that another node created through its API.
    CreateVolume {
        volume: String,
        size: u64,
        replicas: Vec<String>,
    },
    /// Delete the local replica of a volume deleted through another node's API.
    DeleteVolume {
        volume: String,
    },
    /// Like `Read`, but a resync copy: the receiver (the source) clears the sender's
    /// out-of-sync bits for the blocks it returns. Answered with `Reply::Data`.
    ResyncRead {
        offset: u64,
        len: u32,
    },
    /// Split-brain resolution: the receiver discards its own changes made while split from
    /// `keep` and resynchronises from it.
    Resolve {
        keep: String,
    },
    /// Multi-writer volumes, writer → arbiter: the sender wants to write `region` under
    /// `epoch`. Answered `Granted` once the region is the sender's (after the arbiter took it
    /// back from its holder, or recovered it), `Fenced` for another epoch.
    Acquire {
        epoch: u64,
        region: u64,
    },
    /// Arbiter → holder: give `region` (held under `grant`) back once the writes to it that
    /// are in flight have completed. Answered `Released`.
    Revoke {
        epoch: u64,
        region: u64,
        grant: u64,
    },
    /// Holder → arbiter, unasked: the sender gives `region` back; `dirty`: a write of the
    /// sender's to it failed, so its replicas may differ.
    Release {
        epoch: u64,
        region: u64,
        grant: u64,
        dirty: bool,
    },
    /// Arbiter → replica: adopt `grant` for `region` (refusing older writes to it), then
    /// overwrite the region (`1 << shift` bytes from `region << shift`, cut at the volume's
    /// end) with `data`.
    Recover {
        epoch: u64,
        region: u64,
        grant: u64,
        shift: u8,
        data: Bytes,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Opened {
        state: ReplicaStateMsg,
    },
    Data {
        data: Bytes,
    },
    /// The write was not executed: the receiver knows a newer write-priority epoch, `epoch`,
    /// held by `holder` (empty if not known).
    Fenced {
        epoch: u64,
        holder: String,
    },
    Pong,
    Error {
        code: ErrorCode,
        message: String,
    },
    /// Answer to `Acquire`: the region is the sender's under `grant`.
    Granted {
        grant: u64,
    },
    /// Answer to `Revoke`: the region is given back; `dirty` as in `Request::Release`.
    Released {
        dirty: bool,
    },
}

/// Error codes carried by `Reply::Error`. An unknown code on the wire decodes to `Internal`
/// (forward compatible).
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Io = 1,
    OutOfRange = 2,
    Invalid = 3,
    Fenced = 4,
    UnknownVolume = 5,
    NotInSync = 6,
    Checksum = 7,
    Busy = 8,
    Internal = 9,
    /// Multi-writer volumes: a write's region grant is older than one the replica adopted
    /// (the region was handed over or recovered), or its epoch is not known there yet.
    /// Nothing was executed; the writer acquires the region again and retries.
    StaleGrant = 10,
}

impl ErrorCode {
    /// Decodes a wire value; unknown values map to [`ErrorCode::Internal`].
    pub fn from_u16(v: u16) -> ErrorCode {
        match v {
            1 => ErrorCode::Io,
            2 => ErrorCode::OutOfRange,
            3 => ErrorCode::Invalid,
            4 => ErrorCode::Fenced,
            5 => ErrorCode::UnknownVolume,
            6 => ErrorCode::NotInSync,
            7 => ErrorCode::Checksum,
            8 => ErrorCode::Busy,
            10 => ErrorCode::StaleGrant,
            _ => ErrorCode::Internal,
        }
    }

    pub fn as_u16(self) -> u16 {
        self as u16
    }
}

/// One decoded (or to-be-encoded) frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Request { id: u64, req: Request },
    Reply { id: u64, reply: Reply },
}

impl Frame {
    pub fn id(&self) -> u64 {
        match self {
            Frame::Request { id, .. } | Frame::Reply { id, .. } => *id,
        }
    }

    pub fn kind(&self) -> u8 {
        match self {
            Frame::Request { req, .. } => req.kind(),
            Frame::Reply { reply, .. } => reply.kind(),
        }
    }
}

impl Request {
    /// The header kind byte of this request.
    pub fn kind(&self) -> u8 {
        match self {
            Request::Open { .. } => kind::OPEN,
            Request::Write { .. } => kind::WRITE,
            Request::WriteZeroes { .. } => kind::WRITE_ZEROES,
            Request::Trim { .. } => kind::TRIM,
            Request::Read { .. } => kind::READ,
            Request::Flush => kind::FLUSH,
            Request::State { .. } => kind::STATE,
            Request::GetBitmap { .. } => kind::GET_BITMAP,
            Request::Ping => kind::PING,
            Request::CreateVolume { .. } => kind::CREATE_VOLUME,
            Request::DeleteVolume { .. } => kind::DELETE_VOLUME,
            Request::ResyncRead { .. } => kind::RESYNC_READ,
            Request::Resolve { .. } => kind::RESOLVE,
            Request::Acquire { .. } => kind::ACQUIRE,
            Request::Revoke { .. } => kind::REVOKE,
            Request::Release { .. } => kind::RELEASE,
            Request::Recover { .. } => kind::RECOVER,
        }
    }

    /// Size in bytes of the encoded frame (header + body), without validating.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.body_len()
    }

    fn body_len(&self) -> usize {
        match self {
            Request::Open { volume, from_node, state } => 1 + volume.len() + 1 + from_node.len() + state_len(state),
            Request::Write { data, tags, .. } => WRITE_PREFIX + tags.encoded_len() + data.len(),
            Request::WriteZeroes { tags, .. } | Request::Trim { tags, .. } => 33 + tags.encoded_len(),
            Request::Acquire { .. } => 16,
            Request::Revoke { .. } => 24,
            Request::Release { .. } => 25,
            Request::Recover { data, .. } => 25 + data.len(),
            Request::Read { .. } | Request::GetBitmap { .. } | Request::ResyncRead { .. } => 12,
            Request::Flush | Request::Ping => 0,
            Request::State { state } => state_len(state),
            Request::Resolve { keep } => 1 + keep.len(),
            Request::CreateVolume { volume, replicas, .. } => {
                1 + volume.len() + 8 + 1 + replicas.iter().map(|r| 1 + r.len()).sum::<usize>()
            }
            Request::DeleteVolume { volume } => 1 + volume.len(),
        }
    }

    /// Checks everything the decoder checks, so that whatever encodes also decodes.
    fn validate(&self) -> Result<(), ProtoError> {
        match self {
            Request::Open { volume, from_node, state } => {
                check_name_enc(volume, "volume")?;
                check_name_enc(from_node, "from_node")?;
                check_state_enc(state)
            }
            Request::Write { offset, flags, data, tags, .. } => {
                if data.len() > MAX_DATA {
                    return Err(unencodable("data", format!("{} bytes > MAX_DATA", data.len())));
                }
                check_flags_enc(*flags)?;
                tags.check().map_err(|reason| unencodable("tags", reason))?;
                check_range_enc(*offset, data.len() as u64, "offset+len")
            }
            Request::WriteZeroes { offset, len, flags, tags, .. } | Request::Trim { offset, len, flags, tags, .. } => {
                check_flags_enc(*flags)?;
                tags.check().map_err(|reason| unencodable("tags", reason))?;
                check_range_enc(*offset, *len, "offset+len")
            }
            Request::Acquire { .. } | Request::Revoke { .. } | Request::Release { .. } => Ok(()),
            Request::Recover { shift, data, .. } => {
                if !(MIN_REGION_SHIFT..=MAX_REGION_SHIFT).contains(shift) {
                    return Err(unencodable(
                        "shift",
                        format!("{shift} is outside {MIN_REGION_SHIFT}..={MAX_REGION_SHIFT}"),
                    ));
                }
                if data.len() as u64 > 1 << shift {
                    return Err(unencodable("data", format!("{} bytes, more than a region", data.len())));
                }
                Ok(())
            }
            Request::Read { offset, len }
            | Request::GetBitmap { offset, len }
            | Request::ResyncRead { offset, len } => {
                if *len as usize > MAX_DATA {
                    return Err(unencodable("len", format!("{len} bytes > MAX_DATA")));
                }
                check_range_enc(*offset, u64::from(*len), "offset+len")
            }
            Request::State { state } => check_state_enc(state),
            Request::Flush | Request::Ping => Ok(()),
            Request::Resolve { keep } => check_name_enc(keep, "keep"),
            Request::CreateVolume { volume, replicas, .. } => {
                check_name_enc(volume, "volume")?;
                if replicas.len() > MAX_PEERS {
                    return Err(unencodable("replicas", format!("{} names > MAX_PEERS ({MAX_PEERS})", replicas.len())));
                }
                for r in replicas {
                    check_name_enc(r, "replicas")?;
                }
                Ok(())
            }
            Request::DeleteVolume { volume } => check_name_enc(volume, "volume"),
        }
    }
}

impl Reply {
    /// The header kind byte of this reply.
    pub fn kind(&self) -> u8 {
        match self {
            Reply::Ok => kind::OK,
            Reply::Opened { .. } => kind::OPENED,
            Reply::Data { .. } => kind::DATA,
            Reply::Fenced { .. } => kind::FENCED,
            Reply::Pong => kind::PONG,
            Reply::Error { .. } => kind::ERROR,
            Reply::Granted { .. } => kind::GRANTED,
            Reply::Released { .. } => kind::RELEASED,
        }
    }

    /// Size in bytes of the encoded frame (header + body), without validating.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.body_len()
    }

    fn body_len(&self) -> usize {
        match self {
            Reply::Ok | Reply::Pong => 0,
            Reply::Opened { state } => state_len(state),
            Reply::Data { data } => data.len(),
            Reply::Fenced { holder, .. } => 8 + 1 + holder.len(),
            Reply::Error { message, .. } => 4 + truncate_utf8(message, MAX_MESSAGE_LEN).len(),
            Reply::Granted { .. } => 8,
            Reply::Released { .. } => 1,
        }
    }

    fn validate(&self) -> Result<(), ProtoError> {
        match self {
            Reply::Ok | Reply::Pong | Reply::Error { .. } | Reply::Granted { .. } | Reply::Released { .. } => Ok(()),
            Reply::Opened { state } => check_state_enc(state),
            Reply::Data { data } => {
                if data.len() > MAX_DATA {
                    Err(unencodable("data", format!("{} bytes > MAX_DATA", data.len())))
                } else {
                    Ok(())
                }
            }
            Reply::Fenced { holder, .. } => check_opt_name_enc(holder, "holder"),
        }
    }
}

/// Errors of the frame layer.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    // ---- fatal: the stream cannot be framed any more; close the connection ----
    #[error("peer connection I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "bad frame magic {found:02x?} (expected \"PSF1\"): the peer is not speaking peersan frames or the stream lost sync"
    )]
    BadMagic { found: [u8; 4] },
    #[error(
        "frame header checksum mismatch (header says {expected:#010x}, computed {actual:#010x}): header corrupted in transit"
    )]
    HeaderChecksum { expected: u32, actual: u32 },
    #[error("frame body length {len} exceeds the maximum of {max} bytes")]
    Oversized { len: u64, max: usize },
    #[error("stream ended in the middle of a frame ({have} of at least {need} bytes received)")]
    Truncated { have: usize, need: usize },

    // ---- per-frame: exactly this frame was consumed, the next one can be decoded ----
    #[error(
        "body checksum mismatch in {} frame id {id} (header says {expected:#010x}, computed {actual:#010x}): payload corrupted in transit",
        kind::name(*kind)
    )]
    BodyChecksum { id: u64, kind: u8, expected: u32, actual: u32 },
    #[error("unknown frame kind {kind:#04x} (frame id {id})")]
    UnknownKind { id: u64, kind: u8 },
    #[error(
        "reserved bits set in `{field}` of {} frame id {id}: value {value:#x}",
        kind::name(*kind)
    )]
    ReservedBits { id: u64, kind: u8, field: &'static str, value: u64 },
    #[error(
        "truncated body: {} frame id {id} ends inside field `{field}`",
        kind::name(*kind)
    )]
    ShortBody { id: u64, kind: u8, field: &'static str },
    #[error(
        "{extra} trailing byte(s) after the last field of {} frame id {id}",
        kind::name(*kind)
    )]
    TrailingBytes { id: u64, kind: u8, extra: usize },
    #[error("invalid `{field}` in {} frame id {id}: {reason}", kind::name(*kind))]
    InvalidField { id: u64, kind: u8, field: &'static str, reason: String },

    // ---- encoder side: nothing was written ----
    #[error("cannot encode frame: `{field}` {reason}")]
    Unencodable { field: &'static str, reason: String },
}

impl ProtoError {
    /// True if the byte stream can no longer be framed and the connection must be closed.
    /// False for per-frame errors (the offending frame was consumed; see [`ProtoError::frame`])
    /// and for encoder errors (nothing was written).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ProtoError::Io(_)
                | ProtoError::BadMagic { .. }
                | ProtoError::HeaderChecksum { .. }
                | ProtoError::Oversized { .. }
                | ProtoError::Truncated { .. }
        )
    }

    /// `(id, kind)` of the frame a per-frame decode error refers to.
    pub fn frame(&self) -> Option<(u64, u8)> {
        match self {
            ProtoError::BodyChecksum { id, kind, .. }
            | ProtoError::UnknownKind { id, kind }
            | ProtoError::ReservedBits { id, kind, .. }
            | ProtoError::ShortBody { id, kind, .. }
            | ProtoError::TrailingBytes { id, kind, .. }
            | ProtoError::InvalidField { id, kind, .. } => Some((*id, *kind)),
            _ => None,
        }
    }

    /// If this is a per-frame error on a *request*, the request id and the error code to
    /// answer it with (`Checksum` for a corrupted body, `Invalid` otherwise).
    pub fn reply_for_request(&self) -> Option<(u64, ErrorCode)> {
        let (id, k) = self.frame()?;
        if kind::is_reply(k) {
            return None;
        }
        let code = match self {
            ProtoError::BodyChecksum { .. } => ErrorCode::Checksum,
            _ => ErrorCode::Invalid,
        };
        Some((id, code))
    }
}

fn unencodable(field: &'static str, reason: String) -> ProtoError {
    ProtoError::Unencodable { field, reason }
}

/// Checks a volume / node / replica name: 1..=253 bytes of UTF-8 without control
/// characters. Returns a description of the problem.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty name".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("name is {} bytes, the maximum is {MAX_NAME_LEN}", name.len()));
    }
    if name.chars().any(char::is_control) {
        return Err("name contains control characters".into());
    }
    Ok(())
}

fn check_name_enc(name: &str, field: &'static str) -> Result<(), ProtoError> {
    check_name(name).map_err(|reason| unencodable(field, reason))
}

/// Like [`check_name`], but the empty string ("not known") is allowed.
fn check_opt_name(name: &str) -> Result<(), String> {
    if name.is_empty() { Ok(()) } else { check_name(name) }
}

fn check_opt_name_enc(name: &str, field: &'static str) -> Result<(), ProtoError> {
    check_opt_name(name).map_err(|reason| unencodable(field, reason))
}

fn check_names_enc(names: &[String], field: &'static str) -> Result<(), ProtoError> {
    if names.len() > MAX_PEERS {
        return Err(unencodable(field, format!("has {} entries, the maximum is {MAX_PEERS}", names.len())));
    }
    for n in names {
        check_name_enc(n, field)?;
    }
    Ok(())
}

fn check_flags_enc(flags: u8) -> Result<(), ProtoError> {
    if flags & !WF_ALL != 0 {
        return Err(unencodable("flags", format!("has undefined write flag bits {:#04x}", flags & !WF_ALL)));
    }
    Ok(())
}

fn check_range_enc(offset: u64, len: u64, field: &'static str) -> Result<(), ProtoError> {
    if offset.checked_add(len).is_none() {
        return Err(unencodable(field, format!("offset {offset} + length {len} overflows u64")));
    }
    Ok(())
}

fn check_state_enc(s: &ReplicaStateMsg) -> Result<(), ProtoError> {
    check_names_enc(&s.outdated_peers, "outdated_peers")?;
    check_opt_name_enc(&s.holder, "holder")?;
    check_names_enc(&s.dirty_peers, "dirty_peers")
}

fn names_len(names: &[String]) -> usize {
    1 + names.iter().map(|n| 1 + n.len()).sum::<usize>()
}

fn state_len(s: &ReplicaStateMsg) -> usize {
    1 + 8 + 8 + names_len(&s.outdated_peers) + 8 + 1 + s.holder.len() + names_len(&s.dirty_peers) + 8
}

/// Longest prefix of `s` that is at most `max` bytes and ends on a char boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

const WRITE_PREFIX: usize = 8 + 1 + 4 + 4 + 8;

// ------------------------------------------------------------------------------------------
// Encoding
// ------------------------------------------------------------------------------------------

/// Reserves room and appends a zeroed header; returns the frame's start offset.
fn begin_frame(dst: &mut BytesMut, body_len: usize) -> usize {
    dst.reserve(HEADER_LEN + body_len);
    let start = dst.len();
    dst.put_bytes(0, HEADER_LEN);
    start
}

/// Fills in the header of the frame starting at `start` (body already appended).
fn finish_frame(dst: &mut BytesMut, start: usize, kind: u8, id: u64) {
    finish_frame_with_tail(dst, start, kind, id, &[]);
}

/// Fills in the header of a frame whose body is what follows `start` in `dst` and then
/// `tail`, which the caller sends separately.
fn finish_frame_with_tail(dst: &mut BytesMut, start: usize, kind: u8, id: u64, tail: &[u8]) {
    let body_len = dst.len() - start - HEADER_LEN + tail.len();
    debug_assert!(body_len <= MAX_BODY);
    let body_crc = crc32c::crc32c_append(crc32c::crc32c(&dst[start + HEADER_LEN..]), tail);
    let hdr = &mut dst[start..start + HEADER_LEN];
    hdr[0..4].copy_from_slice(&FRAME_MAGIC);
    hdr[4..8].copy_from_slice(&(body_len as u32).to_le_bytes());
    hdr[8] = kind;
    hdr[9] = 0; // flags: none defined in version 2
    hdr[10..12].copy_from_slice(&0u16.to_le_bytes());
    hdr[12..20].copy_from_slice(&id.to_le_bytes());
    hdr[20..24].copy_from_slice(&body_crc.to_le_bytes());
    hdr[24..28].copy_from_slice(&0u32.to_le_bytes());
    let header_crc = crc32c::crc32c(&hdr[..28]);
    hdr[28..32].copy_from_slice(&header_crc.to_le_bytes());
}

fn put_name(dst: &mut BytesMut, name: &str) {
    dst.put_u8(name.len() as u8);
    dst.put_slice(name.as_bytes());
}

fn put_state(dst: &mut BytesMut, s: &ReplicaStateMsg) {
    let mut f = 0;
    if s.consistent {
        f |= SF_CONSISTENT;
    }
    if s.local_ok {
        f |= SF_LOCAL_OK;
    }
    dst.put_u8(f);
    dst.put_u64_le(s.generation);
    dst.put_u64_le(s.size);
    put_names(dst, &s.outdated_peers);
    dst.put_u64_le(s.epoch);
    put_name(dst, &s.holder);
    put_names(dst, &s.dirty_peers);
    dst.put_u64_le(s.flag_epoch);
}

fn put_names(dst: &mut BytesMut, names: &[String]) {
    dst.put_u8(names.len() as u8);
    for n in names {
        put_name(dst, n);
    }
}

/// The fields of a `Write` body in front of the data ([`WRITE_PREFIX`] bytes and the tags).
fn put_write_prefix(dst: &mut BytesMut, offset: u64, flags: u8, insync: u32, sent: u32, epoch: u64, tags: &Tags) {
    dst.put_u64_le(offset);
    dst.put_u8(flags);
    dst.put_u32_le(insync);
    dst.put_u32_le(sent);
    dst.put_u64_le(epoch);
    put_tags(dst, tags);
}

fn put_tags(dst: &mut BytesMut, tags: &Tags) {
    dst.put_u8(tags.shift);
    dst.put_u16_le(tags.list.len() as u16);
    for &(region, grant) in &tags.list {
        dst.put_u64_le(region);
        dst.put_u64_le(grant);
    }
}

/// Appends one request frame to `dst`. On error nothing is appended.
pub fn encode_request(id: u64, req: &Request, dst: &mut BytesMut) -> Result<(), ProtoError> {
    req.validate()?;
    let start = begin_frame(dst, req.body_len());
    match req {
        Request::Open { volume, from_node, state } => {
            put_name(dst, volume);
            put_name(dst, from_node);
            put_state(dst, state);
        }
        Request::Write { offset, flags, insync, sent, epoch, tags, data } => {
            put_write_prefix(dst, *offset, *flags, *insync, *sent, *epoch, tags);
            dst.put_slice(data);
        }
        Request::WriteZeroes { offset, len, flags, insync, sent, epoch, tags }
        | Request::Trim { offset, len, flags, insync, sent, epoch, tags } => {
            dst.put_u64_le(*offset);
            dst.put_u64_le(*len);
            dst.put_u8(*flags);
            dst.put_u32_le(*insync);
            dst.put_u32_le(*sent);
            dst.put_u64_le(*epoch);
            put_tags(dst, tags);
        }
        Request::Acquire { epoch, region } => {
            dst.put_u64_le(*epoch);
            dst.put_u64_le(*region);
        }
        Request::Revoke { epoch, region, grant } => {
            dst.put_u64_le(*epoch);
            dst.put_u64_le(*region);
            dst.put_u64_le(*grant);
        }
        Request::Release { epoch, region, grant, dirty } => {
            dst.put_u64_le(*epoch);
            dst.put_u64_le(*region);
            dst.put_u64_le(*grant);
            dst.put_u8(u8::from(*dirty));
        }
        Request::Recover { epoch, region, grant, shift, data } => {
            dst.put_u64_le(*epoch);
            dst.put_u64_le(*region);
            dst.put_u64_le(*grant);
            dst.put_u8(*shift);
            dst.put_slice(data);
        }
        Request::Read { offset, len } | Request::GetBitmap { offset, len } | Request::ResyncRead { offset, len } => {
            dst.put_u64_le(*offset);
            dst.put_u32_le(*len);
        }
        Request::Flush | Request::Ping => {}
        Request::State { state } => put_state(dst, state),
        Request::CreateVolume { volume, size, replicas } => {
            put_name(dst, volume);
            dst.put_u64_le(*size);
            put_names(dst, replicas);
        }
        Request::DeleteVolume { volume } => put_name(dst, volume),
        Request::Resolve { keep } => put_name(dst, keep),
    }
    finish_frame(dst, start, req.kind(), id);
    Ok(())
}

/// Appends one reply frame to `dst`. On error nothing is appended. An error message longer
/// than [`MAX_MESSAGE_LEN`] bytes is truncated (on a char boundary) rather than rejected.
pub fn encode_reply(id: u64, reply: &Reply, dst: &mut BytesMut) -> Result<(), ProtoError> {
    reply.validate()?;
    let start = begin_frame(dst, reply.body_len());
    match reply {
        Reply::Ok | Reply::Pong => {}
        Reply::Opened { state } => put_state(dst, state),
        Reply::Data { data } => dst.put_slice(data),
        Reply::Fenced { epoch, holder } => {
            dst.put_u64_le(*epoch);
            put_name(dst, holder);
        }
        Reply::Error { code, message } => {
            let msg = truncate_utf8(message, MAX_MESSAGE_LEN);
            dst.put_u16_le(code.as_u16());
            dst.put_u16_le(msg.len() as u16);
            dst.put_slice(msg.as_bytes());
        }
        Reply::Granted { grant } => dst.put_u64_le(*grant),
        Reply::Released { dirty } => dst.put_u8(u8::from(*dirty)),
    }
    finish_frame(dst, start, reply.kind(), id);
    Ok(())
}

/// Payloads of at least this many bytes are not copied into the send buffer by the
/// `*_vectored` encoders.
pub const VECTORED_MIN: usize = 16 << 10;

/// Like [`encode_request`], but a `Write` whose data is at least [`VECTORED_MIN`] bytes is
/// encoded without its data: the header and fixed fields are appended to `dst` and the data
/// is returned, to be sent right after them (vectored I/O, no copy).
pub fn encode_request_vectored(id: u64, req: &Request, dst: &mut BytesMut) -> Result<Option<Bytes>, ProtoError> {
    match req {
        Request::Write { offset, flags, insync, sent, epoch, tags, data } if data.len() >= VECTORED_MIN => {
            req.validate()?;
            let start = begin_frame(dst, WRITE_PREFIX + tags.encoded_len());
            put_write_prefix(dst, *offset, *flags, *insync, *sent, *epoch, tags);
            finish_frame_with_tail(dst, start, kind::WRITE, id, data);
            Ok(Some(data.clone()))
        }
        _ => encode_request(id, req, dst).map(|()| None),
    }
}

/// Like [`encode_reply`], but the data of a large `Data` reply is returned instead of
/// copied (see [`encode_request_vectored`]).
pub fn encode_reply_vectored(id: u64, reply: &Reply, dst: &mut BytesMut) -> Result<Option<Bytes>, ProtoError> {
    match reply {
        Reply::Data { data } if data.len() >= VECTORED_MIN => {
            reply.validate()?;
            let start = begin_frame(dst, 0);
            finish_frame_with_tail(dst, start, kind::DATA, id, data);
            Ok(Some(data.clone()))
        }
        _ => encode_reply(id, reply, dst).map(|()| None),
    }
}

/// Appends one frame of either direction to `dst`.
pub fn encode_frame(frame: &Frame, dst: &mut BytesMut) -> Result<(), ProtoError> {
    match frame {
        Frame::Request { id, req } => encode_request(*id, req, dst),
        Frame::Reply { id, reply } => encode_reply(*id, reply, dst),
    }
}

// ------------------------------------------------------------------------------------------
// Decoding
// ------------------------------------------------------------------------------------------

/// A validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub body_len: u32,
    pub kind: u8,
    pub flags: u8,
    pub reserved: u16,
    pub id: u64,
    pub body_crc: u32,
    pub reserved2: u32,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl FrameHeader {
    /// Checks the fatal-level properties of a header: magic, header CRC, body length.
    /// Returns `Ok(None)` if `buf` is too short to tell. Fails fast on a wrong magic even
    /// before four bytes have arrived.
    pub fn parse(buf: &[u8]) -> Result<Option<FrameHeader>, ProtoError> {
        let n = buf.len().min(4);
        if buf[..n] != FRAME_MAGIC[..n] {
            let mut found = [0u8; 4];
            found[..n].copy_from_slice(&buf[..n]);
            return Err(ProtoError::BadMagic { found });
        }
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let expected = le_u32(buf, 28);
        let actual = crc32c::crc32c(&buf[..28]);
        if expected != actual {
            return Err(ProtoError::HeaderChecksum { expected, actual });
        }
        let body_len = le_u32(buf, 4);
        if body_len as usize > MAX_BODY {
            return Err(ProtoError::Oversized { len: u64::from(body_len), max: MAX_BODY });
        }
        Ok(Some(FrameHeader {
            body_len,
            kind: buf[8],
            flags: buf[9],
            reserved: le_u16(buf, 10),
            id: le_u64(buf, 12),
            body_crc: le_u32(buf, 20),
            reserved2: le_u32(buf, 24),
        }))
    }
}

/// Bounds-checked little-endian reader over a frame body.
struct BodyReader<'a> {
    b: &'a [u8],
    pos: usize,
    id: u64,
    kind: u8,
}

impl<'a> BodyReader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], ProtoError> {
        if self.b.len() - self.pos < n {
            return Err(ProtoError::ShortBody { id: self.id, kind: self.kind, field });
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, ProtoError> {
        Ok(self.take(1, field)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, ProtoError> {
        Ok(le_u16(self.take(2, field)?, 0))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, ProtoError> {
        Ok(le_u32(self.take(4, field)?, 0))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, ProtoError> {
        Ok(le_u64(self.take(8, field)?, 0))
    }
    fn invalid(&self, field: &'static str, reason: String) -> ProtoError {
        ProtoError::InvalidField { id: self.id, kind: self.kind, field, reason }
    }
    fn reserved(&self, field: &'static str, value: u64) -> ProtoError {
        ProtoError::ReservedBits { id: self.id, kind: self.kind, field, value }
    }
    fn name(&mut self, field: &'static str) -> Result<String, ProtoError> {
        let len = self.u8(field)? as usize;
        let raw = self.take(len, field)?;
        let s = std::str::from_utf8(raw).map_err(|e| self.invalid(field, format!("not UTF-8: {e}")))?;
        check_name(s).map_err(|reason| self.invalid(field, reason))?;
        Ok(s.to_owned())
    }
    /// A boolean byte: 0 or 1.
    fn flag(&mut self, field: &'static str) -> Result<bool, ProtoError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.reserved(field, u64::from(v))),
        }
    }
    fn write_flags(&mut self) -> Result<u8, ProtoError> {
        let f = self.u8("flags")?;
        if f & !WF_ALL != 0 {
            return Err(self.reserved("flags", u64::from(f)));
        }
        Ok(f)
    }
    /// A name that may be empty ("not known").
    fn opt_name(&mut self, field: &'static str) -> Result<String, ProtoError> {
        let len = self.u8(field)? as usize;
        let raw = self.take(len, field)?;
        let s = std::str::from_utf8(raw).map_err(|e| self.invalid(field, format!("not UTF-8: {e}")))?;
        check_opt_name(s).map_err(|reason| self.invalid(field, reason))?;
        Ok(s.to_owned())
    }
    /// `count: u8` (≤ [`MAX_PEERS`]) followed by `count` names.
    fn names(&mut self, field: &'static str) -> Result<Vec<String>, ProtoError> {
        let count = self.u8(field)? as usize;
        if count > MAX_PEERS {
            return Err(self.invalid(field, format!("{count} entries, the maximum is {MAX_PEERS}")));
        }
        let mut names = Vec::with_capacity(count);
        for _ in 0..count {
            names.push(self.name(field)?);
        }
        Ok(names)
    }
    /// The grants of a write (see [`Tags`]).
    fn tags(&mut self) -> Result<Tags, ProtoError> {
        let shift = self.u8("tags.shift")?;
        let count = usize::from(self.u16("tags.count")?);
        if count > MAX_TAGS {
            return Err(self.invalid("tags", format!("{count} grants, the maximum is {MAX_TAGS}")));
        }
        let mut list = Vec::with_capacity(count);
        for _ in 0..count {
            let region = self.u64("tags.region")?;
            let grant = self.u64("tags.grant")?;
            list.push((region, grant));
        }
        let tags = Tags { shift, list };
        tags.check().map_err(|reason| self.invalid("tags", reason))?;
        Ok(tags)
    }
    /// `offset u64, len u32` of `Read`, `GetBitmap` and `ResyncRead`.
    fn read_range(&mut self) -> Result<(u64, u32), ProtoError> {
        let offset = self.u64("offset")?;
        let len = self.u32("len")?;
        self.finish()?;
        if len as usize > MAX_DATA {
            return Err(self.invalid("len", format!("{len} bytes > MAX_DATA ({MAX_DATA})")));
        }
        self.range(offset, u64::from(len), "offset+len")?;
        Ok((offset, len))
    }
    fn range(&self, offset: u64, len: u64, field: &'static str) -> Result<(), ProtoError> {
        if offset.checked_add(len).is_none() {
            return Err(self.invalid(field, format!("offset {offset} + length {len} overflows u64")));
        }
        Ok(())
    }
    fn state(&mut self) -> Result<ReplicaStateMsg, ProtoError> {
        let f = self.u8("state.flags")?;
        if f & !(SF_CONSISTENT | SF_LOCAL_OK) != 0 {
            return Err(self.reserved("state.flags", u64::from(f)));
        }
        let generation = self.u64("state.generation")?;
        let size = self.u64("state.size")?;
        let outdated_peers = self.names("state.outdated_peers")?;
        let epoch = self.u64("state.epoch")?;
        let holder = self.opt_name("state.holder")?;
        let dirty_peers = self.names("state.dirty_peers")?;
        let flag_epoch = self.u64("state.flag_epoch")?;
        Ok(ReplicaStateMsg {
            consistent: f & SF_CONSISTENT != 0,
            generation,
            size,
            outdated_peers,
            local_ok: f & SF_LOCAL_OK != 0,
            epoch,
            holder,
            dirty_peers,
            flag_epoch,
        })
    }
    fn finish(&self) -> Result<(), ProtoError> {
        if self.pos != self.b.len() {
            return Err(ProtoError::TrailingBytes { id: self.id, kind: self.kind, extra: self.b.len() - self.pos });
        }
        Ok(())
    }
}

/// Parses a frame body whose CRC has already been verified. `body` is the frozen slice of
/// the receive buffer; data payloads are sub-slices of it (no copy).
fn parse_body(hdr: &FrameHeader, body: Bytes) -> Result<Frame, ProtoError> {
    let id = hdr.id;
    let k = hdr.kind;
    let mut r = BodyReader { b: &body, pos: 0, id, kind: k };
    let frame = match k {
        kind::OPEN => {
            let volume = r.name("volume")?;
            let from_node = r.name("from_node")?;
            let state = r.state()?;
            Frame::Request { id, req: Request::Open { volume, from_node, state } }
        }
        kind::WRITE => {
            let offset = r.u64("offset")?;
            let flags = r.write_flags()?;
            let insync = r.u32("insync")?;
            let sent = r.u32("sent")?;
            let epoch = r.u64("epoch")?;
            let tags = r.tags()?;
            let start = r.pos;
            let len = body.len() - start;
            if len > MAX_DATA {
                return Err(r.invalid("data", format!("{len} bytes > MAX_DATA ({MAX_DATA})")));
            }
            r.range(offset, len as u64, "offset+len")?;
            r.pos = body.len(); // the data runs to the end of the body
            let data = body.slice(start..);
            Frame::Request { id, req: Request::Write { offset, flags, insync, sent, epoch, tags, data } }
        }
        kind::WRITE_ZEROES | kind::TRIM => {
            let offset = r.u64("offset")?;
            let len = r.u64("len")?;
            let flags = r.write_flags()?;
            let insync = r.u32("insync")?;
            let sent = r.u32("sent")?;
            let epoch = r.u64("epoch")?;
            let tags = r.tags()?;
            r.finish()?;
            r.range(offset, len, "offset+len")?;
            let req = if k == kind::TRIM {
                Request::Trim { offset, len, flags, insync, sent, epoch, tags }
            } else {
                Request::WriteZeroes { offset, len, flags, insync, sent, epoch, tags }
            };
            Frame::Request { id, req }
        }
        kind::READ => {
            let (offset, len) = r.read_range()?;
            Frame::Request { id, req: Request::Read { offset, len } }
        }
        kind::FLUSH => {
            r.finish()?;
            Frame::Request { id, req: Request::Flush }
        }
        kind::STATE => {
            let state = r.state()?;
            Frame::Request { id, req: Request::State { state } }
        }
        kind::GET_BITMAP => {
            let (offset, len) = r.read_range()?;
            Frame::Request { id, req: Request::GetBitmap { offset, len } }
        }
        kind::PING => {
            r.finish()?;
            Frame::Request { id, req: Request::Ping }
        }
        kind::CREATE_VOLUME => {
            let volume = r.name("volume")?;
            let size = r.u64("size")?;
            let replicas = r.names("replicas")?;
            r.finish()?;
            Frame::Request { id, req: Request::CreateVolume { volume, size, replicas } }
        }
        kind::DELETE_VOLUME => {
            let volume = r.name("volume")?;
            r.finish()?;
            Frame::Request { id, req: Request::DeleteVolume { volume } }
        }
        kind::RESYNC_READ => {
            let (offset, len) = r.read_range()?;
            Frame::Request { id, req: Request::ResyncRead { offset, len } }
        }
        kind::RESOLVE => {
            let keep = r.name("keep")?;
            r.finish()?;
            Frame::Request { id, req: Request::Resolve { keep } }
        }
        kind::ACQUIRE => {
            let epoch = r.u64("epoch")?;
            let region = r.u64("region")?;
            Frame::Request { id, req: Request::Acquire { epoch, region } }
        }
        kind::REVOKE => {
            let epoch = r.u64("epoch")?;
            let region = r.u64("region")?;
            let grant = r.u64("grant")?;
            Frame::Request { id, req: Request::Revoke { epoch, region, grant } }
        }
        kind::RELEASE => {
            let epoch = r.u64("epoch")?;
            let region = r.u64("region")?;
            let grant = r.u64("grant")?;
            let dirty = r.flag("dirty")?;
            Frame::Request { id, req: Request::Release { epoch, region, grant, dirty } }
        }
        kind::RECOVER => {
            let epoch = r.u64("epoch")?;
            let region = r.u64("region")?;
            let grant = r.u64("grant")?;
            let shift = r.u8("shift")?;
            if !(MIN_REGION_SHIFT..=MAX_REGION_SHIFT).contains(&shift) {
                return Err(r.invalid("shift", format!("{shift} is outside {MIN_REGION_SHIFT}..={MAX_REGION_SHIFT}")));
            }
            let start = r.pos;
            if (body.len() - start) as u64 > 1 << shift {
                return Err(r.invalid("data", format!("{} bytes, more than a region", body.len() - start)));
            }
            if region.checked_shl(u32::from(shift)).is_none_or(|o| o >> shift != region) {
                return Err(r.invalid("region", format!("region {region} of 2^{shift} bytes lies past 2^64")));
            }
            r.pos = body.len();
            let data = body.slice(start..);
            Frame::Request { id, req: Request::Recover { epoch, region, grant, shift, data } }
        }
        kind::GRANTED => {
            let grant = r.u64("grant")?;
            Frame::Reply { id, reply: Reply::Granted { grant } }
        }
        kind::RELEASED => {
            let dirty = r.flag("dirty")?;
            Frame::Reply { id, reply: Reply::Released { dirty } }
        }
        kind::OK => {
            r.finish()?;
            Frame::Reply { id, reply: Reply::Ok }
        }
        kind::OPENED => {
            let state = r.state()?;
            Frame::Reply { id, reply: Reply::Opened { state } }
        }
        kind::DATA => {
            if body.len() > MAX_DATA {
                return Err(r.invalid("data", format!("{} bytes > MAX_DATA ({MAX_DATA})", body.len())));
            }
            r.pos = body.len(); // the whole body is data
            Frame::Reply { id, reply: Reply::Data { data: body.clone() } }
        }
        kind::FENCED => {
            let epoch = r.u64("epoch")?;
            let holder = r.opt_name("holder")?;
            Frame::Reply { id, reply: Reply::Fenced { epoch, holder } }
        }
        kind::PONG => {
            r.finish()?;
            Frame::Reply { id, reply: Reply::Pong }
        }
        kind::ERROR => {
            let code = ErrorCode::from_u16(r.u16("code")?);
            let len = r.u16("message")? as usize;
            if len > MAX_MESSAGE_LEN {
                return Err(r.invalid("message", format!("{len} bytes, the maximum is {MAX_MESSAGE_LEN}")));
            }
            let raw = r.take(len, "message")?;
            let message =
                std::str::from_utf8(raw).map_err(|e| r.invalid("message", format!("not UTF-8: {e}")))?.to_owned();
            Frame::Reply { id, reply: Reply::Error { code, message } }
        }
        _ => return Err(ProtoError::UnknownKind { id, kind: k }),
    };
    r.finish()?;
    Ok(frame)
}

/// `tokio_util` codec for peer frames. Stateless: every call re-examines the buffered bytes,
/// so after a fatal error it keeps returning the same error (nothing is consumed).
#[derive(Debug, Default, Clone, Copy)]
pub struct PeerCodec;

impl PeerCodec {
    pub fn new() -> PeerCodec {
        PeerCodec
    }
}

impl Decoder for PeerCodec {
    type Item = Frame;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, ProtoError> {
        let Some(hdr) = FrameHeader::parse(src)? else {
            src.reserve(HEADER_LEN - src.len());
            return Ok(None);
        };
        let total = HEADER_LEN + hdr.body_len as usize;
        if src.len() < total {
            // body_len <= MAX_BODY was checked above, so this reservation is bounded.
            src.reserve(total - src.len());
            return Ok(None);
        }
        // Consume exactly this frame, whatever happens next.
        let mut frame = src.split_to(total);
        let body = frame.split_off(HEADER_LEN).freeze();
        let actual = crc32c::crc32c(&body);
        if actual != hdr.body_crc {
            return Err(ProtoError::BodyChecksum { id: hdr.id, kind: hdr.kind, expected: hdr.body_crc, actual });
        }
        if !matches!(hdr.kind, 0x01..=0x11 | 0x81..=0x88) {
            return Err(ProtoError::UnknownKind { id: hdr.id, kind: hdr.kind });
        }
        for (field, value) in [
            ("header.flags", u64::from(hdr.flags)),
            ("header.reserved", u64::from(hdr.reserved)),
            ("header.reserved2", u64::from(hdr.reserved2)),
        ] {
            if value != 0 {
                return Err(ProtoError::ReservedBits { id: hdr.id, kind: hdr.kind, field, value });
            }
        }
        parse_body(&hdr, body).map(Some)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, ProtoError> {
        match self.decode(src)? {
            Some(f) => Ok(Some(f)),
            None if src.is_empty() => Ok(None),
            None => {
                let need = match FrameHeader::parse(src) {
                    Ok(Some(h)) => HEADER_LEN + h.body_len as usize,
                    _ => HEADER_LEN,
                };
                Err(ProtoError::Truncated { have: src.len(), need })
            }
        }
    }
}

impl Encoder<Frame> for PeerCodec {
    type Error = ProtoError;

    fn encode(&mut self, item: Frame, dst: &mut BytesMut) -> Result<(), ProtoError> {
        encode_frame(&item, dst)
    }
}

impl Encoder<&Frame> for PeerCodec {
    type Error = ProtoError;

    fn encode(&mut self, item: &Frame, dst: &mut BytesMut) -> Result<(), ProtoError> {
        encode_frame(item, dst)
    }
}

/// Reads the next frame from `r`, buffering in `buf` (keep the same buffer for the whole
/// connection). Returns `Ok(None)` on a clean end of stream between frames.
///
/// Unlike `FramedRead`, this can be called again after a per-frame error
/// (`!e.is_fatal()`): the offending frame has been consumed and the next call decodes the
/// following frame, even if it is already buffered. After a fatal error the connection
/// must be closed.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut) -> Result<Option<Frame>, ProtoError> {
    let mut codec = PeerCodec;
    loop {
        if let Some(f) = codec.decode(buf)? {
            return Ok(Some(f));
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(64 * 1024);
        }
        if r.read_buf(buf).await? == 0 {
            return codec.decode_eof(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn st(peers: &[&str]) -> ReplicaStateMsg {
        ReplicaStateMsg {
            consistent: true,
            generation: 42,
            size: 1 << 30,
            outdated_peers: peers.iter().map(|s| s.to_string()).collect(),
            local_ok: false,
            epoch: 7,
            holder: "node-a".into(),
            dirty_peers: vec!["node-d".into()],
            flag_epoch: 6,
        }
    }

    fn all_requests() -> Vec<Request> {
        vec![
            Request::Open { volume: "pvc-0123".into(), from_node: "node-a".into(), state: st(&["node-b", "nöde-c"]) },
            Request::Write {
                offset: 4096,
                flags: WF_FUA,
                insync: 0b101,
                sent: 0b100,
                epoch: 3,
                data: Bytes::from(vec![7u8; 4096]),
                tags: Tags::default(),
            },
            Request::Write {
                offset: 0,
                flags: 0,
                insync: 0,
                sent: 0,
                epoch: 0,
                data: Bytes::new(),
                tags: Tags::default(),
            },
            Request::WriteZeroes {
                offset: 1 << 20,
                len: 1 << 21,
                flags: WF_RESYNC,
                insync: 1,
                sent: 2,
                epoch: 1,
                tags: Tags::default(),
            },
            Request::Trim {
                offset: 512,
                len: 1024,
                flags: WF_FUA | WF_RESYNC,
                insync: u32::MAX,
                sent: 3,
                epoch: u64::MAX,
                tags: Tags::default(),
            },
            Request::Read { offset: 8192, len: 65536 },
            Request::Flush,
            Request::State { state: st(&[]) },
            Request::State {
                state: ReplicaStateMsg {
                    epoch: 0,
                    holder: String::new(),
                    dirty_peers: vec!["node-b".into(), "nöde-c".into()],
                    ..st(&["node-b"])
                },
            },
            Request::GetBitmap { offset: 4096, len: 8192 },
            Request::Ping,
            Request::ResyncRead { offset: 1 << 20, len: 1 << 20 },
            Request::Resolve { keep: "node-b".into() },
            Request::Write {
                offset: (3 << 20) - 4096,
                flags: 0,
                insync: 3,
                sent: 3,
                epoch: 2,
                data: Bytes::from(vec![9u8; 8192]),
                tags: Tags { shift: 20, list: vec![(2, 41), (3, 7)] },
            },
            Request::Trim {
                offset: 0,
                len: 64 << 10,
                flags: 0,
                insync: 1,
                sent: 1,
                epoch: 2,
                tags: Tags { shift: 16, list: vec![(0, u64::MAX)] },
            },
            Request::Acquire { epoch: 4, region: 17 },
            Request::Revoke { epoch: 4, region: 17, grant: 99 },
            Request::Release { epoch: 4, region: 17, grant: 99, dirty: true },
            Request::Release { epoch: 4, region: 0, grant: 1, dirty: false },
            Request::Recover { epoch: 4, region: 3, grant: 100, shift: 12, data: Bytes::from(vec![1u8; 4096]) },
        ]
    }

    fn all_replies() -> Vec<Reply> {
        vec![
            Reply::Ok,
            Reply::Opened { state: st(&["x"]) },
            Reply::Data { data: Bytes::from_static(b"hello world") },
            Reply::Fenced { epoch: 12, holder: "node-c".into() },
            Reply::Fenced { epoch: u64::MAX, holder: String::new() },
            Reply::Pong,
            Reply::Error { code: ErrorCode::Fenced, message: "generation 3 < 5".into() },
            Reply::Error { code: ErrorCode::StaleGrant, message: "grant 4 < 9".into() },
            Reply::Granted { grant: 42 },
            Reply::Released { dirty: true },
            Reply::Released { dirty: false },
        ]
    }

    #[test]
    fn policing_field_violations() {
        let write_with = |tags: &[u8]| {
            let mut body = 0u64.to_le_bytes().to_vec();
            body.extend_from_slice(&[0; 17]);
            body.extend_from_slice(tags);
            body.extend_from_slice(&[0xAA; 16]);
            raw_frame(kind::WRITE, 0, 0, 4, &body)
        };
        let tag = |shift: u8, list: &[(u64, u64)]| {
            let mut t = vec![shift];
            t.extend_from_slice(&(list.len() as u16).to_le_bytes());
            for (r, g) in list {
                t.extend_from_slice(&r.to_le_bytes());
                t.extend_from_slice(&g.to_le_bytes());
            }
            t
        };
        for (tags, why) in [
            (tag(20, &[(1, 1), (1, 2)]), "not ascending"),
            (tag(11, &[(0, 1)]), "shift below 4 KiB"),
            (tag(23, &[(0, 1)]), "shift above 4 MiB"),
            (tag(20, &[]), "a shift without grants"),
            (tag(12, &(0..65).map(|r| (r, 1)).collect::<Vec<_>>()), "more than MAX_TAGS"),
        ] {
            let mut buf = write_with(&tags);
            assert!(matches!(one(&mut buf), Err(ProtoError::InvalidField { field: "tags", .. })), "{why}");
        }
        // A count that runs past the body.
        let mut buf = write_with(&[20, 9, 0]);
        assert!(one(&mut buf).is_err());
        // dirty must be 0 or 1.
        let mut body = vec![0u8; 24];
        body.push(2);
        let mut buf = raw_frame(kind::RELEASE, 0, 0, 4, &body);
        assert!(matches!(one(&mut buf), Err(ProtoError::ReservedBits { field: "dirty", .. })));
        // Recover: shift in range, data at most a region, region inside u64.
        let recover = |shift: u8, region: u64, data: usize| {
            let mut body = 1u64.to_le_bytes().to_vec();
            body.extend_from_slice(&region.to_le_bytes());
            body.extend_from_slice(&5u64.to_le_bytes());
            body.push(shift);
            body.extend_from_slice(&vec![0u8; data]);
            raw_frame(kind::RECOVER, 0, 0, 4, &body)
        };
        assert!(matches!(one(&mut recover(30, 0, 1)), Err(ProtoError::InvalidField { field: "shift", .. })));
        assert!(matches!(one(&mut recover(12, 0, 4097)), Err(ProtoError::InvalidField { field: "data", .. })));
        assert!(matches!(one(&mut recover(12, u64::MAX, 1)), Err(ProtoError::InvalidField { field: "region", .. })));
        assert!(one(&mut recover(12, 5, 4096)).is_ok());
        // The encoder refuses what the decoder would.
        let bad = Request::Write {
            offset: 0,
            flags: 0,
            insync: 0,
            sent: 0,
            epoch: 0,
            data: Bytes::new(),
            tags: Tags { shift: 20, list: vec![(3, 1), (2, 1)] },
        };
        assert!(matches!(
            encode_request(1, &bad, &mut BytesMut::new()),
            Err(ProtoError::Unencodable { field: "tags", .. })
        ));
    }

    fn decode_all(buf: &mut BytesMut) -> Vec<Result<Frame, ProtoError>> {
        let mut out = vec![];
        let mut c = PeerCodec;
        loop {
            match c.decode(buf) {
                Ok(Some(f)) => out.push(Ok(f)),
                Ok(None) => break,
                Err(e) => {
                    let fatal = e.is_fatal();
                    out.push(Err(e));
                    if fatal {
                        break;
                    }
                }
            }
        }
        out
    }

    fn one(buf: &mut BytesMut) -> Result<Option<Frame>, ProtoError> {
        PeerCodec.decode(buf)
    }

    /// Builds a frame with valid CRCs around an arbitrary body / header fields.
    fn raw_frame(kind: u8, flags: u8, reserved: u16, id: u64, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_slice(&FRAME_MAGIC);
        b.put_u32_le(body.len() as u32);
        b.put_u8(kind);
        b.put_u8(flags);
        b.put_u16_le(reserved);
        b.put_u64_le(id);
        b.put_u32_le(crc32c::crc32c(body));
        b.put_u32_le(0);
        let hc = crc32c::crc32c(&b[..28]);
        b.put_u32_le(hc);
        b.put_slice(body);
        b
    }

    #[test]
    fn header_layout_is_as_documented() {
        let mut b = BytesMut::new();
        encode_request(0x0102030405060708, &Request::Ping, &mut b).unwrap();
        assert_eq!(b.len(), 32);
        assert_eq!(&b[0..4], b"PSF1");
        assert_eq!(&b[4..8], &[0, 0, 0, 0]);
        assert_eq!(b[8], kind::PING);
        assert_eq!(&b[12..20], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[20..24], &0u32.to_le_bytes()); // CRC32C of empty body
        assert_eq!(le_u32(&b, 28), crc32c::crc32c(&b[..28]));
        assert_eq!(raw_frame(kind::PING, 0, 0, 0x0102030405060708, &[]), b);

        let mut b = BytesMut::new();
        let data = Bytes::from_static(b"abc");
        let w = Request::Write {
            offset: 0x10,
            flags: WF_FUA,
            insync: 3,
            sent: 2,
            epoch: 0x0504,
            data,
            tags: Tags::default(),
        };
        encode_request(9, &w, &mut b).unwrap();
        assert_eq!(le_u32(&b, 4), 25 + 3 + 3);
        assert_eq!(
            &b[32..],
            &[0x10, 0, 0, 0, 0, 0, 0, 0, 1, 3, 0, 0, 0, 2, 0, 0, 0, 4, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, b'a', b'b', b'c']
        );
        // With grants: shift, count, then (region, grant) pairs.
        let mut b = BytesMut::new();
        let tags = Tags { shift: 20, list: vec![(2, 0x0706)] };
        let w = Request::Write {
            offset: 2 << 20,
            flags: 0,
            insync: 1,
            sent: 1,
            epoch: 1,
            data: Bytes::from_static(b"z"),
            tags,
        };
        encode_request(9, &w, &mut b).unwrap();
        assert_eq!(le_u32(&b, 4), 25 + 3 + 16 + 1);
        assert_eq!(&b[32 + 25..32 + 25 + 19], &[20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 6, 7, 0, 0, 0, 0, 0, 0]);
        assert_eq!(w.encoded_len(), b.len());
    }

    /// The test vectors printed in PROTOCOL.md (cross-checked with an independent CRC32C).
    #[test]
    fn documented_test_vectors() {
        fn hex(b: &[u8]) -> String {
            b.iter().map(|x| format!("{x:02x}")).collect()
        }
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283); // Castagnoli
        let mut b = BytesMut::new();
        encode_request(1, &Request::Ping, &mut b).unwrap();
        assert_eq!(
            hex(&b),
            "50534631 00000000 09 00 0000 0100000000000000 00000000 00000000 e07a7df1".replace(' ', "")
        );
        let mut b = BytesMut::new();
        let w = Request::Write {
            offset: 4096,
            flags: WF_FUA,
            insync: 3,
            sent: 2,
            epoch: 5,
            data: Bytes::from_static(b"abcd"),
            tags: Tags::default(),
        };
        encode_request(7, &w, &mut b).unwrap();
        assert_eq!(
            hex(&b),
            concat!(
                "50534631 20000000 02 00 0000 0700000000000000 567d356c 00000000 54d68c5a",
                " 0010000000000000 01 03000000 02000000 0500000000000000 00 0000 61626364"
            )
            .replace(' ', "")
        );
        let mut b = BytesMut::new();
        encode_request(8, &Request::GetBitmap { offset: 0, len: 4096 }, &mut b).unwrap();
        assert_eq!(
            hex(&b),
            concat!(
                "50534631 0c000000 08 00 0000 0800000000000000 d7c8c25b 00000000 c6a86ef2",
                " 0000000000000000 00100000"
            )
            .replace(' ', "")
        );
        let mut b = BytesMut::new();
        let state = ReplicaStateMsg {
            consistent: true,
            generation: 3,
            size: 1 << 20,
            outdated_peers: vec!["b".into()],
            local_ok: true,
            epoch: 4,
            holder: "a".into(),
            dirty_peers: vec!["c".into()],
            flag_epoch: 2,
        };
        encode_request(2, &Request::State { state }, &mut b).unwrap();
        assert_eq!(
            hex(&b),
            concat!(
                "50534631 29000000 07 00 0000 0200000000000000 2beec2d5 00000000 80ab1b40",
                " 03 0300000000000000 0000100000000000 01 0162 0400000000000000 0161 01 0163 0200000000000000"
            )
            .replace(' ', "")
        );
        let mut b = BytesMut::new();
        encode_reply(7, &Reply::Fenced { epoch: 6, holder: "node-b".into() }, &mut b).unwrap();
        assert_eq!(
            hex(&b),
            concat!(
                "50534631 0f000000 84 00 0000 0700000000000000 f5251094 00000000 3535864a",
                " 0600000000000000 066e6f64652d62"
            )
            .replace(' ', "")
        );
        let mut b = BytesMut::new();
        let e = Reply::Error { code: ErrorCode::Checksum, message: "bad".into() };
        encode_reply(7, &e, &mut b).unwrap();
        assert_eq!(
            hex(&b),
            concat!("50534631 07000000 86 00 0000 0700000000000000 dcfac4b2 00000000 57fe5549", " 0700 0300 626164")
                .replace(' ', "")
        );
    }

    #[test]
    fn every_variant_round_trips_in_one_batch() {
        let mut buf = BytesMut::new();
        let mut expect = vec![];
        for (i, r) in all_requests().into_iter().enumerate() {
            encode_request(i as u64, &r, &mut buf).unwrap();
            expect.push(Frame::Request { id: i as u64, req: r });
        }
        for (i, r) in all_replies().into_iter().enumerate() {
            let id = u64::MAX - i as u64;
            encode_reply(id, &r, &mut buf).unwrap();
            expect.push(Frame::Reply { id, reply: r });
        }
        let got: Vec<Frame> = decode_all(&mut buf).into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(got, expect);
        assert!(buf.is_empty());
        assert!(PeerCodec.decode_eof(&mut buf).unwrap().is_none());
    }

    #[test]
    fn write_data_is_zero_copy() {
        let mut buf = BytesMut::new();
        let w = Request::Write {
            offset: 0,
            flags: 0,
            insync: 1,
            sent: 1,
            epoch: 1,
            data: Bytes::from(vec![0xAB; 4096]),
            tags: Tags::default(),
        };
        encode_request(1, &w, &mut buf).unwrap();
        let base = buf.as_ptr() as usize;
        let end = base + buf.len();
        let Some(Frame::Request { req: Request::Write { data, .. }, .. }) = one(&mut buf).unwrap() else {
            panic!("expected a write");
        };
        let p = data.as_ptr() as usize;
        assert!(p >= base && p + data.len() <= end, "data was copied");
        assert_eq!(p, base + HEADER_LEN + WRITE_PREFIX + 3);
    }

    #[test]
    fn incomplete_input_waits_then_decodes() {
        let mut full = BytesMut::new();
        encode_request(5, &all_requests()[0], &mut full).unwrap();
        for cut in 0..full.len() {
            let mut b = BytesMut::from(&full[..cut]);
            assert!(one(&mut b).unwrap().is_none(), "cut {cut}");
            assert_eq!(b.len(), cut, "nothing consumed");
            assert!(matches!(PeerCodec.decode_eof(&mut b), Err(ProtoError::Truncated { .. }) | Ok(None)));
            b.extend_from_slice(&full[cut..]);
            assert!(one(&mut b).unwrap().is_some());
        }
        // Truncation at EOF is fatal and reports how much was expected.
        let mut b = BytesMut::from(&full[..40]);
        let e = PeerCodec.decode_eof(&mut b).unwrap_err();
        assert!(e.is_fatal());
        assert!(matches!(e, ProtoError::Truncated { have: 40, need } if need == full.len()));
        let mut b = BytesMut::from(&full[..10]);
        let e = PeerCodec.decode_eof(&mut b).unwrap_err();
        assert!(matches!(e, ProtoError::Truncated { have: 10, need: 32 }));
    }

    #[test]
    fn bad_body_crc_reports_id_and_next_frame_decodes() {
        let mut buf = BytesMut::new();
        let w = all_requests()[1].clone();
        encode_request(77, &w, &mut buf).unwrap();
        let first_len = buf.len();
        encode_request(78, &Request::Flush, &mut buf).unwrap();
        buf[HEADER_LEN + 100] ^= 0x01; // flip one payload bit of frame 77
        let e = one(&mut buf).unwrap_err();
        assert!(!e.is_fatal());
        assert!(matches!(e, ProtoError::BodyChecksum { id: 77, kind: kind::WRITE, .. }));
        assert_eq!(e.reply_for_request(), Some((77, ErrorCode::Checksum)));
        assert_eq!(buf.len(), HEADER_LEN, "exactly the bad frame was consumed");
        let _ = first_len;
        assert_eq!(one(&mut buf).unwrap(), Some(Frame::Request { id: 78, req: Request::Flush }));
    }

    #[test]
    fn bad_header_crc_is_fatal_and_consumes_nothing() {
        let mut buf = BytesMut::new();
        encode_request(1, &Request::Ping, &mut buf).unwrap();
        buf[13] ^= 0x80; // corrupt the id
        let e = one(&mut buf).unwrap_err();
        assert!(e.is_fatal());
        assert!(matches!(e, ProtoError::HeaderChecksum { .. }));
        assert_eq!(buf.len(), HEADER_LEN);
        // Corrupted length field: also caught by the header CRC, not as "oversized".
        let mut buf = BytesMut::new();
        encode_request(1, &Request::Ping, &mut buf).unwrap();
        buf[7] = 0xff;
        assert!(matches!(one(&mut buf), Err(ProtoError::HeaderChecksum { .. })));
    }

    #[test]
    fn bad_magic_is_fatal_even_on_a_short_prefix() {
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        let e = one(&mut buf).unwrap_err();
        assert!(e.is_fatal());
        assert!(matches!(e, ProtoError::BadMagic { found } if &found == b"GET "));
        let mut buf = BytesMut::from(&b"PX"[..]);
        assert!(matches!(one(&mut buf), Err(ProtoError::BadMagic { .. })));
        let mut buf = BytesMut::from(&b"PS"[..]);
        assert!(one(&mut buf).unwrap().is_none());
        assert!(e.to_string().contains("PSF1"));
    }

    #[test]
    fn oversized_length_is_fatal_before_allocating() {
        let mut hdr = raw_frame(kind::WRITE, 0, 0, 3, &[]);
        hdr[4..8].copy_from_slice(&((MAX_BODY + 1) as u32).to_le_bytes());
        let hc = crc32c::crc32c(&hdr[..28]);
        hdr[28..32].copy_from_slice(&hc.to_le_bytes());
        let mut buf = BytesMut::with_capacity(64);
        buf.extend_from_slice(&hdr);
        let e = one(&mut buf).unwrap_err();
        assert!(e.is_fatal());
        assert!(matches!(e, ProtoError::Oversized { len, max: MAX_BODY } if len == MAX_BODY as u64 + 1));
        assert!(buf.capacity() < 1 << 20, "must not reserve for an oversized body");
        // u32::MAX too.
        hdr[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let hc = crc32c::crc32c(&hdr[..28]);
        hdr[28..32].copy_from_slice(&hc.to_le_bytes());
        let mut buf = BytesMut::from(&hdr[..]);
        assert!(matches!(one(&mut buf), Err(ProtoError::Oversized { .. })));
        // Exactly MAX_BODY is accepted at the header level (decoder waits for the body).
        hdr[4..8].copy_from_slice(&(MAX_BODY as u32).to_le_bytes());
        let hc = crc32c::crc32c(&hdr[..28]);
        hdr[28..32].copy_from_slice(&hc.to_le_bytes());
        let mut buf = BytesMut::from(&hdr[..]);
        assert!(one(&mut buf).unwrap().is_none());
    }

    #[test]
    fn max_size_write_round_trips() {
        let data = Bytes::from(vec![0x5A; MAX_DATA]);
        let w = Request::Write { offset: 0, flags: WF_FUA, insync: 1, sent: 1, epoch: 1, data, tags: Tags::default() };
        let mut buf = BytesMut::new();
        encode_request(1, &w, &mut buf).unwrap();
        let f = one(&mut buf).unwrap().unwrap();
        assert_eq!(f, Frame::Request { id: 1, req: w });
        // One byte more is refused by the encoder, which leaves the buffer untouched.
        let w = Request::Write {
            offset: 0,
            flags: 0,
            insync: 0,
            sent: 0,
            epoch: 0,
            data: Bytes::from(vec![0; MAX_DATA + 1]),
            tags: Tags::default(),
        };
        let mut buf = BytesMut::from(&b"xy"[..]);
        assert!(matches!(encode_request(1, &w, &mut buf), Err(ProtoError::Unencodable { field: "data", .. })));
        assert_eq!(&buf[..], b"xy");
    }

    #[test]
    fn unknown_kind_is_per_frame() {
        let mut buf = raw_frame(0x42, 0, 0, 9, b"abc");
        encode_request(10, &Request::Ping, &mut buf).unwrap();
        let e = one(&mut buf).unwrap_err();
        assert!(!e.is_fatal());
        assert!(matches!(e, ProtoError::UnknownKind { id: 9, kind: 0x42 }));
        assert_eq!(e.reply_for_request(), Some((9, ErrorCode::Invalid)));
        assert!(matches!(one(&mut buf), Ok(Some(Frame::Request { id: 10, .. }))));
        // An unknown reply kind is not answered.
        let mut buf = raw_frame(0xF0, 0, 0, 9, b"");
        let e = one(&mut buf).unwrap_err();
        assert_eq!(e.reply_for_request(), None);
        assert_eq!(e.frame(), Some((9, 0xF0)));
    }

    #[test]
    fn reserved_header_bits_are_rejected() {
        let mut buf = raw_frame(kind::PING, 0x01, 0, 1, b"");
        assert!(matches!(one(&mut buf), Err(ProtoError::ReservedBits { field: "header.flags", .. })));
        let mut buf = raw_frame(kind::PING, 0, 0x100, 1, b"");
        assert!(matches!(one(&mut buf), Err(ProtoError::ReservedBits { field: "header.reserved", .. })));
        let mut buf = raw_frame(kind::PING, 0, 0, 1, b"");
        buf[24] = 1;
        let hc = crc32c::crc32c(&buf[..28]);
        buf[28..32].copy_from_slice(&hc.to_le_bytes());
        assert!(matches!(one(&mut buf), Err(ProtoError::ReservedBits { field: "header.reserved2", .. })));
    }

    #[test]
    fn body_field_violations() {
        // Truncated body field.
        let mut buf = raw_frame(kind::READ, 0, 0, 4, &[0; 11]);
        assert!(matches!(one(&mut buf), Err(ProtoError::ShortBody { id: 4, field: "len", .. })));
        let mut buf = raw_frame(kind::WRITE, 0, 0, 4, &[0; 16]);
        assert!(matches!(one(&mut buf), Err(ProtoError::ShortBody { field: "sent", .. })));
        let mut buf = raw_frame(kind::WRITE, 0, 0, 4, &[0; 24]);
        assert!(matches!(one(&mut buf), Err(ProtoError::ShortBody { field: "epoch", .. })));
        for k in [kind::WRITE_ZEROES, kind::TRIM] {
            let mut buf = raw_frame(k, 0, 0, 4, &[0; 32]);
            assert!(matches!(one(&mut buf), Err(ProtoError::ShortBody { field: "epoch", .. })));
        }
        // Trailing garbage.
        let mut buf = raw_frame(kind::PING, 0, 0, 4, b"zz");
        let e = one(&mut buf).unwrap_err();
        assert!(matches!(e, ProtoError::TrailingBytes { extra: 2, .. }));
        assert!(!e.is_fatal());
        let mut ok = BytesMut::new();
        encode_request(4, &Request::Read { offset: 1, len: 2 }, &mut ok).unwrap();
        let mut body = ok[HEADER_LEN..].to_vec();
        body.push(0);
        let mut buf = raw_frame(kind::READ, 0, 0, 4, &body);
        assert!(matches!(one(&mut buf), Err(ProtoError::TrailingBytes { extra: 1, .. })));
        let mut ok = BytesMut::new();
        encode_request(
            4,
            &Request::Trim { offset: 1, len: 2, flags: 0, insync: 1, sent: 1, epoch: 1, tags: Tags::default() },
            &mut ok,
        )
        .unwrap();
        let mut body = ok[HEADER_LEN..].to_vec();
        body.push(0);
        let mut buf = raw_frame(kind::TRIM, 0, 0, 4, &body);
        assert!(matches!(one(&mut buf), Err(ProtoError::TrailingBytes { extra: 1, .. })));
        // Undefined write flag.
        let mut body = vec![0u8; 25];
        body[8] = 0x04;
        let mut buf = raw_frame(kind::WRITE, 0, 0, 4, &body);
        assert!(matches!(one(&mut buf), Err(ProtoError::ReservedBits { field: "flags", value: 4, .. })));
        // Non-UTF-8 and empty names.
        let mut buf = raw_frame(kind::OPEN, 0, 0, 4, &[2, 0xff, 0xfe]);
        assert!(matches!(one(&mut buf), Err(ProtoError::InvalidField { field: "volume", .. })));
        let mut buf = raw_frame(kind::OPEN, 0, 0, 4, &[0]);
        assert!(matches!(one(&mut buf), Err(ProtoError::InvalidField { field: "volume", .. })));
        // Read longer than MAX_DATA.
        let mut body = vec![0u8; 8];
        body.extend_from_slice(&((MAX_DATA + 1) as u32).to_le_bytes());
        let mut buf = raw_frame(kind::READ, 0, 0, 4, &body);
        assert!(matches!(one(&mut buf), Err(ProtoError::InvalidField { field: "len", .. })));
        // offset + len overflow.
        let mut body = u64::MAX.to_le_bytes().to_vec();
        body.extend_from_slice(&2u64.to_le_bytes());
        body.extend_from_slice(&[0; 17 + 3]);
        let mut buf = raw_frame(kind::TRIM, 0, 0, 4, &body);
        assert!(matches!(one(&mut buf), Err(ProtoError::InvalidField { field: "offset+len", .. })));
        let mut body = u64::MAX.to_le_bytes().to_vec();
        body.extend_from_slice(&[0; 17 + 3]);
        body.push(0xAA); // one byte of data
        let mut buf = raw_frame(kind::WRITE, 0, 0, 4, &body);
        assert!(matches!(one(&mut buf), Err(ProtoError::InvalidField { field: "offset+len", .. })));

        // GetBitmap and ResyncRead have the body and checks of Read.
        for k in [kind::GET_BITMAP, kind::RESYNC_READ] {
            let mut buf = raw_frame(k, 0, 0, 4, &[0; 11]);
            assert!(matches!(one(&mut buf), Err(ProtoError::ShortBody { field: "len", .. })), "{}", kind::name(k));
            let mut buf = raw_frame(k, 0, 0, 4, &[0; 13]);
            assert!(matches!(one(&mut buf), Err(ProtoError::TrailingBytes { extra: 1, .. })), "{}", kind::name(k));
            let mut body = vec![0u8; 8];
            body.extend_from_slice(&((MAX_DATA + 1) as u32).to_le_bytes());
            let mut buf = raw_frame(k, 0, 0, 4, &body);
            assert!(matches!(one(&mut buf), Err(ProtoError::InvalidField { field: "len", .. })), "{}", kind::name(k));
            let mut body = (u64::MAX - 1).to_le_bytes().to_vec();
            body.extend_from_slice(&2u32.to_le_bytes());
            let mut buf = raw_frame(k, 0, 0, 4, &body);
            let e = one(&mut buf).unwrap_err();
            assert!(matches!(e, ProtoError::InvalidField { field: "offset+len", .. }), "{e}");
            assert_eq!(e.reply_for_request(), Some((4, ErrorCode::Invalid)));
        }

        // Resolve: one non-empty name, nothing after it.
        let mut buf = raw_frame(kind::RESOLVE, 0, 0, 4, &[]);
        assert!(matches!(one(&mut buf), Err(ProtoError::ShortBody { field: "keep", .. })));
        let mut buf = raw_frame(kind::RESOLVE, 0, 0, 4, &[3, b'a', b'b']);
        assert!(matches!(one(&mut buf), Err(ProtoError::ShortBody { field: "keep", .. })));
        let mut buf = raw_frame(kind::RESOLVE, 0, 0, 4, &[0]);
        assert!(matches!(one(&mut buf), Err(ProtoError::InvalidField { field: "keep", .. })));
        let mut buf = raw_frame(kind::RESOLVE, 0, 0, 4, &[2, b'a', b'\n']);
        assert!(matches!(one(&mut buf), Err(ProtoError::InvalidField { field: "keep", .. })));
        let mut buf = raw_frame(kind::RESOLVE, 0, 0, 4, &[1, b'a', 0]);
        assert!(matches!(one(&mut buf), Err(ProtoError::TrailingBytes { extra: 1, .. })));

        // Fenced: epoch, then a holder name that may be empty.
        let mut buf = raw_frame(kind::FENCED, 0, 0, 4, &[0; 7]);
        let e = one(&mut buf).unwrap_err();
        assert!(matches!(e, ProtoError::ShortBody { field: "epoch", .. }), "{e}");
        assert_eq!(e.reply_for_request(), None, "replies are not answered");
        let mut buf = raw_frame(kind::FENCED, 0, 0, 4, &[0; 8]);
        assert!(matches!(one(&mut buf), Err(ProtoError::ShortBody { field: "holder", .. })));
        let mut body = 5u64.to_le_bytes().to_vec();
        body.extend_from_slice(&[4, b'n', b'o']);
        let mut buf = raw_frame(kind::FENCED, 0, 0, 4, &body);
        assert!(matches!(one(&mut buf), Err(ProtoError::ShortBody { field: "holder", .. })));
        let mut body = 5u64.to_le_bytes().to_vec();
        body.extend_from_slice(&[2, b'n', 0x1b]);
        let mut buf = raw_frame(kind::FENCED, 0, 0, 4, &body);
        assert!(matches!(one(&mut buf), Err(ProtoError::InvalidField { field: "holder", .. })));
        let mut body = 5u64.to_le_bytes().to_vec();
        body.extend_from_slice(&[2, 0xc3, 0x28]);
        let mut buf = raw_frame(kind::FENCED, 0, 0, 4, &body);
        assert!(matches!(one(&mut buf), Err(ProtoError::InvalidField { field: "holder", .. })));
        let mut body = 5u64.to_le_bytes().to_vec();
        body.extend_from_slice(&[0, 0]);
        let mut buf = raw_frame(kind::FENCED, 0, 0, 4, &body);
        assert!(matches!(one(&mut buf), Err(ProtoError::TrailingBytes { extra: 1, .. })));
        let mut body = 5u64.to_le_bytes().to_vec();
        body.push(0);
        let mut buf = raw_frame(kind::FENCED, 0, 0, 4, &body);
        assert_eq!(
            one(&mut buf).unwrap(),
            Some(Frame::Reply { id: 4, reply: Reply::Fenced { epoch: 5, holder: String::new() } })
        );

        // The old resync kinds are gone: 0x84 is Fenced now, 0x08 GetBitmap, and the one-byte
        // body of a version 1 ResyncPoll is rejected.
        let mut buf = raw_frame(kind::GET_BITMAP, 0, 0, 4, &[1]);
        assert!(matches!(one(&mut buf), Err(ProtoError::ShortBody { field: "offset", .. })));

        // State: too many outdated peers.
        let mut body = vec![1, b'v', 1, b'n', 0];
        body.extend_from_slice(&[0; 16]);
        body.push(33);
        let mut buf = raw_frame(kind::OPEN, 0, 0, 4, &body);
        assert!(matches!(one(&mut buf), Err(ProtoError::InvalidField { field: "state.outdated_peers", .. })));
        // State: the fields after the outdated peers.
        let mut state = vec![0u8; 17];
        state.push(0); // no outdated peers
        let mut buf = raw_frame(kind::STATE, 0, 0, 4, &state);
        assert!(matches!(one(&mut buf), Err(ProtoError::ShortBody { field: "state.epoch", .. })));
        state.extend_from_slice(&9u64.to_le_bytes());
        let mut buf = raw_frame(kind::STATE, 0, 0, 4, &state);
        assert!(matches!(one(&mut buf), Err(ProtoError::ShortBody { field: "state.holder", .. })));
        let long = [&[254u8][..], &[b'h'; 254]].concat();
        for bad_holder in [&[1u8, 0x7f][..], &[2, 0xff, b'a'], &long] {
            let mut body = state.clone();
            body.extend_from_slice(bad_holder);
            body.push(0);
            let mut buf = raw_frame(kind::STATE, 0, 0, 4, &body);
            let e = one(&mut buf).unwrap_err();
            assert!(matches!(e, ProtoError::InvalidField { field: "state.holder", .. }), "{bad_holder:?}: {e}");
        }
        state.push(0); // holder not known
        let mut buf = raw_frame(kind::STATE, 0, 0, 4, &state);
        assert!(matches!(one(&mut buf), Err(ProtoError::ShortBody { field: "state.dirty_peers", .. })));
        let mut body = state.clone();
        body.push(33);
        let mut buf = raw_frame(kind::STATE, 0, 0, 4, &body);
        assert!(matches!(one(&mut buf), Err(ProtoError::InvalidField { field: "state.dirty_peers", .. })));
        let mut body = state.clone();
        body.extend_from_slice(&[1, 0]);
        let mut buf = raw_frame(kind::STATE, 0, 0, 4, &body);
        assert!(matches!(one(&mut buf), Err(ProtoError::InvalidField { field: "state.dirty_peers", .. })));
        let mut body = state.clone();
        body.extend_from_slice(&[1, 1, b'x', 0]);
        let mut buf = raw_frame(kind::STATE, 0, 0, 4, &body);
        assert!(matches!(one(&mut buf), Err(ProtoError::ShortBody { field: "state.flag_epoch", .. })));
        let mut body = state.clone();
        body.extend_from_slice(&[1, 1, b'x']);
        body.extend_from_slice(&[0; 9]);
        let mut buf = raw_frame(kind::STATE, 0, 0, 4, &body);
        assert!(matches!(one(&mut buf), Err(ProtoError::TrailingBytes { extra: 1, .. })));
        let mut body = state.clone();
        body.extend_from_slice(&[1, 1, b'x']);
        body.extend_from_slice(&[0; 8]);
        let mut buf = raw_frame(kind::STATE, 0, 0, 4, &body);
        let Some(Frame::Request { req: Request::State { state }, .. }) = one(&mut buf).unwrap() else { panic!() };
        assert_eq!((state.epoch, state.holder.as_str(), state.dirty_peers), (9, "", vec!["x".to_string()]));
    }

    #[test]
    fn unknown_error_code_decodes_to_internal() {
        let mut body = 0xBEEFu16.to_le_bytes().to_vec();
        body.extend_from_slice(&2u16.to_le_bytes());
        body.extend_from_slice(b"hi");
        let mut buf = raw_frame(kind::ERROR, 0, 0, 4, &body);
        assert_eq!(
            one(&mut buf).unwrap(),
            Some(Frame::Reply { id: 4, reply: Reply::Error { code: ErrorCode::Internal, message: "hi".into() } })
        );
        for c in 1..=9u16 {
            assert_eq!(ErrorCode::from_u16(c).as_u16(), c);
        }
        assert_eq!(ErrorCode::from_u16(0), ErrorCode::Internal);
    }

    #[test]
    fn long_error_message_is_truncated_on_a_char_boundary() {
        let msg = "é".repeat(MAX_MESSAGE_LEN); // 2 bytes each
        let mut buf = BytesMut::new();
        let r = Reply::Error { code: ErrorCode::Io, message: msg.clone() };
        encode_reply(1, &r, &mut buf).unwrap();
        assert_eq!(buf.len(), r.encoded_len());
        let Some(Frame::Reply { reply: Reply::Error { message, .. }, .. }) = one(&mut buf).unwrap() else { panic!() };
        assert_eq!(message.len(), MAX_MESSAGE_LEN);
        assert!(msg.starts_with(&message));
    }

    #[test]
    fn encoder_rejects_what_the_decoder_would_reject() {
        let bad_reqs = vec![
            Request::Open { volume: "".into(), from_node: "n".into(), state: st(&[]) },
            Request::Open { volume: "v".repeat(254), from_node: "n".into(), state: st(&[]) },
            Request::Open { volume: "v".into(), from_node: "a\nb".into(), state: st(&[]) },
            Request::State { state: ReplicaStateMsg { outdated_peers: vec!["p".into(); 33], ..st(&[]) } },
            Request::State { state: ReplicaStateMsg { holder: "a\tb".into(), ..st(&[]) } },
            Request::State { state: ReplicaStateMsg { holder: "h".repeat(254), ..st(&[]) } },
            Request::State { state: ReplicaStateMsg { dirty_peers: vec!["p".into(); 33], ..st(&[]) } },
            Request::Open {
                volume: "v".into(),
                from_node: "n".into(),
                state: ReplicaStateMsg { dirty_peers: vec!["".into()], ..st(&[]) },
            },
            Request::Trim { offset: u64::MAX, len: 1, flags: 0, insync: 0, sent: 0, epoch: 0, tags: Tags::default() },
            Request::WriteZeroes {
                offset: 0,
                len: 1,
                flags: 0x80,
                insync: 0,
                sent: 0,
                epoch: 0,
                tags: Tags::default(),
            },
            Request::Write {
                offset: u64::MAX,
                flags: 0,
                insync: 0,
                sent: 0,
                epoch: 0,
                data: Bytes::from_static(b"x"),
                tags: Tags::default(),
            },
            Request::Read { offset: 0, len: MAX_DATA as u32 + 1 },
            Request::GetBitmap { offset: 0, len: MAX_DATA as u32 + 1 },
            Request::GetBitmap { offset: u64::MAX, len: 1 },
            Request::ResyncRead { offset: 0, len: MAX_DATA as u32 + 1 },
            Request::ResyncRead { offset: u64::MAX - 1, len: 2 },
            Request::Resolve { keep: "".into() },
            Request::Resolve { keep: "k\u{7f}".into() },
        ];
        for r in bad_reqs {
            let mut buf = BytesMut::new();
            let e = encode_request(1, &r, &mut buf).unwrap_err();
            assert!(matches!(e, ProtoError::Unencodable { .. }), "{r:?}: {e}");
            assert!(!e.is_fatal());
            assert!(buf.is_empty());
        }
        for r in
            [Reply::Fenced { epoch: 1, holder: "a\nb".into() }, Reply::Fenced { epoch: 1, holder: "h".repeat(254) }]
        {
            let mut buf = BytesMut::new();
            let e = encode_reply(1, &r, &mut buf).unwrap_err();
            assert!(matches!(e, ProtoError::Unencodable { field: "holder", .. }), "{r:?}: {e}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn errors_have_clear_messages() {
        let e = ProtoError::BodyChecksum { id: 7, kind: kind::WRITE, expected: 1, actual: 2 };
        let s = e.to_string();
        assert!(s.contains("Write") && s.contains("id 7") && s.contains("checksum"), "{s}");
        let s = ProtoError::Oversized { len: 99_999_999, max: MAX_BODY }.to_string();
        assert!(s.contains("99999999"), "{s}");
    }

    #[tokio::test]
    async fn codec_works_with_framed_sink_and_read_frame_survives_per_frame_errors() {
        use futures::SinkExt;
        use tokio::io::AsyncWriteExt;
        use tokio_util::codec::{FramedRead, FramedWrite};

        // FramedWrite + FramedRead over a duplex pipe.
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut w = FramedWrite::new(a, PeerCodec);
        let mut r = FramedRead::new(b, PeerCodec);
        let frames: Vec<Frame> =
            all_requests().into_iter().enumerate().map(|(i, req)| Frame::Request { id: i as u64, req }).collect();
        let sender = {
            let frames = frames.clone();
            tokio::spawn(async move {
                for f in frames {
                    w.send(f).await.unwrap();
                }
            })
        };
        for f in &frames {
            let got = futures::StreamExt::next(&mut r).await.unwrap().unwrap();
            assert_eq!(&got, f);
        }
        sender.await.unwrap();

        // read_frame: a corrupted frame in the middle of a single write does not stall.
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let mut out = BytesMut::new();
        encode_request(1, &Request::Ping, &mut out).unwrap();
        let at = out.len();
        encode_request(2, &all_requests()[1], &mut out).unwrap();
        encode_request(3, &Request::Flush, &mut out).unwrap();
        out[at + HEADER_LEN + 5] ^= 0xff;
        a.write_all(&out).await.unwrap();
        let mut buf = BytesMut::new();
        assert_eq!(read_frame(&mut b, &mut buf).await.unwrap().unwrap().id(), 1);
        let e = read_frame(&mut b, &mut buf).await.unwrap_err();
        assert_eq!(e.reply_for_request(), Some((2, ErrorCode::Checksum)));
        assert_eq!(read_frame(&mut b, &mut buf).await.unwrap().unwrap().id(), 3);
        // Clean EOF, then truncated EOF.
        drop(a);
        assert!(read_frame(&mut b, &mut buf).await.unwrap().is_none());
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&out[..at + 10]).await.unwrap();
        drop(a);
        let mut buf = BytesMut::new();
        assert!(read_frame(&mut b, &mut buf).await.unwrap().is_some());
        assert!(matches!(read_frame(&mut b, &mut buf).await, Err(ProtoError::Truncated { have: 10, .. })));
    }

    // ---------------------------------------------------------------- property tests

    fn arb_name() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9][a-z0-9.-]{0,40}",
            "[a-z]{253}",
            "[\\PC]{1,20}".prop_filter("≤253 bytes", |s| s.len() <= MAX_NAME_LEN),
        ]
    }

    /// A name, or the empty string ("not known").
    fn arb_opt_name() -> impl Strategy<Value = String> {
        prop_oneof![Just(String::new()), arb_name()]
    }

    fn arb_state() -> impl Strategy<Value = ReplicaStateMsg> {
        (
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(arb_name(), 0..=MAX_PEERS),
            any::<bool>(),
            any::<u64>(),
            arb_opt_name(),
            proptest::collection::vec(arb_name(), 0..=MAX_PEERS),
            any::<u64>(),
        )
            .prop_map(
                |(consistent, generation, size, outdated_peers, local_ok, epoch, holder, dirty_peers, flag_epoch)| {
                    ReplicaStateMsg {
                        consistent,
                        generation,
                        size,
                        outdated_peers,
                        local_ok,
                        epoch,
                        holder,
                        dirty_peers,
                        flag_epoch,
                    }
                },
            )
    }

    fn arb_range() -> impl Strategy<Value = (u64, u64)> {
        (any::<u64>(), any::<u64>()).prop_map(|(o, l)| (o, l.min(u64::MAX - o)))
    }

    fn arb_data() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..9000).prop_map(Bytes::from)
    }

    /// `offset, len` of `Read`, `GetBitmap` and `ResyncRead`.
    fn arb_read_range() -> impl Strategy<Value = (u64, u32)> {
        (any::<u64>(), 0..=MAX_DATA as u32).prop_map(|(offset, len)| (offset.min(u64::MAX - u64::from(len)), len))
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        let wf = 0u8..=WF_ALL;
        prop_oneof![
            (arb_name(), arb_name(), arb_state())
                .prop_map(|(volume, from_node, state)| { Request::Open { volume, from_node, state } }),
            (any::<u64>(), wf.clone(), any::<u32>(), any::<u32>(), any::<u64>(), arb_data()).prop_map(
                |(offset, flags, insync, sent, epoch, data)| Request::Write {
                    offset: offset.min(u64::MAX - data.len() as u64),
                    flags,
                    insync,
                    sent,
                    epoch,
                    data,
                    tags: Tags::default(),
                }
            ),
            (arb_range(), wf.clone(), any::<u32>(), any::<u32>(), any::<u64>()).prop_map(
                |((offset, len), flags, insync, sent, epoch)| Request::WriteZeroes {
                    offset,
                    len,
                    flags,
                    insync,
                    sent,
                    epoch,
                    tags: Tags::default(),
                }
            ),
            (arb_range(), wf, any::<u32>(), any::<u32>(), any::<u64>()).prop_map(
                |((offset, len), flags, insync, sent, epoch)| Request::Trim {
                    offset,
                    len,
                    flags,
                    insync,
                    sent,
                    epoch,
                    tags: Tags::default()
                }
            ),
            arb_read_range().prop_map(|(offset, len)| Request::Read { offset, len }),
            Just(Request::Flush),
            arb_state().prop_map(|state| Request::State { state }),
            arb_read_range().prop_map(|(offset, len)| Request::GetBitmap { offset, len }),
            Just(Request::Ping),
            arb_read_range().prop_map(|(offset, len)| Request::ResyncRead { offset, len }),
            arb_name().prop_map(|keep| Request::Resolve { keep }),
            (any::<u64>(), any::<u64>()).prop_map(|(epoch, region)| Request::Acquire { epoch, region }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(epoch, region, grant)| Request::Revoke {
                epoch,
                region,
                grant
            }),
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>())
                .prop_map(|(epoch, region, grant, dirty)| Request::Release { epoch, region, grant, dirty }),
            (any::<u64>(), 0u64..1 << 40, any::<u64>(), 12u8..=22, arb_data()).prop_map(
                |(epoch, region, grant, shift, data)| Request::Recover {
                    epoch,
                    region,
                    grant,
                    shift,
                    data: data.slice(..data.len().min(1 << shift)),
                }
            ),
            (any::<u64>(), 12u8..=22, proptest::collection::btree_map(0u64..1 << 30, any::<u64>(), 1..8), arb_data())
                .prop_map(|(epoch, shift, tags, data)| Request::Write {
                    offset: 0,
                    flags: 0,
                    insync: 1,
                    sent: 1,
                    epoch,
                    data,
                    tags: Tags { shift, list: tags.into_iter().collect() },
                }),
        ]
    }

    fn arb_code() -> impl Strategy<Value = ErrorCode> {
        (1u16..=10).prop_map(ErrorCode::from_u16)
    }

    fn arb_reply() -> impl Strategy<Value = Reply> {
        prop_oneof![
            Just(Reply::Ok),
            arb_state().prop_map(|state| Reply::Opened { state }),
            arb_data().prop_map(|data| Reply::Data { data }),
            (any::<u64>(), arb_opt_name()).prop_map(|(epoch, holder)| Reply::Fenced { epoch, holder }),
            Just(Reply::Pong),
            (arb_code(), "\\PC{0,300}").prop_map(|(code, message)| Reply::Error { code, message }),
            any::<u64>().prop_map(|grant| Reply::Granted { grant }),
            any::<bool>().prop_map(|dirty| Reply::Released { dirty }),
        ]
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (any::<u64>(), arb_request()).prop_map(|(id, req)| Frame::Request { id, req }),
            (any::<u64>(), arb_reply()).prop_map(|(id, reply)| Frame::Reply { id, reply }),
        ]
    }

    /// Feeds `bytes` to the decoder in `chunk`-sized pieces until it stops; must not panic.
    fn drain(bytes: &[u8], chunk: usize) {
        let mut c = PeerCodec;
        let mut buf = BytesMut::new();
        let mut fed = 0;
        loop {
            match c.decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) => {
                    if fed == bytes.len() {
                        let _ = c.decode_eof(&mut buf);
                        return;
                    }
                    let n = chunk.max(1).min(bytes.len() - fed);
                    buf.extend_from_slice(&bytes[fed..fed + n]);
                    fed += n;
                }
                Err(e) if e.is_fatal() => return,
                Err(_) => continue,
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn prop_frames_round_trip(frames in proptest::collection::vec(arb_frame(), 1..8), chunk in 1usize..5000) {
            let mut wire = BytesMut::new();
            for f in &frames {
                let before = wire.len();
                encode_frame(f, &mut wire).unwrap();
                let len = match f {
                    Frame::Request { req, .. } => req.encoded_len(),
                    Frame::Reply { reply, .. } => reply.encoded_len(),
                };
                prop_assert_eq!(wire.len() - before, len);
            }
            // Decode with the stream arriving in arbitrary chunks.
            let mut got = vec![];
            let mut buf = BytesMut::new();
            let mut c = PeerCodec;
            for piece in wire.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(f) = c.decode(&mut buf).unwrap() {
                    got.push(f);
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn prop_random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000), chunk in 1usize..64) {
            drain(&bytes, chunk);
            // Also with a valid magic in front, to get past the first check.
            let mut v = FRAME_MAGIC.to_vec();
            v.extend_from_slice(&bytes);
            drain(&v, chunk);
        }

        #[test]
        fn prop_mutated_frames_never_panic(
            frames in proptest::collection::vec(arb_frame(), 1..4),
            muts in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..6),
            chunk in 1usize..3000,
        ) {
            let mut wire = BytesMut::new();
            for f in &frames {
                encode_frame(f, &mut wire).unwrap();
            }
            let mut v = wire.to_vec();
            for (idx, byte, op) in muts {
                if v.is_empty() { break; }
                let i = idx.index(v.len());
                match op {
                    0 => v[i] ^= byte | 1,
                    1 => v.truncate(i),
                    2 => v.insert(i, byte),
                    _ => { v.remove(i); }
                }
            }
            drain(&v, chunk);
        }

        /// Random bodies wrapped in a header with *valid* CRCs: exercises every body parser.
        #[test]
        fn prop_valid_crc_random_body_never_panics(
            k in prop_oneof![0x00u8..=0x0e, 0x80u8..=0x87, any::<u8>()],
            flags in prop_oneof![Just(0u8), any::<u8>()],
            id in any::<u64>(),
            body in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let mut buf = raw_frame(k, flags, 0, id, &body);
            let total = buf.len();
            match PeerCodec.decode(&mut buf) {
                Ok(Some(f)) => {
                    prop_assert_eq!(f.id(), id);
                    // Whatever decodes re-encodes to the same bytes.
                    let mut again = BytesMut::new();
                    encode_frame(&f, &mut again).unwrap();
                    prop_assert_eq!(&again[..], &raw_frame(k, flags, 0, id, &body)[..]);
                }
                Ok(None) => prop_assert!(false, "complete frame not decoded"),
                Err(e) => {
                    prop_assert!(!e.is_fatal(), "{}", e);
                    prop_assert_eq!(e.frame().map(|f| f.0), Some(id));
                }
            }
            prop_assert!(buf.is_empty(), "frame of {} bytes not consumed", total);
        }
    }

    /// Micro-benchmark: `cargo test --release -- --ignored bench_write_4k --nocapture`.
    #[test]
    #[ignore]
    fn bench_write_4k() {
        use std::time::Instant;
        let req = Request::Write {
            offset: 1 << 30,
            flags: WF_FUA,
            insync: 0b111,
            sent: 0b110,
            epoch: 1,
            data: Bytes::from(vec![0xC3; 4096]),
            tags: Tags::default(),
        };
        let batch = 64;
        let rounds = 20_000;
        let mut buf = BytesMut::with_capacity(batch * req.encoded_len() * 2);
        let mut c = PeerCodec;
        let (mut enc_ns, mut dec_ns) = (0u128, 0u128);
        let mut n = 0u64;
        for round in 0..rounds + 1000 {
            buf.clear();
            let t0 = Instant::now();
            for i in 0..batch {
                encode_request(i as u64, &req, &mut buf).unwrap();
            }
            let t1 = Instant::now();
            while let Some(f) = c.decode(&mut buf).unwrap() {
                std::hint::black_box(&f);
            }
            let t2 = Instant::now();
            if round >= 1000 {
                enc_ns += (t1 - t0).as_nanos();
                dec_ns += (t2 - t1).as_nanos();
                n += batch as u64;
            }
        }
        let n = n as f64;
        println!(
            "4 KiB Write frame: encode {:.0} ns, decode {:.0} ns, encode+decode {:.0} ns per frame ({:.2} GB/s)",
            enc_ns as f64 / n,
            dec_ns as f64 / n,
            (enc_ns + dec_ns) as f64 / n,
            4096.0 * n / (enc_ns + dec_ns) as f64
        );
    }

    #[test]
    fn vectored_encoding_matches_plain_encoding() {
        let data = Bytes::from((0..100_000u32).map(|i| (i * 7) as u8).collect::<Vec<u8>>());
        let req = Request::Write {
            offset: 4096,
            flags: WF_FUA,
            insync: 3,
            sent: 7,
            epoch: 9,
            data: data.clone(),
            tags: Tags::default(),
        };
        let mut plain = BytesMut::new();
        encode_request(9, &req, &mut plain).unwrap();
        let mut head = BytesMut::new();
        let tail = encode_request_vectored(9, &req, &mut head).unwrap().unwrap();
        assert_eq!(head.len(), HEADER_LEN + WRITE_PREFIX + 3);
        assert_eq!(tail.as_ptr(), data.as_ptr(), "the data is not copied");
        head.extend_from_slice(&tail);
        assert_eq!(head, plain);

        let reply = Reply::Data { data };
        let mut plain = BytesMut::new();
        encode_reply(10, &reply, &mut plain).unwrap();
        let mut head = BytesMut::new();
        let tail = encode_reply_vectored(10, &reply, &mut head).unwrap().unwrap();
        head.extend_from_slice(&tail);
        assert_eq!(head, plain);

        // Small payloads are encoded whole.
        let mut b = BytesMut::new();
        let small = Request::Write {
            offset: 0,
            flags: 0,
            insync: 1,
            sent: 1,
            epoch: 1,
            data: Bytes::from_static(b"abc"),
            tags: Tags::default(),
        };
        assert!(encode_request_vectored(1, &small, &mut b).unwrap().is_none());
        assert_eq!(b.len(), small.encoded_len());
    }

    #[test]
    fn volume_lifecycle_requests_round_trip() {
        let reqs = [
            Request::CreateVolume {
                volume: "data".into(),
                size: 16 << 20,
                replicas: vec!["node-1".into(), "node-2".into()],
            },
            Request::DeleteVolume { volume: "data".into() },
        ];
        for (i, req) in reqs.into_iter().enumerate() {
            let mut b = BytesMut::new();
            encode_request(i as u64, &req, &mut b).unwrap();
            assert_eq!(b.len(), req.encoded_len());
            let f = PeerCodec.decode(&mut b).unwrap().unwrap();
            assert_eq!(f, Frame::Request { id: i as u64, req });
        }
        let too_many =
            Request::CreateVolume { volume: "v".into(), size: 4096, replicas: vec!["n".into(); MAX_PEERS + 1] };
        assert!(encode_request(1, &too_many, &mut BytesMut::new()).is_err());
    }
}
