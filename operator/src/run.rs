//! The operator process: logging, the async runtime, the controller and the HTTP endpoints,
//! until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use futures::{FutureExt, StreamExt};
use tracing::{info, warn};

pub use crate::config::OperatorArgs;
use crate::events::Reporter;
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
    let result = runtime.block_on(operate(args));
    // Reconciliations cut short by the grace period end with the runtime.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
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

    // SIGTERM or Ctrl-C: the controller stops taking work and finishes what runs; the
    // process ends after GRACE at the latest (the controller waits for its first list of
    // VirtualSANs before it can stop, which never comes while the API server is away).
    let (signalled, signal) = futures::channel::oneshot::channel::<()>();
    let stop = signal.map(|_| ()).shared();
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutdown requested");
        let _ = signalled.send(());
    });

    // One server when both endpoints share an address, else one each.
    let shared = args.health_addr.is_some() && args.health_addr == args.metrics_addr;
    let mut servers = Vec::new();
    let probes = Probes { ready, metrics };
    let plan = [
        (args.health_addr, true, shared, "--health-addr"),
        (if shared { None } else { args.metrics_addr }, false, true, "--metrics-addr"),
    ];
    for (addr, health, with_metrics, what) in plan {
        if let Some(listener) = bind(addr, what).await? {
            servers.push(tokio::spawn(http::serve(listener, probes.clone(), health, with_metrics, stop.clone())));
        }
    }

    info!(namespace = %args.namespace, peer_port = args.peer_port, "peersan operator started");
    let controller = controller::run(controller, context, stop.clone()).for_each(|()| std::future::ready(()));
    let deadline = async {
        stop.clone().await;
        tokio::time::sleep(GRACE).await;
    };
    tokio::select! {
        () = controller => info!("controller stopped"),
        () = deadline => warn!(grace = ?GRACE, "reconciliations did not finish in time; stopping anyway"),
    }
    for server in servers {
        server.await.context("HTTP server task")?.context("HTTP server")?;
    }
    Ok(())
}

/// How long reconciliations under way may take to finish after a shutdown request.
const GRACE: Duration = Duration::from_secs(10);

/// SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = interrupt => {},
                _ = terminate.recv() => {},
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM; stopping on Ctrl-C only");
            let _ = interrupt.await;
        }
    }
}
