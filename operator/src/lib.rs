//! peersan operator: reconciles `VirtualSAN` resources into per-node configuration
//! (`SANNode`), a StorageClass and status, watches node heartbeats and moves a volume's
//! write priority (its Lease) away from a node whose heartbeat expired.
//!
//! - [`config`]: command line and environment.
//! - [`run`]: the process entry point (`run::run`), also used by the multi-call binary.
//! - [`controller`]: the reconciler, its context and the watches that trigger it.
//! - Pure decisions, unit tested without an API server: [`members`] (who is a member),
//!   [`address`] (where a member mirrors), [`liveness`] (heartbeat Leases), [`volume`]
//!   (health, failover target, fencing epoch), [`conditions`] (status conditions).

pub mod address;
pub mod conditions;
pub mod config;
pub mod controller;
pub mod error;
pub mod events;
mod http;
pub mod liveness;
pub mod members;
pub mod metrics;
pub mod run;
pub mod volume;

pub use error::{Error, ErrorKind};

/// Field manager of every write the operator makes (server-side apply and updates).
pub const MANAGER: &str = "peersan-operator";

/// Finalizer the operator puts on every VirtualSAN, so that it can delete the SAN's
/// SANNodes and StorageClass (and refuse while volumes remain).
pub const FINALIZER: &str = "peersan.io/cleanup";
