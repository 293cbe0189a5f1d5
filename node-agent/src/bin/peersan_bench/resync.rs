//! The resync section of `peersan-bench`: how fast a 2-way volume resynchronises a replica
//! (in full, and after a short absence with a little data written), measured against the
//! disk and loopback TCP speed of the same run, and what a running resync costs foreground
//! writes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use peersan_node_agent::api::pb;
use peersan_node_agent::config::ResyncConfig;
use peersan_node_agent::localcluster::{LocalCluster, VolumeDef};
use serde::Serialize;

use super::{KillOnDrop, Target, WORKLOADS, fio, median, prefill};

const VOLUME: &str = "bench";

/// Progress on stderr, with the seconds since the section started.
macro_rules! note {
    ($t0:expr, $($arg:tt)*) => {
        eprintln!("[{:6.1} s] {}", $t0.elapsed().as_secs_f64(), format!($($arg)*))
    };
}
/// Longest a single resync may take before the benchmark gives up.
const RESYNC_TIMEOUT: Duration = Duration::from_secs(900);
/// The foreground workload: 4k random writes at QD32.
const FOREGROUND: usize = 1;

/// What to run.
pub struct Options {
    pub size: u64,
    /// Seconds of each foreground fio run.
    pub runtime: u64,
    /// Share of the volume's 4 KiB blocks written while the replica is away, in percent.
    pub dirty_percent: f64,
    /// Resync rate limit while the foreground IOPS are measured (None: the agent's default).
    pub rate_during: Option<u64>,
    pub repeat: usize,
}

/// One timed resync: from the start of the returning agent until both agents report every
/// replica in sync.
#[derive(Debug, Clone, Serialize)]
pub struct ResyncRun {
    pub seconds: f64,
    /// Of which: until the returning agent's API answered (process start and settling).
    pub api_up_seconds: f64,
    /// Largest `resync_total_bytes` the returning node's API reported during the resync
    /// (None: the resync ended before the API was seen reporting it).
    pub api_total_bytes: Option<u64>,
    /// State of the returning replica as node-1 reported it just before the restart.
    pub state_before: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ForegroundRun {
    pub iops: f64,
    pub p99_us: f64,
    /// For runs during a resync: whether the resync was still running when fio ended, and
    /// how far it had got.
    pub resync_running_at_end: Option<bool>,
    pub resync_done_bytes_at_end: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ResyncReport {
    pub volume_bytes: u64,
    pub repeat: usize,
    /// How the volume was filled before the resyncs.
    pub fill: String,
    pub fill_seconds: f64,
    pub disk_write_mb_s: f64,
    pub disk_read_mb_s: f64,
    /// None: iperf3 is not installed.
    pub link_mb_s: Option<f64>,
    pub limit_mb_s: f64,
    pub full: Vec<ResyncRun>,
    pub full_seconds: f64,
    pub full_mb_s: f64,
    pub dirty_percent: f64,
    pub dirty_bytes: u64,
    pub delta: Vec<ResyncRun>,
    pub delta_seconds: f64,
    pub delta_dirty_mb_s: f64,
    pub in_sync: Vec<ForegroundRun>,
    pub during: Vec<ForegroundRun>,
    pub rate_during_bytes_per_sec: u64,
    pub foreground_runtime_s: u64,
}

fn fio_json(args: &[String]) -> anyhow::Result<serde_json::Value> {
    let out = Command::new("fio")
        .args(args)
        .arg("--output-format=json")
        .output()
        .context("running fio (Debian: apt-get install fio)")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find('{').context("fio printed no JSON")?;
    serde_json::from_str(&text[start..]).context("parsing fio JSON")
}

/// Sequential 1 MiB direct-I/O throughput of a file in `dir`: (write MB/s, read MB/s).
fn disk_speed(dir: &Path, size: u64) -> anyhow::Result<(f64, f64)> {
    let f = dir.join("disk-baseline.img");
    let _ = std::fs::remove_file(&f);
    let common = |rw: &str, size: u64| {
        vec![
            "--name=disk".to_string(),
            format!("--rw={rw}"),
            "--bs=1M".into(),
            "--iodepth=8".into(),
            "--ioengine=libaio".into(),
            "--direct=1".into(),
            "--time_based".into(),
            "--runtime=5".into(),
            format!("--size={size}"),
            format!("--filename={}", f.display()),
        ]
    };
    let w = fio_json(&common("write", size))?;
    let w = &w["jobs"][0]["write"];
    let written = w["io_bytes"].as_u64().unwrap_or(0);
    // Read back only what the write pass laid out, so that no hole is read.
    let readable = written.min(size) / (1 << 20) * (1 << 20);
    let r = if readable > 0 { fio_json(&common("read", readable))? } else { serde_json::Value::Null };
    let _ = std::fs::remove_file(&f);
    Ok((w["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6, r["jobs"][0]["read"]["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6))
}

/// TCP throughput over loopback with iperf3 (one stream, 3 s), in MB/s; None if iperf3 is
/// not installed.
fn link_speed() -> anyhow::Result<Option<f64>> {
    let port = peersan_node_agent::localcluster::free_ports(1)?[0];
    let server = match Command::new("iperf3")
        .args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => KillOnDrop(c),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("starting iperf3"),
    };
    let mut last = String::new();
    for _ in 0..40 {
        let out =
            Command::new("iperf3").args(["-c", "127.0.0.1", "-p", &port.to_string(), "-t", "3", "-J"]).output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
            drop(server);
            return Ok(Some(bps / 8.0 / 1e6));
        }
        last = v["error"].as_str().unwrap_or("no result").to_owned();
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("iperf3 client failed: {last}")
}

fn api<T>(r: Result<T, String>) -> anyhow::Result<T> {
    r.map_err(anyhow::Error::msg)
}

fn all_in_sync(v: &pb::Volume) -> bool {
    v.replicas.iter().all(|r| r.state == "in-sync")
}

/// State of `node`'s replica as node-1 reports it.
fn state_on_node1(c: &LocalCluster, node: &str) -> String {
    match c.volume(0, VOLUME) {
        Ok(v) => v.replicas.iter().find(|r| r.node == node).map(|r| r.state.clone()).unwrap_or("-".into()),
        Err(e) => format!("({e})"),
    }
}

/// The returning node's local resync progress: (done, total) while it resynchronises.
fn local_progress(c: &LocalCluster, i: usize) -> Option<(u64, u64)> {
    let v = c.volume(i, VOLUME).ok()?;
    let r = v.replicas.iter().find(|r| r.local)?;
    (r.state == "catching-up").then_some((r.resync_done_bytes, r.resync_total_bytes))
}

/// Starts node-2 and times it until node-1 reports every replica in sync and node-2 agrees,
/// polling node-2 for the resync size it reports.
fn timed_return(c: &mut LocalCluster) -> anyhow::Result<ResyncRun> {
    let state_before = state_on_node1(c, &c.members[1].name.clone());
    let t0 = Instant::now();
    c.start(1)?;
    let api_up_seconds = t0.elapsed().as_secs_f64();
    let mut api_total: Option<u64> = None;
    loop {
        if let Ok(v) = c.volume(0, VOLUME)
            && all_in_sync(&v)
            && c.volume(1, VOLUME).is_ok_and(|v| all_in_sync(&v))
        {
            break;
        }
        if let Some((_, total)) = local_progress(c, 1)
            && total > 0
        {
            api_total = Some(api_total.unwrap_or(0).max(total));
        }
        if t0.elapsed() > RESYNC_TIMEOUT {
            bail!("the replica did not get in sync within {RESYNC_TIMEOUT:?}; last: {:?}", c.volume(0, VOLUME));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(ResyncRun { seconds: t0.elapsed().as_secs_f64(), api_up_seconds, api_total_bytes: api_total, state_before })
}

/// SIGTERM to node-2, waiting for it to exit.
fn stop_node2(c: &mut LocalCluster, t0: Instant) {
    let t = Instant::now();
    c.stop(1);
    note!(t0, "node-2 stopped (SIGTERM; exited after {:.2} s)", t.elapsed().as_secs_f64());
}

/// Writes back the page cache, so that no measurement pays for the writeback of the one
/// before it.
fn settle_disk() {
    rustix::fs::sync();
}

struct RemoveDirOnDrop(PathBuf);
impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(dir: &Path, o: &Options) -> anyhow::Result<ResyncReport> {
    let t0 = Instant::now();
    let size = o.size;
    let repeat = o.repeat.max(1);
    note!(t0, "2-way volume of {size} bytes, {repeat} run(s) of each measurement, in {}", dir.display());
    settle_disk();
    let (disk_write, disk_read) = disk_speed(dir, size)?;
    note!(t0, "disk: sequential write {disk_write:.1} MB/s, read {disk_read:.1} MB/s");
    let link = link_speed()?;
    match link {
        Some(l) => note!(t0, "link: TCP over loopback {l:.1} MB/s"),
        None => note!(t0, "link: iperf3 is not installed (Debian: apt-get install iperf3); link figure skipped"),
    }
    let limit = link.map_or(disk_write, |l| l.min(disk_write));

    let cdir = dir.join("resync");
    let _ = std::fs::remove_dir_all(&cdir);
    let _cleanup = RemoveDirOnDrop(cdir.clone());
    let agent = std::env::current_exe()?;
    let mut c = LocalCluster::new(&cdir, &agent, 2, vec![VolumeDef::new(VOLUME, size, vec![0, 1])])?;
    c.agent_args = vec!["agent".into()];
    c.log_filter = "warn".into();
    c.resync_rate = Some(0);
    c.write_configs()?;
    c.start_all()?;
    api(c.wait_healthy(0, VOLUME, Duration::from_secs(30)))?;
    let uri = c.members[0].nbd_uri(VOLUME);
    let target = Target::Nbd(uri.clone());

    note!(t0, "filling the volume");
    let t = Instant::now();
    prefill(&target, size)?;
    let fill_seconds = t.elapsed().as_secs_f64();
    let fill = "the whole volume written with non-zero data before the resyncs (fio sequential write, 1 MiB blocks, \
                through NBD on node-1)"
        .to_string();
    note!(t0, "volume filled in {fill_seconds:.1} s");

    let replica2 = c.members[1].replica_path(VOLUME);
    let mut full = Vec::new();
    for _ in 0..repeat {
        stop_node2(&mut c, t0);
        std::fs::remove_file(&replica2).with_context(|| format!("removing {}", replica2.display()))?;
        settle_disk();
        note!(t0, "node-2's replica deleted; starting it");
        let r = timed_return(&mut c)?;
        note!(t0, "full resync: {:.2} s (API resync_total_bytes {:?})", r.seconds, r.api_total_bytes);
        full.push(r);
    }

    let blocks = size / 4096;
    let dirty_blocks = ((blocks as f64 * o.dirty_percent / 100.0) as u64).max(1);
    let dirty_bytes = dirty_blocks * 4096;
    let mut delta = Vec::new();
    for k in 0..repeat {
        stop_node2(&mut c, t0);
        note!(t0, "writing {dirty_bytes} bytes through node-1");
        // Random 4 KiB writes, each block at most once (fio's random map), fixed seed.
        let v = fio_json(&[
            "--name=dirty".into(),
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            "--iodepth=32".into(),
            format!("--size={size}"),
            format!("--io_size={dirty_bytes}"),
            format!("--randseed={}", 4242 + k),
        ])?;
        let wrote = v["jobs"][0]["write"]["io_bytes"].as_u64().unwrap_or(0);
        if wrote != dirty_bytes {
            bail!("fio wrote {wrote} bytes, expected {dirty_bytes}");
        }
        settle_disk();
        note!(t0, "starting node-2");
        let r = timed_return(&mut c)?;
        note!(
            t0,
            "delta resync ({} MB dirty): {:.2} s (API resync_total_bytes {:?})",
            dirty_bytes as f64 / 1e6,
            r.seconds,
            r.api_total_bytes
        );
        delta.push(r);
    }

    let w = WORKLOADS[FOREGROUND];
    let mut in_sync = Vec::new();
    for _ in 0..repeat {
        settle_disk();
        let (iops, _, _, p99, _) = fio(&target, w, size, o.runtime)?;
        note!(t0, "{} in sync: {iops:.0} IOPS, p99 {p99:.0} us", w.name);
        in_sync.push(ForegroundRun { iops, p99_us: p99, resync_running_at_end: None, resync_done_bytes_at_end: None });
    }
    if !all_in_sync(&api(c.volume(0, VOLUME))?) {
        bail!("the replicas fell out of sync during the in-sync foreground run");
    }

    let rate_during = o.rate_during.unwrap_or(ResyncConfig::default().rate.0);
    c.resync_rate = Some(rate_during);
    c.write_configs()?;
    let mut during = Vec::new();
    for _ in 0..repeat {
        stop_node2(&mut c, t0);
        std::fs::remove_file(&replica2).with_context(|| format!("removing {}", replica2.display()))?;
        settle_disk();
        note!(t0, "node-2's replica deleted; starting it and fio");
        c.start(1)?;
        let (iops, _, _, p99, _) = fio(&target, w, size, o.runtime)?;
        let progress = local_progress(&c, 1);
        note!(t0, "{} during resync: {iops:.0} IOPS, p99 {p99:.0} us; resync at the end: {:?}", w.name, progress);
        during.push(ForegroundRun {
            iops,
            p99_us: p99,
            resync_running_at_end: Some(progress.is_some()),
            resync_done_bytes_at_end: progress.map(|p| p.0),
        });
    }
    drop(c);
    note!(t0, "done");

    let full_seconds = median(full.iter().map(|r| r.seconds).collect());
    let delta_seconds = median(delta.iter().map(|r| r.seconds).collect());
    Ok(ResyncReport {
        volume_bytes: size,
        repeat,
        fill,
        fill_seconds,
        disk_write_mb_s: disk_write,
        disk_read_mb_s: disk_read,
        link_mb_s: link,
        limit_mb_s: limit,
        full,
        full_seconds,
        full_mb_s: size as f64 / 1e6 / full_seconds,
        dirty_percent: o.dirty_percent,
        dirty_bytes,
        delta,
        delta_seconds,
        delta_dirty_mb_s: dirty_bytes as f64 / 1e6 / delta_seconds,
        in_sync,
        during,
        rate_during_bytes_per_sec: rate_during,
        foreground_runtime_s: o.runtime,
    })
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn reported(runs: &[ResyncRun]) -> String {
    let seen: Vec<String> =
        runs.iter().map(|r| r.api_total_bytes.map_or("not seen (ended before a poll)".into(), mb)).collect();
    seen.join(", ")
}

pub fn print(r: &ResyncReport) {
    let runs = if r.repeat > 1 { format!(", medians of {} runs", r.repeat) } else { String::new() };
    println!("resync: 2-way volume of {}{runs}", mb(r.volume_bytes));
    println!("  {} ({:.1} s)", r.fill, r.fill_seconds);
    println!("  the page cache is written back (sync) before each measurement");
    println!();
    println!("{:<52} {:>9}", "baseline", "MB/s");
    println!("{:<52} {:>9.1}", "disk seq write (fio 1M QD8 direct, 5 s)", r.disk_write_mb_s);
    println!("{:<52} {:>9.1}", "disk seq read (fio 1M QD8 direct, 5 s)", r.disk_read_mb_s);
    match r.link_mb_s {
        Some(l) => println!("{:<52} {:>9.1}", "link: TCP over loopback (iperf3, 1 stream, 3 s)", l),
        None => println!("{:<52} {:>9}", "link: TCP over loopback (iperf3 not installed)", "-"),
    }
    println!("{:<52} {:>9.1}", "effective limit = min(disk write, link)", r.limit_mb_s);
    println!();
    let up = |runs: &[ResyncRun]| median(runs.iter().map(|x| x.api_up_seconds).collect());
    println!(
        "{:<52} {:>9} {:>9} {:>9}  API resync_total_bytes",
        "resync (until both agents report in-sync)", "seconds", "MB/s", "agent up"
    );
    println!(
        "{:<52} {:>9.2} {:>9.1} {:>9.2}  {}",
        "full: replica deleted, rate unlimited",
        r.full_seconds,
        r.full_mb_s,
        up(&r.full),
        reported(&r.full)
    );
    println!(
        "{:<52} {:>9.2} {:>9.1} {:>9.2}  {}",
        format!("delta: {}% of 4k blocks dirty ({}), unlimited", r.dirty_percent, mb(r.dirty_bytes)),
        r.delta_seconds,
        r.delta_dirty_mb_s,
        up(&r.delta),
        reported(&r.delta)
    );
    let mut before: Vec<&str> = r.full.iter().chain(&r.delta).map(|x| x.state_before.as_str()).collect();
    before.dedup();
    println!("  seconds: from starting node-2's agent; of which \"agent up\": until its API answered");
    println!("  MB/s: volume size (full) or dirty data (delta) / seconds");
    println!("  node-2's replica as node-1 reported it before each restart: {}", before.join(", "));
    println!();
    let fg = |runs: &[ForegroundRun]| {
        (median(runs.iter().map(|x| x.iops).collect()), median(runs.iter().map(|x| x.p99_us).collect()))
    };
    let (iops_in, p99_in) = fg(&r.in_sync);
    let (iops_dur, p99_dur) = fg(&r.during);
    println!(
        "{:<52} {:>9} {:>9}",
        format!("foreground 4k randwrite QD32 on node-1, {} s", r.foreground_runtime_s),
        "IOPS",
        "p99 us"
    );
    println!("{:<52} {:>9.0} {:>9.0}", "both replicas in sync", iops_in, p99_in);
    println!(
        "{:<52} {:>9.0} {:>9.0}",
        format!("during a full resync of node-2 (rate {:.1} MB/s)", r.rate_during_bytes_per_sec as f64 / 1e6),
        iops_dur,
        p99_dur
    );
    let covered = r.during.iter().all(|x| x.resync_running_at_end == Some(true));
    let done: Vec<String> = r.during.iter().map(|x| x.resync_done_bytes_at_end.map_or("-".into(), mb)).collect();
    println!(
        "  (resync still running when fio ended: {}; copied by then: {})",
        if covered { "yes" } else { "NO, the resync ended during the run" },
        done.join(", ")
    );
    println!();
    let line = |label: &str, ratio: f64, target: Option<(&str, f64)>| {
        let t = match target {
            Some((">=", min)) => {
                format!("  (target >= {:.0}%) {}", min * 100.0, if ratio >= min { "met" } else { "MISSED" })
            }
            Some((_, max)) => {
                format!("  (target <= {:.0}%) {}", max * 100.0, if ratio <= max { "met" } else { "MISSED" })
            }
            None => String::new(),
        };
        println!("{label:<52} {:>5.0}%{t}", ratio * 100.0);
    };
    line("full resync MB/s / effective limit", r.full_mb_s / r.limit_mb_s, Some((">=", 0.7)));
    line("delta resync time / full resync time", r.delta_seconds / r.full_seconds, Some(("<=", 0.05)));
    line("IOPS during resync / in sync, 4k randwrite QD32", iops_dur / iops_in, None);
    line("p99 during resync / in sync, 4k randwrite QD32", p99_dur / p99_in, None);
}
