//! peersan operator. The reconciler of VirtualSAN resources is part of the control plane;
//! until it exists this binary only reports that it has nothing to run.

fn main() -> std::process::ExitCode {
    eprintln!(
        "peersan-operator: the {} control plane is not part of this build; run node agents in standalone mode (peersan-node-agent --config node.yaml)",
        peersan_crds::API_GROUP
    );
    std::process::ExitCode::from(2)
}
