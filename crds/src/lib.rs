//! Custom resource types of peersan's Kubernetes API (group `peersan.io`).
//!
//! The `VirtualSAN` and per-volume kinds are defined together with the control plane;
//! this crate currently holds the names that every component shares.

/// API group of every peersan custom resource.
pub const API_GROUP: &str = "peersan.io";

/// Name under which the CSI driver registers with kubelet.
pub const CSI_DRIVER_NAME: &str = "csi.peersan.io";
