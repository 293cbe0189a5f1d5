//! Status conditions: the new set from the previous one, keeping `lastTransitionTime` where
//! a condition's status did not change.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use peersan_crds::{Condition, ConditionStatus};

/// A condition as a reconciliation computes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    /// Condition type (`Ready`, …).
    pub type_: &'static str,
    /// Whether it holds.
    pub status: ConditionStatus,
    /// CamelCase reason.
    pub reason: String,
    /// Details for people.
    pub message: String,
}

impl Desired {
    /// A condition of `type_`, `True` when `holds`.
    pub fn new(type_: &'static str, holds: bool, reason: impl Into<String>, message: impl Into<String>) -> Desired {
        let status = if holds { ConditionStatus::True } else { ConditionStatus::False };
        Desired { type_, status, reason: reason.into(), message: message.into() }
    }
}

/// `now` to the second: the precision of a `Time` on the wire, so that a condition read back
/// equals the one written.
pub fn now_seconds(now: Timestamp) -> Timestamp {
    Timestamp::from_second(now.as_second()).unwrap_or(now)
}

/// The conditions `desired`, each with `observedGeneration` = `generation` and the
/// `lastTransitionTime` of the previous condition of its type if that had the same status,
/// else `now`.
pub fn merge(previous: &[Condition], desired: Vec<Desired>, now: Timestamp, generation: Option<i64>) -> Vec<Condition> {
    desired
        .into_iter()
        .map(|d| {
            let last_transition_time = previous
                .iter()
                .find(|p| p.type_ == d.type_ && p.status == d.status)
                .map_or_else(|| Time(now_seconds(now)), |p| p.last_transition_time.clone());
            Condition {
                type_: d.type_.to_owned(),
                status: d.status,
                reason: d.reason,
                message: d.message,
                last_transition_time,
                observed_generation: generation,
            }
        })
        .collect()
}

/// The condition of `type_` in `conditions`.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether `conditions` has `type_` with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == ConditionStatus::True)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::SignedDuration;

    use super::*;

    #[test]
    fn transition_time_changes_only_with_the_status() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1 = t0 + SignedDuration::from_millis(61_250);
        let first = merge(
            &[],
            vec![Desired::new("Ready", false, "NodesNotReady", "0/3"), Desired::new("Degraded", false, "InSync", "")],
            t0,
            Some(1),
        );
        assert_eq!(first[0].last_transition_time, Time(t0));
        assert_eq!(first[0].observed_generation, Some(1));

        // Same status, other reason, message and generation: the time stays.
        let second = merge(
            &first,
            vec![Desired::new("Ready", false, "InvalidSpec", "x"), Desired::new("Degraded", true, "NodesOffline", "a")],
            t1,
            Some(2),
        );
        assert_eq!(second[0].last_transition_time, Time(t0));
        assert_eq!((second[0].reason.as_str(), second[0].observed_generation), ("InvalidSpec", Some(2)));
        // Status changed: now, to the second.
        assert_eq!(second[1].last_transition_time, Time("2026-01-01T00:01:01Z".parse().unwrap()));
        assert!(is_true(&second, "Degraded"));
        assert!(!is_true(&second, "Ready"));
        assert!(!is_true(&second, "SplitBrain"));

        // Unchanged input gives an equal set: nothing to write.
        let again = merge(
            &second,
            vec![Desired::new("Ready", false, "InvalidSpec", "x"), Desired::new("Degraded", true, "NodesOffline", "a")],
            t1 + SignedDuration::from_secs(30),
            Some(2),
        );
        assert_eq!(again, second);
    }
}
