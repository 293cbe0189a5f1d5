//! Batching frame writer shared by both ends of a peer connection: producers append
//! encoded frames, a task writes whatever has accumulated with as few syscalls as it can.
//!
//! Small frames are encoded into one buffer; large payloads (see
//! [`super::proto::VECTORED_MIN`]) are queued as the `Bytes` they arrived in and written
//! with vectored I/O, so data is never copied on its way to the socket.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

/// Slices handed to one `writev`.
const MAX_IOV: usize = 64;

#[derive(Default)]
struct Queue {
    /// Complete chunks, in order.
    chunks: VecDeque<Bytes>,
    /// Bytes encoded after the last chunk.
    tail: BytesMut,
}

pub struct FrameWriter {
    queue: Mutex<Queue>,
    wake: Notify,
    closed: AtomicBool,
}

impl FrameWriter {
    pub fn spawn<W: AsyncWrite + Unpin + Send + 'static>(mut wr: W) -> Arc<FrameWriter> {
        let w = Arc::new(FrameWriter {
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
        });
        let me = w.clone();
        tokio::spawn(async move {
            let mut out: VecDeque<Bytes> = VecDeque::new();
            loop {
                let notified = me.wake.notified();
                {
                    let mut q = me.queue.lock().unwrap();
                    out.append(&mut q.chunks);
                    if !q.tail.is_empty() {
                        out.push_back(q.tail.split().freeze());
                    }
                }
                if out.is_empty() {
                    if me.closed.load(Ordering::Acquire) {
                        break;
                    }
                    notified.await;
                    continue;
                }
                if write_chunks(&mut wr, &mut out).await.is_err() {
                    me.closed.store(true, Ordering::Release);
                    break;
                }
            }
            let _ = wr.shutdown().await;
        });
        w
    }

    /// Appends one frame: `encode` writes the frame (or its header) into the buffer and
    /// returns the payload to send after it, if it left the payload out.
    pub fn push<E>(&self, encode: impl FnOnce(&mut BytesMut) -> Result<Option<Bytes>, E>) -> Result<(), E> {
        {
            let mut q = self.queue.lock().unwrap();
            let payload = encode(&mut q.tail)?;
            if let Some(data) = payload {
                let head = q.tail.split().freeze();
                q.chunks.push_back(head);
                q.chunks.push_back(data);
            }
        }
        self.wake.notify_one();
        Ok(())
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Stops after writing what is queued.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

async fn write_chunks<W: AsyncWrite + Unpin>(wr: &mut W, out: &mut VecDeque<Bytes>) -> std::io::Result<()> {
    while !out.is_empty() {
        let n = {
            let iov: Vec<IoSlice<'_>> = out.iter().take(MAX_IOV).map(|b| IoSlice::new(b)).collect();
            wr.write_vectored(&iov).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut left = n;
        while left > 0 {
            let front = out.front_mut().expect("wrote more than queued");
            if front.len() <= left {
                left -= front.len();
                out.pop_front();
            } else {
                front.advance(left);
                left = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn frames_and_payloads_arrive_in_order() {
        let (a, mut b) = tokio::io::duplex(1 << 10);
        let w = FrameWriter::spawn(a);
        let big = Bytes::from(vec![7u8; 100_000]);
        w.push(|buf| {
            buf.extend_from_slice(b"head1");
            Ok::<_, ()>(None)
        })
        .unwrap();
        w.push(|buf| {
            buf.extend_from_slice(b"head2");
            Ok::<_, ()>(Some(big.clone()))
        })
        .unwrap();
        w.push(|buf| {
            buf.extend_from_slice(b"tail");
            Ok::<_, ()>(None)
        })
        .unwrap();
        w.close();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        let mut want = b"head1head2".to_vec();
        want.extend_from_slice(&big);
        want.extend_from_slice(b"tail");
        assert_eq!(got, want);
    }
}
