//! Code shared by the binaries.

pub mod agent;
