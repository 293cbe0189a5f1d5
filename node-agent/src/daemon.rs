//! A running node agent: a [`Node`] with its peer listener, NBD frontend, agent API and (when
//! configured) CSI Node service, and their clean shutdown. Standalone mode and Kubernetes mode
//! start and stop a node the same way, through [`Daemon`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::agent::{AgentError, Node};
use crate::config::Config;
use crate::csi::{self, StageRecords};
use crate::frontend::Frontends;
use crate::{api, nbd, peer};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A listener could not be bound; `what` names the setting.
    #[error("{what}: cannot bind {address}: {source}")]
    Bind { what: String, address: String, source: std::io::Error },
    /// A socket's directory could not be made, or a stale socket removed.
    #[error("{what}: {context}: {source}")]
    Socket { what: String, context: String, source: std::io::Error },
    /// The node could not open its pool, secret or replicas.
    #[error("starting the node: {0}")]
    Node(#[from] AgentError),
}

/// Binds the peer protocol's listener.
pub async fn bind_peer(what: &str, addr: SocketAddr) -> Result<TcpListener, DaemonError> {
    TcpListener::bind(addr).await.map_err(|source| DaemonError::Bind {
        what: what.to_owned(),
        address: addr.to_string(),
        source,
    })
}

/// Binds a unix socket, creating its directory and replacing a stale socket file.
pub fn bind_unix(what: &str, path: &Path) -> Result<UnixListener, DaemonError> {
    let err = |context: String, source| DaemonError::Socket { what: what.to_owned(), context, source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("creating {}", dir.display()), e))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(format!("removing stale socket {}", path.display()), e)),
    }
    UnixListener::bind(path).map_err(|source| DaemonError::Bind {
        what: what.to_owned(),
        address: path.display().to_string(),
        source,
    })
}

/// A node and its servers.
pub struct Daemon {
    pub node: Arc<Node>,
    stop: watch::Sender<bool>,
    frontends: Vec<JoinHandle<()>>,
    api: JoinHandle<()>,
    csi: Option<JoinHandle<()>>,
    sockets: Vec<PathBuf>,
}

impl Daemon {
    /// Starts the node of `config` on the bound `peer_listener`: opens the pool and starts an
    /// engine per volume, serves the peer protocol, learns from the peers whether local
    /// replicas missed writes (before serving any I/O), then serves NBD (unix socket, and
    /// TCP if configured), the agent API and, when configured, CSI.
    pub async fn start(config: Config, peer_listener: TcpListener) -> Result<Daemon, DaemonError> {
        let node = Node::new(config)?;
        let cfg = node.config.clone();
        tracing::info!(node = %cfg.node.name, peer = %cfg.listen.peer, volumes = node.volumes().len(), "node agent starting");

        let hs = Arc::new(node.ctx.handshake.clone());
        tokio::spawn(peer::server::serve(peer_listener, hs, node.clone()));
        // Learn from peers whether local replicas missed writes before serving any I/O.
        node.settle().await;

        let (stop, stop_rx) = watch::channel(false);
        let wait_stop = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let nbd_unix = bind_unix("listen.nbd_unix", &cfg.listen.nbd_unix)?;
        let mut frontends = vec![tokio::spawn(nbd::serve_unix(nbd_unix, node.clone(), wait_stop(stop_rx.clone())))];
        if let Some(addr) = cfg.listen.nbd_tcp {
            let l = TcpListener::bind(addr).await.map_err(|source| DaemonError::Bind {
                what: "listen.nbd_tcp".into(),
                address: addr.to_string(),
                source,
            })?;
            frontends.push(tokio::spawn(nbd::serve_tcp(l, node.clone(), wait_stop(stop_rx.clone()))));
        }
        let api_listener = bind_unix("listen.api", &cfg.listen.api)?;
        let api = {
            let (node, shutdown) = (node.clone(), wait_stop(stop_rx.clone()));
            tokio::spawn(async move {
                if let Err(e) = api::serve(api_listener, node, shutdown).await {
                    tracing::error!(error = %e, "agent API server failed");
                }
            })
        };
        let csi = match &cfg.csi {
            Some(c) => {
                let listener = bind_unix("csi.socket", &c.socket)?;
                let frontends = Arc::new(Frontends::new(c.fuse_dir(&cfg)));
                let records = StageRecords::new(c.state_dir(&cfg));
                tracing::info!(csi = %c.socket.display(), "serving CSI (Identity, Node)");
                let (node, shutdown) = (node.clone(), wait_stop(stop_rx.clone()));
                Some(tokio::spawn(async move {
                    if let Err(e) = csi::serve(listener, node, frontends, records, shutdown).await {
                        tracing::error!(error = %e, "CSI server failed");
                    }
                }))
            }
            None => None,
        };
        tracing::info!(api = %cfg.listen.api.display(), nbd = %cfg.listen.nbd_unix.display(), "node agent ready");
        Ok(Daemon {
            node,
            stop,
            frontends,
            api,
            csi,
            sockets: vec![cfg.listen.api.clone(), cfg.listen.nbd_unix.clone()],
        })
    }

    /// Clean shutdown: the frontends stop taking requests and finish the ones in flight
    /// (mirrored as usual), then everything acknowledged is made durable and the engines
    /// stop with complete bitmaps, so the next start need not replay the activity log.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        let _ = self.stop.send(true);
        // Let the requests clients have in flight finish before the engines stop: a write
        // cut off half-way would mark peers out of sync for nothing.
        for f in self.frontends {
            let _ = f.await;
        }
        self.node.shutdown().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.api).await;
        if let Some(csi) = self.csi {
            let _ = tokio::time::timeout(Duration::from_secs(2), csi).await;
        }
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
    }
}

/// Resolves at SIGTERM or SIGINT (Ctrl-C).
pub async fn terminated() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}
