//! The `multiwriter` section of `peersan-bench`: what writing one 2-way volume from both of
//! its nodes at once costs (`write_policy: multi-writer`, engine/POLICING.md), against a
//! single-writer volume measured in the same run. Every job is fio's 4k random write at
//! QD32 through a node's NBD export (fio's nbd engine: no page cache in between):
//!
//! * (a) the baseline: a single-writer 2-way volume, one job on node-1 over the first half;
//! * (a') the multi-writer volume, one job on node-1 over the first half (a lone writer);
//! * (b) the multi-writer volume, node-1 on the first half and node-2 on the second at once:
//!   aggregate IOPS against (a) (target: at least 90 %);
//! * (c) the multi-writer volume, both nodes on the same 1 MiB at once: every write
//!   contends for one region (with the default region size); against (a) and against
//!   (a-hot), one job on node-1 over 1 MiB of the single-writer volume (a small working set
//!   is cheaper in itself: its pages stay in the CPU caches and few are dirty at once).
//!
//! Before measuring, node-1 writes the first half of each volume once and node-2 the second
//! half of the multi-writer one, so that neither the replica files' first touch nor the
//! first grant of a region is measured. The p99 of a two-job run is that of both jobs'
//! latencies together (fio's latency histograms merged).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use peersan_node_agent::localcluster::{LocalCluster, VolumeDef};
use serde::Serialize;

use super::{cpu_us, median, run_fio_json};

const SINGLE: &str = "bench-sw";
const MULTI: &str = "bench-mw";
const HOT: u64 = 1 << 20;

pub struct Options {
    pub size: u64,
    pub runtime: u64,
    pub repeat: usize,
    /// Region size of the multi-writer volume (None: the agent's default).
    pub region: Option<u64>,
}

/// One measured setup (medians over the runs).
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    pub label: String,
    pub jobs: usize,
    pub iops: f64,
    /// Per job, in the order of the jobs.
    pub iops_per_job: Vec<f64>,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Agents' CPU time (user + system, both agents) per write, microseconds.
    pub cpu_us_per_io: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MultiWriterReport {
    pub volume_bytes: u64,
    pub region_bytes: u64,
    pub runtime_s: u64,
    pub repeat: usize,
    pub setups: Vec<Setup>,
}

/// One fio job: which node's export, and where.
struct Job {
    uri: String,
    offset: u64,
    size: u64,
}

/// What one fio run measured.
struct Run {
    iops_per_job: Vec<f64>,
    ios: u64,
    p50_us: f64,
    p99_us: f64,
}

/// Runs `jobs` at once in one fio process: 4k random writes at QD32 for `runtime` seconds.
fn fio_together(jobs: &[Job], runtime: u64) -> anyhow::Result<Run> {
    let mut cmd = Command::new("fio");
    // Options before the first --name apply to every job.
    cmd.args(["--output-format=json+", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--iodepth=32"]);
    cmd.args(["--time_based", "--randrepeat=0", "--norandommap"]).arg(format!("--runtime={runtime}"));
    for (k, j) in jobs.iter().enumerate() {
        cmd.arg(format!("--name=job{k}"));
        cmd.arg(format!("--uri={}", j.uri)).arg(format!("--offset={}", j.offset)).arg(format!("--size={}", j.size));
    }
    let v = run_fio_json(&mut cmd)?;
    let mut iops_per_job = Vec::new();
    let mut ios = 0;
    // Completion latency histogram of every job together: nanoseconds -> count.
    let mut bins: BTreeMap<u64, u64> = BTreeMap::new();
    for j in v["jobs"].as_array().context("fio JSON without jobs")? {
        let w = &j["write"];
        if let Some(e) = j["error"].as_i64().filter(|&e| e != 0) {
            bail!("fio job {} failed with error {e}", j["jobname"]);
        }
        iops_per_job.push(w["iops"].as_f64().unwrap_or(0.0));
        ios += w["total_ios"].as_u64().unwrap_or(0);
        for (ns, count) in w["clat_ns"]["bins"].as_object().context("fio JSON+ without latency bins")? {
            *bins.entry(ns.parse()?).or_default() += count.as_u64().unwrap_or(0);
        }
    }
    let total: u64 = bins.values().sum();
    let pct = |p: f64| {
        let rank = (p * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (&ns, &count) in &bins {
            seen += count;
            if seen >= rank {
                return ns as f64 / 1000.0;
            }
        }
        0.0
    };
    Ok(Run { iops_per_job, ios, p50_us: pct(0.50), p99_us: pct(0.99) })
}

/// Sequential 1 MiB writes over `size` bytes at `offset`, to lay the data out once.
fn warm_up(uri: &str, offset: u64, size: u64) -> anyhow::Result<()> {
    let out = Command::new("fio")
        .args(["--name=warmup", "--ioengine=nbd", "--rw=write", "--bs=1M", "--iodepth=8", "--output-format=terse"])
        .arg(format!("--uri={uri}"))
        .arg(format!("--offset={offset}"))
        .arg(format!("--size={size}"))
        .output()
        .context("running fio")?;
    if !out.status.success() {
        bail!("fio warm-up failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn measure(label: &str, jobs: &[Job], pids: &[u32], o: &Options) -> anyhow::Result<Setup> {
    let mut runs = Vec::new();
    for _ in 0..o.repeat.max(1) {
        let before: Option<u64> = pids.iter().map(|&p| cpu_us(p)).sum();
        let r = fio_together(jobs, o.runtime)?;
        let after: Option<u64> = pids.iter().map(|&p| cpu_us(p)).sum();
        let cpu = match (before, after) {
            (Some(b), Some(a)) if r.ios > 0 => Some((a - b) as f64 / r.ios as f64),
            _ => None,
        };
        runs.push((r, cpu));
    }
    let per_job =
        (0..jobs.len()).map(|k| median(runs.iter().map(|(r, _)| r.iops_per_job[k]).collect())).collect::<Vec<f64>>();
    let s = Setup {
        label: label.into(),
        jobs: jobs.len(),
        iops: median(runs.iter().map(|(r, _)| r.iops_per_job.iter().sum()).collect()),
        iops_per_job: per_job,
        p50_us: median(runs.iter().map(|(r, _)| r.p50_us).collect()),
        p99_us: median(runs.iter().map(|(r, _)| r.p99_us).collect()),
        cpu_us_per_io: runs.iter().map(|(_, c)| *c).collect::<Option<Vec<f64>>>().map(median),
    };
    eprintln!("  {label:<52} {:>9.0} IOPS, p99 {:>7.0} us", s.iops, s.p99_us);
    Ok(s)
}

pub fn run(dir: &std::path::Path, o: &Options) -> anyhow::Result<MultiWriterReport> {
    let cdir = dir.join("multiwriter");
    let _ = std::fs::remove_dir_all(&cdir);
    let agent = std::env::current_exe()?;
    let size = o.size;
    let half = size / 2;
    let region = o.region.unwrap_or(peersan_node_agent::config::DEFAULT_REGION_SIZE);
    let volumes =
        vec![VolumeDef::new(SINGLE, size, vec![0, 1]), VolumeDef::new(MULTI, size, vec![0, 1]).multi_writer(o.region)];
    let mut c = LocalCluster::new(&cdir, &agent, 2, volumes)?;
    c.agent_args = vec!["agent".into()];
    c.log_filter = "warn".into();
    c.write_configs()?;
    c.start_all()?;
    for i in 0..2 {
        for v in [SINGLE, MULTI] {
            c.wait_healthy(i, v, Duration::from_secs(30)).map_err(anyhow::Error::msg)?;
        }
    }
    let pids: Vec<u32> = (0..2).filter_map(|i| c.pid(i)).collect();
    let uri = |i: usize, v: &str| c.members[i].nbd_uri(v);
    eprintln!(
        "  multiwriter: warming up (node-1 writes the first half of both volumes, node-2 the second half of {MULTI})"
    );
    warm_up(&uri(0, SINGLE), 0, half)?;
    warm_up(&uri(0, MULTI), 0, half)?;
    warm_up(&uri(1, MULTI), half, half)?;

    let mut setups = Vec::new();
    let job = |i: usize, v: &str, offset: u64, size: u64| Job { uri: uri(i, v), offset, size };
    setups.push(measure("(a) single-writer, node-1, first half", &[job(0, SINGLE, 0, half)], &pids, o)?);
    setups.push(measure("(a-hot) single-writer, node-1, 1 MiB", &[job(0, SINGLE, 0, HOT)], &pids, o)?);
    setups.push(measure("(a') multi-writer, node-1 alone, first half", &[job(0, MULTI, 0, half)], &pids, o)?);
    setups.push(measure(
        "(b) multi-writer, node-1 + node-2, disjoint halves",
        &[job(0, MULTI, 0, half), job(1, MULTI, half, half)],
        &pids,
        o,
    )?);
    setups.push(measure(
        "(c) multi-writer, node-1 + node-2, same 1 MiB",
        &[job(0, MULTI, 0, HOT), job(1, MULTI, 0, HOT)],
        &pids,
        o,
    )?);
    for i in 0..2 {
        for v in [SINGLE, MULTI] {
            let vol = c.volume(i, v).map_err(anyhow::Error::msg)?;
            if vol.health != "healthy" {
                bail!("multiwriter: {v} became {} on {} during the benchmark", vol.health, c.members[i].name);
            }
        }
    }
    drop(c);
    let _ = std::fs::remove_dir_all(&cdir);
    Ok(MultiWriterReport { volume_bytes: size, region_bytes: region, runtime_s: o.runtime, repeat: o.repeat, setups })
}

pub fn print(r: &MultiWriterReport) {
    let runs = if r.repeat > 1 { format!(", medians of {} runs", r.repeat) } else { String::new() };
    println!(
        "multi-writer: 2-way volumes of {:.1} MiB, region {} KiB, fio 4k randwrite QD32 per job (nbd engine), {} s{runs}",
        r.volume_bytes as f64 / 1048576.0,
        r.region_bytes >> 10,
        r.runtime_s
    );
    println!(
        "{:<52} {:>4} {:>9} {:>17} {:>8} {:>8} {:>7} {:>9}",
        "setup", "jobs", "IOPS", "per job", "p50 us", "p99 us", "vs (a)", "cpu us/IO"
    );
    let base = r.setups.first().map(|s| s.iops).filter(|b| *b > 0.0);
    for s in &r.setups {
        let per_job: Vec<String> = s.iops_per_job.iter().map(|i| format!("{i:.0}")).collect();
        println!(
            "{:<52} {:>4} {:>9.0} {:>17} {:>8.0} {:>8.0} {:>7} {:>9}",
            s.label,
            s.jobs,
            s.iops,
            per_job.join(" + "),
            s.p50_us,
            s.p99_us,
            base.map(|b| format!("{:.0}%", 100.0 * s.iops / b)).unwrap_or("-".into()),
            s.cpu_us_per_io.map(|c| format!("{c:.1}")).unwrap_or("-".into())
        );
    }
    println!();
    let find = |prefix: &str| r.setups.iter().find(|s| s.label.starts_with(prefix)).map(|s| s.iops);
    if let (Some(b), Some(a)) = (find("(b)"), base) {
        let ratio = b / a;
        println!(
            "{:<52} {:>5.0}%  (target >= 90%) {}",
            "(b) two writers, disjoint halves / (a)",
            100.0 * ratio,
            if ratio >= 0.9 { "met" } else { "MISSED" }
        );
    }
    if let (Some(c), Some(a)) = (find("(c)"), base) {
        println!("{:<52} {:>5.0}%", "(c) two writers, one hot 1 MiB region / (a)", 100.0 * c / a);
    }
    if let (Some(c), Some(a)) = (find("(c)"), find("(a-hot)")) {
        println!("{:<52} {:>5.0}%", "(c) two writers, one hot 1 MiB region / (a-hot)", 100.0 * c / a);
    }
    let p99 = |prefix: &str| r.setups.iter().find(|s| s.label.starts_with(prefix)).map(|s| s.p99_us);
    if let (Some(c), Some(a)) = (p99("(c)"), p99("(a-hot)")) {
        println!("{:<52} {:>5.0}%", "(c) p99 latency / (a-hot) p99 latency", 100.0 * c / a);
    }
    if let (Some(a2), Some(a)) = (find("(a')"), base) {
        println!("{:<52} {:>5.0}%", "(a') one writer on the multi-writer volume / (a)", 100.0 * a2 / a);
    }
}
