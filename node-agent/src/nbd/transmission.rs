//! The transmission phase: a pipelined request reader and an executor that drives the
//! device calls concurrently and writes their replies in batches.

use std::io::{self, IoSlice};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::{Instrument, debug, error, warn};

use super::handshake::{discard, read_or_eof};
use super::proto::{self, Request};
use super::{MAX_BLOCK_SIZE, MAX_BYTES_IN_FLIGHT, MAX_DISCARD_WRITE, MAX_IN_FLIGHT, NbdError, errno_for};
use crate::block::{BlockDevice, BlockError, BlockErrorKind, check_range};

/// Most replies gathered into one vectored write.
const MAX_BATCH: usize = 64;
/// For writers without vectored writes: data at least this long is written directly
/// instead of being copied next to its header.
const COPY_THRESHOLD: usize = 16 * 1024;

/// Lets a connection learn that the server is shutting down.
pub(crate) struct Shutdown(Option<watch::Receiver<bool>>);

impl Shutdown {
    pub(crate) fn never() -> Self {
        Self(None)
    }

    pub(crate) fn new(rx: watch::Receiver<bool>) -> Self {
        Self(Some(rx))
    }

    /// Completes once shutdown has been requested; never completes if the sender went
    /// away without requesting it.
    pub(crate) async fn wait(&mut self) {
        if let Some(rx) = &mut self.0
            && rx.wait_for(|stop| *stop).await.is_ok()
        {
            return;
        }
        std::future::pending::<()>().await;
    }
}

/// Budget held by a request from the moment it is accepted until its reply is written.
struct Permits {
    _count: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// A simple reply ready to be written.
struct Reply {
    header: [u8; proto::SIMPLE_REPLY_LEN],
    data: Option<Bytes>,
    _permits: Permits,
}

/// What the executor has to do for a request that passed the reader's checks.
enum Op {
    Read,
    Write(Bytes),
    Flush,
    Trim,
    WriteZeroes,
    /// No device call: reply with this error value (0 for success).
    Reply(u32),
}

/// A request handed from the reader to the executor.
struct Job {
    req: Request,
    op: Op,
    permits: Permits,
}

enum Step {
    Continue,
    Disconnect,
    /// The executor has stopped (it could not write to the socket); its error says why.
    ExecutorGone,
}

/// The reader's side of a connection.
struct Conn<D> {
    device: Arc<D>,
    jobs: mpsc::UnboundedSender<Job>,
    count: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

/// Serves requests until the client disconnects (or breaks the protocol, or shutdown is
/// requested), then waits for every request in flight to be answered and closes.
pub(crate) async fn serve<R, W, D>(
    mut reader: R,
    writer: W,
    device: Arc<D>,
    mut shutdown: Shutdown,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
    D: BlockDevice,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let executor = tokio::spawn(execute_and_reply(writer, device.clone(), rx).in_current_span());
    let conn = Conn {
        device,
        jobs: tx,
        count: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        bytes: Arc::new(Semaphore::new(MAX_BYTES_IN_FLIGHT)),
    };

    let result = loop {
        let step = tokio::select! {
            biased;
            () = shutdown.wait() => {
                debug!("server shutting down; finishing requests in flight");
                break Ok(());
            }
            step = conn.next_request(&mut reader) => step,
        };
        match step {
            Ok(Step::Continue) => {}
            Ok(Step::Disconnect | Step::ExecutorGone) => break Ok(()),
            Err(e) => break Err(e),
        }
    };

    // The executor ends once the reader is gone and every request in flight is answered.
    drop(conn);
    let written = match executor.await {
        Ok(r) => r,
        Err(e) => Err(io::Error::other(format!("executor task failed: {e}"))),
    };
    match (result, written) {
        (Err(e), _) => Err(e),
        (Ok(()), Err(e)) if e.kind() != io::ErrorKind::NotConnected => Err(e.into()),
        (Ok(()), _) => Ok(()),
    }
}

impl<D: BlockDevice> Conn<D> {
    /// Reads one request (and its payload), checks it and hands it to the executor.
    async fn next_request<R: AsyncRead + Unpin>(&self, reader: &mut R) -> Result<Step, NbdError> {
        let mut hdr = [0u8; proto::REQUEST_LEN];
        if !read_or_eof(reader, &mut hdr).await? {
            debug!("client hung up without NBD_CMD_DISC");
            return Ok(Step::Disconnect);
        }
        let req = Request::parse(&hdr);
        if req.magic != proto::REQUEST_MAGIC {
            warn!(magic = req.magic, "bad request magic; closing the connection");
            return Err(NbdError::Protocol(format!("bad request magic {:#010x}", req.magic)));
        }

        let (op, permits) = match req.kind {
            proto::CMD_READ => {
                let check = self
                    .check_flags(&req, proto::CMD_FLAG_FUA)
                    .and_then(|()| self.check_len(&req))
                    .and_then(|()| self.check_range(&req, BlockErrorKind::OutOfRange));
                let permits = self.permits(if check.is_ok() { req.len } else { 0 }).await;
                (ok_or_reply(check, &req, Op::Read), permits)
            }
            proto::CMD_WRITE => {
                if req.len > MAX_DISCARD_WRITE {
                    warn!(len = req.len, "NBD_CMD_WRITE payload is absurdly large; closing the connection");
                    return Err(NbdError::Protocol(format!("write of {} bytes", req.len)));
                }
                if req.len > MAX_BLOCK_SIZE {
                    warn!(len = req.len, "NBD_CMD_WRITE longer than the maximum block size; skipping its payload");
                    discard(reader, req.len.into()).await?;
                    (Op::Reply(proto::EINVAL), self.permits(0).await)
                } else {
                    // Take the budget before reading the payload, so that a client cannot
                    // make the server buffer more than MAX_BYTES_IN_FLIGHT.
                    let permits = self.permits(req.len).await;
                    let data = read_payload(reader, req.len as usize).await?;
                    let check = self
                        .check_flags(&req, proto::CMD_FLAG_FUA)
                        .and_then(|()| self.check_range(&req, BlockErrorKind::NoSpace));
                    (ok_or_reply(check, &req, Op::Write(data)), permits)
                }
            }
            proto::CMD_DISC => {
                debug!("NBD_CMD_DISC");
                return Ok(Step::Disconnect);
            }
            proto::CMD_FLUSH => {
                // Offset and length are reserved; they are ignored rather than refused.
                let check = self.check_flags(&req, proto::CMD_FLAG_FUA);
                (ok_or_reply(check, &req, Op::Flush), self.permits(0).await)
            }
            proto::CMD_TRIM => {
                let check = self
                    .check_flags(&req, proto::CMD_FLAG_FUA)
                    .and_then(|()| self.check_range(&req, BlockErrorKind::OutOfRange));
                (ok_or_reply(check, &req, Op::Trim), self.permits(0).await)
            }
            proto::CMD_WRITE_ZEROES => {
                // NO_HOLE needs nothing special: the device writes zeros either way.
                let check = self
                    .check_flags(&req, proto::CMD_FLAG_FUA | proto::CMD_FLAG_NO_HOLE)
                    .and_then(|()| self.check_range(&req, BlockErrorKind::NoSpace));
                (ok_or_reply(check, &req, Op::WriteZeroes), self.permits(0).await)
            }
            kind => {
                warn!(kind, name = proto::command_name(kind), "unsupported command; replying EINVAL");
                (Op::Reply(proto::EINVAL), self.permits(0).await)
            }
        };
        match self.jobs.send(Job { req, op, permits }) {
            Ok(()) => Ok(Step::Continue),
            Err(_) => Ok(Step::ExecutorGone),
        }
    }

    fn check_flags(&self, req: &Request, allowed: u16) -> Result<(), u32> {
        if req.flags & !allowed != 0 {
            warn!(
                flags = req.flags,
                command = proto::command_name(req.kind),
                "command flags not valid for this command; replying EINVAL"
            );
            return Err(proto::EINVAL);
        }
        Ok(())
    }

    fn check_len(&self, req: &Request) -> Result<(), u32> {
        if req.len > MAX_BLOCK_SIZE {
            warn!(len = req.len, command = proto::command_name(req.kind), "request longer than the maximum block size");
            return Err(proto::EINVAL);
        }
        Ok(())
    }

    /// Checks the request against the device size; `past_end` is the error kind for a
    /// request reaching past the end (EINVAL for reads and trims, ENOSPC for writes).
    fn check_range(&self, req: &Request, past_end: BlockErrorKind) -> Result<(), u32> {
        let size = self.device.size();
        check_range(req.offset, req.len.into(), size).map_err(|e| {
            debug!(command = proto::command_name(req.kind), "{e}");
            errno_for(past_end)
        })
    }

    /// Takes the budget for one request with `bytes` bytes of payload.
    async fn permits(&self, bytes: u32) -> Permits {
        let count = self.count.clone().acquire_owned().await.expect("the semaphore is never closed");
        let bytes = if bytes == 0 {
            None
        } else {
            Some(self.bytes.clone().acquire_many_owned(bytes).await.expect("the semaphore is never closed"))
        };
        Permits { _count: count, _bytes: bytes }
    }
}

/// The operation for a request that passed its checks, or the error reply for one that
/// did not. A zero-length request succeeds without calling the device.
fn ok_or_reply(check: Result<(), u32>, req: &Request, op: Op) -> Op {
    match check {
        Err(errno) => Op::Reply(errno),
        Ok(()) if req.len == 0 && !matches!(op, Op::Flush) => Op::Reply(0),
        Ok(()) => op,
    }
}

/// Runs the device call of one job and builds its reply.
async fn execute<D: BlockDevice>(device: &D, job: Job) -> Reply {
    let Job { req, op, permits } = job;
    let call = async {
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        match op {
            Op::Reply(errno) => return Ok((errno, None)),
            Op::Read => {
                let data = device.read(req.offset, req.len).await?;
                if data.len() != req.len as usize {
                    // Sending it would desynchronise the client.
                    return Err(BlockError::new(
                        BlockErrorKind::Io,
                        format!("device returned {} bytes for a read of {}", data.len(), req.len),
                    ));
                }
                return Ok((0, Some(data)));
            }
            Op::Write(data) => device.write(req.offset, data, fua).await?,
            Op::Flush => device.flush().await?,
            Op::Trim => device.trim(req.offset, req.len.into(), fua).await?,
            Op::WriteZeroes => device.write_zeroes(req.offset, req.len.into(), fua).await?,
        }
        Ok((0, None))
    };
    let (error, data) = match AssertUnwindSafe(call).catch_unwind().await {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => {
            debug!(command = proto::command_name(req.kind), offset = req.offset, len = req.len, "device error: {e}");
            (errno_for(e.kind), None)
        }
        Err(_) => {
            error!(
                command = proto::command_name(req.kind),
                offset = req.offset,
                len = req.len,
                "device call panicked; replying EIO"
            );
            (proto::EIO, None)
        }
    };
    Reply { header: proto::simple_reply(error, req.handle), data, _permits: permits }
}

/// Reads exactly `len` bytes into a buffer of exactly that size, without zero-filling it.
async fn read_payload<R: AsyncRead + Unpin>(reader: &mut R, len: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(len);
    let mut limited = (&mut *reader).take(len as u64);
    while buf.len() < len {
        if limited.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "stream ended inside a write payload"));
        }
    }
    Ok(buf.freeze())
}

/// The executor task: runs the device calls of the jobs the reader sends, all
/// concurrently, and writes their replies in completion order, every reply that is ready
/// in one (vectored) write. Ends when the reader has gone and every job is answered.
async fn execute_and_reply<W, D>(
    mut writer: W,
    device: Arc<D>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
    D: BlockDevice,
{
    let vectored = writer.is_write_vectored();
    let mut in_flight = FuturesUnordered::new();
    let mut incoming: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut batch: Vec<Reply> = Vec::with_capacity(MAX_BATCH);
    let mut flat: Vec<u8> = Vec::new();
    let mut reader_open = true;
    loop {
        tokio::select! {
            biased;
            Some(reply) = in_flight.next(), if !in_flight.is_empty() => batch.push(reply),
            n = jobs.recv_many(&mut incoming, MAX_BATCH), if reader_open => {
                reader_open = n > 0;
                for job in incoming.drain(..) {
                    in_flight.push(execute(&*device, job));
                }
            }
            else => break,
        }
        // Gather every other reply that is ready now (polling newly pushed jobs too).
        std::future::poll_fn(|cx| {
            while batch.len() < MAX_BATCH {
                match in_flight.poll_next_unpin(cx) {
                    Poll::Ready(Some(reply)) => batch.push(reply),
                    _ => break,
                }
            }
            Poll::Ready(())
        })
        .await;
        if batch.is_empty() {
            continue;
        }
        if vectored {
            write_batch_vectored(&mut writer, &batch).await?;
        } else {
            write_batch_flat(&mut writer, &batch, &mut flat).await?;
        }
        writer.flush().await?;
        // Releases the budget of the replies just written.
        batch.clear();
    }
    writer.shutdown().await
}

async fn write_batch_vectored<W: AsyncWrite + Unpin>(writer: &mut W, batch: &[Reply]) -> io::Result<()> {
    let mut slices = [IoSlice::new(&[]); 2 * MAX_BATCH];
    let mut n = 0;
    for reply in batch {
        slices[n] = IoSlice::new(&reply.header);
        n += 1;
        if let Some(data) = &reply.data {
            slices[n] = IoSlice::new(data);
            n += 1;
        }
    }
    let mut bufs = &mut slices[..n];
    while !bufs.is_empty() {
        let written = writer.write_vectored(bufs).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, written);
    }
    Ok(())
}

async fn write_batch_flat<W: AsyncWrite + Unpin>(
    writer: &mut W,
    batch: &[Reply],
    flat: &mut Vec<u8>,
) -> io::Result<()> {
    flat.clear();
    for reply in batch {
        flat.extend_from_slice(&reply.header);
        if let Some(data) = &reply.data {
            if data.len() >= COPY_THRESHOLD {
                writer.write_all(flat).await?;
                flat.clear();
                writer.write_all(data).await?;
            } else {
                flat.extend_from_slice(data);
            }
        }
    }
    writer.write_all(flat).await
}
