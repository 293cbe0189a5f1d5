//! Which Kubernetes nodes are members of a VirtualSAN: those its label selector matches and
//! those it names.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use peersan_crds::virtualsan::NodeSelection;

/// Whether `selector` matches an object with `labels`, with Kubernetes' semantics: every
/// `matchLabels` pair and every `matchExpressions` requirement must hold; an empty selector
/// matches everything. `Err` names a requirement the API server would refuse (unknown
/// operator, values where none are allowed or none where some are needed).
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> Result<bool, String> {
    for (key, value) in selector.match_labels.iter().flatten() {
        if labels.get(key) != Some(value) {
            return Ok(false);
        }
    }
    for req in selector.match_expressions.iter().flatten() {
        if !requirement_matches(req, labels)? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn requirement_matches(req: &LabelSelectorRequirement, labels: &BTreeMap<String, String>) -> Result<bool, String> {
    let values = req.values.as_deref().unwrap_or_default();
    let value = labels.get(&req.key);
    match req.operator.as_str() {
        "In" | "NotIn" if values.is_empty() => {
            Err(format!("selector requirement on {:?}: operator {} needs values", req.key, req.operator))
        }
        "Exists" | "DoesNotExist" if !values.is_empty() => {
            Err(format!("selector requirement on {:?}: operator {} takes no values", req.key, req.operator))
        }
        "In" => Ok(value.is_some_and(|v| values.contains(v))),
        "NotIn" => Ok(!value.is_some_and(|v| values.contains(v))),
        "Exists" => Ok(value.is_some()),
        "DoesNotExist" => Ok(value.is_none()),
        other => Err(format!(
            "selector requirement on {:?}: unknown operator {other:?} (In, NotIn, Exists, DoesNotExist)",
            req.key
        )),
    }
}

/// The members of a VirtualSAN: node name → its Node object, or `None` for a node named in
/// `names` that has no Node object (a member that stays pending). Sorted by name.
pub fn select_members<'a>(
    selection: &NodeSelection,
    nodes: impl IntoIterator<Item = &'a Node>,
) -> Result<BTreeMap<String, Option<&'a Node>>, String> {
    let names: BTreeSet<&str> = selection.names.iter().map(String::as_str).collect();
    let mut members = BTreeMap::new();
    for node in nodes {
        let Some(name) = node.metadata.name.as_deref() else { continue };
        let selected = match &selection.selector {
            Some(selector) => {
                let empty = BTreeMap::new();
                selector_matches(selector, node.metadata.labels.as_ref().unwrap_or(&empty))?
            }
            None => false,
        };
        if selected || names.contains(name) {
            members.insert(name.to_owned(), Some(node));
        }
    }
    for name in names {
        members.entry(name.to_owned()).or_insert(None);
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node(name: &str, labels: &[(&str, &str)]) -> Node {
        let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        serde_json::from_value(json!({ "metadata": { "name": name, "labels": labels } })).unwrap()
    }

    fn selection(v: serde_json::Value) -> NodeSelection {
        serde_json::from_value(v).unwrap()
    }

    fn names(m: &BTreeMap<String, Option<&Node>>) -> Vec<(String, bool)> {
        m.iter().map(|(k, v)| (k.clone(), v.is_some())).collect()
    }

    #[test]
    fn match_labels_and_expressions() {
        let nodes = [
            node("a", &[("peersan.io/san", "one"), ("zone", "x")]),
            node("b", &[("peersan.io/san", "one"), ("zone", "y")]),
            node("c", &[("peersan.io/san", "two")]),
            node("d", &[]),
        ];
        let sel = selection(json!({ "selector": { "matchLabels": { "peersan.io/san": "one" } } }));
        let m = select_members(&sel, &nodes).unwrap();
        assert_eq!(names(&m), [("a".into(), true), ("b".into(), true)]);

        let sel = selection(json!({ "selector": { "matchLabels": { "peersan.io/san": "one" },
            "matchExpressions": [{ "key": "zone", "operator": "NotIn", "values": ["y"] }] } }));
        assert_eq!(names(&select_members(&sel, &nodes).unwrap()), [("a".into(), true)]);

        let sel = selection(json!({ "selector": {
            "matchExpressions": [{ "key": "peersan.io/san", "operator": "In", "values": ["one", "two"] }] } }));
        assert_eq!(select_members(&sel, &nodes).unwrap().len(), 3);

        // NotIn matches nodes without the label; Exists and DoesNotExist look at the key.
        let sel = selection(json!({ "selector": {
            "matchExpressions": [{ "key": "zone", "operator": "NotIn", "values": ["x"] }] } }));
        assert_eq!(select_members(&sel, &nodes).unwrap().keys().cloned().collect::<Vec<_>>(), ["b", "c", "d"]);
        let sel = selection(json!({ "selector": {
            "matchExpressions": [{ "key": "zone", "operator": "Exists" }] } }));
        assert_eq!(select_members(&sel, &nodes).unwrap().keys().cloned().collect::<Vec<_>>(), ["a", "b"]);
        let sel = selection(json!({ "selector": {
            "matchExpressions": [{ "key": "zone", "operator": "DoesNotExist" }] } }));
        assert_eq!(select_members(&sel, &nodes).unwrap().keys().cloned().collect::<Vec<_>>(), ["c", "d"]);

        // An empty selector selects every node.
        let sel = selection(json!({ "selector": {} }));
        assert_eq!(select_members(&sel, &nodes).unwrap().len(), 4);
    }

    #[test]
    fn names_join_the_selected_and_may_lack_a_node() {
        let nodes = [node("a", &[("san", "1")]), node("b", &[]), node("c", &[])];
        let sel = selection(json!({ "selector": { "matchLabels": { "san": "1" } }, "names": ["c", "ghost", "a"] }));
        let m = select_members(&sel, &nodes).unwrap();
        assert_eq!(names(&m), [("a".into(), true), ("c".into(), true), ("ghost".into(), false)]);

        let sel = selection(json!({ "names": ["b"] }));
        assert_eq!(names(&select_members(&sel, &nodes).unwrap()), [("b".into(), true)]);
    }

    #[test]
    fn malformed_requirements_are_reported() {
        let nodes = [node("a", &[])];
        for (req, needle) in [
            (json!({ "key": "k", "operator": "Near", "values": ["x"] }), "unknown operator"),
            (json!({ "key": "k", "operator": "In" }), "needs values"),
            (json!({ "key": "k", "operator": "Exists", "values": ["x"] }), "takes no values"),
        ] {
            let sel = selection(json!({ "selector": { "matchExpressions": [req] } }));
            let e = select_members(&sel, &nodes).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }
}
