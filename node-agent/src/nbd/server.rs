//! Accept loops and per-connection driver.

use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, debug_span, error, warn};

use super::transmission::{self, Shutdown};
use super::{Exports, HANDSHAKE_TIMEOUT, NbdError, handshake};

/// Size of the buffered reader on a connection's socket. Large enough to pick up a full
/// queue of small pipelined requests with one read.
const READ_BUFFER: usize = 256 * 1024;
/// After shutdown has been requested, how long connections get to finish the requests in
/// flight before they are aborted.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves NBD on a unix socket until `shutdown` completes. Each connection runs in its
/// own task; a failing connection never stops the listener. On shutdown, stops accepting,
/// lets every connection finish the requests it has in flight (up to a grace period),
/// then closes them.
pub async fn serve_unix<E: Exports>(listener: UnixListener, exports: Arc<E>, shutdown: impl Future) {
    accept_loop(Unix(listener), exports, shutdown).await;
}

/// Serves NBD on a TCP socket until `shutdown` completes; see [`serve_unix`].
pub async fn serve_tcp<E: Exports>(listener: TcpListener, exports: Arc<E>, shutdown: impl Future) {
    accept_loop(Tcp(listener), exports, shutdown).await;
}

/// Serves one NBD connection (handshake and transmission) on any byte stream. Returns
/// when the client disconnects; an error says why the connection ended abnormally.
pub async fn serve_connection<S, E>(stream: S, exports: Arc<E>) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    E: Exports,
{
    let (reader, writer) = tokio::io::split(stream);
    run_connection(reader, writer, exports, Shutdown::never(), HANDSHAKE_TIMEOUT).await
}

pub(crate) async fn run_connection<R, W, E>(
    mut reader: R,
    mut writer: W,
    exports: Arc<E>,
    mut shutdown: Shutdown,
    handshake_timeout: Duration,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
    E: Exports,
{
    // The handshake reads the socket unbuffered (a few small messages), so nothing is
    // read ahead and the large transmission buffer is only allocated for clients that
    // complete it.
    let handshake = tokio::time::timeout(handshake_timeout, handshake::negotiate(&mut reader, &mut writer, &*exports));
    let negotiated = tokio::select! {
        biased;
        () = shutdown.wait() => return Ok(()),
        n = handshake => match n {
            Ok(n) => n?,
            Err(_) => {
                warn!(?handshake_timeout, "client did not complete the handshake in time; closing");
                return Err(NbdError::Protocol("handshake timed out".into()));
            }
        },
    };
    let Some(negotiated) = negotiated else {
        return Ok(());
    };
    debug!(export = %negotiated.name, "transmission phase");
    let reader = BufReader::with_capacity(READ_BUFFER, reader);
    transmission::serve(reader, writer, negotiated.device, shutdown).await
}

/// A listening socket whose connections can be split into independently owned halves.
trait Listener: Send {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;

    /// Accepts a connection; returns its halves and a description of the peer.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Read, Self::Write, String)>> + Send;
}

struct Unix(UnixListener);

impl Listener for Unix {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;

    async fn accept(&self) -> io::Result<(Self::Read, Self::Write, String)> {
        let (stream, addr) = self.0.accept().await?;
        let peer = match addr.as_pathname() {
            Some(path) => path.display().to_string(),
            None => "unix".to_owned(),
        };
        let (r, w) = stream.into_split();
        Ok((r, w, peer))
    }
}

struct Tcp(TcpListener);

impl Listener for Tcp {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;

    async fn accept(&self) -> io::Result<(Self::Read, Self::Write, String)> {
        let (stream, addr) = self.0.accept().await?;
        // Replies are written in batches already; don't let Nagle delay them further.
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "could not set TCP_NODELAY");
        }
        let (r, w) = stream.into_split();
        Ok((r, w, addr.to_string()))
    }
}

async fn accept_loop<L: Listener, E: Exports>(listener: L, exports: Arc<E>, shutdown: impl Future) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut next_id: u64 = 0;
    let mut shutdown = pin!(shutdown);

    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = joined
                    && e.is_panic() {
                        error!("NBD connection task panicked");
                    }
            }
            accepted = listener.accept() => match accepted {
                Ok((reader, writer, peer)) => {
                    next_id += 1;
                    let span = debug_span!("nbd_conn", id = next_id, peer = %peer);
                    let exports = exports.clone();
                    let stop = Shutdown::new(stop_rx.clone());
                    connections.spawn(
                        async move {
                            debug!("connection opened");
                            let result =
                                run_connection(reader, writer, exports, stop, HANDSHAKE_TIMEOUT).await;
                            match result {
                                Ok(()) => debug!("connection closed"),
                                Err(e) => debug!(error = %e, "connection closed abnormally"),
                            }
                        }
                        .instrument(span),
                    );
                }
                Err(e) => {
                    warn!(error = %e, "accepting an NBD connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }

    drop(listener);
    let open = connections.len();
    debug!(open, "NBD server shutting down");
    let _ = stop_tx.send(true);
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        warn!(
            left = connections.len(),
            "NBD connections did not finish within the shutdown grace period; aborting them"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
}
