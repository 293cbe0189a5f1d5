//! Command line of `peersan-csi-controller`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use peersan_csi_driver::controller::{NodeEndpoint, NodesFile};

#[derive(Debug, Parser)]
#[command(
    name = "peersan-csi-controller",
    version,
    about = "peersan CSI controller (Identity and Controller services)"
)]
pub struct Args {
    /// CSI endpoint to serve: unix:///path/csi.sock or an absolute path.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,
    /// YAML file naming the node agents (`nodes: [{name, api}]`).
    #[arg(long, env = "PEERSAN_NODES_FILE")]
    pub nodes: PathBuf,
    /// Log filter when RUST_LOG is not set.
    #[arg(long, env = "PEERSAN_LOG", default_value = "info")]
    pub log_level: String,
}

impl Args {
    /// Reads and checks the nodes file; errors name the file and the problem.
    pub fn nodes_file(&self) -> anyhow::Result<Vec<NodeEndpoint>> {
        let text = std::fs::read_to_string(&self.nodes).with_context(|| format!("--nodes {}", self.nodes.display()))?;
        let f: NodesFile = serde_yaml::from_str(&text)
            .with_context(|| format!("--nodes {}: not a valid nodes file", self.nodes.display()))?;
        f.validate().map_err(|e| anyhow::anyhow!("--nodes {}: {e}", self.nodes.display()))?;
        Ok(f.nodes)
    }
}
