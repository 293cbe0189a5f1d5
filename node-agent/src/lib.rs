//! peersan node agent: the replica store, the mirror engine, the peer protocol, the block
//! frontends (NBD, FUSE + loop) and the agent API. The binaries `peersan-node-agent` (the
//! daemon), `peersan` (the CLI and demo) and `peersan-bench` are built on this library.

pub mod agent;
pub mod api;
pub mod block;
pub mod config;
pub mod csi;
pub mod daemon;
pub mod engine;
pub mod frontend;
pub mod fuse;
pub mod k8s;
pub mod localcluster;
pub mod nbd;
pub mod peer;
pub mod replica;
