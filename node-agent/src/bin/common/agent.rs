//! The node agent's entry point, shared by `peersan-node-agent`, `peersan agent` and the
//! benchmark (which runs its agents as `peersan-bench agent`), so that each of them can run
//! a node without needing the others to be built.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use peersan_node_agent::config::Config;
use peersan_node_agent::daemon::{self, Daemon};
use peersan_node_agent::k8s::{self, KubeArgs};

/// How to run a node agent: standalone from a configuration file (`--config`), or in
/// Kubernetes mode (`--kubernetes`), configured by its SANNode.
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Node configuration file (YAML): standalone mode.
    #[arg(long, short, env = "PEERSAN_CONFIG", required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
    pub config: Option<PathBuf>,
    /// Kubernetes mode: the configuration comes from the node's SANNode, volumes from
    /// MirrorVolumes, write priority from their Leases.
    #[arg(long)]
    pub kubernetes: bool,
    /// Check the configuration and exit.
    #[arg(long, requires = "config")]
    pub check: bool,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "PEERSAN_LOG", default_value = "info")]
    pub log: String,
    /// Worker threads of the runtime (default: one per CPU).
    #[arg(long, env = "PEERSAN_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    #[command(flatten)]
    pub kube: KubeArgs,
}

/// Runs a node until SIGTERM or Ctrl-C.
pub fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).context("--log")?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mode = match &args.config {
        Some(path) => {
            let config = Config::load(path)?;
            if args.check {
                println!("{}: configuration is valid", path.display());
                return Ok(());
            }
            Mode::Standalone(config)
        }
        None => Mode::Kubernetes(args.kube.options()?),
    };
    let serves_csi = match &mode {
        Mode::Standalone(c) => c.csi.is_some(),
        Mode::Kubernetes(o) => o.csi_socket.is_some(),
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.worker_threads {
        rt.worker_threads(n);
    }
    // A process that serves its own loop devices (the FUSE frontend) must not be throttled
    // or blocked by writeback of those devices under memory pressure: its threads are
    // marked as I/O flushers (PR_SET_IO_FLUSHER, which needs CAP_SYS_RESOURCE).
    if serves_csi {
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
    let rt = rt.enable_all().build()?;
    match mode {
        Mode::Standalone(config) => rt.block_on(run(config)),
        Mode::Kubernetes(opts) => Ok(rt.block_on(k8s::run(opts))?),
    }
}

enum Mode {
    Standalone(Config),
    Kubernetes(k8s::Options),
}

async fn run(config: Config) -> anyhow::Result<()> {
    let peer_listener = daemon::bind_peer("listen.peer", config.listen.peer).await?;
    let daemon = Daemon::start(config, peer_listener).await?;
    daemon::terminated().await?;
    daemon.shutdown().await;
    Ok(())
}
