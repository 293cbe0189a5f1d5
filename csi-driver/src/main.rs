//! `peersan-csi-controller`: serves the CSI Identity and Controller services on a unix
//! socket, for Kubernetes' external-provisioner, external-attacher and external-resizer.

use clap::Parser;
use peersan_csi_driver::run::{ControllerArgs, run};

#[derive(Debug, Parser)]
#[command(
    name = "peersan-csi-controller",
    version,
    about = "peersan CSI controller (Identity and Controller services)"
)]
struct Cli {
    #[command(flatten)]
    args: ControllerArgs,
}

fn main() -> anyhow::Result<()> {
    run(Cli::parse().args)
}
