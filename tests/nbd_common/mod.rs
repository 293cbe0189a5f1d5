//! Shared helpers for the integration tests: an in-memory device, a one-export catalogue,
//! a server on a unix socket in a temporary directory, and running external clients.

#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use peersan_node_agent::block::{BlockDevice, BlockResult, check_range};
use peersan_node_agent::nbd::{ExportInfo, Exports, serve_unix};
use tokio::process::Command;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// An in-memory device: a `Vec<u8>` behind a mutex.
pub struct MemDevice {
    data: Mutex<Vec<u8>>,
}

impl MemDevice {
    pub fn new(size: usize) -> Self {
        Self { data: Mutex::new(vec![0; size]) }
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }

    pub fn set(&self, contents: &[u8]) {
        self.data.lock().unwrap()[..contents.len()].copy_from_slice(contents);
    }

    fn zero(&self, offset: u64, len: u64) -> BlockResult<()> {
        let mut d = self.data.lock().unwrap();
        check_range(offset, len, d.len() as u64)?;
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn read(&self, offset: u64, len: u32) -> impl Future<Output = BlockResult<Bytes>> + Send {
        let result = (|| {
            let d = self.data.lock().unwrap();
            check_range(offset, len.into(), d.len() as u64)?;
            Ok(Bytes::copy_from_slice(&d[offset as usize..][..len as usize]))
        })();
        std::future::ready(result)
    }

    fn write(&self, offset: u64, data: Bytes, _fua: bool) -> impl Future<Output = BlockResult<()>> + Send {
        let result = (|| {
            let mut d = self.data.lock().unwrap();
            check_range(offset, data.len() as u64, d.len() as u64)?;
            d[offset as usize..][..data.len()].copy_from_slice(&data);
            Ok(())
        })();
        std::future::ready(result)
    }

    fn flush(&self) -> impl Future<Output = BlockResult<()>> + Send {
        std::future::ready(Ok(()))
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> impl Future<Output = BlockResult<()>> + Send {
        std::future::ready(self.zero(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> impl Future<Output = BlockResult<()>> + Send {
        std::future::ready(self.zero(offset, len))
    }
}

/// One export, also served as the default export.
pub struct OneExport {
    pub name: String,
    pub description: String,
    pub device: Arc<MemDevice>,
}

impl Exports for OneExport {
    type Device = MemDevice;

    fn lookup(&self, name: &str) -> Option<Arc<MemDevice>> {
        (name.is_empty() || name == self.name).then(|| self.device.clone())
    }

    fn list(&self) -> Vec<ExportInfo> {
        vec![ExportInfo { name: self.name.clone(), description: self.description.clone() }]
    }
}

/// `serve_unix` running on a socket in a temporary directory.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub device: Arc<MemDevice>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Server {
    pub async fn start(size: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let device = Arc::new(MemDevice::new(size));
        let exports = Arc::new(OneExport {
            name: "disk".into(),
            description: "peersan test disk".into(),
            device: device.clone(),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_unix(listener, exports, stopped));
        Self { dir, socket, device, stop: Some(stop), task }
    }

    /// The NBD URI of export `name` (empty for the default export).
    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), &mut self.task).await.expect("server did not stop").unwrap();
    }
}

/// Whether `tool` can be run; prints why the test is skipped if not.
pub async fn have(tool: &str, test: &str) -> bool {
    match Command::new(tool).arg("--version").output().await {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED {test}: `{tool}` cannot be run ({e}); install it to run this test");
            assert!(std::env::var_os("CI").is_none(), "{tool} is required in CI (.ci/run installs it)");
            false
        }
    }
}

/// Runs a command to completion (with a time limit) and asserts it succeeded.
pub async fn run(cmd: &mut Command) -> Output {
    cmd.kill_on_drop(true);
    let desc = format!("{cmd:?}");
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{desc} timed out"))
        .unwrap_or_else(|e| panic!("{desc} failed to start: {e}"));
    assert!(
        out.status.success(),
        "{desc} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Deterministic non-trivial bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
