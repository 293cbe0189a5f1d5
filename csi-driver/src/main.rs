//! `peersan-csi-controller`: serves the CSI Identity and Controller services on a unix
//! socket, for Kubernetes' external-provisioner, external-attacher and external-resizer.

mod config;

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use peersan_csi_driver::controller::{ControllerService, NodeEndpoint};
use peersan_csi_driver::error::CsiError;
use peersan_csi_driver::identity::{IdentityService, Readiness};
use peersan_csi_driver::pb::controller_server::ControllerServer;
use peersan_csi_driver::pb::identity_server::IdentityServer;
use peersan_csi_driver::{agent, serve};

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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = config::Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| args.log_level.clone().into()),
        )
        .init();
    let nodes = args.nodes_file()?;
    let socket = serve::socket_path(&args.endpoint).map_err(|e| anyhow::anyhow!("--endpoint: {e}"))?;
    let listener = serve::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
    tracing::info!(endpoint = %socket.display(), nodes = nodes.len(), "peersan CSI controller serving");
    let identity = IdentityService::new(Arc::new(AgentsReachable(nodes.clone())));
    let controller = ControllerService::new(nodes);
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    };
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_service(ControllerServer::new(controller))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), shutdown)
        .await
        .context("serving CSI")?;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
