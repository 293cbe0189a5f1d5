//! `peersan-node-agent --config node.yaml` (standalone) or `peersan-node-agent --kubernetes` (configured by the Kubernetes API): runs a node.

mod common;

use clap::Parser;
use common::agent::{AgentArgs, run_agent};

#[derive(Parser, Debug)]
#[command(name = "peersan-node-agent", version, about = "peersan node agent")]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
}

fn main() -> anyhow::Result<()> {
    run_agent(Cli::parse().agent)
}
