//! Command line of the operator, with environment fallbacks.

use std::net::SocketAddr;

use clap::Args;

/// Default TCP port the node agents listen on for their peers.
pub const DEFAULT_PEER_PORT: u16 = 7700;

/// Options of `peersan-operator` (and of `peersan operator`).
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct OperatorArgs {
    /// Namespace peersan runs in: where the heartbeat and write-priority Leases live.
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// TCP port of the node agents' replication listener, appended to every replication
    /// address.
    #[arg(long, env = "PEERSAN_PEER_PORT", default_value_t = DEFAULT_PEER_PORT)]
    pub peer_port: u16,
    /// Address to serve `GET /healthz` and `GET /readyz` on (for example `0.0.0.0:8081`).
    #[arg(long)]
    pub health_addr: Option<SocketAddr>,
    /// Address to serve Prometheus metrics (`GET /metrics`) on (for example `0.0.0.0:9090`).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Log filter, in `tracing_subscriber::EnvFilter` syntax (`info`, `debug,hyper=info`).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log: String,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: OperatorArgs,
    }

    #[test]
    fn flags_and_defaults() {
        let cli = Cli::try_parse_from([
            "peersan-operator",
            "--namespace",
            "peersan-system",
            "--health-addr",
            "127.0.0.1:8081",
        ])
        .unwrap();
        assert_eq!(cli.args.namespace, "peersan-system");
        assert_eq!(cli.args.peer_port, DEFAULT_PEER_PORT);
        assert_eq!(cli.args.health_addr, Some("127.0.0.1:8081".parse().unwrap()));
        assert_eq!(cli.args.metrics_addr, None);
        if std::env::var_os("RUST_LOG").is_none() {
            assert_eq!(cli.args.log, "info");
        }

        let cli =
            Cli::try_parse_from(["peersan-operator", "--namespace", "ns", "--peer-port", "7800", "--log", "debug"])
                .unwrap();
        assert_eq!(cli.args.peer_port, 7800);
        assert_eq!(cli.args.log, "debug");
        assert!(Cli::try_parse_from(["peersan-operator", "--namespace", "ns", "--peer-port", "70000"]).is_err());
    }
}
