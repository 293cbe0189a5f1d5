//! The block-device interface that frontends (NBD, later FUSE) serve and that the
//! mirror engine implements.
//!
//! Offsets and lengths are in bytes. Implementations check ranges themselves and
//! return [`BlockErrorKind::OutOfRange`] for a request past the end of the device.

use std::fmt;
use std::future::Future;

use bytes::Bytes;

/// What went wrong, in the small set of kinds a frontend can translate to its protocol's
/// error codes (see `nbd::errno_for`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockErrorKind {
    /// The request reaches past the end of the device.
    OutOfRange,
    /// The request is malformed (bad alignment, zero length where not allowed, ...).
    Invalid,
    /// No replica could execute the request, or a replica returned an I/O error that
    /// could not be masked by a mirror.
    Io,
    /// The device is read-only for this client.
    ReadOnly,
    /// The volume cannot accept writes right now (fenced, no quorum, shutting down).
    Unavailable,
    /// The device ran out of space.
    NoSpace,
}

/// An error from a block device, with a kind and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockError {
    pub kind: BlockErrorKind,
    pub message: String,
}

impl BlockError {
    pub fn new(kind: BlockErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }

    pub fn out_of_range(offset: u64, len: u64, size: u64) -> Self {
        Self::new(
            BlockErrorKind::OutOfRange,
            format!("request at offset {offset} length {len} reaches past the end of the device ({size} bytes)"),
        )
    }
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for BlockError {}

pub type BlockResult<T> = Result<T, BlockError>;

/// Checks that `[offset, offset + len)` lies inside a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> BlockResult<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::out_of_range(offset, len, size)),
    }
}

/// A block device as a frontend sees it. All methods may be called concurrently from
/// many tasks; an implementation must not serialise independent requests.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Reads `len` bytes at `offset`. The returned buffer has exactly `len` bytes.
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = BlockResult<Bytes>> + Send;

    /// Writes `data` at `offset`. With `fua`, the data is durable when this returns.
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> impl Future<Output = BlockResult<()>> + Send;

    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = BlockResult<()>> + Send;

    /// Discards `[offset, offset + len)`; afterwards the range reads back as zeros.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> impl Future<Output = BlockResult<()>> + Send;

    /// Writes zeros to `[offset, offset + len)`.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> impl Future<Output = BlockResult<()>> + Send;
}
