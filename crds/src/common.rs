//! Types that several resources share: where a node keeps its replicas, the write policy,
//! conditions, and the patterns of rates and endpoints.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A rate in bytes per second, in the node agent's size syntax: digits and an optional unit
/// (`B`, `K`/`k`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB`, all powers of 1024). `0` means
/// unlimited.
pub const RATE_PATTERN: &str = "^[0-9]+(B|K|k|KiB|M|MiB|G|GiB|T|TiB)?$";

/// A TCP endpoint `host:port`, the host an IPv4 address, a DNS name or a bracketed IPv6
/// address.
pub const ENDPOINT_PATTERN: &str = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):[0-9]{1,5}$";

/// The resync rate when none is given (the node agent's default too).
pub const DEFAULT_RESYNC_RATE: &str = "100MiB";

pub(crate) fn default_resync_rate() -> String {
    DEFAULT_RESYNC_RATE.to_owned()
}

/// Where a node keeps its replicas: exactly one of `path` and `device`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PoolSource {
    /// Absolute path of a directory on the node. Each replica is a preallocated sparse file
    /// `<path>/<volume>.replica` in it.
    Path(#[schemars(length(min = 2), regex(pattern = "^/"))] String),
    /// Absolute path of a raw block device on the node (for example `/dev/vdb`), used whole
    /// by one replica.
    Device(#[schemars(length(min = 6), regex(pattern = "^/dev/"))] String),
}

/// Which nodes may write a volume at the same time.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum WritePolicy {
    /// One node at a time holds write priority (the per-volume Lease names it); a node that
    /// lost it is fenced by the epoch every write carries. For ReadWriteOnce and
    /// ReadWriteOncePod volumes.
    #[default]
    SingleWriter,
    /// Several nodes write at once; overlapping writes are ordered the same way on every
    /// replica. For ReadWriteMany block volumes (live migration, clustered filesystems).
    MultiWriter,
}

/// What a volume does while a replica is unreachable.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DegradedWrites {
    /// Writes go on to the remaining in-sync replicas; what the unreachable replica missed
    /// is recorded and copied to it when it returns.
    #[default]
    Allow,
    /// Writes fail (EIO) until every replica is reachable again.
    Refuse,
}

/// A condition of a resource's status, in the shape of `metav1.Condition` (same fields and
/// constraints), except that `message` may be null: Kubernetes 1.20's server-side apply turns
/// an empty string inside a list item into null, and the standard schema then refuses the
/// whole status. A null message reads as "".
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Type of the condition, in CamelCase (the kinds' `condition` modules list them).
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 316), regex(pattern = CONDITION_TYPE_PATTERN))]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// Why the condition last changed, a CamelCase identifier.
    #[schemars(length(min = 1, max = 1024), regex(pattern = CONDITION_REASON_PATTERN))]
    pub reason: String,
    /// Details for people; may be empty.
    #[serde(default, deserialize_with = "null_as_default")]
    #[schemars(length(max = 32768), extend("nullable" = true))]
    pub message: String,
    /// When the condition last changed status.
    pub last_transition_time: Time,
    /// The `metadata.generation` the condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,
}

/// `metav1.Condition`'s pattern of condition types.
pub const CONDITION_TYPE_PATTERN: &str =
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$";

/// `metav1.Condition`'s pattern of reasons.
pub const CONDITION_REASON_PATTERN: &str = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$";

/// The status of a condition.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// Not known (yet).
    Unknown,
}

/// Deserialises null as the type's default. Every list in this API is nullable and read this
/// way: Kubernetes 1.20's server-side apply stores a list that an apply empties or stops
/// setting as null instead of removing it.
pub(crate) fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}
