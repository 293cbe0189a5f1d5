//! The requesting side of a peer connection: pipelined requests with ids, replies matched
//! by id, and a per-request timeout after which the connection is declared dead.
//!
//! Callers append encoded frames to a shared buffer; one writer task drains it with a
//! single `write_all` per batch, so many requests in flight cost few syscalls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::sync::{Notify, oneshot};

use super::handshake::{HandshakeConfig, client_handshake};
use super::proto::{ErrorCode, Frame, ReplicaStateMsg, Reply, Request, encode_request_vectored, read_frame};
use super::writer::FrameWriter;

#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    #[error("connection to {peer} lost")]
    Disconnected { peer: String },
    #[error("{peer} did not answer within {timeout:?}")]
    Timeout { peer: String, timeout: Duration },
    #[error("{peer} answered {code:?}: {message}")]
    Remote { peer: String, code: ErrorCode, message: String },
    #[error("cannot connect to {peer} at {address}: {message}")]
    Connect { peer: String, address: String, message: String },
    #[error("{peer} sent an unexpected reply: {message}")]
    Protocol { peer: String, message: String },
}

type Pending = Mutex<HashMap<u64, oneshot::Sender<Reply>>>;

/// An established, authenticated connection to a peer, bound to one volume.
pub struct PeerConn {
    peer: String,
    timeout: Duration,
    writer: Arc<FrameWriter>,
    pending: Arc<Pending>,
    next_id: AtomicU64,
    closed: Arc<AtomicBool>,
    closed_notify: Arc<Notify>,
}

impl std::fmt::Debug for PeerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConn").field("peer", &self.peer).finish()
    }
}

impl PeerConn {
    /// Connects, authenticates and opens `volume` on the peer. Returns the connection and
    /// the peer's replica state.
    pub async fn connect(
        peer: &str,
        address: &str,
        hs: &HandshakeConfig,
        volume: &str,
        state: ReplicaStateMsg,
        io_timeout: Duration,
    ) -> Result<(Arc<PeerConn>, ReplicaStateMsg), PeerError> {
        let conn = Self::establish(peer, address, hs, io_timeout).await?;
        let opened =
            conn.call(Request::Open { volume: volume.to_owned(), from_node: hs.node_name.clone(), state }).await;
        match opened {
            Ok(Reply::Opened { state }) => Ok((conn, state)),
            Ok(other) => {
                conn.close();
                Err(PeerError::Protocol { peer: peer.into(), message: format!("expected Opened, got {other:?}") })
            }
            Err(e) => {
                conn.close();
                Err(e)
            }
        }
    }

    /// Connects and authenticates, without binding the connection to a volume.
    pub async fn establish(
        peer: &str,
        address: &str,
        hs: &HandshakeConfig,
        io_timeout: Duration,
    ) -> Result<Arc<PeerConn>, PeerError> {
        let cerr = |message: String| PeerError::Connect { peer: peer.into(), address: address.into(), message };
        let mut stream = tokio::time::timeout(hs.timeout, TcpStream::connect(address))
            .await
            .map_err(|_| cerr(format!("no answer within {:?}", hs.timeout)))?
            .map_err(|e| cerr(e.to_string()))?;
        stream.set_nodelay(true).map_err(|e| cerr(e.to_string()))?;
        // A connection that is dropped (peer failed or timed out) is reset, not drained:
        // writes still queued in the socket must not reach the peer later, when the link
        // heals, after the peer has been resynchronised.
        #[allow(deprecated)]
        stream.set_linger(Some(Duration::ZERO)).map_err(|e| cerr(e.to_string()))?;
        let hello = client_handshake(&mut stream, hs).await.map_err(|e| cerr(e.to_string()))?;
        if hello.node_name != peer {
            return Err(cerr(format!("the node at this address is {:?}, not {peer:?}", hello.node_name)));
        }
        let (rd, wr) = stream.into_split();
        let conn = Arc::new(PeerConn {
            peer: peer.to_owned(),
            timeout: io_timeout,
            writer: FrameWriter::spawn(wr),
            pending: Arc::new(Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(1),
            closed: Arc::new(AtomicBool::new(false)),
            closed_notify: Arc::new(Notify::new()),
        });
        // Reader: completes pending requests.
        let r = conn.clone();
        tokio::spawn(async move {
            let mut rd = rd;
            let mut buf = BytesMut::with_capacity(256 << 10);
            loop {
                match read_frame(&mut rd, &mut buf).await {
                    Ok(Some(Frame::Reply { id, reply })) => {
                        let tx = r.pending.lock().unwrap().remove(&id);
                        if let Some(tx) = tx {
                            let _ = tx.send(reply);
                        }
                    }
                    Ok(Some(Frame::Request { .. })) => {
                        tracing::warn!(peer = %r.peer, "peer sent a request on a reply stream; closing");
                        break;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        // A reply that cannot be decoded can't be matched to its request:
                        // the connection is no longer trustworthy.
                        tracing::warn!(peer = %r.peer, error = %e, "bad reply from peer; closing");
                        break;
                    }
                }
            }
            r.close();
        });
        Ok(conn)
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Closes the connection; every pending and later request fails with `Disconnected`.
    pub fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.pending.lock().unwrap().clear();
            self.writer.close();
            self.closed_notify.notify_waiters();
        }
    }

    /// Resolves when the connection is closed.
    pub async fn closed(&self) {
        loop {
            let n = self.closed_notify.notified();
            if self.is_closed() {
                return;
            }
            n.await;
        }
    }

    /// Sends one request and waits for its reply. An `Error` reply becomes
    /// `PeerError::Remote`. A timeout closes the connection: a peer that does not answer
    /// one request within the bound is not trusted with the others.
    pub async fn call(&self, req: Request) -> Result<Reply, PeerError> {
        self.call_with_timeout(req, self.timeout).await
    }

    pub async fn call_with_timeout(&self, req: Request, timeout: Duration) -> Result<Reply, PeerError> {
        let disconnected = || PeerError::Disconnected { peer: self.peer.clone() };
        if self.is_closed() {
            return Err(disconnected());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        if let Err(e) = self.writer.push(|b| encode_request_vectored(id, &req, b)) {
            self.pending.lock().unwrap().remove(&id);
            return Err(PeerError::Protocol { peer: self.peer.clone(), message: e.to_string() });
        }
        drop(req);
        if self.is_closed() {
            // Closed between the check and the insert: make sure nobody waits forever.
            self.pending.lock().unwrap().remove(&id);
            return Err(disconnected());
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Reply::Error { code, message })) => Err(PeerError::Remote { peer: self.peer.clone(), code, message }),
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(disconnected()),
            Err(_) => {
                tracing::warn!(peer = %self.peer, ?timeout, "peer did not answer in time; dropping the connection");
                self.close();
                Err(PeerError::Timeout { peer: self.peer.clone(), timeout })
            }
        }
    }
}

impl Drop for PeerConn {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
    }
}
