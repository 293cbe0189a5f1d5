//! The `fuse` section of `peersan-bench`: a 2-way volume (`--fuse-replicas`) attached as a kernel block device
//! through the FUSE + loop frontend, measured with fio (libaio, direct) on the loop device,
//! and the same volume through the NBD frontend (fio's nbd engine), both against the local
//! file measured in the same run (the `local` setup).
//!
//! Node-1 runs inside the benchmark process (the frontend serves the engine's volume
//! object, as the agent's CSI Node service does); node-2 is an agent process. The CPU
//! figures are the benchmark process's (node-1 and its FUSE server) plus node-2's.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use peersan_node_agent::frontend::{FrontendKind, Frontends};
use peersan_node_agent::fuse::FuseConfig;
use peersan_node_agent::localcluster::{LocalCluster, VolumeDef, start_node_in_process, stop_node_in_process};

use super::{Args, Result_, Target, measure};

const VOLUME: &str = "bench";

/// Measures setups `fuse-loop` and `nbd` (the same in-process 2-way volume).
pub fn run(dir: &Path, a: &Args, results: &mut Vec<Result_>) -> anyhow::Result<()> {
    if let Err(why) = FrontendKind::FuseLoop.available() {
        eprintln!("  fuse: skipped: {why}");
        return Ok(());
    }
    let cdir = dir.join("fuse");
    let _ = std::fs::remove_dir_all(&cdir);
    let agent = std::env::current_exe()?;
    let n = a.fuse_replicas.clamp(1, 3);
    let mut c = LocalCluster::new(&cdir, &agent, n, vec![VolumeDef::new(VOLUME, a.size.0, (0..n).collect())])?;
    c.agent_args = vec!["agent".into()];
    c.log_filter = "warn".into();
    c.write_configs()?;
    for i in 1..n {
        c.start(i)?;
    }
    // The runtime's threads serve a loop device of this process (see `become_io_flusher`).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(|| {
            let _ = peersan_node_agent::fuse::become_io_flusher();
        })
        .build()?;
    let node = rt.block_on(start_node_in_process(&c.members[0].config_path()))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    // Every replica in sync, as node-1 sees it.
    while node.get(VOLUME).is_none_or(|v| v.health() != "healthy") {
        if std::time::Instant::now() > deadline {
            bail!("fuse: the volume did not become healthy");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut pids: Vec<u32> = vec![std::process::id()];
    pids.extend((1..n).filter_map(|i| c.pid(i)));

    let fuse_config = FuseConfig { threads: a.fuse_threads, ..FuseConfig::default() };
    let frontends = Frontends::with_fuse_config(cdir.join("run"), fuse_config);
    let volume = node.get(VOLUME).context("volume missing on node-1")?;
    let attached = rt.block_on(frontends.attach(VOLUME, volume))?;
    eprintln!(
        "  fuse: {} on {} (direct I/O: {})",
        attached.device.display(),
        attached.file.display(),
        attached.direct_io
    );
    let measured = measure("fuse-loop", &Target::File(attached.device.clone()), &pids, a, results);
    rt.block_on(frontends.detach(VOLUME))?;
    measured?;

    // The same volume through the NBD frontend, served by the same process.
    let sock = cdir.join("nbd.sock");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let _enter = rt.enter();
        let listener = tokio::net::UnixListener::bind(&sock)?;
        rt.spawn(peersan_node_agent::nbd::serve_unix(listener, Arc::clone(&node), async move {
            let _ = stop_rx.await;
        }))
    };
    let uri = format!("nbd+unix:///{VOLUME}?socket={}", sock.display());
    let measured = measure("nbd", &Target::Nbd(uri), &pids, a, results);
    let _ = stop_tx.send(());
    let _ = rt.block_on(server);
    measured?;

    let health = node.get(VOLUME).context("volume missing on node-1")?.health();
    if health != "healthy" {
        bail!("fuse: volume became {health} during the benchmark");
    }
    rt.block_on(stop_node_in_process(&node));
    drop(c);
    let _ = std::fs::remove_dir_all(&cdir);
    Ok(())
}
