//! `VirtualSAN`: the user-facing resource. It names the nodes that pool their disks, where
//! each keeps its replicas, how many replicas a volume has and which network mirrors them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::{JsonSchema, Schema};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::common::{
    Condition, DegradedWrites, PoolSource, RATE_PATTERN, WritePolicy, default_resync_rate, null_as_default,
};
use crate::schema;

/// Condition types of a VirtualSAN's status.
pub mod condition {
    /// Every selected node runs an agent with the current configuration and the
    /// StorageClass exists: volumes can be created.
    pub const READY: &str = "Ready";
    /// Some volume has fewer in-sync replicas than it should (a node or disk is down).
    pub const DEGRADED: &str = "Degraded";
    /// Some replica is copying what it missed from an in-sync peer.
    pub const RESYNCING: &str = "Resyncing";
    /// Some volume has replicas that accepted different writes while cut off from each
    /// other; it waits for an operator to choose the survivor.
    pub const SPLIT_BRAIN: &str = "SplitBrain";
}

/// The desired state of a virtual SAN.
// Every `printcolumn(...)` repeats the same keys, which clippy takes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "peersan.io",
    version = "v1alpha1",
    kind = "VirtualSAN",
    plural = "virtualsans",
    singular = "virtualsan",
    shortname = "vsan",
    category = "peersan",
    status = "VirtualSANStatus",
    derive = "PartialEq",
    doc = "A virtual SAN: the local disks of a set of nodes pooled into mirrored volumes. Every volume \
           has `replicas` copies on different nodes, kept in sync over the replication link; the \
           operator turns this resource into per-node configuration (SANNode), a StorageClass and \
           write-priority Leases.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether volumes can be created"
    ),
    printcolumn(
        name = "Nodes",
        type_ = "string",
        json_path = ".status.readyNodes",
        description = "Ready nodes / selected nodes"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".spec.replicas",
        description = "Replicas per volume"
    ),
    printcolumn(
        name = "Link",
        type_ = "string",
        json_path = ".spec.replicationLink.mode",
        description = "Network that carries the mirroring"
    ),
    printcolumn(name = "Volumes", type_ = "integer", json_path = ".status.volumes", description = "MirrorVolumes"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualSANSpec {
    /// The member nodes: those matching `selector`, those listed in `names`, or with both the
    /// nodes in either. At least one of the two must be given.
    pub nodes: NodeSelection,
    /// Where every member node keeps its replicas (exactly one of `path` and `device`), unless
    /// `nodePools` says otherwise for it. Changing it does not move existing replicas.
    pub pool: PoolSource,
    /// Per-node exceptions to `pool`, for nodes whose disk is elsewhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_default")]
    #[schemars(transform = schema::list_by_node)]
    pub node_pools: Vec<NodePool>,
    /// Replicas of every volume, each on a different node: 2 or 3. Applies to volumes created
    /// afterwards.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 2, max = 3))]
    pub replicas: i32,
    /// The network that carries the mirroring between nodes. With `mode: Cluster` (the
    /// default) none of `cidr`, `interface`, `nodeInterfaces` may be set; with
    /// `mode: Dedicated` exactly one of `cidr` and `interface` must be; `nodeInterfaces` needs
    /// `interface`.
    #[serde(default)]
    pub replication_link: ReplicationLink,
    /// Whether one node or several may write a volume at once. StorageClasses of this SAN
    /// create volumes with it.
    #[serde(default)]
    pub write_policy: WritePolicy,
    /// Whether a volume accepts writes while one of its replicas is unreachable.
    #[serde(default)]
    pub degraded_writes: DegradedWrites,
    /// Upper bound of the copy rate of a resync, per volume and second (`100MiB`, `1G`,
    /// `0` = unlimited), so that foreground I/O keeps going.
    #[serde(default = "default_resync_rate")]
    #[schemars(regex(pattern = RATE_PATTERN))]
    pub resync_rate: String,
}

fn default_replicas() -> i32 {
    2
}

/// Which Kubernetes nodes are members: those matching `selector`, those listed in `names`,
/// or, with both, the nodes in either. At least one of them must be given.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = node_selection_rules)]
pub struct NodeSelection {
    /// Label selector over Kubernetes nodes (`matchLabels`, `matchExpressions`). An empty
    /// selector selects every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Names of Kubernetes nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_default")]
    #[schemars(length(min = 1), transform = schema::set_list)]
    pub names: Vec<String>,
}

fn node_selection_rules(s: &mut Schema) {
    schema::require_any(s, &["selector", "names"]);
}

/// A node whose replicas live somewhere other than the SAN's `pool`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodePool {
    /// Kubernetes node name.
    pub node: String,
    /// Where this node keeps its replicas: exactly one of `path` and `device`.
    pub pool: PoolSource,
}

/// The network that mirrors writes between the replicas of a volume. The API server checks
/// the rules between the fields (see [`VirtualSANSpec::replication_link`]).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = replication_link_rules)]
pub struct ReplicationLink {
    /// `Cluster`: the nodes' ordinary cluster network (their InternalIP). `Dedicated`: a
    /// separate network, named by `cidr` or `interface`.
    #[serde(default)]
    pub mode: LinkMode,
    /// Dedicated link: each node mirrors over its address in this CIDR (for example
    /// `10.20.0.0/24`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "cidr"))]
    pub cidr: Option<String>,
    /// Dedicated link: each node mirrors over the address of this network interface (for
    /// example `eth1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = INTERFACE_PATTERN))]
    pub interface: Option<String>,
    /// Dedicated link by interface: nodes whose interface has another name.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_default")]
    #[schemars(transform = schema::list_by_node)]
    pub node_interfaces: Vec<NodeInterface>,
}

/// A Linux network interface name: 1 to 15 characters, no `/`, no whitespace.
pub const INTERFACE_PATTERN: &str = r"^[A-Za-z0-9_.:@-]{1,15}$";

fn replication_link_rules(s: &mut Schema) {
    use schema::{equals, has};
    // Dedicated: exactly one of cidr and interface.
    schema::when(s, equals("mode", "Dedicated"), json!({ "oneOf": [has("cidr"), has("interface")] }));
    // Any of them set: the mode must be Dedicated (the default is Cluster).
    schema::when(
        s,
        json!({ "anyOf": [has("cidr"), has("interface"), has("nodeInterfaces")] }),
        equals("mode", "Dedicated"),
    );
    schema::when(s, has("nodeInterfaces"), has("interface"));
}

/// The network a replication link uses.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum LinkMode {
    /// A dedicated network, named by `cidr` or `interface`.
    Dedicated,
    /// The cluster network.
    #[default]
    Cluster,
}

/// The interface a node uses for a dedicated link, when it differs from `interface`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeInterface {
    /// Kubernetes node name.
    pub node: String,
    /// Network interface on that node.
    #[schemars(regex(pattern = INTERFACE_PATTERN))]
    pub interface: String,
}

/// The observed state of a virtual SAN, written by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualSANStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Degraded`, `Resyncing`, `SplitBrain` (see the `condition` module), each
    /// with the generation it was computed for.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_default")]
    #[schemars(transform = schema::list_by_type)]
    pub conditions: Vec<Condition>,
    /// Every member node and its state.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_default")]
    #[schemars(transform = schema::list_by_name)]
    pub nodes: Vec<MemberNode>,
    /// `ready/members`, for display (for example `2/3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_nodes: Option<String>,
    /// Number of MirrorVolumes of this SAN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub volumes: Option<i32>,
    /// The StorageClass that provisions volumes on this SAN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
}

/// A member node as the operator sees it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberNode {
    /// Kubernetes node name.
    pub name: String,
    /// Whether the node serves its replicas.
    pub state: MemberState,
    /// The address the node mirrors on (`host:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Size of the node's pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub capacity_bytes: Option<i64>,
    /// Space of the pool not taken by replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub free_bytes: Option<i64>,
}

/// State of a member node.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MemberState {
    /// Selected, but its agent has not reported yet.
    Pending,
    /// Its agent renews its heartbeat Lease, runs the current configuration and its pool is
    /// usable.
    Ready,
    /// Its agent runs, but its pool or some replication link fails.
    Degraded,
    /// Its heartbeat Lease expired: the node or its agent is down or cut off.
    Offline,
}
