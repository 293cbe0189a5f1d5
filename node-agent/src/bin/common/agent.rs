//! The node agent's entry point, shared by `peersan-node-agent`, `peersan agent` and the
//! benchmark (which runs its agents as `peersan-bench agent`), so that each of them can run
//! a node without needing the others to be built.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use peersan_node_agent::agent::Node;
use peersan_node_agent::config::Config;
use peersan_node_agent::csi::{self, StageRecords};
use peersan_node_agent::frontend::Frontends;
use peersan_node_agent::{api, nbd, peer};

/// How to run a node agent.
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Node configuration file (YAML).
    #[arg(long, short, env = "PEERSAN_CONFIG")]
    pub config: PathBuf,
    /// Check the configuration and exit.
    #[arg(long)]
    pub check: bool,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "PEERSAN_LOG", default_value = "info")]
    pub log: String,
    /// Worker threads of the runtime (default: one per CPU).
    #[arg(long, env = "PEERSAN_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
}

/// Runs a node until SIGTERM or Ctrl-C.
pub fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).context("--log")?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = Config::load(&args.config)?;
    if args.check {
        println!("{}: configuration is valid", args.config.display());
        return Ok(());
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.worker_threads {
        rt.worker_threads(n);
    }
    // A process that serves its own loop devices (the FUSE frontend) must not be throttled
    // or blocked by writeback of those devices under memory pressure: its threads are
    // marked as I/O flushers (PR_SET_IO_FLUSHER, which needs CAP_SYS_RESOURCE).
    if config.csi.is_some() {
        match peersan_node_agent::fuse::become_io_flusher() {
            Ok(()) => {
                rt.on_thread_start(|| {
                    let _ = peersan_node_agent::fuse::become_io_flusher();
                });
            }
            Err(e) => tracing::warn!(
                error = %e,
                "cannot mark the agent's threads as I/O flushers (needs CAP_SYS_RESOURCE); \
                 under memory pressure, writeback to staged volumes may stall"
            ),
        }
    }
    rt.enable_all().build()?.block_on(run(config))
}

fn bind_unix(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale socket {}", path.display())),
    }
    tokio::net::UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let peer_listener = tokio::net::TcpListener::bind(config.listen.peer)
        .await
        .with_context(|| format!("listen.peer: cannot bind {}", config.listen.peer))?;
    let node = Node::new(config).context("starting the node")?;
    let cfg = node.config.clone();
    tracing::info!(node = %cfg.node.name, peer = %cfg.listen.peer, volumes = node.volumes().len(), "node agent starting");

    let hs = Arc::new(node.ctx.handshake.clone());
    tokio::spawn(peer::server::serve(peer_listener, hs, node.clone()));
    // Learn from peers whether local replicas missed writes before serving any I/O.
    node.settle().await;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let nbd_unix = bind_unix(&cfg.listen.nbd_unix).context("listen.nbd_unix")?;
    let mut frontends = vec![tokio::spawn(nbd::serve_unix(nbd_unix, node.clone(), wait_stop(stop_rx.clone())))];
    if let Some(addr) = cfg.listen.nbd_tcp {
        let l =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listen.nbd_tcp: cannot bind {addr}"))?;
        frontends.push(tokio::spawn(nbd::serve_tcp(l, node.clone(), wait_stop(stop_rx.clone()))));
    }
    let api_listener = bind_unix(&cfg.listen.api).context("listen.api")?;
    let api = tokio::spawn(api::serve(api_listener, node.clone(), wait_stop(stop_rx.clone())));
    let csi = match &cfg.csi {
        Some(c) => {
            let listener = bind_unix(&c.socket).context("csi.socket")?;
            let frontends = Arc::new(Frontends::new(c.fuse_dir(&cfg)));
            let records = StageRecords::new(c.state_dir(&cfg));
            tracing::info!(csi = %c.socket.display(), "serving CSI (Identity, Node)");
            Some(tokio::spawn(csi::serve(listener, node.clone(), frontends, records, wait_stop(stop_rx.clone()))))
        }
        None => None,
    };
    tracing::info!(api = %cfg.listen.api.display(), nbd = %cfg.listen.nbd_unix.display(), "node agent ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    // Let the requests clients have in flight finish (mirrored as usual) before the
    // engines stop: a write cut off half-way would mark peers out of sync for nothing.
    for f in frontends {
        let _ = f.await;
    }
    // Durable, stopped, bitmaps complete: the next start need not replay the activity log.
    node.shutdown().await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), api).await;
    if let Some(csi) = csi {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), csi).await;
    }
    let _ = std::fs::remove_file(&cfg.listen.api);
    let _ = std::fs::remove_file(&cfg.listen.nbd_unix);
    Ok(())
}
