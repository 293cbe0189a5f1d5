//! A real Kubernetes API server (kube-apiserver v1.20.2 and etcd) for tests, built from Debian's
//! packages by `tests/k8s/build.sh` (once, cached, locked) and started on free loopback ports
//! by `tests/k8s/start.sh`.
//!
//! ```ignore
//! #[path = "../tests/k8s/harness.rs"]
//! mod k8s;
//!
//! let Some(server) = k8s::ApiServer::start().map_err(|r| println!("SKIPPED: {r}")).ok() else { return };
//! let client = server.client().await;
//! ```
//!
//! When the server cannot be built or started, `start` returns the reason, and the test skips;
//! when the environment variable `CI` is set it panics instead, because CI must run these
//! tests. `PEERSAN_K8S_KEEP=1` keeps the state directory (logs, kubeconfig) of every server.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// A running etcd + kube-apiserver, stopped when dropped.
#[derive(Debug)]
pub struct ApiServer {
    /// Admin kubeconfig (client certificate in `system:masters`).
    pub kubeconfig: PathBuf,
    /// Directory with the PKI, etcd's data, the logs `etcd.log` and `apiserver.log`, and the
    /// pid files.
    pub state: PathBuf,
    /// Directory with `kube-apiserver`, `etcd` and `kubectl`.
    pub bin: PathBuf,
}

impl ApiServer {
    /// Builds the binaries (once, cached and locked across processes) and starts etcd and
    /// kube-apiserver on free loopback ports; returns once `/readyz` answers. `Err(reason)`
    /// when that is impossible here; panics instead when `CI` is set.
    pub fn start() -> Result<ApiServer, String> {
        match Self::try_start() {
            Ok(server) => Ok(server),
            Err(reason) if std::env::var_os("CI").is_some() => {
                panic!("CI is set, so the Kubernetes API server tests must run, but: {reason}")
            }
            Err(reason) => Err(reason),
        }
    }

    /// `kubectl` from the build, talking to this server, with a discovery cache of its own.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("kubectl"));
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!("--cache-dir={}", self.state.join("kubectl-cache").display()));
        cmd
    }

    /// `kubectl apply -f crds/` (the generated CRDs), then waits until every CRD is
    /// Established; panics with kubectl's output when either fails.
    pub fn install_crds(&self) {
        let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
        for args in [
            vec!["apply".to_owned(), "-f".to_owned(), crds.display().to_string()],
            ["wait", "--for=condition=Established", "--timeout=60s", "crd", "--all"].map(str::to_owned).to_vec(),
        ] {
            let out = self.kubectl().args(&args).output().expect("running kubectl");
            assert!(
                out.status.success(),
                "kubectl {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// A `kube::Client` for this server.
    pub async fn client(&self) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig)
            .unwrap_or_else(|e| panic!("reading {}: {e}", self.kubeconfig.display()));
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap_or_else(|e| panic!("kubeconfig {}: {e}", self.kubeconfig.display()));
        kube::Client::try_from(config).unwrap_or_else(|e| panic!("client for {}: {e}", self.kubeconfig.display()))
    }

    fn try_start() -> Result<ApiServer, String> {
        let scripts = scripts_dir()?;
        let bin = build(&scripts)?;
        static SERVERS: AtomicU32 = AtomicU32::new(0);
        let mut failures = Vec::new();
        // A port found free can be taken by someone else before etcd or the API server binds
        // it; a few attempts with other ports make that harmless.
        for _ in 0..3 {
            let n = SERVERS.fetch_add(1, Ordering::Relaxed);
            let state = std::env::temp_dir().join(format!("peersan-k8s-{}-{n}", std::process::id()));
            let ports = free_ports()?;
            let out = Command::new(scripts.join("start.sh"))
                .env("BIN", &bin)
                .env("STATE", &state)
                .env("API_PORT", ports[0].to_string())
                .env("ETCD_PORT", ports[1].to_string())
                .env("ETCD_PEER_PORT", ports[2].to_string())
                .env("OWNER_PID", std::process::id().to_string())
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("running {}: {e}", scripts.join("start.sh").display()))?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            if out.status.success()
                && let Some(kubeconfig) = stdout.lines().last().map(PathBuf::from).filter(|p| p.is_file())
            {
                return Ok(ApiServer { kubeconfig, state, bin });
            }
            failures.push(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
            if std::env::var_os("PEERSAN_K8S_KEEP").is_none() {
                let _ = std::fs::remove_dir_all(&state);
            }
        }
        Err(format!("kube-apiserver did not start: {}", failures.join("\n---\n")))
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let stopped = scripts_dir().and_then(|scripts| {
            Command::new(scripts.join("stop.sh"))
                .env("STATE", &self.state)
                .status()
                .map_err(|e| format!("running stop.sh: {e}"))
        });
        if let Err(e) = stopped {
            eprintln!("stopping the API server in {}: {e}", self.state.display());
        }
        if std::env::var_os("PEERSAN_K8S_KEEP").is_some() {
            eprintln!("kept the API server's state in {}", self.state.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.state);
        }
    }
}

/// `tests/k8s` of the workspace the including crate belongs to.
fn scripts_dir() -> Result<PathBuf, String> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|dir| dir.join("tests/k8s"))
        .find(|dir| dir.join("start.sh").is_file())
        .ok_or_else(|| format!("no tests/k8s/start.sh above {}", env!("CARGO_MANIFEST_DIR")))
}

/// Runs build.sh once per test process (it returns at once when its cache is complete) and
/// returns the directory with the binaries. Its progress goes to the test's stderr.
fn build(scripts: &Path) -> Result<PathBuf, String> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let script = scripts.join("build.sh");
        let out = Command::new(&script)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!("{} failed ({}); its output is above", script.display(), out.status));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let bin = stdout.lines().last().map(PathBuf::from).unwrap_or_default();
        if !bin.join("kube-apiserver").is_file() {
            return Err(format!(
                "{} printed {:?}, not a directory with kube-apiserver",
                script.display(),
                stdout.trim()
            ));
        }
        Ok(bin)
    })
    .clone()
}

/// Three distinct loopback ports that were free a moment ago.
fn free_ports() -> Result<[u16; 3], String> {
    let bind = || std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("binding 127.0.0.1:0: {e}"));
    // All three are held at once, so they differ.
    let listeners = [bind()?, bind()?, bind()?];
    let port = |l: &std::net::TcpListener| l.local_addr().map(|a| a.port()).map_err(|e| e.to_string());
    Ok([port(&listeners[0])?, port(&listeners[1])?, port(&listeners[2])?])
}
