//! peersan's CSI driver: the CSI v1 protocol compiled with tonic, the Identity service
//! (served by both the controller binary and the node agent), the Controller service (the
//! `peersan-csi-controller` binary), and what both sides share: the one mapping of errors
//! to gRPC codes, the per-volume concurrency guard, request logging with secrets stripped,
//! and serving on a unix socket. The Node service lives in the node agent, which owns the
//! volumes' block devices.

pub mod agent;
pub mod cluster;
pub mod controller;
pub mod error;
pub mod identity;
pub mod limiter;
pub mod log;
pub mod params;
pub mod run;
pub mod serve;

/// The CSI v1 messages and services.
pub mod pb {
    tonic::include_proto!("csi.v1");
}

pub use peersan_crds::CSI_DRIVER_NAME;

/// Topology key under which every node reports its name (NodeGetInfo) and every volume
/// the nodes holding its replicas (CreateVolume). A volume is accessible on the nodes
/// that hold one of its replicas.
pub const TOPOLOGY_NODE_KEY: &str = "topology.csi.peersan.io/node";

/// Version reported by GetPluginInfo.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
