//! NBD (Network Block Device) server frontend.
//!
//! Serves [`BlockDevice`]s found through an [`Exports`] catalogue to NBD clients (the
//! Linux kernel's `nbd-client`, qemu, libnbd's tools, fio's nbd engine, ...) over unix or
//! TCP sockets.
//!
//! # Protocol subset
//!
//! * Handshake: fixed newstyle only (`NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES`), no
//!   TLS. Options: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO` (with `NBD_INFO_EXPORT`,
//!   `NBD_INFO_BLOCK_SIZE` always, `NBD_INFO_NAME` / `NBD_INFO_DESCRIPTION` on request).
//!   Everything else (`STRUCTURED_REPLY`, `STARTTLS`, meta contexts, ...) is answered with
//!   `NBD_REP_ERR_UNSUP` and negotiation continues.
//! * Transmission: simple replies only. `READ`, `WRITE`, `FLUSH`, `TRIM`, `WRITE_ZEROES`
//!   (`NO_HOLE` honoured by writing zeros, which is all a block device can do anyway),
//!   `DISC`, and `FUA` on any command. Transmission flags: `HAS_FLAGS`, `SEND_FLUSH`,
//!   `SEND_FUA`, `SEND_TRIM`, `SEND_WRITE_ZEROES`, `CAN_MULTI_CONN`. Fast zero is not
//!   advertised, so a request carrying `NBD_CMD_FLAG_FAST_ZERO` gets `EINVAL`.
//!
//! # Concurrency
//!
//! Each connection has two tasks. The reader (the connection task) parses requests,
//! checks them, reads write payloads straight into buffers of the right size and hands
//! the requests to the executor over a channel, without waiting for earlier requests to
//! complete. The executor drives every device call of the connection concurrently (in a
//! `FuturesUnordered`) and writes the replies in completion order, all replies that are
//! ready in one vectored write (headers and read data are not copied together). At most
//! [`MAX_IN_FLIGHT`] requests and [`MAX_BYTES_IN_FLIGHT`] bytes of payload (write data
//! received but not yet written to the device, plus read data not yet sent) are
//! outstanding per connection; the reader stops reading from the socket while either
//! limit is reached. `NBD_CMD_DISC` (or the client hanging up, or server shutdown) stops
//! the reader; the executor answers what is in flight, then the connection is closed.
//!
//! # Errors and limits
//!
//! * Ranges are checked before the device is called: a read or trim past the end gets
//!   `EINVAL`, a write or write-zeroes past the end gets `ENOSPC` (as the protocol
//!   document asks); device errors go through [`errno_for`].
//! * `READ`/`WRITE` longer than [`MAX_BLOCK_SIZE`] (32 MiB, advertised in
//!   `NBD_INFO_BLOCK_SIZE`) get `EINVAL`. The payload of such a write is read and thrown
//!   away to keep the stream in sync if it is at most [`MAX_DISCARD_WRITE`] (64 MiB);
//!   a longer one is treated as a denial-of-service attempt and the connection is closed.
//!   `TRIM` and `WRITE_ZEROES` carry no payload and may cover any range inside the
//!   device.
//! * Unknown commands and flags not valid for a command get `EINVAL`; the connection
//!   keeps serving. A request with a bad magic closes the connection (the stream cannot be
//!   resynchronised); the listener keeps serving other connections.
//! * Option payloads longer than [`MAX_OPTION_LEN`] are answered with
//!   `NBD_REP_ERR_TOO_BIG` after being read in small pieces and thrown away; past
//!   [`MAX_DISCARD_OPTION`] the connection is closed.

mod handshake;
pub mod proto;
mod server;
mod transmission;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use crate::block::{BlockDevice, BlockErrorKind};

pub use server::{serve_connection, serve_tcp, serve_unix};

/// Smallest request size and alignment the server accepts (advertised in
/// `NBD_INFO_BLOCK_SIZE`).
pub const MIN_BLOCK_SIZE: u32 = 1;
/// Preferred request size and alignment (advertised in `NBD_INFO_BLOCK_SIZE`).
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Largest `READ`/`WRITE` the server accepts (advertised in `NBD_INFO_BLOCK_SIZE`).
pub const MAX_BLOCK_SIZE: u32 = 32 * 1024 * 1024;
/// A `WRITE` longer than [`MAX_BLOCK_SIZE`] but at most this long gets `EINVAL` and its
/// payload is skipped; a longer one closes the connection.
pub const MAX_DISCARD_WRITE: u32 = 64 * 1024 * 1024;
/// Longest option payload the server reads into memory during the handshake.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// An option payload longer than [`MAX_OPTION_LEN`] but at most this long is skipped and
/// answered with `NBD_REP_ERR_TOO_BIG`; a longer one closes the connection.
pub const MAX_DISCARD_OPTION: u32 = 1024 * 1024;
/// A client that has not entered the transmission phase (or ended the session) this long
/// after connecting is disconnected, so idle half-open connections cannot pile up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most requests outstanding (received but not yet answered) on one connection.
pub const MAX_IN_FLIGHT: usize = 256;
/// Most payload bytes outstanding on one connection (write data received but not yet
/// written to the device, plus read data not yet sent). Must be at least
/// [`MAX_BLOCK_SIZE`].
pub const MAX_BYTES_IN_FLIGHT: usize = 64 * 1024 * 1024;

const _: () = assert!(MAX_BYTES_IN_FLIGHT >= MAX_BLOCK_SIZE as usize);
const _: () = assert!(MAX_DISCARD_WRITE >= MAX_BLOCK_SIZE);
const _: () = assert!(MAX_DISCARD_OPTION >= MAX_OPTION_LEN);

/// An export as listed to clients by `NBD_OPT_LIST`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
}

/// The catalogue of exports a server offers.
pub trait Exports: Send + Sync + 'static {
    type Device: BlockDevice;

    /// Finds the export a client asked for. The empty name is the protocol's "default
    /// export"; an implementation may map it to any export or to none.
    fn lookup(&self, name: &str) -> Option<Arc<Self::Device>>;

    /// Every export, for `NBD_OPT_LIST` (and for `NBD_INFO_DESCRIPTION`).
    fn list(&self) -> Vec<ExportInfo>;
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed, or the client hung up in the middle of a message.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol badly enough that the connection had to be closed.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The client asked for an unknown export with `NBD_OPT_EXPORT_NAME`, which cannot
    /// be answered with an error, so the connection was closed.
    #[error("unknown export {0:?}")]
    UnknownExport(String),
}

/// The NBD error value for a block-device error kind. The server answers every failed
/// device call with this value; its own range checks use the same mapping (a read or
/// trim past the end is reported as [`BlockErrorKind::OutOfRange`], a write or
/// write-zeroes past the end as [`BlockErrorKind::NoSpace`]).
pub fn errno_for(kind: BlockErrorKind) -> u32 {
    match kind {
        BlockErrorKind::OutOfRange => proto::EINVAL,
        BlockErrorKind::Invalid => proto::EINVAL,
        BlockErrorKind::Io => proto::EIO,
        BlockErrorKind::ReadOnly => proto::EPERM,
        // `NBD_ESHUTDOWN` obliges the client to disconnect, which is right only when the
        // server itself is going away. A volume that is fenced or has lost quorum may
        // come back, and a client that gets EIO can retry; so EIO.
        BlockErrorKind::Unavailable => proto::EIO,
        BlockErrorKind::NoSpace => proto::ENOSPC,
    }
}

/// Transmission flags advertised for every export.
pub(crate) const TRANSMISSION_FLAGS: u16 = proto::TFLAG_HAS_FLAGS
    | proto::TFLAG_SEND_FLUSH
    | proto::TFLAG_SEND_FUA
    | proto::TFLAG_SEND_TRIM
    | proto::TFLAG_SEND_WRITE_ZEROES
    | proto::TFLAG_CAN_MULTI_CONN;
