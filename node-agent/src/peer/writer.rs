//! Batching frame writer shared by both ends of a peer connection: producers append
//! encoded frames to one buffer, a task writes whatever has accumulated with one syscall.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

pub struct FrameWriter {
    buf: Mutex<BytesMut>,
    wake: Notify,
    closed: AtomicBool,
    /// Notified once when the writer stops (closed, or the socket failed).
    pub stopped: Arc<Notify>,
}

impl FrameWriter {
    pub fn spawn<W: AsyncWrite + Unpin + Send + 'static>(mut wr: W) -> Arc<FrameWriter> {
        let w = Arc::new(FrameWriter {
            buf: Mutex::new(BytesMut::with_capacity(64 << 10)),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            stopped: Arc::new(Notify::new()),
        });
        let me = w.clone();
        tokio::spawn(async move {
            let mut out = BytesMut::with_capacity(64 << 10);
            loop {
                let notified = me.wake.notified();
                {
                    let mut b = me.buf.lock().unwrap();
                    if !b.is_empty() {
                        std::mem::swap(&mut *b, &mut out);
                    }
                }
                if out.is_empty() {
                    if me.closed.load(Ordering::Acquire) {
                        break;
                    }
                    notified.await;
                    continue;
                }
                if wr.write_all(&out).await.is_err() {
                    me.closed.store(true, Ordering::Release);
                    break;
                }
                out.clear();
                if out.capacity() > (4 << 20) {
                    out = BytesMut::with_capacity(64 << 10);
                }
            }
            let _ = wr.shutdown().await;
            me.stopped.notify_one();
        });
        w
    }

    /// Appends one or more frames (the closure encodes into the buffer) and wakes the task.
    pub fn push<R>(&self, encode: impl FnOnce(&mut BytesMut) -> R) -> R {
        let r = encode(&mut self.buf.lock().unwrap());
        self.wake.notify_one();
        r
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Stops after writing what is buffered.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}
