//! The Helm chart `charts/peersan`: `helm lint` (also `--strict`), rendering with the default
//! values and with values that set every option, what the rendered objects must hold
//! (labels, the node agent's privileges and mounts, the registrar's path, least-privilege
//! RBAC), the values schema refusing wrong values, and a real kube-apiserver (v1.20)
//! accepting every rendered object (`kubectl apply --dry-run=server`).
//!
//! helm and kubectl come from `tests/k8s/tools.sh`. Without them (or without an API server
//! for the last test) a test prints `SKIPPED: <reason>` and passes, except in CI (env `CI`
//! set), where it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_yaml::Value;

const RELEASE: &str = "peersan";
const NAMESPACE: &str = "peersan-system";

/// Every object carries these (the chart's `peersan.labels`).
const STANDARD_LABELS: &[&str] = &[
    "helm.sh/chart",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
];

/// Values that set every option away from its default.
const FULL_VALUES: &str = r#"
nameOverride: san
fullnameOverride: ""
image:
  repository: registry.example.com/storage/peersan
  tag: "0.1.0-rc.1"
  pullPolicy: Always
imagePullSecrets:
  - name: regcred
logLevel: "debug,hyper=info"
kubeletDir: /var/lib/k0s/kubelet/
crds:
  install: false
  keep: false
peerSecret:
  existingSecret: site-peer-secret
  key: shared-secret
operator:
  replicas: 2
  healthPort: 8081
  metricsPort: 9091
  resources:
    requests: {cpu: 100m, memory: 100Mi}
    limits: {cpu: 1, memory: 512Mi}
  nodeSelector:
    kubernetes.io/os: linux
  tolerations:
    - {key: dedicated, operator: Equal, value: storage, effect: NoSchedule}
  affinity:
    podAntiAffinity:
      preferredDuringSchedulingIgnoredDuringExecution:
        - weight: 100
          podAffinityTerm:
            topologyKey: kubernetes.io/hostname
            labelSelector:
              matchLabels: {app.kubernetes.io/component: operator}
  priorityClassName: system-cluster-critical
  podAnnotations:
    prometheus.io/scrape: "true"
  extraArgs: ["--requeue-max=5m"]
nodeAgent:
  peerPort: 7800
  poolHostPath: /srv/peersan
  resources:
    requests: {cpu: 200m, memory: 256Mi}
    limits: {memory: 2Gi}
  nodeSelector:
    peersan.io/storage: "true"
  tolerations:
    - {key: node-role.kubernetes.io/control-plane, operator: Exists, effect: NoSchedule}
  affinity:
    nodeAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
        nodeSelectorTerms:
          - matchExpressions:
              - {key: kubernetes.io/arch, operator: In, values: [amd64]}
  priorityClassName: system-node-critical
  terminationGracePeriodSeconds: 120
  podAnnotations:
    example.com/owner: storage-team
  extraArgs: ["--debug-api"]
  registrar:
    healthPort: 9829
    resources:
      requests: {cpu: 5m, memory: 8Mi}
  livenessProbe:
    enabled: false
    port: 9828
csiController:
  replicas: 2
  timeout: 2m30s
  resources:
    requests: {cpu: 50m, memory: 64Mi}
  sidecarResources:
    requests: {cpu: 5m, memory: 16Mi}
  nodeSelector:
    kubernetes.io/os: linux
  tolerations: []
  affinity: {}
  priorityClassName: ""
  podAnnotations:
    example.com/owner: storage-team
  extraArgs: ["--placement=spread"]
  livenessProbe:
    enabled: true
    port: 9838
csiDriver:
  fsGroupPolicy: ReadWriteOnceWithFSType
sidecars:
  provisioner: {repository: mirror.example.com/csi-provisioner, tag: v5.2.0, pullPolicy: Always}
  attacher: {repository: mirror.example.com/csi-attacher, tag: v4.11.0, pullPolicy: Always}
  resizer: {repository: mirror.example.com/csi-resizer, tag: v1.13.2, pullPolicy: Always}
  nodeDriverRegistrar: {repository: mirror.example.com/csi-node-driver-registrar, tag: v2.16.0, pullPolicy: Always}
  livenessProbe: {repository: mirror.example.com/livenessprobe, tag: v2.18.0, pullPolicy: Always}
exampleVirtualSAN:
  enabled: true
  name: rack-a
  spec:
    nodes:
      names: [node-a, node-b, node-c]
    pool:
      path: /srv/peersan/pool
    replicas: 3
    replicationLink:
      mode: Cluster
    writePolicy: SingleWriter
    degradedWrites: Allow
    resyncRate: 200MiB
"#;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn chart_dir() -> PathBuf {
    repo_root().join("charts/peersan")
}

/// Passes the test with `SKIPPED: <why>` outside CI; fails it in CI.
fn skip(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{why} (CI must run this test)");
    }
    eprintln!("SKIPPED: {why}");
}

/// The directory holding helm and kubectl, from tests/k8s/tools.sh (run once per process).
fn tools() -> Result<&'static Path, String> {
    static TOOLS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    TOOLS
        .get_or_init(|| {
            let script = repo_root().join("tests/k8s/tools.sh");
            let out =
                Command::new("bash").arg(&script).output().map_err(|e| format!("running {}: {e}", script.display()))?;
            if !out.status.success() {
                return Err(format!(
                    "{} failed ({}): {}",
                    script.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            let stdout = String::from_utf8_lossy(&out.stdout);
            let dir = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
            if !dir.join("helm").is_file() || !dir.join("kubectl").is_file() {
                return Err(format!("{} printed {dir:?}, which holds no helm and kubectl", script.display()));
            }
            Ok(dir)
        })
        .as_deref()
        .map_err(Clone::clone)
}

/// Each test's helm runs with its own (empty) configuration, cache and data directories.
struct Helm {
    bin: PathBuf,
    home: tempfile::TempDir,
}

impl Helm {
    fn new() -> Option<Helm> {
        match tools() {
            Ok(dir) => Some(Helm { bin: dir.join("helm"), home: tempfile::tempdir().unwrap() }),
            Err(e) => {
                skip(&format!("no helm: {e}"));
                None
            }
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).env_remove("KUBECONFIG").output().expect("running helm")
    }

    /// helm talking to an API server.
    fn run_on(&self, server: &ApiServer, args: &[&str]) -> String {
        let out = self.command(args).env("KUBECONFIG", &server.kubeconfig).output().expect("running helm");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "helm {args:?} failed:\n{}\n{stdout}", String::from_utf8_lossy(&out.stderr));
        stdout
    }

    fn command(&self, args: &[&str]) -> Command {
        let h = self.home.path();
        let mut c = Command::new(&self.bin);
        c.args(args)
            .env("HELM_CONFIG_HOME", h.join("config"))
            .env("HELM_CACHE_HOME", h.join("cache"))
            .env("HELM_DATA_HOME", h.join("data"));
        c
    }

    /// `helm template` of the chart with extra arguments; panics with helm's message on failure.
    fn template(&self, extra: &[&str]) -> String {
        let out = self.template_output(extra);
        assert!(out.status.success(), "helm template {extra:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn template_output(&self, extra: &[&str]) -> Output {
        let chart = chart_dir();
        let mut args = vec!["template", RELEASE, chart.to_str().unwrap(), "--namespace", NAMESPACE];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    /// A values file in this test's directory.
    fn values_file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.home.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

/// One rendered object: helm's text of it (sent to the API server as it is, so that YAML
/// 1.1 readings such as octal modes stay kubectl's) and its parsed form.
struct Doc {
    text: String,
    value: Value,
}

/// The rendered documents, parsed; empty documents (comments only) dropped.
fn parse_docs(rendered: &str) -> Vec<Doc> {
    let mut docs = Vec::new();
    let mut text = String::new();
    for line in rendered.lines().chain(std::iter::once("---")) {
        if line.trim_end() == "---" {
            let value: Value =
                serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("rendered YAML does not parse: {e}\n{text}"));
            if !value.is_null() {
                docs.push(Doc { text: std::mem::take(&mut text), value });
            }
            text.clear();
        } else {
            text.push_str(line);
            text.push('\n');
        }
    }
    docs
}

fn parse_objects(rendered: &str) -> Vec<Value> {
    parse_docs(rendered).into_iter().map(|d| d.value).collect()
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(v, path).and_then(Value::as_str)
}

/// The value at a path of mapping keys and sequence indexes (`["spec", "containers", "0"]`).
fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| match v {
        Value::Sequence(s) => k.parse::<usize>().ok().and_then(|i| s.get(i)),
        _ => v.get(*k),
    })
}

fn kind(v: &Value) -> &str {
    str_at(v, &["kind"]).unwrap_or("")
}

fn name(v: &Value) -> &str {
    str_at(v, &["metadata", "name"]).unwrap_or("")
}

fn find<'a>(objects: &'a [Value], kind_: &str, name_suffix: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| kind(o) == kind_ && name(o).ends_with(name_suffix))
        .unwrap_or_else(|| panic!("no {kind_} named *{name_suffix} among {:?}", summary(objects)))
}

fn summary(objects: &[Value]) -> Vec<String> {
    objects.iter().map(|o| format!("{}/{}", kind(o), name(o))).collect()
}

fn containers(workload: &Value) -> &Vec<Value> {
    at(workload, &["spec", "template", "spec", "containers"]).and_then(Value::as_sequence).expect("containers")
}

fn container<'a>(workload: &'a Value, name_: &str) -> &'a Value {
    containers(workload)
        .iter()
        .find(|c| str_at(c, &["name"]) == Some(name_))
        .unwrap_or_else(|| panic!("{} has no container {name_}", name(workload)))
}

fn args(c: &Value) -> Vec<&str> {
    at(c, &["args"])
        .and_then(Value::as_sequence)
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn has_crd_files() -> bool {
    std::fs::read_dir(chart_dir().join("files/crds"))
        .map(|d| d.flatten().any(|e| e.path().extension().is_some_and(|x| x == "yaml")))
        .unwrap_or(false)
}

#[test]
fn lint_is_clean_with_default_and_full_values() {
    let Some(helm) = Helm::new() else { return };
    let chart = chart_dir();
    let full = helm.values_file("full.yaml", FULL_VALUES);
    for strict in [false, true] {
        for values in [None, Some(&full)] {
            let mut a = vec!["lint", chart.to_str().unwrap(), "--namespace", NAMESPACE];
            if strict {
                a.push("--strict");
            }
            if let Some(v) = values {
                a.extend(["--values", v.to_str().unwrap()]);
            }
            let out = helm.run(&a);
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success(), "helm {a:?} failed:\n{text}");
            assert!(text.contains("1 chart(s) linted, 0 chart(s) failed"), "helm {a:?}:\n{text}");
            // INFO (a missing icon) is allowed; warnings and errors are not.
            for line in text.lines() {
                assert!(!line.starts_with("[WARNING]") && !line.starts_with("[ERROR]"), "helm {a:?}: {line}\n{text}");
            }
        }
    }
}

#[test]
fn default_values_render_the_whole_system() {
    let Some(helm) = Helm::new() else { return };
    let objects = parse_objects(&helm.template(&[]));
    check_labels(&objects);

    let kinds: BTreeMap<&str, usize> = objects.iter().fold(BTreeMap::new(), |mut m, o| {
        *m.entry(kind(o)).or_default() += 1;
        m
    });
    let crds = usize::from(has_crd_files()) * kinds.get("CustomResourceDefinition").copied().unwrap_or(0);
    let expected: BTreeMap<&str, usize> = [
        ("ServiceAccount", 3),
        ("ClusterRole", 6),
        ("ClusterRoleBinding", 6),
        ("Role", 3),
        ("RoleBinding", 3),
        ("Secret", 1),
        ("DaemonSet", 1),
        ("Deployment", 2),
        ("CSIDriver", 1),
    ]
    .into_iter()
    .chain((crds > 0).then_some(("CustomResourceDefinition", crds)))
    .collect();
    assert_eq!(kinds, expected, "objects: {:?}", summary(&objects));
    if has_crd_files() {
        assert!(crds >= 3, "files/crds holds the VirtualSAN, MirrorVolume and SANNode CRDs; rendered {crds}");
        for crd in objects.iter().filter(|o| kind(o) == "CustomResourceDefinition") {
            assert_eq!(str_at(crd, &["metadata", "annotations", "helm.sh/resource-policy"]), Some("keep"));
        }
    } else {
        eprintln!("note: charts/peersan/files/crds/ holds no CRDs on this tree; the chart renders none");
    }

    // The node agent: privileged, host network, Bidirectional mounts, registrar path.
    let ds = find(&objects, "DaemonSet", "-node-agent");
    check_node_agent(ds, "/var/lib/kubelet", "/var/lib/peersan", 7700, "peersan-peer-secret", "peer-secret");
    let agent = container(ds, "node-agent");
    assert!(at(agent, &["livenessProbe"]).is_some(), "the livenessprobe sidecar is on by default");
    assert!(containers(ds).iter().any(|c| str_at(c, &["name"]) == Some("liveness-probe")));

    // The generated peer secret: 48 random characters under the key the agent mounts.
    let secret = find(&objects, "Secret", "-peer-secret");
    let value = str_at(secret, &["data", "peer-secret"]).expect("data.peer-secret");
    assert_eq!(value.len(), 64, "base64 of 48 characters: {value}");

    // The operator.
    let op = find(&objects, "Deployment", "-operator");
    let c = container(op, "operator");
    assert_eq!(str_at(c, &["command", "0"]), Some("/usr/local/bin/peersan-operator"));
    assert_eq!(args(c), ["--namespace=$(POD_NAMESPACE)", "--health-addr=0.0.0.0:8080", "--metrics-addr=0.0.0.0:9090"]);
    assert_eq!(at(op, &["spec", "replicas"]).and_then(Value::as_u64), Some(1));
    assert_eq!(str_at(c, &["image"]), Some("ghcr.io/peersan/peersan:0.1.0"), "image.tag defaults to appVersion");
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(str_at(c, &[probe, "httpGet", "path"]), Some("/healthz"), "{probe}");
    }
    check_env_field(c, "POD_NAMESPACE", "metadata.namespace");
    check_non_root(op);

    // The CSI controller and its sidecars, sharing /csi.
    let ctl = find(&objects, "Deployment", "-csi-controller");
    check_non_root(ctl);
    assert_eq!(
        args(container(ctl, "csi-controller")),
        ["--kubernetes", "--namespace=$(POD_NAMESPACE)", "--endpoint=unix:///csi/csi.sock"]
    );
    let prov = args(container(ctl, "csi-provisioner"));
    for a in [
        "--csi-address=/csi/csi.sock",
        "--feature-gates=Topology=true",
        "--leader-election",
        "--default-fstype=ext4",
        "--extra-create-metadata",
    ] {
        assert!(prov.contains(&a), "csi-provisioner lacks {a}: {prov:?}");
    }
    for sidecar in ["csi-attacher", "csi-resizer"] {
        let a = args(container(ctl, sidecar));
        assert!(a.contains(&"--leader-election") && a.contains(&"--csi-address=/csi/csi.sock"), "{sidecar}: {a:?}");
    }
    for c in containers(ctl) {
        let mounts = at(c, &["volumeMounts"]).and_then(Value::as_sequence).expect("volumeMounts");
        assert!(
            mounts.iter().any(|m| str_at(m, &["mountPath"]) == Some("/csi")),
            "{:?} does not mount the socket directory",
            str_at(c, &["name"])
        );
    }
    let vols = at(ctl, &["spec", "template", "spec", "volumes"]).and_then(Value::as_sequence).unwrap();
    assert!(vols.iter().any(|v| str_at(v, &["name"]) == Some("socket-dir") && v.get("emptyDir").is_some()));

    // The CSIDriver.
    let drv = find(&objects, "CSIDriver", "csi.peersan.io");
    assert_eq!(name(drv), "csi.peersan.io");
    assert_eq!(str_at(drv, &["apiVersion"]), Some("storage.k8s.io/v1"));
    let spec = drv.get("spec").unwrap();
    assert_eq!(spec.get("attachRequired").and_then(Value::as_bool), Some(true));
    assert_eq!(spec.get("podInfoOnMount").and_then(Value::as_bool), Some(false));
    assert_eq!(str_at(spec, &["fsGroupPolicy"]), Some("File"));
    assert_eq!(serde_yaml::to_string(&spec["volumeLifecycleModes"]).unwrap().trim(), "- Persistent");

    check_rbac(&objects);
}

#[test]
fn every_option_renders() {
    let Some(helm) = Helm::new() else { return };
    let full = helm.values_file("full.yaml", FULL_VALUES);
    let objects = parse_objects(&helm.template(&["--values", full.to_str().unwrap()]));
    check_labels(&objects);

    assert!(!objects.iter().any(|o| kind(o) == "CustomResourceDefinition"), "crds.install=false");
    assert!(!objects.iter().any(|o| kind(o) == "Secret"), "an existing secret: the chart creates none");

    let ds = find(&objects, "DaemonSet", "-node-agent");
    // kubeletDir is given with a trailing slash; every path derived from it has none.
    check_node_agent(ds, "/var/lib/k0s/kubelet", "/srv/peersan", 7800, "site-peer-secret", "shared-secret");
    assert!(!containers(ds).iter().any(|c| str_at(c, &["name"]) == Some("liveness-probe")), "livenessProbe off");
    assert!(at(container(ds, "node-agent"), &["livenessProbe"]).is_none());
    assert!(args(container(ds, "node-agent")).contains(&"--debug-api"));
    assert_eq!(
        at(ds, &["spec", "template", "spec", "terminationGracePeriodSeconds"]).and_then(Value::as_u64),
        Some(120)
    );
    assert_eq!(str_at(ds, &["spec", "template", "spec", "nodeSelector", "peersan.io/storage"]), Some("true"));
    assert!(at(ds, &["spec", "template", "spec", "affinity", "nodeAffinity"]).is_some());

    // Every image from the values.
    let mut images = BTreeSet::new();
    for o in objects.iter().filter(|o| matches!(kind(o), "Deployment" | "DaemonSet")) {
        assert_eq!(str_at(o, &["spec", "template", "spec", "imagePullSecrets", "0", "name"]), Some("regcred"));
        for c in containers(o) {
            images.insert(str_at(c, &["image"]).unwrap().to_owned());
            assert_eq!(str_at(c, &["imagePullPolicy"]), Some("Always"), "{:?}", str_at(c, &["name"]));
        }
    }
    let expected: BTreeSet<String> = [
        "registry.example.com/storage/peersan:0.1.0-rc.1",
        "mirror.example.com/csi-provisioner:v5.2.0",
        "mirror.example.com/csi-attacher:v4.11.0",
        "mirror.example.com/csi-resizer:v1.13.2",
        "mirror.example.com/csi-node-driver-registrar:v2.16.0",
        "mirror.example.com/livenessprobe:v2.18.0",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(images, expected);

    let op = find(&objects, "Deployment", "-operator");
    assert_eq!(at(op, &["spec", "replicas"]).and_then(Value::as_u64), Some(2));
    let c = container(op, "operator");
    assert_eq!(
        args(c),
        [
            "--namespace=$(POD_NAMESPACE)",
            "--health-addr=0.0.0.0:8081",
            "--metrics-addr=0.0.0.0:9091",
            "--requeue-max=5m"
        ]
    );
    let rust_log = at(c, &["env"])
        .and_then(Value::as_sequence)
        .and_then(|e| e.iter().find(|e| str_at(e, &["name"]) == Some("RUST_LOG")))
        .and_then(|e| str_at(e, &["value"]));
    assert_eq!(rust_log, Some("debug,hyper=info"));
    assert_eq!(str_at(op, &["spec", "template", "metadata", "annotations", "prometheus.io/scrape"]), Some("true"));

    let ctl = find(&objects, "Deployment", "-csi-controller");
    assert!(
        at(ctl, &["spec", "template", "spec", "priorityClassName"]).is_none(),
        "empty priorityClassName is left out"
    );
    for sidecar in ["csi-provisioner", "csi-attacher", "csi-resizer"] {
        assert!(args(container(ctl, sidecar)).contains(&"--timeout=2m30s"), "{sidecar}");
    }
    let probe_port = at(container(ctl, "csi-controller"), &["livenessProbe", "httpGet", "port"]);
    assert_eq!(probe_port.and_then(Value::as_u64), Some(9838));

    let drv = find(&objects, "CSIDriver", "csi.peersan.io");
    assert_eq!(str_at(drv, &["spec", "fsGroupPolicy"]), Some("ReadWriteOnceWithFSType"));

    let vsan = find(&objects, "VirtualSAN", "rack-a");
    assert_eq!(str_at(vsan, &["apiVersion"]), Some("peersan.io/v1alpha1"));
    assert!(str_at(vsan, &["metadata", "namespace"]).is_none(), "VirtualSAN is cluster-scoped");
    assert_eq!(at(vsan, &["spec", "replicas"]).and_then(Value::as_u64), Some(3));
    assert_eq!(str_at(vsan, &["spec", "resyncRate"]), Some("200MiB"));

    // nameOverride reaches the name label.
    assert_eq!(str_at(op, &["metadata", "labels", "app.kubernetes.io/name"]), Some("san"));
    check_rbac(&objects);
}

#[test]
fn example_virtualsan_file_matches_the_template() {
    let Some(helm) = Helm::new() else { return };
    let file = std::fs::read_to_string(chart_dir().join("examples/virtualsan.yaml")).unwrap();
    let example: Value = serde_yaml::from_str(&file).unwrap();
    let objects = parse_objects(&helm.template(&["--set", "exampleVirtualSAN.enabled=true"]));
    let rendered = find(&objects, "VirtualSAN", "example");
    assert_eq!(example["apiVersion"], rendered["apiVersion"]);
    assert_eq!(example["kind"], rendered["kind"]);
    assert_eq!(example["metadata"]["name"], rendered["metadata"]["name"]);
    assert_eq!(example["spec"], rendered["spec"], "examples/virtualsan.yaml and exampleVirtualSAN.spec differ");
}

#[test]
fn schema_refuses_wrong_values() {
    let Some(helm) = Helm::new() else { return };
    let cases: &[(&[&str], &[&str])] = &[
        (&["--set-string", "operator.replicas=x"], &["operator", "replicas"]),
        (&["--set", "operator.replicas=-1"], &["operator", "replicas"]),
        (&["--set", "noSuchKey=1"], &["noSuchKey"]),
        (&["--set", "nodeAgent.noSuchKey=1"], &["nodeAgent", "noSuchKey"]),
        (&["--set", "csiDriver.fsGroupPolicy=Always"], &["fsGroupPolicy"]),
        (&["--set", "image.pullPolicy=Sometimes"], &["pullPolicy"]),
        (&["--set", "nodeAgent.peerPort=70000"], &["peerPort"]),
        (&["--set", "kubeletDir=var/lib/kubelet"], &["kubeletDir"]),
        (&["--set", "csiController.timeout=soon"], &["timeout"]),
        (&["--set", "peerSecret.existingSecret=Not_A_Name"], &["existingSecret"]),
        (&["--set", "crds.install=maybe"], &["install"]),
    ];
    for (args, expect) in cases {
        let out = helm.template_output(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "helm template {args:?} was accepted");
        assert!(err.contains("values don't meet the specifications of the schema"), "helm template {args:?}:\n{err}");
        for word in *expect {
            assert!(err.contains(word), "helm template {args:?}: the error does not name {word:?}:\n{err}");
        }
    }
}

/// The objects of both renderings, as a real kube-apiserver v1.20 sees them: the CRDs
/// applied for real, then every other object with `kubectl apply --dry-run=server`.
#[test]
fn api_server_accepts_the_rendered_objects() {
    let Some(helm) = Helm::new() else { return };
    let server = match start_api_server() {
        Ok(s) => s,
        Err(e) => return skip(&format!("no kube-apiserver: {e}")),
    };
    let full = helm.values_file("full.yaml", FULL_VALUES);
    let kube_version = ["--kube-version", "1.20.2"];
    let default = parse_docs(&helm.template(&kube_version));
    let all_options = parse_docs(&helm.template(&[&kube_version[..], &["--values", full.to_str().unwrap()]].concat()));

    kubectl_ok(&server, &["create", "namespace", NAMESPACE], None);

    let (crds, default): (Vec<Doc>, Vec<Doc>) =
        default.into_iter().partition(|d| kind(&d.value) == "CustomResourceDefinition");
    if crds.is_empty() {
        eprintln!("note: no CRDs in charts/peersan/files/crds on this tree: the VirtualSAN is not sent");
    } else {
        kubectl_ok(&server, &["apply", "--server-side", "-f", "-"], Some(&to_stream(&crds)));
        for crd in &crds {
            let name = format!("crd/{}", name(&crd.value));
            kubectl_ok(&server, &["wait", "--for=condition=Established", "--timeout=60s", &name], None);
        }
    }

    for (what, docs) in [("default values", default), ("every option", all_options)] {
        let docs: Vec<Doc> = docs
            .into_iter()
            .filter(|d| {
                let peersan_kind = str_at(&d.value, &["apiVersion"]).unwrap_or("").starts_with("peersan.io/");
                if peersan_kind && crds.is_empty() {
                    eprintln!("note: {what}: {}/{} not sent (no CRD)", kind(&d.value), name(&d.value));
                }
                !peersan_kind || !crds.is_empty()
            })
            .collect();
        let out = kubectl_ok(&server, &["apply", "--dry-run=server", "-f", "-"], Some(&to_stream(&docs)));
        let accepted = out.lines().filter(|l| l.contains("(server dry run)")).count();
        assert_eq!(
            accepted,
            docs.len(),
            "{what}: the server answered for {accepted} of {} objects:\n{out}",
            docs.len()
        );
    }

    // The example a user applies by hand.
    if !crds.is_empty() {
        let example = chart_dir().join("examples/virtualsan.yaml");
        let out = kubectl_ok(&server, &["apply", "--dry-run=server", "-f", example.to_str().unwrap()], None);
        assert!(out.contains("virtualsan.peersan.io/example created (server dry run)"), "{out}");
    }

    // fsGroupPolicy is a beta field in 1.20: a server that did not know it would drop it
    // silently. Create the CSIDriver for real and read it back.
    let drv = parse_docs(&helm.template(&[&kube_version[..], &["--show-only", "templates/csidriver.yaml"]].concat()));
    kubectl_ok(&server, &["apply", "-f", "-"], Some(&to_stream(&drv)));
    let back =
        kubectl_ok(&server, &["get", "csidriver", "csi.peersan.io", "-o", "jsonpath={.spec.fsGroupPolicy}"], None);
    assert_eq!(back.trim(), "File", "the API server dropped CSIDriver.spec.fsGroupPolicy");
}

/// `helm install` and `helm upgrade` on a real API server: the generated peer secret keeps
/// its value (found with `lookup`), the example VirtualSAN can be added by an upgrade, and
/// an uninstall leaves the CRDs.
#[test]
fn upgrade_keeps_the_generated_peer_secret() {
    let Some(helm) = Helm::new() else { return };
    let server = match start_api_server() {
        Ok(s) => s,
        Err(e) => return skip(&format!("no kube-apiserver: {e}")),
    };
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    let secret = || {
        let out = kubectl_ok(
            &server,
            &["-n", NAMESPACE, "get", "secret", "peersan-peer-secret", "-o", "jsonpath={.data.peer-secret}"],
            None,
        );
        out.trim().to_owned()
    };
    helm.run_on(&server, &["install", RELEASE, chart, "--namespace", NAMESPACE, "--create-namespace"]);
    let first = secret();
    assert_eq!(first.len(), 64, "base64 of 48 characters: {first:?}");

    let mut upgrade = vec!["upgrade", RELEASE, chart, "--namespace", NAMESPACE];
    if has_crd_files() {
        upgrade.extend(["--set", "exampleVirtualSAN.enabled=true"]);
    }
    helm.run_on(&server, &upgrade);
    assert_eq!(secret(), first, "helm upgrade changed the peer secret");
    helm.run_on(&server, &["upgrade", RELEASE, chart, "--namespace", NAMESPACE, "--reuse-values"]);
    assert_eq!(secret(), first, "the second helm upgrade changed the peer secret");
    if has_crd_files() {
        kubectl_ok(&server, &["get", "virtualsan", "example"], None);
        helm.run_on(&server, &["uninstall", RELEASE, "--namespace", NAMESPACE]);
        let crds = kubectl_ok(&server, &["get", "crd", "-o", "name"], None);
        for crd in ["virtualsans.peersan.io", "mirrorvolumes.peersan.io", "sannodes.peersan.io"] {
            assert!(crds.contains(crd), "uninstall removed {crd} (crds.keep): {crds}");
        }
    }
}

fn to_stream(docs: &[Doc]) -> String {
    docs.iter().map(|d| format!("---\n{}", d.text)).collect()
}

fn kubectl_ok(server: &ApiServer, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    use std::process::Stdio;
    let mut cmd = server.kubectl();
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().expect("running kubectl");
    if let Some(text) = stdin {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kubectl {args:?} failed:\n{}\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr),
        stdin.map(|s| format!("input:\n{s}")).unwrap_or_default()
    );
    stdout
}

fn check_labels(objects: &[Value]) {
    assert!(!objects.is_empty());
    for o in objects {
        let labels = at(o, &["metadata", "labels"]).and_then(Value::as_mapping);
        for key in STANDARD_LABELS {
            let v = labels.and_then(|l| l.get(*key)).and_then(Value::as_str);
            assert!(v.is_some_and(|v| !v.is_empty()), "{}/{} lacks the label {key}", kind(o), name(o));
        }
        assert_eq!(str_at(o, &["metadata", "labels", "app.kubernetes.io/instance"]), Some(RELEASE));
        assert_eq!(str_at(o, &["metadata", "labels", "app.kubernetes.io/managed-by"]), Some("Helm"));
        // Pods carry the labels too, and their workload's selector picks them.
        if let Some(template) = at(o, &["spec", "template", "metadata", "labels"]).and_then(Value::as_mapping) {
            for key in STANDARD_LABELS {
                assert!(template.contains_key(*key), "{}/{}: pod template lacks {key}", kind(o), name(o));
            }
            let selector = at(o, &["spec", "selector", "matchLabels"]).and_then(Value::as_mapping).expect("selector");
            for (k, v) in selector {
                assert_eq!(template.get(k), Some(v), "{}/{}: selector {k:?} does not match its pods", kind(o), name(o));
            }
            assert!(!selector.contains_key("app.kubernetes.io/version"), "a selector must not change with the version");
        }
    }
}

fn check_env_field(c: &Value, var: &str, field: &str) {
    let env = at(c, &["env"]).and_then(Value::as_sequence).expect("env");
    let e = env.iter().find(|e| str_at(e, &["name"]) == Some(var)).unwrap_or_else(|| panic!("no env {var}"));
    assert_eq!(str_at(e, &["valueFrom", "fieldRef", "fieldPath"]), Some(field), "env {var}");
}

fn check_non_root(workload: &Value) {
    let pod = at(workload, &["spec", "template", "spec"]).unwrap();
    assert_eq!(
        at(pod, &["securityContext", "runAsNonRoot"]).and_then(Value::as_bool),
        Some(true),
        "{}",
        name(workload)
    );
    assert!(pod.get("hostNetwork").is_none(), "{}", name(workload));
    for c in containers(workload) {
        let sc = c.get("securityContext").unwrap_or_else(|| panic!("{:?} has no securityContext", c.get("name")));
        assert_eq!(sc.get("allowPrivilegeEscalation").and_then(Value::as_bool), Some(false));
        assert!(sc.get("privileged").is_none_or(|p| p.as_bool() == Some(false)));
        assert_eq!(serde_yaml::to_string(&sc["capabilities"]["drop"]).unwrap().trim(), "- ALL");
    }
}

fn check_node_agent(ds: &Value, kubelet_dir: &str, pool: &str, peer_port: u64, secret: &str, key: &str) {
    let pod = at(ds, &["spec", "template", "spec"]).unwrap();
    assert_eq!(pod.get("hostNetwork").and_then(Value::as_bool), Some(true));
    assert_eq!(str_at(pod, &["dnsPolicy"]), Some("ClusterFirstWithHostNet"));
    assert_ne!(pod.get("hostPID").and_then(Value::as_bool), Some(true));
    assert_eq!(str_at(ds, &["spec", "updateStrategy", "type"]), Some("RollingUpdate"));
    assert_eq!(at(ds, &["spec", "updateStrategy", "rollingUpdate", "maxUnavailable"]).and_then(Value::as_u64), Some(1));

    let agent = container(ds, "node-agent");
    assert_eq!(at(agent, &["securityContext", "privileged"]).and_then(Value::as_bool), Some(true));
    assert_eq!(
        args(agent)[..4],
        ["--kubernetes", "--node-name=$(NODE_NAME)", "--namespace=$(POD_NAMESPACE)", "--csi-socket=/csi/csi.sock"]
    );
    check_env_field(agent, "NODE_NAME", "spec.nodeName");
    check_env_field(agent, "POD_NAMESPACE", "metadata.namespace");
    assert_eq!(at(agent, &["ports", "0", "containerPort"]).and_then(Value::as_u64), Some(peer_port));

    // Host paths by volume name, and where the agent mounts each.
    let volumes: BTreeMap<&str, &Value> = at(pod, &["volumes"])
        .and_then(Value::as_sequence)
        .unwrap()
        .iter()
        .map(|v| (str_at(v, &["name"]).unwrap(), v))
        .collect();
    let host_path = |vol: &str| str_at(volumes[vol], &["hostPath", "path"]).map(str::to_owned);
    let mounts: BTreeMap<&str, &Value> = at(agent, &["volumeMounts"])
        .and_then(Value::as_sequence)
        .unwrap()
        .iter()
        .map(|m| (str_at(m, &["name"]).unwrap(), m))
        .collect();
    let mount = |vol: &str| {
        let m = mounts.get(vol).unwrap_or_else(|| panic!("the agent does not mount {vol}"));
        (str_at(m, &["mountPath"]).unwrap().to_owned(), str_at(m, &["mountPropagation"]).map(str::to_owned))
    };
    let plugin_dir = format!("{kubelet_dir}/plugins/csi.peersan.io");
    assert_eq!(host_path("socket-dir"), Some(plugin_dir.clone()));
    assert_eq!(mount("socket-dir").0, "/csi");
    assert_eq!(host_path("kubelet-dir").as_deref(), Some(kubelet_dir));
    assert_eq!(mount("kubelet-dir"), (kubelet_dir.to_owned(), Some("Bidirectional".to_owned())));
    assert_eq!(host_path("run-peersan").as_deref(), Some("/run/peersan"));
    assert_eq!(mount("run-peersan"), ("/run/peersan".to_owned(), Some("Bidirectional".to_owned())));
    assert_eq!(host_path("pool").as_deref(), Some(pool));
    assert_eq!(mount("pool").0, pool);
    assert_eq!(host_path("dev").as_deref(), Some("/dev"));
    assert_eq!(mount("dev").0, "/dev");
    assert_eq!(host_path("registration-dir"), Some(format!("{kubelet_dir}/plugins_registry")));
    // Only the agent propagates mounts, and only where it must.
    let bidirectional: Vec<&str> = mounts
        .iter()
        .filter(|(_, m)| str_at(m, &["mountPropagation"]) == Some("Bidirectional"))
        .map(|(k, _)| *k)
        .collect();
    assert_eq!(bidirectional, ["kubelet-dir", "run-peersan"]);

    // The peer secret, as the file /etc/peersan/peer-secret.
    assert_eq!(str_at(volumes["peer-secret"], &["secret", "secretName"]), Some(secret));
    let item = at(volumes["peer-secret"], &["secret", "items", "0"]).unwrap();
    assert_eq!((str_at(item, &["key"]), str_at(item, &["path"])), (Some(key), Some("peer-secret")));
    assert_eq!(mount("peer-secret").0, "/etc/peersan");

    // The registrar tells kubelet the socket's host path, below kubeletDir.
    let reg = container(ds, "node-driver-registrar");
    let reg_args = args(reg);
    assert!(reg_args.contains(&"--csi-address=/csi/csi.sock"), "{reg_args:?}");
    let registration = format!("--kubelet-registration-path={plugin_dir}/csi.sock");
    assert!(reg_args.contains(&registration.as_str()), "{reg_args:?} lacks {registration}");
    let reg_mounts = at(reg, &["volumeMounts"]).and_then(Value::as_sequence).unwrap();
    assert!(reg_mounts.iter().any(|m| str_at(m, &["name"]) == Some("registration-dir")));
    for c in containers(ds).iter().filter(|c| str_at(c, &["name"]) != Some("node-agent")) {
        assert!(at(c, &["securityContext", "privileged"]).is_none(), "only the agent is privileged");
        for m in at(c, &["volumeMounts"]).and_then(Value::as_sequence).unwrap() {
            assert!(m.get("mountPropagation").is_none(), "{:?}: only the agent propagates mounts", c.get("name"));
        }
    }
}

/// Least privilege: no wildcard, no Secrets, Leases only through namespaced Roles, and the
/// grants each component's work needs.
fn check_rbac(objects: &[Value]) {
    let rules_of = |o: &Value| -> Vec<(Vec<String>, Vec<String>, Vec<String>)> {
        let seq = |v: &Value, k: &str| -> Vec<String> {
            v.get(k)
                .and_then(Value::as_sequence)
                .map(|s| s.iter().filter_map(Value::as_str).map(String::from).collect())
                .unwrap_or_default()
        };
        at(o, &["rules"])
            .and_then(Value::as_sequence)
            .unwrap()
            .iter()
            .map(|r| (seq(r, "apiGroups"), seq(r, "resources"), seq(r, "verbs")))
            .collect()
    };
    let grants = |o: &Value, group: &str, resource: &str, verb: &str| {
        rules_of(o).iter().any(|(g, r, v)| {
            g.iter().any(|x| x == group) && r.iter().any(|x| x == resource) && v.iter().any(|x| x == verb)
        })
    };
    for o in objects.iter().filter(|o| matches!(kind(o), "ClusterRole" | "Role")) {
        for (g, r, v) in rules_of(o) {
            for list in [&g, &r, &v] {
                assert!(!list.iter().any(|x| x == "*"), "{}/{}: wildcard in {list:?}", kind(o), name(o));
            }
            assert!(!r.iter().any(|x| x == "secrets"), "{}/{} grants secrets", kind(o), name(o));
            if kind(o) == "ClusterRole" {
                assert!(!r.iter().any(|x| x == "leases"), "{}: Leases belong in a namespaced Role", name(o));
            }
        }
    }
    for o in objects.iter().filter(|o| kind(o) == "Role") {
        assert_eq!(str_at(o, &["metadata", "namespace"]), Some(NAMESPACE));
        assert!(grants(o, "coordination.k8s.io", "leases", "get"), "{}", name(o));
    }
    let op = find(objects, "ClusterRole", "-operator");
    for (res, verbs) in [
        ("virtualsans", &["get", "list", "watch", "create", "update", "patch", "delete"][..]),
        ("mirrorvolumes", &["get", "list", "watch", "create", "update", "patch", "delete"]),
        ("sannodes", &["get", "list", "watch", "create", "update", "patch", "delete"]),
        ("virtualsans/status", &["update", "patch"]),
        ("mirrorvolumes/status", &["update", "patch"]),
        ("sannodes/status", &["update", "patch"]),
        ("virtualsans/finalizers", &["update"]),
    ] {
        for verb in verbs {
            assert!(grants(op, "peersan.io", res, verb), "operator: {verb} {res}");
        }
    }
    for verb in ["create", "get", "list", "watch", "update", "delete"] {
        assert!(grants(op, "storage.k8s.io", "storageclasses", verb), "operator: {verb} storageclasses");
    }
    assert!(grants(op, "", "nodes", "watch") && !grants(op, "", "nodes", "update"));
    assert!(grants(op, "", "events", "create") && grants(op, "", "events", "patch"));
    let op_role = find(objects, "Role", "-operator");
    for verb in ["create", "update", "delete", "watch"] {
        assert!(grants(op_role, "coordination.k8s.io", "leases", verb), "operator: {verb} leases");
    }

    let agent = find(objects, "ClusterRole", "-node-agent");
    assert!(grants(agent, "peersan.io", "sannodes", "watch") && !grants(agent, "peersan.io", "sannodes", "update"));
    assert!(grants(agent, "peersan.io", "sannodes/status", "patch"));
    assert!(
        grants(agent, "peersan.io", "mirrorvolumes", "get") && !grants(agent, "peersan.io", "mirrorvolumes", "update")
    );
    assert!(grants(agent, "", "nodes", "get") && grants(agent, "", "events", "create"));
    let agent_role = find(objects, "Role", "-node-agent");
    assert!(grants(agent_role, "coordination.k8s.io", "leases", "update"));
    assert!(!grants(agent_role, "coordination.k8s.io", "leases", "delete"));

    let ctl = |suffix: &str| find(objects, "ClusterRole", &format!("-csi-controller-{suffix}"));
    let (prov, att, res, drv) = (ctl("provisioner"), ctl("attacher"), ctl("resizer"), ctl("driver"));
    for verb in ["create", "delete", "patch"] {
        assert!(grants(prov, "", "persistentvolumes", verb), "provisioner: {verb} PVs");
    }
    assert!(grants(prov, "", "persistentvolumeclaims", "update"));
    assert!(grants(prov, "storage.k8s.io", "csinodes", "list") && grants(prov, "", "nodes", "list"));
    assert!(grants(prov, "storage.k8s.io", "volumeattachments", "watch"));
    assert!(grants(att, "storage.k8s.io", "volumeattachments", "patch"));
    assert!(grants(att, "storage.k8s.io", "volumeattachments/status", "patch"));
    assert!(grants(res, "", "persistentvolumeclaims/status", "patch") && grants(res, "", "persistentvolumes", "patch"));
    assert!(
        grants(drv, "peersan.io", "mirrorvolumes", "create")
            && grants(drv, "peersan.io", "mirrorvolumes/status", "patch")
    );
    assert!(grants(drv, "peersan.io", "sannodes", "watch") && !grants(drv, "peersan.io", "sannodes", "update"));
    let ctl_role = find(objects, "Role", "-csi-controller");
    for verb in ["create", "update", "delete"] {
        assert!(grants(ctl_role, "coordination.k8s.io", "leases", verb));
    }

    // Every role is bound to its component's ServiceAccount, in the release namespace.
    let accounts: BTreeSet<&str> = objects.iter().filter(|o| kind(o) == "ServiceAccount").map(name).collect();
    for b in objects.iter().filter(|o| matches!(kind(o), "ClusterRoleBinding" | "RoleBinding")) {
        let role_kind = if kind(b) == "RoleBinding" { "Role" } else { "ClusterRole" };
        assert_eq!(str_at(b, &["roleRef", "kind"]), Some(role_kind));
        let role = str_at(b, &["roleRef", "name"]).unwrap();
        assert!(objects.iter().any(|o| kind(o) == role_kind && name(o) == role), "{} binds a missing {role}", name(b));
        let subject = at(b, &["subjects", "0"]).unwrap();
        assert_eq!(str_at(subject, &["namespace"]), Some(NAMESPACE));
        assert!(accounts.contains(str_at(subject, &["name"]).unwrap()), "{} binds an unknown account", name(b));
    }
    for o in objects.iter().filter(|o| matches!(kind(o), "Deployment" | "DaemonSet")) {
        let sa = str_at(o, &["spec", "template", "spec", "serviceAccountName"]).unwrap();
        assert!(accounts.contains(sa), "{} runs as a missing {sa}", name(o));
    }
}

// ---------------------------------------------------------------------------------------
// The API server: the project's real kube-apiserver v1.20.2 (tests/k8s). With CI set, a
// server that cannot start fails the test instead of skipping it.

#[path = "k8s/harness.rs"]
mod k8s;
use k8s::ApiServer;

fn start_api_server() -> Result<ApiServer, String> {
    ApiServer::start()
}

/// The command lines the chart gives peersan's binaries (default values) are accepted by
/// those binaries: each is run (as a subcommand of the multi-call `peersan`) with its rendered arguments (`$(VAR)` references filled in)
/// and `--help`, which parses every argument before it prints the help, so an unknown flag
/// or a malformed value fails (clap's usage error) and nothing else runs.
#[test]
fn rendered_commands_are_accepted_by_the_binaries() {
    let Some(helm) = Helm::new() else { return };
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_peersan-operator")).parent().unwrap().to_owned();
    let docs = parse_docs(&helm.template(&[]));
    let mut checked = BTreeSet::new();
    for doc in &docs {
        let kind = doc.value["kind"].as_str().unwrap_or_default();
        if !["Deployment", "DaemonSet"].contains(&kind) {
            continue;
        }
        let containers = doc.value["spec"]["template"]["spec"]["containers"].as_sequence().unwrap();
        for c in containers {
            let Some(command) = c["command"].as_sequence() else { continue };
            let Some(path) = command.first().and_then(Value::as_str) else { continue };
            let Some(binary) = path.strip_prefix("/usr/local/bin/") else { continue };
            // The multi-call `peersan` binary (built for the node agent's tests) runs each of
            // them as a subcommand with the same command line.
            let sub = match binary {
                "peersan-operator" => "operator",
                "peersan-node-agent" => "agent",
                "peersan-csi-controller" => "csi-controller",
                other => panic!("the chart runs an unknown peersan binary {other}"),
            };
            let local = bin_dir.join("peersan");
            if !local.is_file() {
                skip(&format!("{} is not built (cargo test --workspace builds it)", local.display()));
                return;
            }
            let args: Vec<String> = c["args"]
                .as_sequence()
                .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
                .unwrap_or_default();
            // Kubernetes expands $(VAR) from the container's environment.
            let args: Vec<String> = args
                .iter()
                .map(|a| {
                    let mut a = a.clone();
                    while let (Some(s), Some(e)) = (a.find("$("), a.find(')')) {
                        a.replace_range(s..=e, "value");
                    }
                    a
                })
                .collect();
            let out =
                Command::new(&local).arg(sub).args(&args).arg("--help").env_remove("KUBECONFIG").output().unwrap();
            assert!(
                out.status.success(),
                "{kind} {}: `{binary} {}` is refused by the binary (run alone, this test uses the \
                 binaries as last built: `cargo build --workspace --bins` first):\n{}",
                doc.value["metadata"]["name"].as_str().unwrap_or_default(),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            checked.insert(binary.to_owned());
        }
    }
    let expected: BTreeSet<String> =
        ["peersan-csi-controller", "peersan-node-agent", "peersan-operator"].map(str::to_owned).into();
    assert_eq!(checked, expected, "every peersan binary of the chart was checked");
}
