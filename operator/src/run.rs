//! The operator process: logging, the async runtime, the controller and the HTTP endpoints,
//! until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{FutureExt, StreamExt};
use tracing::{info, warn};

pub use crate::config::OperatorArgs;
use crate::events::Reporter;
use crate::http::{self, Probes};
use crate::leader::{self, Elector};
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
    let ready = Arc::new(AtomicBool::new(false));

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
    let probes = Probes { ready: ready.clone(), metrics: metrics.clone() };
    let plan = [
        (args.health_addr, true, shared, "--health-addr"),
        (if shared { None } else { args.metrics_addr }, false, true, "--metrics-addr"),
    ];
    for (addr, health, with_metrics, what) in plan {
        if let Some(listener) = bind(addr, what).await? {
            servers.push(tokio::spawn(http::serve(listener, probes.clone(), health, with_metrics, stop.clone())));
        }
    }

    let outcome = lead_and_reconcile(&args, client, metrics, ready, stop).await;
    for server in servers {
        server.await.context("HTTP server task")?.context("HTTP server")?;
    }
    outcome
}

/// Stands by until this process holds the leader election Lease, then runs the
/// controller until a shutdown request (releasing the Lease) or until the Lease is lost
/// (an error: the process must end before another one takes over).
async fn lead_and_reconcile(
    args: &OperatorArgs,
    client: kube::Client,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    stop: futures::future::Shared<impl Future<Output = ()> + Send + 'static>,
) -> anyhow::Result<()> {
    let elector = Elector::new(client.clone(), &args.namespace, leader::default_identity());
    info!(identity = elector.identity(), lease = leader::LEADER_LEASE, "waiting to lead");
    loop {
        match elector.try_lead().await {
            Ok(true) => break,
            // A standby process is ready: it does what it should.
            Ok(false) => ready.store(true, Ordering::Relaxed),
            Err(e) => warn!(error = %e, "leader election"),
        }
        tokio::select! {
            () = stop.clone() => return Ok(()),
            () = tokio::time::sleep(leader::RENEW_EVERY) => {}
        }
    }
    info!(identity = elector.identity(), "leading: reconciling VirtualSANs");
    ready.store(false, Ordering::Relaxed);

    let reporter = Reporter { controller: MANAGER.to_owned(), instance: Some(elector.identity().to_owned()) };
    let (controller, context) = controller::build(client, &args.namespace, args.peer_port, metrics, reporter);
    let stores = context.stores.clone();
    tokio::spawn(async move {
        if stores.wait_ready().await.is_ok() {
            ready.store(true, Ordering::Relaxed);
            info!("caches filled");
        }
    });

    // Renew the Lease; give up in time when that fails.
    let renewer = {
        let elector = elector.clone();
        tokio::spawn(async move {
            let mut renewed = Instant::now();
            loop {
                tokio::time::sleep(leader::RENEW_EVERY).await;
                match elector.try_lead().await {
                    Ok(true) => renewed = Instant::now(),
                    Ok(false) => return "another process holds the leader election Lease".to_owned(),
                    Err(e) if renewed.elapsed() + leader::RENEW_EVERY >= leader::LEASE_DURATION => {
                        return format!("the leader election Lease could not be renewed in time: {e}");
                    }
                    Err(e) => warn!(error = %e, "renewing the leader election Lease"),
                }
            }
        })
    };

    info!(namespace = %args.namespace, peer_port = args.peer_port, "peersan operator started");
    let controller = controller::run(controller, context, stop.clone()).for_each(|()| std::future::ready(()));
    let deadline = async {
        stop.clone().await;
        tokio::time::sleep(GRACE).await;
    };
    let lost = tokio::select! {
        () = controller => {
            info!("controller stopped");
            None
        }
        () = deadline => {
            warn!(grace = ?GRACE, "reconciliations did not finish in time; stopping anyway");
            None
        }
        reason = renewer => Some(reason.unwrap_or_else(|e| format!("the Lease renewal task failed: {e}"))),
    };
    match lost {
        Some(reason) => anyhow::bail!("stopping: {reason}"),
        None => {
            if let Err(e) = elector.release().await {
                warn!(error = %e, "releasing the leader election Lease");
            }
            Ok(())
        }
    }
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
