//! The generated CRDs: checked-in YAML in sync with the types, structural-schema rules, and
//! golden checks of the schema properties the API depends on.

use std::path::Path;

use serde_json::{Value, json};

use crate::{CRD_DIRS, MirrorVolume, SANNode, VirtualSAN, crd_files, crds};

fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn checked_in_yaml_matches_the_types() {
    let files = crd_files().unwrap();
    let mut stale = Vec::new();
    for dir in CRD_DIRS {
        for (name, text) in &files {
            let path = repo_root().join(dir).join(name);
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                stale.push(format!("{dir}/{name}"));
            }
        }
    }
    assert!(
        stale.is_empty(),
        "CRD YAML differs from the types: {stale:?}; run `cargo run -p peersan-crds --bin crdgen -- --write`"
    );
    // The chart's directory holds exactly the generated files.
    let mut in_chart: Vec<String> = std::fs::read_dir(repo_root().join(CRD_DIRS[1]))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    in_chart.sort();
    let mut expected: Vec<String> = files.iter().map(|(n, _)| n.to_string()).collect();
    expected.sort();
    assert_eq!(in_chart, expected);
}

/// The `openAPIV3Schema` of a CRD as JSON.
fn schema_of(file: &str) -> Value {
    let (_, crd) = crds().into_iter().find(|(f, _)| *f == file).unwrap();
    let crd = serde_json::to_value(crd).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

fn crd_json(file: &str) -> Value {
    let (_, crd) = crds().into_iter().find(|(f, _)| *f == file).unwrap();
    serde_json::to_value(crd).unwrap()
}

const JUNCTORS: [&str; 4] = ["allOf", "anyOf", "oneOf", "not"];

/// Subschemas of a node: (keyword, path segment, schema).
fn children(node: &Value) -> Vec<(&'static str, String, &Value)> {
    let mut out = Vec::new();
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        out.extend(props.iter().map(|(name, p)| ("properties", format!("properties/{name}"), p)));
    }
    for key in ["items", "additionalProperties"] {
        if let Some(p) = node.get(key).filter(|p| p.is_object()) {
            out.push((key, key.to_owned(), p));
        }
    }
    for key in JUNCTORS {
        match node.get(key) {
            Some(Value::Array(list)) => {
                out.extend(list.iter().enumerate().map(|(i, p)| (key, format!("{key}/{i}"), p)))
            }
            Some(p @ Value::Object(_)) => out.push((key, key.to_owned(), p)),
            _ => {}
        }
    }
    out
}

/// Checks the rules of a Kubernetes structural schema that the API server enforces on CRD
/// creation, so that a violation fails here and not only against a real cluster.
fn check_structural(node: &Value, path: &str, in_junctor: bool, outer_props: Option<&Value>, errors: &mut Vec<String>) {
    let obj = node.as_object().unwrap();
    if in_junctor {
        for forbidden in ["type", "description", "default", "nullable", "additionalProperties", "title"] {
            if obj.contains_key(forbidden) {
                errors.push(format!("{path}: `{forbidden}` inside a logical junctor"));
            }
        }
        // Properties named in a junctor must be declared by the schema it constrains.
        if let Some(props) = obj.get("properties").and_then(Value::as_object) {
            for name in props.keys() {
                if outer_props.and_then(|o| o.get(name)).is_none() {
                    errors.push(format!("{path}: junctor names property {name:?} the schema does not declare"));
                }
            }
        }
    } else {
        let preserves =
            obj.contains_key("x-kubernetes-preserve-unknown-fields") || obj.contains_key("x-kubernetes-int-or-string");
        if !obj.contains_key("type") && !preserves {
            errors.push(format!("{path}: no `type`"));
        }
        for forbidden in ["$ref", "definitions", "uniqueItems", "x-kubernetes-validations"] {
            if obj.contains_key(forbidden) {
                errors.push(format!("{path}: `{forbidden}` is not accepted by Kubernetes 1.20"));
            }
        }
        if obj.get("x-kubernetes-list-type") == Some(&json!("map")) {
            let item = &obj["items"];
            let required = item["required"].as_array().cloned().unwrap_or_default();
            for key in obj["x-kubernetes-list-map-keys"].as_array().unwrap() {
                if !required.contains(key) {
                    errors.push(format!("{path}: list-map key {key} is not required in the items"));
                }
            }
        }
    }
    let own_props = if in_junctor { outer_props } else { obj.get("properties") };
    for (key, segment, child) in children(node) {
        let child_in_junctor = in_junctor || JUNCTORS.contains(&key);
        let child_path = format!("{path}/{segment}");
        // A property of a junctor branch is checked against the outer property's properties.
        let outer = if key == "properties" && in_junctor { None } else { own_props };
        check_structural(child, &child_path, child_in_junctor, outer, errors);
    }
}

#[test]
fn schemas_are_structural() {
    for (file, _) in crds() {
        let mut errors = Vec::new();
        check_structural(&schema_of(file), file, false, None, &mut errors);
        assert!(errors.is_empty(), "{file}:\n{}", errors.join("\n"));
    }
}

#[test]
fn the_structural_check_catches_violations() {
    let bad = json!({
        "type": "object",
        "properties": {
            "a": { "type": "string" },
            "b": { "properties": {} },
            "c": { "type": "array", "items": { "type": "object", "properties": { "k": { "type": "string" } } },
                   "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["k"] }
        },
        "oneOf": [{ "type": "object", "required": ["a"] }, { "properties": { "z": { "enum": ["x"] } } }]
    });
    let mut errors = Vec::new();
    check_structural(&bad, "bad", false, None, &mut errors);
    let text = errors.join("\n");
    for expected in
        ["bad/properties/b: no `type`", "`type` inside a logical junctor", "property \"z\"", "\"k\" is not required"]
    {
        assert!(text.contains(expected), "{expected:?} not reported in:\n{text}");
    }
}

#[test]
fn virtualsan_schema() {
    let crd = crd_json("virtualsan.yaml");
    assert_eq!(crd["metadata"]["name"], "virtualsans.peersan.io");
    assert_eq!(crd["spec"]["scope"], "Cluster");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["vsan"]));
    assert_eq!(crd["spec"]["names"]["categories"], json!(["peersan"]));
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(version["subresources"]["status"], json!({}));
    let columns: Vec<&str> =
        version["additionalPrinterColumns"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(columns, ["Ready", "Nodes", "Replicas", "Link", "Volumes", "Age"]);

    let spec = &schema_of("virtualsan.yaml")["properties"]["spec"];
    assert_eq!(spec["required"], json!(["nodes", "pool"]));
    let p = &spec["properties"];
    assert_eq!(
        (&p["replicas"]["minimum"], &p["replicas"]["maximum"], &p["replicas"]["default"]),
        (&json!(2.0), &json!(3.0), &json!(2))
    );
    assert_eq!(p["pool"]["oneOf"], json!([{ "required": ["path"] }, { "required": ["device"] }]));
    assert_eq!(p["pool"]["properties"]["path"]["pattern"], "^/");
    assert_eq!(p["nodePools"]["items"]["properties"]["pool"]["oneOf"], p["pool"]["oneOf"]);
    assert_eq!(p["nodePools"]["x-kubernetes-list-map-keys"], json!(["node"]));
    assert_eq!(p["nodes"]["allOf"], json!([{ "anyOf": [{ "required": ["selector"] }, { "required": ["names"] }] }]));
    assert_eq!(p["nodes"]["properties"]["names"]["x-kubernetes-list-type"], "set");
    assert_eq!(p["nodes"]["properties"]["names"]["minItems"], 1);
    let link = &p["replicationLink"];
    assert_eq!(link["properties"]["mode"]["enum"], json!(["Dedicated", "Cluster"]));
    assert_eq!(link["properties"]["mode"]["default"], "Cluster");
    assert_eq!(link["default"], json!({ "mode": "Cluster" }));
    assert_eq!(link["properties"]["cidr"]["format"], "cidr");
    assert_eq!(link["allOf"].as_array().unwrap().len(), 3, "{link}");
    assert_eq!(p["writePolicy"]["enum"], json!(["SingleWriter", "MultiWriter"]));
    assert_eq!(p["writePolicy"]["default"], "SingleWriter");
    assert_eq!(p["degradedWrites"]["enum"], json!(["Allow", "Refuse"]));
    assert_eq!(p["degradedWrites"]["default"], "Allow");
    assert_eq!(p["resyncRate"]["default"], "100MiB");
    assert_eq!(p["resyncRate"]["pattern"], crate::common::RATE_PATTERN);

    let status = &schema_of("virtualsan.yaml")["properties"]["status"]["properties"];
    assert_condition_list(&status["conditions"]);
    assert_eq!(status["nodes"]["x-kubernetes-list-map-keys"], json!(["name"]));
    assert_eq!(
        status["nodes"]["items"]["properties"]["state"]["enum"],
        json!(["pending", "ready", "degraded", "offline"])
    );
}

/// Conditions: keyed by type, nullable, the metav1.Condition fields and constraints.
fn assert_condition_list(conditions: &Value) {
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
    assert_eq!(conditions["nullable"], true);
    let item = &conditions["items"];
    assert_eq!(item["required"], json!(["lastTransitionTime", "reason", "status", "type"]));
    assert_eq!(item["properties"]["status"]["enum"], json!(["True", "False", "Unknown"]));
    assert_eq!(item["properties"]["lastTransitionTime"]["format"], "date-time");
    assert_eq!(item["properties"]["message"]["nullable"], true);
    assert_eq!(item["properties"]["reason"]["minLength"], 1);
}

#[test]
fn mirrorvolume_schema() {
    let crd = crd_json("mirrorvolume.yaml");
    assert_eq!(crd["spec"]["scope"], "Cluster");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["mvol"]));
    let columns: Vec<&str> = crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Size", "Health", "Writer", "Epoch", "Attached", "SAN", "Age"]);

    let schema = schema_of("mirrorvolume.yaml");
    let spec = &schema["properties"]["spec"];
    assert_eq!(spec["required"], json!(["replicas", "sizeBytes", "virtualSAN"]));
    let size = &spec["properties"]["sizeBytes"];
    assert_eq!((&size["minimum"], &size["multipleOf"]), (&json!(4096.0), &json!(4096.0)));
    let replicas = &spec["properties"]["replicas"];
    assert_eq!((&replicas["minItems"], &replicas["maxItems"]), (&json!(1), &json!(3)));
    assert_eq!(replicas["x-kubernetes-list-type"], "set");

    let status = &schema["properties"]["status"]["properties"];
    assert_eq!(status["health"]["enum"], json!(["healthy", "degraded", "resyncing", "unavailable", "split-brain"]));
    let replica = &status["replicas"]["items"]["properties"];
    assert_eq!(
        replica["state"]["enum"],
        json!(["in-sync", "catching-up", "outdated", "diskless", "disconnected", "split-brain"])
    );
    assert_eq!(status["replicas"]["x-kubernetes-list-map-keys"], json!(["node"]));
    assert_eq!(status["attachedNodes"]["x-kubernetes-list-type"], "set");
    assert_eq!(status["attachedNodes"]["nullable"], true);
    assert_eq!(status["epoch"]["minimum"], 0.0);
    assert_condition_list(&status["conditions"]);
}

#[test]
fn sannode_schema() {
    let crd = crd_json("sannode.yaml");
    assert_eq!(crd["spec"]["scope"], "Cluster");
    let schema = schema_of("sannode.yaml");
    let spec = &schema["properties"]["spec"];
    assert_eq!(spec["required"], json!(["pool", "virtualSAN"]));
    assert_eq!(spec["properties"]["peers"]["x-kubernetes-list-map-keys"], json!(["name"]));
    assert_eq!(spec["properties"]["pool"]["oneOf"], json!([{ "required": ["path"] }, { "required": ["device"] }]));
    let status = &schema["properties"]["status"]["properties"];
    assert_eq!(status["pool"]["required"], json!(["allocatedBytes", "capacityBytes", "freeBytes"]));
    assert_condition_list(&status["conditions"]);
}

#[test]
fn every_list_is_nullable_except_required_ones() {
    // Kubernetes 1.20's server-side apply stores an emptied list as null; see schema.rs.
    fn walk(node: &Value, path: &str, required: &[Value], name: &str, out: &mut Vec<String>) {
        if node.get("type") == Some(&json!("array"))
            && node.get("nullable") != Some(&json!(true))
            && !required.contains(&json!(name))
        {
            out.push(path.to_owned());
        }
        let req = node.get("required").and_then(Value::as_array).cloned().unwrap_or_default();
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                walk(v, &format!("{path}.{k}"), &req, k, out);
            }
        }
        if let Some(items) = node.get("items") {
            walk(items, &format!("{path}[]"), &[], "", out);
        }
    }
    for (file, _) in crds() {
        let mut out = Vec::new();
        walk(&schema_of(file), file, &[], "", &mut out);
        // LabelSelector's own lists come from Kubernetes' schema.
        out.retain(|p| !p.contains(".selector."));
        assert!(out.is_empty(), "optional lists that are not nullable: {out:?}");
    }
}

#[test]
fn null_lists_and_messages_read_as_empty() {
    let vol: MirrorVolume = serde_json::from_value(json!({
        "apiVersion": "peersan.io/v1alpha1", "kind": "MirrorVolume", "metadata": { "name": "v" },
        "spec": { "virtualSAN": "s", "sizeBytes": 4096, "replicas": ["a"] },
        "status": { "attachedNodes": null, "replicas": null,
            "conditions": [{ "type": "Ready", "status": "True", "reason": "InSync", "message": null,
                "lastTransitionTime": "2026-01-01T00:00:00Z" }] }
    }))
    .unwrap();
    let status = vol.status.unwrap();
    assert!(status.attached_nodes.is_empty() && status.replicas.is_empty());
    assert_eq!(status.conditions[0].message, "");
    // Empty lists are left out when written, so an apply does not claim them.
    let written = serde_json::to_value(&status).unwrap();
    assert!(written.get("attachedNodes").is_none() && written.get("replicas").is_none(), "{written}");
}

#[test]
fn samples_match_the_types() {
    fn check<T: serde::de::DeserializeOwned + serde::Serialize>(file: &str) {
        let text = std::fs::read_to_string(repo_root().join("crds/samples").join(file)).unwrap();
        let value: Value = serde_yaml::from_str(&text).unwrap();
        let typed: T = serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
        // Nothing in the sample is unknown to the types (a typo would be dropped here).
        assert_eq!(serde_json::to_value(typed).unwrap(), value, "{file}");
    }
    check::<VirtualSAN>("virtualsan.yaml");
    check::<MirrorVolume>("mirrorvolume.yaml");
    check::<SANNode>("sannode.yaml");
}

#[test]
fn state_and_health_spellings_are_the_api_values() {
    use crate::mirrorvolume::{ReplicaState, VolumeHealth};
    for s in [
        ReplicaState::InSync,
        ReplicaState::CatchingUp,
        ReplicaState::Outdated,
        ReplicaState::Diskless,
        ReplicaState::Disconnected,
        ReplicaState::SplitBrain,
    ] {
        assert_eq!(serde_json::to_value(s).unwrap(), serde_json::json!(s.as_str()));
    }
    for h in [
        VolumeHealth::Healthy,
        VolumeHealth::Degraded,
        VolumeHealth::Resyncing,
        VolumeHealth::Unavailable,
        VolumeHealth::SplitBrain,
    ] {
        assert_eq!(serde_json::to_value(h).unwrap(), serde_json::json!(h.as_str()));
    }
}
