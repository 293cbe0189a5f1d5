//! Events (events.k8s.io/v1) about the operator's cluster-scoped objects.
//!
//! Kubernetes stores an Event in a namespace even when the object it is about has none.
//! For new-style Events (with `eventTime`) about a cluster-scoped object, Kubernetes 1.20
//! accepts only the namespace `kube-system` (later versions also `default`), while
//! `kube::runtime::events::Recorder` puts them in `default`. This recorder writes them to
//! `kube-system`, where `kubectl describe` of the object finds them on every version.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Client, Resource};

pub use kube::runtime::events::{EventType, Reporter};

/// Namespace of Events about cluster-scoped objects.
pub const CLUSTER_EVENTS_NAMESPACE: &str = "kube-system";

/// Publishes Events as `reporter`.
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    reporter: Reporter,
}

impl Recorder {
    /// A recorder reporting as `reporter`.
    pub fn new(client: Client, reporter: Reporter) -> Recorder {
        Recorder { client, reporter }
    }

    /// The Event about `regarding` (its namespace: the object's, or [`CLUSTER_EVENTS_NAMESPACE`]).
    pub fn event(
        &self,
        regarding: ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
        now: Timestamp,
    ) -> Event {
        let namespace = regarding.namespace.clone().unwrap_or_else(|| CLUSTER_EVENTS_NAMESPACE.to_owned());
        let object = regarding.name.clone().unwrap_or_else(|| self.reporter.controller.clone());
        Event {
            metadata: ObjectMeta {
                name: Some(format!("{object}.{:x}", now.as_nanosecond())),
                namespace: Some(namespace),
                ..Default::default()
            },
            action: Some(reason.to_owned()),
            reason: Some(reason.to_owned()),
            note: Some(truncate(note, 1024)),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding),
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(
                self.reporter.instance.clone().unwrap_or_else(|| self.reporter.controller.clone()),
            ),
            type_: Some(match type_ {
                EventType::Normal => "Normal".to_owned(),
                EventType::Warning => "Warning".to_owned(),
            }),
            ..Default::default()
        }
    }

    /// Publishes an Event about `regarding`.
    pub async fn publish<K: Resource<DynamicType = ()>>(
        &self,
        regarding: &K,
        type_: EventType,
        reason: &str,
        note: String,
    ) -> Result<(), kube::Error> {
        let event = self.event(regarding.object_ref(&()), type_, reason, note, Timestamp::now());
        let namespace = event.metadata.namespace.clone().unwrap_or_default();
        Api::<Event>::namespaced(self.client.clone(), &namespace).create(&PostParams::default(), &event).await?;
        Ok(())
    }
}

/// At most `max` bytes, cut at a character boundary.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_at_a_char_boundary() {
        assert_eq!(truncate("abc".into(), 5), "abc");
        assert_eq!(truncate("aé".into(), 2), "a");
    }
}
