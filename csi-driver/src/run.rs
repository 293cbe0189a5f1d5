//! The controller's entry point: command line and serving. The `peersan-csi-controller`
//! binary runs it, and so does `peersan csi-controller` (one binary for tests and tools).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use crate::cluster::ClusterController;
use crate::controller::{ControllerService, NodeEndpoint, NodesFile};
use crate::error::CsiError;
use crate::identity::{IdentityService, Readiness};
use crate::pb::controller_server::ControllerServer;
use crate::pb::identity_server::IdentityServer;
use crate::{agent, serve};

/// Command line of the CSI controller.
#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// CSI endpoint to serve: unix:///path/csi.sock or an absolute path.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,
    /// YAML file naming the node agents (`nodes: [{name, api}]`): volumes live on those
    /// agents, which the controller drives directly (without Kubernetes).
    #[arg(long, env = "PEERSAN_NODES_FILE", required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
    pub nodes: Option<PathBuf>,
    /// Keep the volumes' state in the Kubernetes API (MirrorVolumes and write-priority
    /// Leases); the node agents act on it. The client configuration comes from the
    /// in-cluster service account or KUBECONFIG.
    #[arg(long)]
    pub kubernetes: bool,
    /// Namespace of the volumes' write-priority Leases (the one peersan is installed in).
    #[arg(long, env = "POD_NAMESPACE", required_if_eq("kubernetes", "true"))]
    pub namespace: Option<String>,
    /// How long a call waits for the node agents to act on a change (create, publish,
    /// expand) before it returns UNAVAILABLE and the caller retries.
    #[arg(long, env = "PEERSAN_CSI_WAIT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub wait: std::time::Duration,
    /// Log filter when RUST_LOG is not set.
    #[arg(long, env = "PEERSAN_LOG", default_value = "info")]
    pub log_level: String,
}

impl ControllerArgs {
    /// Reads and checks the nodes file; errors name the file and the problem.
    pub fn nodes_file(&self) -> anyhow::Result<Vec<NodeEndpoint>> {
        let path = self.nodes.as_ref().context("--nodes is required without --kubernetes")?;
        let text = std::fs::read_to_string(path).with_context(|| format!("--nodes {}", path.display()))?;
        let f: NodesFile = serde_yaml::from_str(&text)
            .with_context(|| format!("--nodes {}: not a valid nodes file", path.display()))?;
        f.validate().map_err(|e| anyhow::anyhow!("--nodes {}: {e}", path.display()))?;
        Ok(f.nodes)
    }
}

/// Ready when at least one node agent answers.
struct AgentsReachable(Vec<NodeEndpoint>);

#[tonic::async_trait]
impl Readiness for AgentsReachable {
    async fn ready(&self) -> Result<bool, CsiError> {
        let mut errors = Vec::new();
        for n in &self.0 {
            match agent::connect(&n.name, &n.api).await {
                Ok(mut c) => match c.get_node(agent::request(agent::pb::GetNodeRequest {})).await {
                    Ok(_) => return Ok(true),
                    Err(s) => errors.push(format!("{}: {}", n.name, s.message())),
                },
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(CsiError::Unavailable(format!("no node agent answers: {}", errors.join("; "))))
    }
}

/// Ready when the API server answers a list of MirrorVolumes.
struct ApiReachable(kube::Api<peersan_crds::MirrorVolume>);

#[tonic::async_trait]
impl Readiness for ApiReachable {
    async fn ready(&self) -> Result<bool, CsiError> {
        self.0
            .list_metadata(&kube::api::ListParams::default().limit(1))
            .await
            .map(|_| true)
            .map_err(|e| CsiError::Unavailable(format!("the Kubernetes API server does not answer: {e}")))
    }
}

/// Serves the Identity and Controller services until SIGTERM or Ctrl-C.
pub fn run(args: ControllerArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| args.log_level.clone().into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let nodes = if args.kubernetes { Vec::new() } else { args.nodes_file()? };
    let socket = serve::socket_path(&args.endpoint).map_err(|e| anyhow::anyhow!("--endpoint: {e}"))?;
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(async move {
        let listener = serve::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
        let (identity, with_agents, with_api) = if args.kubernetes {
            let namespace = args.namespace.clone().context("--namespace is required with --kubernetes")?;
            let client = kube::Client::try_default().await.context("connecting to the Kubernetes API server")?;
            tracing::info!(endpoint = %socket.display(), %namespace, "peersan CSI controller serving (state in the Kubernetes API)");
            let identity = IdentityService::new(Arc::new(ApiReachable(kube::Api::all(client.clone()))));
            (identity, None, Some(ControllerServer::new(ClusterController::new(client, &namespace, args.wait))))
        } else {
            tracing::info!(endpoint = %socket.display(), nodes = nodes.len(), "peersan CSI controller serving");
            let identity = IdentityService::new(Arc::new(AgentsReachable(nodes.clone())));
            (identity, Some(ControllerServer::new(ControllerService::new(nodes))), None)
        };
        let shutdown = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on Ctrl-C only");
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
            tracing::info!("shutting down");
        };
        tonic::transport::Server::builder()
            .add_service(IdentityServer::new(identity))
            .add_optional_service(with_agents)
            .add_optional_service(with_api)
            .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), shutdown)
            .await
            .context("serving CSI")?;
        let _ = std::fs::remove_file(&socket);
        Ok(())
    })
}
