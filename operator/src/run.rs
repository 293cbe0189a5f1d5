//! The operator process: logging, the async runtime, the controller and the HTTP endpoints,
//! until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::events::Reporter;
use anyhow::Context as _;
use futures::StreamExt;
use tracing::info;

pub use crate::config::OperatorArgs;
use crate::http::{self, Probes};
use crate::metrics::Metrics;
use crate::{MANAGER, controller};

/// Runs the operator until SIGTERM or Ctrl-C: sets up logging (to stderr, filtered by
/// `--log`), a Tokio runtime, the Kubernetes client (`KUBECONFIG`, else in-cluster), the
/// controller and the HTTP endpoints.
pub fn run(args: OperatorArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log).with_context(|| format!("--log {:?}", args.log))?;
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("peersan-operator")
        .enable_all()
        .build()
        .context("starting the Tokio runtime")?;
    runtime.block_on(operate(args))
}

async fn bind(addr: Option<SocketAddr>, what: &str) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    match addr {
        None => Ok(None),
        Some(addr) => {
            let listener =
                tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {what} address {addr}"))?;
            Ok(Some(listener))
        }
    }
}

async fn operate(args: OperatorArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("configuring the Kubernetes client (KUBECONFIG, ~/.kube/config or the in-cluster service account)")?;
    let metrics = Arc::new(Metrics::default());
    let reporter = Reporter { controller: MANAGER.to_owned(), instance: std::env::var("POD_NAME").ok() };
    let (controller, context) = controller::build(client, &args.namespace, args.peer_port, metrics.clone(), reporter);

    let ready = Arc::new(AtomicBool::new(false));
    let stores = context.stores.clone();
    let filled = ready.clone();
    tokio::spawn(async move {
        if stores.wait_ready().await.is_ok() {
            filled.store(true, Ordering::Relaxed);
            info!("caches filled");
        }
    });

    // One server when both endpoints share an address, else one each.
    let shared = args.health_addr.is_some() && args.health_addr == args.metrics_addr;
    let mut servers = Vec::new();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let probes = Probes { ready, metrics };
    let plan = [
        (args.health_addr, true, shared, "--health-addr"),
        (if shared { None } else { args.metrics_addr }, false, true, "--metrics-addr"),
    ];
    for (addr, health, with_metrics, what) in plan {
        if let Some(listener) = bind(addr, what).await? {
            let mut stopped = stopped.clone();
            let shutdown = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            servers.push(tokio::spawn(http::serve(listener, probes.clone(), health, with_metrics, shutdown)));
        }
    }

    info!(namespace = %args.namespace, peer_port = args.peer_port, "peersan operator started");
    controller::run(controller, context).for_each(|()| std::future::ready(())).await;
    info!("controller stopped; shutting down");
    let _ = stop.send(true);
    for server in servers {
        server.await.context("HTTP server task")?.context("HTTP server")?;
    }
    Ok(())
}
