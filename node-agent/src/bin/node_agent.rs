//! `peersan-node-agent --config node.yaml`: runs a node in standalone mode.

mod common;

use clap::Parser;
use common::agent::{AgentArgs, run_agent};

#[derive(Parser, Debug)]
#[command(name = "peersan-node-agent", version, about = "peersan node agent (standalone mode)")]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
}

fn main() -> anyhow::Result<()> {
    run_agent(Cli::parse().agent)
}
