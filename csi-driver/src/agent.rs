//! Client of the node agent API, through which the controller creates, attaches, expands
//! and deletes volumes. Until the control plane keeps volume state in the API server, the
//! node agents hold it: each replica's node records the volume and its attachment.

use std::path::Path;
use std::time::Duration;

use crate::error::CsiError;

/// The agent API's messages (client side).
pub mod pb {
    tonic::include_proto!("peersan.agent.v1");
}

pub type AgentClient = pb::agent_client::AgentClient<tonic::transport::Channel>;

/// How long one agent call may take before the node counts as unreachable. Creating a
/// volume waits for its replicas to connect (a few seconds at most).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects to a node agent's API socket.
pub async fn connect(node: &str, path: &Path) -> Result<AgentClient, CsiError> {
    let ch = crate::serve::channel(path)
        .await
        .map_err(|e| CsiError::Unavailable(format!("node {node}: agent API {} unreachable: {e}", path.display())))?;
    Ok(pb::agent_client::AgentClient::new(ch))
}

/// A request with the standard deadline.
pub fn request<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(CALL_TIMEOUT);
    r
}
