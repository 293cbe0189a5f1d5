//! Prometheus metrics of the operator.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::ErrorKind;

/// Label set of a metric: `(name, value)` pairs.
pub type Labels = Vec<(String, String)>;

/// The operator's metrics and their registry (prefix `peersan_operator_`).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Reconciliations started.
    pub reconciles: Counter,
    /// Failed reconciliations, by error kind.
    pub reconcile_errors: Family<Labels, Counter>,
    /// Member nodes whose heartbeat expired, by VirtualSAN.
    pub nodes_offline: Family<Labels, Gauge>,
    /// Write priority moved away from an offline node.
    pub failovers: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("peersan_operator");
        let reconciles = Counter::default();
        registry.register("reconciles", "Reconciliations of VirtualSANs started", reconciles.clone());
        let reconcile_errors = Family::<Labels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed reconciliations by error kind (conflict, invalid_spec, blocked, transient)",
            reconcile_errors.clone(),
        );
        let nodes_offline = Family::<Labels, Gauge>::default();
        registry.register(
            "nodes_offline",
            "Member nodes whose heartbeat expired, by VirtualSAN",
            nodes_offline.clone(),
        );
        let failovers = Counter::default();
        registry.register(
            "failovers",
            "Volumes whose write priority was moved away from an offline node",
            failovers.clone(),
        );
        Metrics { registry, reconciles, reconcile_errors, nodes_offline, failovers }
    }
}

impl Metrics {
    /// Counts a failed reconciliation.
    pub fn error(&self, kind: ErrorKind) {
        self.reconcile_errors.get_or_create(&vec![("kind".to_owned(), kind.as_str().to_owned())]).inc();
    }

    /// Sets the number of offline members of `virtual_san`.
    pub fn set_nodes_offline(&self, virtual_san: &str, offline: usize) {
        let labels = vec![("virtualsan".to_owned(), virtual_san.to_owned())];
        self.nodes_offline.get_or_create(&labels).set(i64::try_from(offline).unwrap_or(i64::MAX));
    }

    /// Forgets the gauges of a deleted VirtualSAN.
    pub fn forget(&self, virtual_san: &str) {
        self.nodes_offline.remove(&vec![("virtualsan".to_owned(), virtual_san.to_owned())]);
    }

    /// The metrics in Prometheus' text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String does not fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format() {
        let m = Metrics::default();
        m.reconciles.inc();
        m.error(ErrorKind::Conflict);
        m.set_nodes_offline("san", 2);
        m.failovers.inc();
        let text = m.encode();
        for line in [
            "peersan_operator_reconciles_total 1",
            "peersan_operator_reconcile_errors_total{kind=\"conflict\"} 1",
            "peersan_operator_nodes_offline{virtualsan=\"san\"} 2",
            "peersan_operator_failovers_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
        m.forget("san");
        assert!(!m.encode().contains("virtualsan=\"san\""));
    }
}
