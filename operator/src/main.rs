//! `peersan-operator`: reconciles VirtualSAN resources into SANNodes, StorageClasses and
//! status, and moves write priority away from offline nodes. See `peersan_operator::run`.

use clap::Parser;
use peersan_operator::run::{OperatorArgs, run};

/// peersan operator: reconciles VirtualSAN resources (Kubernetes API server from KUBECONFIG,
/// else in-cluster).
#[derive(Parser, Debug)]
#[command(name = "peersan-operator", version)]
struct Cli {
    #[command(flatten)]
    args: OperatorArgs,
}

fn main() -> anyhow::Result<()> {
    run(Cli::parse().args)
}
