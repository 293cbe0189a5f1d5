//! Volume lifecycle across nodes: a volume created or deleted through one agent's API is
//! created or deleted on every node that holds one of its replicas, over the peer protocol.
//!
//! A peer checks its own pool before it creates its replica; its refusal for lack of space
//! (`OutOfRange`, with a message naming the peer) comes back as [`AgentError::OutOfRange`].

use super::client::{PeerConn, PeerError};
use super::proto::{ErrorCode, Reply, Request};
use crate::agent::{AgentError, Node};
use crate::engine::Volume;

async fn call_peer(node: &Node, peer: &str, req: Request) -> Result<(), AgentError> {
    let perr = |message: String| AgentError::Peer { peer: peer.to_owned(), message };
    let address = node.peer_address(peer).ok_or_else(|| perr("no address configured".into()))?;
    let conn = PeerConn::establish(peer, &address, &node.ctx.handshake, node.ctx.io_timeout)
        .await
        .map_err(|e| perr(e.to_string()))?;
    let res = conn.call(req).await;
    conn.close();
    match res {
        Ok(Reply::Ok) => Ok(()),
        Ok(other) => Err(perr(format!("unexpected reply {other:?}"))),
        // The peer's message names it (see `Node::create_local`).
        Err(PeerError::Remote { code: ErrorCode::OutOfRange, message, .. }) => Err(AgentError::OutOfRange(message)),
        Err(e) => Err(perr(e.to_string())),
    }
}

/// Asks every other replica node to create its replica of `v` (at `v`'s size). Returns a
/// refusal for lack of space if there is one, else the first error; the replicas that
/// other nodes created stay (the volume then exists in part, and `DeleteVolume` removes it
/// everywhere).
pub async fn create_on_peers(node: &Node, v: &Volume) -> Result<(), AgentError> {
    let spec = v.spec();
    let size = v.size();
    let calls = spec.replicas.iter().filter(|r| **r != node.ctx.name).map(|peer| {
        call_peer(
            node,
            peer,
            Request::CreateVolume { volume: spec.name.clone(), size, replicas: spec.replicas.clone() },
        )
    });
    let mut err = None;
    for r in futures::future::join_all(calls).await {
        if let Err(e) = r
            && (err.is_none() || matches!(e, AgentError::OutOfRange(_)))
        {
            err = Some(e);
        }
    }
    err.map_or(Ok(()), Err)
}

pub async fn delete_on_peers(node: &Node, v: &Volume) -> Result<(), AgentError> {
    let spec = v.spec();
    let calls = spec
        .replicas
        .iter()
        .filter(|r| **r != node.ctx.name)
        .map(|peer| call_peer(node, peer, Request::DeleteVolume { volume: spec.name.clone() }));
    let mut first_err = None;
    for r in futures::future::join_all(calls).await {
        if let Err(e) = r {
            tracing::warn!(error = %e, "peer could not delete its replica");
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}
