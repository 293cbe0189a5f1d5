//! The peer protocol between mirror engines; see `PROTOCOL.md` beside this file.

pub mod client;
pub mod control;
pub mod handshake;
pub mod proto;
pub mod server;
pub mod writer;
