//! The serving side of the peer protocol: authenticates a connecting peer, binds the
//! connection to a volume (`Open`) and executes its requests concurrently, replying in
//! completion order.

use std::sync::Arc;

use bytes::BytesMut;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::net::{TcpListener, TcpStream};

use super::handshake::{HandshakeConfig, server_handshake};
use super::proto::{ErrorCode, Frame, Reply, Request, encode_reply_vectored, read_frame};
use super::writer::FrameWriter;
use crate::engine::Volume;

/// What the peer server needs of the node: its volumes, and volume lifecycle.
pub trait VolumeLookup: Send + Sync + 'static {
    fn volume(&self, name: &str) -> Option<Arc<Volume>>;
    /// Creates the local replica of a volume that a peer created (idempotent). A refusal
    /// carries the code to answer with: `OutOfRange` when this node lacks the space,
    /// `Invalid` otherwise.
    fn create_volume(&self, name: &str, size: u64, replicas: &[String]) -> Result<(), (ErrorCode, String)>;
    /// Deletes the local replica of a volume that a peer deleted.
    fn delete_volume(&self, name: &str) -> Result<(), String>;
}

/// Accepts peer connections until the task is dropped.
pub async fn serve<L: VolumeLookup>(listener: TcpListener, hs: Arc<HandshakeConfig>, volumes: Arc<L>) {
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                let hs = hs.clone();
                let volumes = volumes.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_conn(stream, &hs, volumes).await {
                        tracing::warn!(%addr, error = %e, "peer connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_conn<L: VolumeLookup>(
    mut stream: TcpStream,
    hs: &HandshakeConfig,
    volumes: Arc<L>,
) -> Result<(), String> {
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let hello = server_handshake(&mut stream, hs).await.map_err(|e| e.to_string())?;
    let peer = hello.node_name;
    let (mut rd, wr) = stream.into_split();
    let writer = FrameWriter::spawn(wr);
    let mut rbuf = BytesMut::with_capacity(256 << 10);

    // The first request binds the connection to a volume.
    let (volume, idx, (session_id, mut session, _serving)) = match read_frame(&mut rd, &mut rbuf).await.transpose() {
        Some(Ok(Frame::Request { id, req: Request::Open { volume, from_node, state } })) => {
            let reply_err = |code, message: String| {
                send(&writer, id, &Reply::Error { code, message: message.clone() });
                writer.close();
                message
            };
            if from_node != peer {
                return Err(reply_err(
                    ErrorCode::Invalid,
                    format!("authenticated as {peer:?} but opened as {from_node:?}"),
                ));
            }
            let Some(v) = volumes.volume(&volume) else {
                return Err(reply_err(ErrorCode::UnknownVolume, format!("no volume {volume:?} on this node")));
            };
            let Some(idx) = v.replica_index(&peer).filter(|&i| v.spec().replicas[i] != hs.node_name) else {
                return Err(reply_err(
                    ErrorCode::UnknownVolume,
                    format!("node {peer:?} holds no replica of {volume:?}"),
                ));
            };
            // Replicas of different sizes (a volume being grown one node at a time) connect:
            // the engine keeps writes and reads within each replica's end.
            let Some(session) = v.begin_peer_session(idx).await else {
                return Err(reply_err(
                    ErrorCode::UnknownVolume,
                    format!("node {peer:?} holds no replica of {volume:?}"),
                ));
            };
            let ours = v.peer_open(idx, state);
            send(&writer, id, &Reply::Opened { state: ours });
            (v, idx, session)
        }
        Some(Ok(Frame::Request { id, req: Request::CreateVolume { volume, size, replicas } })) => {
            let reply = match volumes.create_volume(&volume, size, &replicas) {
                Ok(()) => Reply::Ok,
                Err((code, message)) => Reply::Error { code, message },
            };
            send(&writer, id, &reply);
            writer.close();
            return Ok(());
        }
        Some(Ok(Frame::Request { id, req: Request::DeleteVolume { volume } })) => {
            let reply = match volumes.delete_volume(&volume) {
                Ok(()) => Reply::Ok,
                Err(message) => Reply::Error { code: ErrorCode::UnknownVolume, message },
            };
            send(&writer, id, &reply);
            writer.close();
            return Ok(());
        }
        Some(Ok(_)) => {
            writer.close();
            return Err("first request was not Open".into());
        }
        Some(Err(e)) => return Err(e.to_string()),
        None => return Ok(()),
    };
    tracing::debug!(%peer, volume = %volume.name(), "peer opened volume");

    let mut inflight = FuturesUnordered::new();
    let mut missed = volume.missed_writes_watch(idx).ok_or("no link for this peer")?;
    let result = loop {
        tokio::select! {
            // We recorded that this peer missed writes: make it reconnect, so that it learns
            // from our state at `Open` that it is out of date.
            Ok(()) = missed.changed() => {
                break Err(format!("{peer} missed writes; closing its connection so that it resynchronises"));
            }
            // The peer opened a newer connection: this one is abandoned; what is still
            // unread on it must not be executed.
            Ok(()) = session.changed() => {
                if *session.borrow_and_update() != session_id {
                    break Err(format!("{peer} opened a newer connection; closing this one"));
                }
            }
            Some((id, reply)) = inflight.next(), if !inflight.is_empty() => {
                send(&writer, id, &reply);
            }
            // read_frame keeps its state in `rbuf`, so it is safe to cancel here.
            frame = read_frame(&mut rd, &mut rbuf) => match frame.transpose() {
                Some(Ok(Frame::Request { id, req })) => {
                    let v = volume.clone();
                    inflight.push(async move { (id, v.serve_peer(idx, session_id, req).await) });
                }
                Some(Ok(Frame::Reply { .. })) => break Err("peer sent a reply on a request stream".to_string()),
                Some(Err(e)) if !e.is_fatal() => {
                    // The framing is intact: refuse exactly this request and go on.
                    tracing::warn!(%peer, error = %e, "bad frame refused; nothing executed");
                    if let Some((id, code)) = e.reply_for_request() {
                        let message = format!("request not executed: {e}");
                        send(&writer, id, &Reply::Error { code, message });
                    }
                }
                Some(Err(e)) => break Err(e.to_string()),
                None => break Ok(()),
            },
        }
    };
    // Region grants given on this connection end with it (and none is given while what was
    // started is finished).
    volume.peer_session_ended(idx, session_id);
    // Finish what was started, so that nothing half-done is left behind by this peer.
    while let Some((id, reply)) = inflight.next().await {
        send(&writer, id, &reply);
    }
    writer.close();
    result
}

fn send(writer: &FrameWriter, id: u64, reply: &Reply) {
    if let Err(e) = writer.push(|b| encode_reply_vectored(id, reply, b)) {
        tracing::error!(id, error = %e, "cannot encode reply");
    }
}
