//! `MirrorVolume`: one mirrored volume, created by the CSI controller for a PersistentVolume.
//! Its name is the CSI volume id; its status is the volume's health as the node agents report
//! it.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, WritePolicy, null_as_default};
use crate::schema;

/// Block size of every volume: sizes are multiples of it.
pub const BLOCK_SIZE: i64 = 4096;

/// Condition types of a MirrorVolume's status.
pub mod condition {
    /// Every replica is in sync and the writer (if attached) holds the current epoch.
    pub const READY: &str = "Ready";
    /// Some replica is not in sync (see `status.replicas`).
    pub const DEGRADED: &str = "Degraded";
    /// Some replica is copying what it missed.
    pub const RESYNCING: &str = "Resyncing";
    /// Two replicas accepted different writes; nothing is merged until the survivor is chosen.
    pub const SPLIT_BRAIN: &str = "SplitBrain";
}

/// The desired state of a mirrored volume.
// Every `printcolumn(...)` repeats the same keys, which clippy takes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "peersan.io",
    version = "v1alpha1",
    kind = "MirrorVolume",
    plural = "mirrorvolumes",
    singular = "mirrorvolume",
    shortname = "mvol",
    category = "peersan",
    status = "MirrorVolumeStatus",
    derive = "PartialEq",
    doc = "A volume mirrored on `replicas` nodes of a VirtualSAN. The name is the CSI volume id. \
           Write priority (which node may write, at which fencing epoch) is held in the Lease \
           `peersan-vol-<name>`; the status mirrors it and the replicas' states.",
    printcolumn(name = "Size", type_ = "integer", json_path = ".spec.sizeBytes", description = "Size in bytes"),
    printcolumn(name = "Health", type_ = "string", json_path = ".status.health"),
    printcolumn(
        name = "Writer",
        type_ = "string",
        json_path = ".status.writer",
        description = "Node with write priority"
    ),
    printcolumn(name = "Epoch", type_ = "integer", json_path = ".status.epoch", description = "Fencing epoch"),
    printcolumn(
        name = "Attached",
        type_ = "string",
        json_path = ".status.attachedNodes",
        description = "Nodes the volume is attached to"
    ),
    printcolumn(name = "SAN", type_ = "string", json_path = ".spec.virtualSAN", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct MirrorVolumeSpec {
    /// The VirtualSAN the volume belongs to.
    #[serde(rename = "virtualSAN")]
    #[schemars(length(min = 1))]
    pub virtual_san: String,
    /// Size in bytes, a multiple of 4096. It may grow (online expansion), never shrink.
    #[schemars(range(min = 4096), extend("multipleOf" = 4096))]
    pub size_bytes: i64,
    /// Nodes holding a replica, distinct, 1 to 3. The first one holds write priority when
    /// the volume is created.
    #[schemars(length(min = 1, max = 3), extend("x-kubernetes-list-type" = "set"))]
    pub replicas: Vec<String>,
    /// Whether one node or several may write the volume at once: `SingleWriter` for
    /// ReadWriteOnce/ReadWriteOncePod claims, `MultiWriter` for ReadWriteMany block claims.
    #[serde(default)]
    pub write_policy: WritePolicy,
}

/// The observed state of a mirrored volume.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MirrorVolumeStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The volume's health, from its replicas' states.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<VolumeHealth>,
    /// Fencing epoch: rises at every change of the node with write priority; replicas refuse
    /// writes carrying an older one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub epoch: Option<i64>,
    /// The node with write priority at `epoch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
    /// Nodes the volume is attached to (ControllerPublishVolume).
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_default")]
    #[schemars(transform = schema::set_list)]
    pub attached_nodes: Vec<String>,
    /// Every replica and its state.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_default")]
    #[schemars(transform = schema::list_by_node)]
    pub replicas: Vec<ReplicaStatus>,
    /// `Ready`, `Degraded`, `Resyncing`, `SplitBrain` (see the `condition` module).
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_default")]
    #[schemars(transform = schema::list_by_type)]
    pub conditions: Vec<Condition>,
}

// `status.health` is optional, and an optional enum field's schema takes its description from
// the enum's, hence the wording.
/// The volume's health, from its replicas' states.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeHealth {
    /// Every replica is in sync.
    Healthy,
    /// Some replica is not in sync and is not copying yet (disconnected, outdated, diskless).
    Degraded,
    /// Some replica is copying what it missed; the others are in sync.
    Resyncing,
    /// No in-sync replica is reachable: I/O fails.
    Unavailable,
    /// Two replicas accepted different writes under different epochs.
    SplitBrain,
}

/// State of one replica of a volume.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    /// Node holding the replica.
    pub node: String,
    /// The replica's state.
    pub state: ReplicaState,
    /// Bytes the replica lacks, as its peers record it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub out_of_sync_bytes: Option<i64>,
    /// Bytes copied so far by a running resync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub resync_done_bytes: Option<i64>,
    /// Bytes a running resync copies in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub resync_total_bytes: Option<i64>,
    /// Size of the replica in bytes (below `spec.sizeBytes` while a growth is under way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub size_bytes: Option<i64>,
    /// The newest fencing epoch this node's engine knows for the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub epoch: Option<i64>,
    /// The node with write priority at `epoch`, as this node's engine knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
    /// Why the replica is in its state, for people (empty when in sync).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// State of a replica (the node agent's replica states).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicaState {
    /// Holds every acknowledged write; may be read.
    InSync,
    /// Receives new writes while it copies what it missed; never read.
    CatchingUp,
    /// Known to lack writes, not copying yet.
    Outdated,
    /// Its disk failed or is missing: the node serves the volume from its peers.
    Diskless,
    /// Unreachable.
    Disconnected,
    /// Accepted writes that another replica did not, under another epoch.
    SplitBrain,
}

impl VolumeHealth {
    /// The API spelling (`healthy`, `degraded`, `resyncing`, `unavailable`, `split-brain`).
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeHealth::Healthy => "healthy",
            VolumeHealth::Degraded => "degraded",
            VolumeHealth::Resyncing => "resyncing",
            VolumeHealth::Unavailable => "unavailable",
            VolumeHealth::SplitBrain => "split-brain",
        }
    }
}

impl ReplicaState {
    /// The API spelling (`in-sync`, `catching-up`, `outdated`, `diskless`, `disconnected`,
    /// `split-brain`).
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::InSync => "in-sync",
            ReplicaState::CatchingUp => "catching-up",
            ReplicaState::Outdated => "outdated",
            ReplicaState::Diskless => "diskless",
            ReplicaState::Disconnected => "disconnected",
            ReplicaState::SplitBrain => "split-brain",
        }
    }
}
