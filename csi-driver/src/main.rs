//! peersan CSI controller. The CSI services are not part of this build yet; the binary
//! reports that instead of pretending to serve.

fn main() -> std::process::ExitCode {
    eprintln!("peersan-csi-controller: the CSI driver {} is not part of this build yet", peersan_crds::CSI_DRIVER_NAME);
    std::process::ExitCode::from(2)
}
