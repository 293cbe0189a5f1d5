//! Custom resource types of peersan's Kubernetes API (group `peersan.io`, version
//! `v1alpha1`), the CRDs generated from them, and the names of the Leases of the policing
//! protocol.
//!
//! - [`VirtualSAN`] (user-facing): member nodes, pool, replicas, replication link, policies.
//! - [`MirrorVolume`]: one mirrored volume (the CSI volume), its replicas' states and epoch.
//! - [`SANNode`]: one member node: the node agent's configuration (spec, written by the
//!   operator) and what the agent reports (status).
//! - [`lease`]: names of the per-volume write-priority and per-node heartbeat Leases.
//!
//! The CRD YAML in `crds/*.yaml` and `charts/peersan/files/crds/` is generated from these
//! types by `cargo run -p peersan-crds --bin crdgen -- --write`; a test fails when it drifts.
//!
//! The schemas target Kubernetes 1.20 and later (see `schema.rs` for how):
//!
//! - Structural schemas with defaults, enums, patterns, ranges, `format: cidr`, unique lists
//!   (`x-kubernetes-list-type: set`/`map`), and the cross-field rules as `anyOf`/`oneOf`/`not`
//!   over `required` (a pool is exactly one of `path` and `device`; a VirtualSAN names nodes by
//!   `selector` or `names`; a dedicated link has exactly one of `cidr` and `interface`, a
//!   cluster link neither).
//! - No CEL rules (`x-kubernetes-validations`, Kubernetes 1.25+). They do not degrade
//!   gracefully: kubectl 1.20 refuses such a CRD ("unknown field"), and the 1.20 API server,
//!   given it with `--validate=false`, drops the rules without a word. What only CEL could
//!   check is left to the operator, to report in the resource's conditions: immutability (a
//!   VirtualSAN's `pool`, a MirrorVolume's `replicas` and `virtualSAN`, `sizeBytes` only
//!   growing), the nodes of `nodePools`/`nodeInterfaces` being members, and a VirtualSAN's
//!   `replicas` not exceeding its member nodes.
//! - Every optional list is nullable and read back with null as empty, and a condition's
//!   `message` may be null: Kubernetes 1.20's server-side apply stores an emptied or dropped
//!   list, and an empty string inside a list item, as null.

pub mod common;
pub mod lease;
pub mod mirrorvolume;
pub mod sannode;
mod schema;
pub mod virtualsan;

#[cfg(test)]
mod tests;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use common::{Condition, ConditionStatus, DegradedWrites, PoolSource, WritePolicy};
pub use mirrorvolume::{MirrorVolume, MirrorVolumeSpec, MirrorVolumeStatus, ReplicaState, ReplicaStatus, VolumeHealth};
pub use sannode::{SANNode, SANNodeSpec, SANNodeStatus};
pub use virtualsan::{LinkMode, ReplicationLink, VirtualSAN, VirtualSANSpec, VirtualSANStatus};

/// API group of every peersan custom resource.
pub const API_GROUP: &str = "peersan.io";

/// API version of the custom resources.
pub const API_VERSION: &str = "v1alpha1";

/// Name under which the CSI driver registers with kubelet.
pub const CSI_DRIVER_NAME: &str = "csi.peersan.io";

/// Where the generated CRD files live, relative to the workspace root: the CRDs applied with
/// `kubectl apply -f crds/`, and the Helm chart's copy.
pub const CRD_DIRS: [&str; 2] = ["crds", "charts/peersan/files/crds"];

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A volume or node name that cannot be part of a Kubernetes object name.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    /// A fencing epoch annotation that is not a decimal integer.
    #[error("invalid fencing epoch {value:?}: expected a decimal integer without sign or leading zeros")]
    InvalidEpoch { value: String },
    /// A CRD could not be serialised to YAML.
    #[error("cannot serialise CRD {name} to YAML: {source}")]
    Yaml { name: String, source: serde_yaml::Error },
}

/// Every CRD of peersan, each with the name of its file.
pub fn crds() -> Vec<(&'static str, CustomResourceDefinition)> {
    let mut crds = vec![
        ("virtualsan.yaml", VirtualSAN::crd()),
        ("mirrorvolume.yaml", MirrorVolume::crd()),
        ("sannode.yaml", SANNode::crd()),
    ];
    for (_, crd) in &mut crds {
        schema::unwrap_descriptions(crd);
    }
    crds
}

const HEADER: &str = "# Generated from the types in crds/src by `cargo run -p peersan-crds --bin crdgen -- --write`.\n\
                      # Do not edit: change the types and regenerate.\n";

/// The text of every CRD file: a header comment and the CRD as YAML.
pub fn crd_files() -> Result<Vec<(&'static str, String)>, Error> {
    crds()
        .into_iter()
        .map(|(file, crd)| {
            let yaml = serde_yaml::to_string(&crd)
                .map_err(|source| Error::Yaml { name: crd.metadata.name.clone().unwrap_or_default(), source })?;
            Ok((file, format!("{HEADER}{yaml}")))
        })
        .collect()
}
