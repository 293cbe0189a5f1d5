//! peersan's CRDs against a real kube-apiserver (v1.20.2, the oldest API the schemas target):
//! they install and become Established, valid objects are accepted with their defaults filled
//! in and shown with the printer columns, invalid ones are refused by the API server with the
//! field named, and status is written with server-side apply through the status subresource.
//!
//! Each test starts its own API server (tests/k8s/harness.rs). Where one cannot be built or
//! started the tests print `SKIPPED` and why, and pass, unless `CI` is set.

#[path = "k8s/harness.rs"]
mod k8s;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s::ApiServer;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, Status};
use kube::{Client, CustomResourceExt};
use peersan_crds::mirrorvolume::{ReplicaState, ReplicaStatus, VolumeHealth};
use peersan_crds::virtualsan::{LinkMode, NodeSelection};
use peersan_crds::{
    DegradedWrites, MirrorVolume, MirrorVolumeSpec, PoolSource, SANNode, VirtualSAN, VirtualSANSpec, WritePolicy,
};
use serde_json::{Value, json};

fn crds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// Starts an API server, applies `kubectl apply -f crds/` and waits until every CRD is
/// Established. `None` (after printing why) when no server can run here.
async fn server_with_crds() -> Option<(ApiServer, Client)> {
    let server = match ApiServer::start() {
        Ok(server) => server,
        Err(reason) => {
            eprintln!("SKIPPED: {reason}");
            return None;
        }
    };
    let out = server.kubectl().arg("apply").arg("-f").arg(crds_dir()).output().expect("running kubectl");
    assert!(out.status.success(), "kubectl apply -f crds/: {}", String::from_utf8_lossy(&out.stderr));
    let applied = String::from_utf8_lossy(&out.stdout);
    for name in [VirtualSAN::crd_name(), MirrorVolume::crd_name(), SANNode::crd_name()] {
        assert!(applied.contains(name), "kubectl apply did not create {name}: {applied}");
    }
    let client = server.client().await;
    wait_established(&client).await;
    Some((server, client))
}

/// Polls the CRDs until each has the condition Established=True.
async fn wait_established(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    for name in [VirtualSAN::crd_name(), MirrorVolume::crd_name(), SANNode::crd_name()] {
        loop {
            let crd = api.get(name).await.unwrap_or_else(|e| panic!("get crd {name}: {e}"));
            let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
            if conditions.iter().any(|c| c.type_ == "Established" && c.status == "True") {
                break;
            }
            assert!(Instant::now() < deadline, "{name} not Established after 30 s: {conditions:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn kubectl_ok(server: &ApiServer, args: &[&str]) -> String {
    let out = server.kubectl().args(args).output().expect("running kubectl");
    assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The header of `kubectl get <resource>` split into column names.
fn header(table: &str) -> Vec<String> {
    table.lines().next().unwrap_or_default().split_whitespace().map(str::to_owned).collect()
}

/// The cell of `column` in the row of object `name` of a `kubectl get` table (columns are
/// aligned with the header; an empty cell is "").
fn cell<'a>(table: &'a str, name: &str, column: &str) -> &'a str {
    let mut lines = table.lines();
    let head = lines.next().unwrap_or_default();
    let start =
        head.find(&format!(" {column}")).map(|i| i + 1).unwrap_or_else(|| panic!("no column {column}: {table}"));
    let row = lines
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no row for {name}: {table}"));
    let rest = row.get(start..).unwrap_or_default();
    rest.split("  ").next().unwrap_or_default().trim()
}

#[tokio::test]
async fn valid_objects_are_accepted_with_defaults_and_printer_columns() {
    let Some((server, client)) = server_with_crds().await else { return };

    // The samples, as a user would apply them.
    let samples = crds_dir().join("samples");
    let out = kubectl_ok(&server, &["apply", "-f", samples.to_str().unwrap()]);
    for created in ["virtualsan.peersan.io/example", "sannode.peersan.io/node-a", "mirrorvolume.peersan.io/pvc-"] {
        assert!(out.contains(created), "{created} missing from: {out}");
    }

    // A minimal VirtualSAN through the typed client: the API server fills in the defaults.
    let vsans: Api<VirtualSAN> = Api::all(client.clone());
    let minimal = serde_json::from_value::<VirtualSAN>(json!({
        "apiVersion": "peersan.io/v1alpha1", "kind": "VirtualSAN",
        "metadata": { "name": "minimal" },
        "spec": { "nodes": { "names": ["node-a", "node-b"] }, "pool": { "path": "/var/lib/peersan" } },
    }))
    .unwrap();
    let created = vsans.create(&PostParams::default(), &minimal).await.expect("create minimal VirtualSAN");
    let spec = &created.spec;
    assert_eq!(spec.replicas, 2);
    assert_eq!(spec.replication_link.mode, LinkMode::Cluster);
    assert_eq!(spec.write_policy, WritePolicy::SingleWriter);
    assert_eq!(spec.degraded_writes, DegradedWrites::Allow);
    assert_eq!(spec.resync_rate, "100MiB");
    assert_eq!(spec.pool, PoolSource::Path("/var/lib/peersan".into()));

    // Every field set, built from the Rust types.
    let mut full = VirtualSAN::new(
        "full",
        VirtualSANSpec {
            nodes: NodeSelection {
                selector: Some(
                    serde_json::from_value(json!({
                        "matchExpressions": [{ "key": "peersan.io/storage", "operator": "Exists" }]
                    }))
                    .unwrap(),
                ),
                names: vec!["node-d".into()],
            },
            pool: PoolSource::Device("/dev/vdb".into()),
            node_pools: vec![peersan_crds::virtualsan::NodePool {
                node: "node-d".into(),
                pool: PoolSource::Path("/srv/peersan".into()),
            }],
            replicas: 3,
            replication_link: peersan_crds::ReplicationLink {
                mode: LinkMode::Dedicated,
                cidr: Some("10.20.0.0/24".into()),
                interface: None,
                node_interfaces: vec![],
            },
            write_policy: WritePolicy::MultiWriter,
            degraded_writes: DegradedWrites::Refuse,
            resync_rate: "0".into(),
        },
    );
    let stored = vsans.create(&PostParams::default(), &full).await.expect("create full VirtualSAN");
    full.metadata = stored.metadata.clone();
    assert_eq!(stored, full, "the API server changed or dropped fields");

    let volume = MirrorVolume::new(
        "pvc-1",
        MirrorVolumeSpec {
            virtual_san: "full".into(),
            size_bytes: 1 << 30,
            replicas: vec!["node-a".into(), "node-b".into(), "node-d".into()],
            write_policy: WritePolicy::MultiWriter,
        },
    );
    Api::<MirrorVolume>::all(client.clone())
        .create(&PostParams::default(), &volume)
        .await
        .expect("create MirrorVolume");

    let table = kubectl_ok(&server, &["get", "virtualsans"]);
    assert_eq!(header(&table), ["NAME", "READY", "NODES", "REPLICAS", "LINK", "VOLUMES", "AGE"], "{table}");
    assert_eq!(cell(&table, "full", "REPLICAS"), "3", "{table}");
    assert_eq!(cell(&table, "full", "LINK"), "Dedicated", "{table}");
    assert_eq!(cell(&table, "minimal", "LINK"), "Cluster", "{table}");
    let short = kubectl_ok(&server, &["get", "vsan", "example", "-o", "name"]);
    assert_eq!(short.trim(), "virtualsan.peersan.io/example");

    let table = kubectl_ok(&server, &["get", "mvol"]);
    assert_eq!(header(&table), ["NAME", "SIZE", "HEALTH", "WRITER", "EPOCH", "ATTACHED", "AGE"], "{table}");
    assert_eq!(cell(&table, "pvc-1", "SIZE"), "1073741824", "{table}");
    let wide = kubectl_ok(&server, &["get", "mirrorvolumes", "-o", "wide"]);
    assert!(header(&wide).contains(&"SAN".to_owned()), "{wide}");

    let table = kubectl_ok(&server, &["get", "sannodes"]);
    assert_eq!(header(&table), ["NAME", "SAN", "ADDRESS", "READY", "FREE", "VOLUMES", "AGE"], "{table}");
    assert_eq!(cell(&table, "node-a", "ADDRESS"), "10.20.0.1:7700", "{table}");
    assert_eq!(cell(&table, "node-a", "SAN"), "example", "{table}");

    // The category lists all three kinds.
    let all = kubectl_ok(&server, &["get", "peersan", "-o", "name"]);
    for name in ["virtualsan.peersan.io/full", "mirrorvolume.peersan.io/pvc-1", "sannode.peersan.io/node-a"] {
        assert!(all.contains(name), "{name} missing from `kubectl get peersan`: {all}");
    }
}

/// Creates `spec` as a `kind` and returns the API server's refusal.
async fn refusal(client: &Client, resource: &ApiResource, name: &str, spec: Value) -> Status {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), resource);
    let mut obj = DynamicObject::new(name, resource);
    obj.data = json!({ "spec": spec });
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => panic!("{} {name} with spec {spec} was accepted", resource.kind),
        Err(kube::Error::Api(status)) => *status,
        Err(e) => panic!("{} {name}: unexpected error {e}", resource.kind),
    }
}

/// Checks that the API server refuses each case as invalid (422) with a message naming
/// `field` (and containing each of `words`).
async fn assert_refused(client: &Client, resource: &ApiResource, base: &Value, cases: &[Case]) {
    for (i, case) in cases.iter().enumerate() {
        let mut spec = base.clone();
        (case.edit)(&mut spec);
        let status = refusal(client, resource, &format!("invalid-{i}"), spec).await;
        eprintln!("{} {:?}: {}", resource.kind, case.what, status.message);
        assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"), "{}: {status:?}", case.what);
        for needle in std::iter::once(&case.field).chain(case.words) {
            assert!(
                status.message.contains(needle),
                "{}: the message does not name {needle:?}: {}",
                case.what,
                status.message
            );
        }
    }
}

struct Case {
    what: &'static str,
    edit: fn(&mut Value),
    field: &'static str,
    words: &'static [&'static str],
}

fn valid_vsan_spec() -> Value {
    json!({ "nodes": { "names": ["node-a", "node-b"] }, "pool": { "path": "/var/lib/peersan" } })
}

#[tokio::test]
async fn invalid_objects_are_refused_with_the_field_named() {
    let Some((server, client)) = server_with_crds().await else { return };

    let vsan = VirtualSAN::api_resource();
    let cases = [
        Case { what: "replicas 0", edit: |s| s["replicas"] = json!(0), field: "spec.replicas", words: &["2"] },
        Case { what: "replicas 4", edit: |s| s["replicas"] = json!(4), field: "spec.replicas", words: &["3"] },
        Case {
            what: "unknown link mode",
            edit: |s| s["replicationLink"] = json!({ "mode": "Fast" }),
            field: "spec.replicationLink.mode",
            words: &["Dedicated", "Cluster"],
        },
        Case {
            what: "missing pool",
            edit: |s| drop(s.as_object_mut().unwrap().remove("pool")),
            field: "spec.pool",
            words: &["Required"],
        },
        Case {
            what: "pool with neither path nor device",
            edit: |s| s["pool"] = json!({}),
            field: "spec.pool",
            words: &["Found none valid"],
        },
        Case {
            what: "pool with both path and device",
            edit: |s| s["pool"] = json!({ "path": "/var/lib/peersan", "device": "/dev/vdb" }),
            field: "spec.pool",
            words: &["Found 2 valid alternatives"],
        },
        Case {
            what: "relative pool path",
            edit: |s| s["pool"] = json!({ "path": "var/lib/peersan" }),
            field: "spec.pool.path",
            words: &[],
        },
        Case {
            what: "pool device outside /dev",
            edit: |s| s["pool"] = json!({ "device": "/var/vdb" }),
            field: "spec.pool.device",
            words: &[],
        },
        Case {
            what: "per-node pool with neither path nor device",
            edit: |s| s["nodePools"] = json!([{ "node": "node-a", "pool": {} }]),
            // 1.20 names the field of a failed oneOf without the list index.
            field: "spec.nodePools.pool",
            words: &[],
        },
        Case {
            what: "two per-node pools for one node",
            edit: |s| {
                s["nodePools"] = json!([{ "node": "node-a", "pool": { "path": "/a" } }, { "node": "node-a", "pool": { "path": "/b" } }])
            },
            field: "spec.nodePools[1]",
            words: &["Duplicate"],
        },
        Case { what: "no nodes", edit: |s| s["nodes"] = json!({}), field: "spec.nodes", words: &["at least one"] },
        Case {
            what: "empty node list",
            edit: |s| s["nodes"] = json!({ "names": [] }),
            field: "spec.nodes.names",
            words: &[],
        },
        Case {
            what: "node listed twice",
            edit: |s| s["nodes"] = json!({ "names": ["node-a", "node-a"] }),
            field: "spec.nodes.names[1]",
            words: &["Duplicate"],
        },
        Case {
            what: "Dedicated link without cidr or interface",
            edit: |s| s["replicationLink"] = json!({ "mode": "Dedicated" }),
            field: "spec.replicationLink",
            words: &["spec.replicationLink.cidr: Required value"],
        },
        Case {
            what: "Dedicated link with both cidr and interface",
            edit: |s| {
                s["replicationLink"] = json!({ "mode": "Dedicated", "cidr": "10.20.0.0/24", "interface": "eth1" })
            },
            field: "spec.replicationLink",
            words: &["Found 2 valid alternatives"],
        },
        Case {
            what: "Cluster link with a cidr",
            edit: |s| s["replicationLink"] = json!({ "cidr": "10.20.0.0/24" }),
            field: "spec.replicationLink",
            words: &["spec.replicationLink.mode: Unsupported value: \"Cluster\": supported values: \"Dedicated\""],
        },
        Case {
            what: "per-node interfaces without interface",
            edit: |s| {
                s["replicationLink"] = json!({ "mode": "Dedicated", "cidr": "10.20.0.0/24",
                    "nodeInterfaces": [{ "node": "node-a", "interface": "eth2" }] })
            },
            field: "spec.replicationLink",
            words: &["spec.replicationLink.interface: Required value"],
        },
        Case {
            what: "malformed cidr",
            edit: |s| s["replicationLink"] = json!({ "mode": "Dedicated", "cidr": "10.20.0.0/33" }),
            field: "spec.replicationLink.cidr",
            words: &["cidr"],
        },
        Case {
            what: "interface name with a slash",
            edit: |s| s["replicationLink"] = json!({ "mode": "Dedicated", "interface": "eth1/0" }),
            field: "spec.replicationLink.interface",
            words: &[],
        },
        Case {
            what: "unknown write policy",
            edit: |s| s["writePolicy"] = json!("AnyWriter"),
            field: "spec.writePolicy",
            words: &["SingleWriter", "MultiWriter"],
        },
        Case {
            what: "unknown degraded-writes policy",
            edit: |s| s["degradedWrites"] = json!("Maybe"),
            field: "spec.degradedWrites",
            words: &["Allow", "Refuse"],
        },
        Case {
            what: "resync rate in words",
            edit: |s| s["resyncRate"] = json!("fast"),
            field: "spec.resyncRate",
            words: &[],
        },
        Case {
            what: "resync rate with an unknown unit",
            edit: |s| s["resyncRate"] = json!("100MB/s"),
            field: "spec.resyncRate",
            words: &[],
        },
    ];
    assert_refused(&client, &vsan, &valid_vsan_spec(), &cases).await;

    let mvol = MirrorVolume::api_resource();
    let base = json!({ "virtualSAN": "example", "sizeBytes": 1_073_741_824_i64, "replicas": ["node-a", "node-b"] });
    let cases = [
        Case {
            what: "size not a multiple of 4096",
            edit: |s| s["sizeBytes"] = json!(1_000_000),
            field: "spec.sizeBytes",
            words: &["4096"],
        },
        Case { what: "size 0", edit: |s| s["sizeBytes"] = json!(0), field: "spec.sizeBytes", words: &[] },
        Case {
            what: "four replicas",
            edit: |s| s["replicas"] = json!(["a", "b", "c", "d"]),
            field: "spec.replicas",
            words: &["3"],
        },
        Case {
            what: "a node twice",
            edit: |s| s["replicas"] = json!(["node-a", "node-a"]),
            field: "spec.replicas[1]",
            words: &["Duplicate"],
        },
        Case {
            what: "missing VirtualSAN",
            edit: |s| drop(s.as_object_mut().unwrap().remove("virtualSAN")),
            field: "spec.virtualSAN",
            words: &["Required"],
        },
    ];
    assert_refused(&client, &mvol, &base, &cases).await;

    let snode = SANNode::api_resource();
    let base = json!({ "virtualSAN": "example", "pool": { "path": "/var/lib/peersan" }, "replicationAddress": "10.20.0.1:7700" });
    let cases = [
        Case {
            what: "address without port",
            edit: |s| s["replicationAddress"] = json!("10.20.0.1"),
            field: "spec.replicationAddress",
            words: &[],
        },
        Case {
            what: "a peer twice",
            edit: |s| s["peers"] = json!([{ "name": "node-b", "address": "10.20.0.2:7700" }, { "name": "node-b", "address": "10.20.0.3:7700" }]),
            field: "spec.peers[1]",
            words: &["Duplicate"],
        },
        Case {
            what: "pool with both path and device",
            edit: |s| s["pool"] = json!({ "path": "/var/lib/peersan", "device": "/dev/vdb" }),
            field: "spec.pool",
            words: &[],
        },
    ];
    assert_refused(&client, &snode, &base, &cases).await;

    // What a user sees from kubectl for one of them.
    let manifest = json!({ "apiVersion": "peersan.io/v1alpha1", "kind": "VirtualSAN", "metadata": { "name": "bad" },
        "spec": { "nodes": { "names": ["node-a"] }, "pool": { "path": "/p" }, "replicas": 4 } });
    let mut child = server
        .kubectl()
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running kubectl");
    child.stdin.take().unwrap().write_all(manifest.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("spec.replicas"), "kubectl apply of replicas 4: {stderr}");
}

#[tokio::test]
async fn status_is_written_by_server_side_apply() {
    let Some((_server, client)) = server_with_crds().await else { return };

    let volumes: Api<MirrorVolume> = Api::all(client.clone());
    let volume = MirrorVolume::new(
        "pvc-ssa",
        MirrorVolumeSpec {
            virtual_san: "example".into(),
            size_bytes: 64 << 20,
            replicas: vec!["node-a".into(), "node-b".into()],
            write_policy: WritePolicy::SingleWriter,
        },
    );
    let created = volumes.create(&PostParams::default(), &volume).await.expect("create MirrorVolume");
    let generation = created.metadata.generation;

    // The operator owns health, epoch, writer and the Ready condition.
    let operator = PatchParams::apply("peersan-operator").force();
    let status = json!({
        "apiVersion": "peersan.io/v1alpha1", "kind": "MirrorVolume",
        "status": {
            "observedGeneration": generation,
            "health": "resyncing", "epoch": 3, "writer": "node-a", "attachedNodes": ["node-a"],
            "replicas": [
                { "node": "node-a", "state": "in-sync" },
                { "node": "node-b", "state": "catching-up", "outOfSyncBytes": 4096, "resyncDoneBytes": 0, "resyncTotalBytes": 8192 }
            ],
            "conditions": [{ "type": "Ready", "status": "False", "reason": "Resyncing",
                "message": "node-b is catching up", "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": generation }]
        }
    });
    let after = volumes.patch_status("pvc-ssa", &operator, &Patch::Apply(&status)).await.expect("apply status");
    let st = after.status.clone().expect("status written");
    assert_eq!(st.health, Some(VolumeHealth::Resyncing));
    assert_eq!(st.epoch, Some(3));
    assert_eq!(st.writer.as_deref(), Some("node-a"));
    assert_eq!(
        st.replicas[1],
        ReplicaStatus {
            node: "node-b".into(),
            state: ReplicaState::CatchingUp,
            out_of_sync_bytes: Some(4096),
            resync_done_bytes: Some(0),
            resync_total_bytes: Some(8192),
            size_bytes: None,
            epoch: None,
            writer: None,
            detail: None,
        }
    );
    assert_eq!(after.metadata.generation, generation, "a status write must not change the generation");
    assert_eq!(after.spec, volume.spec, "a status write must not change the spec");

    // Another manager owns another condition: conditions merge by type, neither removes the
    // other's.
    let agent = PatchParams::apply("peersan-node-agent-node-b").force();
    let degraded = json!({
        "apiVersion": "peersan.io/v1alpha1", "kind": "MirrorVolume",
        "status": { "conditions": [{ "type": "Degraded", "status": "True", "reason": "ReplicaCatchingUp",
            "message": "node-b lacks 4096 bytes", "lastTransitionTime": "2026-01-01T00:00:01Z" }] }
    });
    let after = volumes.patch_status("pvc-ssa", &agent, &Patch::Apply(&degraded)).await.expect("apply condition");
    let types: Vec<String> = after.status.unwrap().conditions.into_iter().map(|c| c.type_).collect();
    assert_eq!(types, ["Ready", "Degraded"]);

    // Applying again without a field drops only what that manager owned.
    let healed = json!({
        "apiVersion": "peersan.io/v1alpha1", "kind": "MirrorVolume",
        "status": { "health": "healthy", "epoch": 3, "writer": "node-a",
            "replicas": [{ "node": "node-a", "state": "in-sync" }, { "node": "node-b", "state": "in-sync" }],
            "conditions": [{ "type": "Ready", "status": "True", "reason": "InSync", "message": "",
                "lastTransitionTime": "2026-01-01T00:00:02Z" }] }
    });
    let after = volumes.patch_status("pvc-ssa", &operator, &Patch::Apply(&healed)).await.expect("apply healed");
    let st = after.status.unwrap();
    assert_eq!(st.health, Some(VolumeHealth::Healthy));
    assert!(st.attached_nodes.is_empty(), "attachedNodes was the operator's and is no longer applied");
    assert_eq!(st.conditions.iter().map(|c| c.type_.as_str()).collect::<Vec<_>>(), ["Ready", "Degraded"]);

    // Status is validated as the spec is.
    let bad = json!({ "apiVersion": "peersan.io/v1alpha1", "kind": "MirrorVolume", "status": { "health": "fine" } });
    match volumes.patch_status("pvc-ssa", &operator, &Patch::Apply(&bad)).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422, "{s:?}");
            assert!(s.message.contains("status.health"), "{}", s.message);
        }
        other => panic!("health \"fine\" was not refused: {other:?}"),
    }

    // The node agent reports its SANNode's status the same way.
    let nodes: Api<SANNode> = Api::all(client.clone());
    // Through a JSON value: serde_yaml 0.9 reads enums such as PoolSource from YAML tags only.
    let sample = std::fs::read_to_string(crds_dir().join("samples/sannode.yaml")).unwrap();
    let node: SANNode = serde_json::from_value(serde_yaml::from_str::<Value>(&sample).unwrap()).unwrap();
    nodes.create(&PostParams::default(), &node).await.expect("create SANNode");
    let report = json!({
        "apiVersion": "peersan.io/v1alpha1", "kind": "SANNode",
        "status": { "observedGeneration": 1, "agentVersion": "0.1.0", "volumes": 2,
            "addresses": [{ "interface": "eth1", "ip": "10.20.0.1" }],
            "pool": { "capacityBytes": 107_374_182_400_i64, "allocatedBytes": 2_147_483_648_i64, "freeBytes": 105_226_698_752_i64 },
            "conditions": [{ "type": "Ready", "status": "True", "reason": "Running", "message": "",
                "lastTransitionTime": "2026-01-01T00:00:00Z" }] }
    });
    let after = nodes
        .patch_status("node-a", &PatchParams::apply("peersan-node-agent-node-a").force(), &Patch::Apply(&report))
        .await
        .expect("apply SANNode status");
    let st = after.status.expect("SANNode status");
    assert_eq!(st.pool.map(|p| p.free_bytes), Some(105_226_698_752));
    assert_eq!(st.agent_version.as_deref(), Some("0.1.0"));
    assert_eq!(after.spec, node.spec);
}
