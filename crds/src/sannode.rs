//! `SANNode`: one member node of a VirtualSAN. The operator writes its spec (the node agent's
//! configuration); the node agent writes its status. Its name is the Kubernetes node name.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    Condition, DegradedWrites, ENDPOINT_PATTERN, PoolSource, RATE_PATTERN, WritePolicy, default_resync_rate,
    null_as_default,
};
use crate::schema;

/// Condition types of a SANNode's status.
pub mod condition {
    /// The agent runs with the current spec, its pool is usable and its peer listener is up.
    pub const READY: &str = "Ready";
    /// Every peer in `spec.peers` is connected and authenticated.
    pub const PEERS_CONNECTED: &str = "PeersConnected";
}

/// The configuration of one node's agent, written by the operator.
// Every `printcolumn(...)` repeats the same keys, which clippy takes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "peersan.io",
    version = "v1alpha1",
    kind = "SANNode",
    plural = "sannodes",
    singular = "sannode",
    shortname = "snode",
    category = "peersan",
    status = "SANNodeStatus",
    derive = "PartialEq",
    doc = "One member node of a VirtualSAN, named after its Kubernetes node. The operator writes \
           the spec (the node agent's configuration); the node agent writes the status.",
    printcolumn(name = "SAN", type_ = "string", json_path = ".spec.virtualSAN"),
    printcolumn(
        name = "Address",
        type_ = "string",
        json_path = ".spec.replicationAddress",
        description = "Where peers reach this node's agent"
    ),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(
        name = "Free",
        type_ = "integer",
        json_path = ".status.pool.freeBytes",
        description = "Free bytes in the pool"
    ),
    printcolumn(name = "Volumes", type_ = "integer", json_path = ".status.volumes"),
    printcolumn(name = "Version", type_ = "string", json_path = ".status.agentVersion", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct SANNodeSpec {
    /// The VirtualSAN this node serves.
    #[serde(rename = "virtualSAN")]
    #[schemars(length(min = 1))]
    pub virtual_san: String,
    /// Where the node keeps its replicas: exactly one of `path` and `device`.
    pub pool: PoolSource,
    /// `host:port` the agent listens on for its peers, on the replication link. Unset while
    /// the operator cannot tell it yet (a dedicated link whose address the agent has not
    /// reported in `status.addresses`); the agent waits for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = ENDPOINT_PATTERN))]
    pub replication_address: Option<String>,
    /// The other member nodes and where to reach them.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_default")]
    #[schemars(transform = schema::list_by_name)]
    pub peers: Vec<Peer>,
    /// Upper bound of a resync's copy rate per volume and second (`0` = unlimited).
    #[serde(default = "default_resync_rate")]
    #[schemars(regex(pattern = RATE_PATTERN))]
    pub resync_rate: String,
    /// Whether one node or several may write a volume at once.
    #[serde(default)]
    pub write_policy: WritePolicy,
    /// Whether volumes accept writes while one of their replicas is unreachable.
    #[serde(default)]
    pub degraded_writes: DegradedWrites,
}

/// Another member node.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    /// Kubernetes node name.
    pub name: String,
    /// `host:port` of its agent on the replication link.
    #[schemars(regex(pattern = ENDPOINT_PATTERN))]
    pub address: String,
}

/// What the node agent reports about itself.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SANNodeStatus {
    /// The `metadata.generation` of the spec the agent runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The node's IP addresses by interface; the operator picks the replication address
    /// among them (dedicated link by CIDR or interface).
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_default")]
    #[schemars(transform = schema::nullable_list)]
    pub addresses: Vec<InterfaceAddress>,
    /// The pool's space.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolUsage>,
    /// Version of the running node agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Replicas the node holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub volumes: Option<i32>,
    /// `Ready`, `PeersConnected` (see the `condition` module).
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_default")]
    #[schemars(transform = schema::list_by_type)]
    pub conditions: Vec<Condition>,
}

/// An IP address of one of the node's interfaces.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceAddress {
    /// Interface name.
    pub interface: String,
    /// IPv4 or IPv6 address, without prefix length.
    pub ip: String,
}

/// Space in a node's pool.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolUsage {
    /// Size of the pool's filesystem or device.
    #[schemars(range(min = 0))]
    pub capacity_bytes: i64,
    /// Bytes reserved by replicas at their full size (no overcommit).
    #[schemars(range(min = 0))]
    pub allocated_bytes: i64,
    /// Bytes a new replica can still take.
    #[schemars(range(min = 0))]
    pub free_bytes: i64,
}
