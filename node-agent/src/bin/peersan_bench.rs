//! `peersan-bench`: measures peersan volumes against a local file and an unreplicated
//! user-space NBD server (qemu-nbd) in the same run, with fio, and prints ratios; its fuse
//! section measures a 2-way volume as a kernel block device through the FUSE + loop
//! frontend (and the same volume through NBD); its resync section times replica
//! resynchronisation against the disk and link speed; its multiwriter section measures a
//! volume written from both of its nodes at once against a single-writer one.

mod common;
#[path = "peersan_bench/fuse.rs"]
mod fuse;
#[path = "peersan_bench/multiwriter.rs"]
mod multiwriter;
#[path = "peersan_bench/resync.rs"]
mod resync;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use peersan_node_agent::localcluster::{LocalCluster, VolumeDef};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(name = "peersan-bench", version, about = "fio benchmark of peersan volumes against local baselines")]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Size of the test file / volume.
    #[arg(long, default_value = "1GiB", value_parser = peersan_node_agent::config::ByteSize::parse)]
    size: peersan_node_agent::config::ByteSize,
    /// Seconds per fio job.
    #[arg(long, default_value_t = 8)]
    runtime: u64,
    /// Runs of each job (and of each resync measurement); the median is reported.
    #[arg(long, default_value_t = 1, global = true)]
    repeat: usize,
    /// Setups to run (comma-separated): local, qemu-nbd, 1-way, 2-way, 3-way, fuse, resync,
    /// multiwriter. `fuse` (needs root) measures setups `fuse-loop` and `nbd` on one 2-way
    /// volume; `multiwriter` (not in the default run) a 2-way volume written from both nodes
    /// at once against a single-writer one.
    #[arg(long, value_delimiter = ',', default_value = "local,qemu-nbd,1-way,2-way,3-way,fuse,resync")]
    setups: Vec<String>,
    /// Working directory (on the disk to measure); default: a fresh directory in /var/tmp.
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
    /// Also write the results as JSON.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// Fuse section: threads reading /dev/fuse.
    #[arg(long, default_value_t = peersan_node_agent::fuse::FuseConfig::default().threads, global = true)]
    fuse_threads: usize,
    /// Fuse section: replicas of the volume (1 measures the frontend without mirroring).
    #[arg(long, default_value_t = 2, global = true)]
    fuse_replicas: usize,
    /// Resync section: size of the 2-way volume.
    #[arg(long, default_value = "4GiB", value_parser = peersan_node_agent::config::ByteSize::parse, global = true)]
    resync_size: peersan_node_agent::config::ByteSize,
    /// Resync section: share of the volume's 4 KiB blocks written while a replica is away
    /// before the delta resync, in percent.
    #[arg(long, default_value_t = 1.0, global = true)]
    resync_dirty_percent: f64,
    /// Resync section: seconds of each foreground 4k random-write run.
    #[arg(long, default_value_t = 10, global = true)]
    resync_runtime: u64,
    /// Resync section: resync rate limit (per second) while foreground writes are measured
    /// during a resync; default: the agent's default.
    #[arg(long, value_parser = peersan_node_agent::config::ByteSize::parse, global = true)]
    resync_rate_during: Option<peersan_node_agent::config::ByteSize>,
    /// Multiwriter section: region size of the multi-writer volume; default: the agent's
    /// default.
    #[arg(long, value_parser = peersan_node_agent::config::ByteSize::parse, global = true)]
    mw_region: Option<peersan_node_agent::config::ByteSize>,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Run a node agent (the benchmark starts its agents this way).
    #[command(hide = true)]
    Agent(Box<common::agent::AgentArgs>),
    /// Run only the resync section (same as `--setups resync`).
    Resync,
    /// Run only the multiwriter section (same as `--setups multiwriter`).
    Multiwriter,
}

#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    depth: u32,
}

const WORKLOADS: [Workload; 4] = [
    Workload { name: "4k randwrite QD1", rw: "randwrite", bs: "4k", depth: 1 },
    Workload { name: "4k randwrite QD32", rw: "randwrite", bs: "4k", depth: 32 },
    Workload { name: "4k randread QD32", rw: "randread", bs: "4k", depth: 32 },
    Workload { name: "1M seqwrite QD8", rw: "write", bs: "1M", depth: 8 },
];

#[derive(Debug, Clone, Serialize)]
struct Result_ {
    setup: String,
    workload: String,
    iops: f64,
    mb_s: f64,
    p50_us: f64,
    p99_us: f64,
    /// Agent CPU time (user + system, all agents of the setup) per I/O, microseconds.
    cpu_us_per_io: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    size_bytes: u64,
    runtime_s: u64,
    repeat: usize,
    results: Vec<Result_>,
    peak_rss_kib: BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resync: Option<resync::ResyncReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    multiwriter: Option<multiwriter::MultiWriterReport>,
}

enum Target {
    File(PathBuf),
    Nbd(String),
}

fn fio(target: &Target, w: Workload, size: u64, runtime: u64) -> anyhow::Result<(f64, f64, f64, f64, u64)> {
    let mut cmd = Command::new("fio");
    cmd.args(["--name=bench", "--output-format=json", "--time_based", "--randrepeat=0", "--norandommap"]);
    cmd.arg(format!("--runtime={runtime}")).arg(format!("--size={size}"));
    cmd.arg(format!("--rw={}", w.rw)).arg(format!("--bs={}", w.bs)).arg(format!("--iodepth={}", w.depth));
    match target {
        Target::File(p) => {
            cmd.args(["--ioengine=libaio", "--direct=1"]).arg(format!("--filename={}", p.display()));
        }
        Target::Nbd(uri) => {
            cmd.arg("--ioengine=nbd").arg(format!("--uri={uri}"));
        }
    }
    let v = run_fio_json(&mut cmd)?;
    let dir = if w.rw.contains("read") { "read" } else { "write" };
    let j = &v["jobs"][0][dir];
    let pct = |p: &str| j["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
    Ok((
        j["iops"].as_f64().unwrap_or(0.0),
        j["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        pct("50.000000"),
        pct("99.000000"),
        j["total_ios"].as_u64().unwrap_or(0),
    ))
}

/// Runs fio (given `--output-format=json`) and returns its report.
fn run_fio_json(cmd: &mut Command) -> anyhow::Result<serde_json::Value> {
    let out = cmd.output().context("running fio (Debian: apt-get install fio)")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find('{').context("fio printed no JSON")?;
    serde_json::from_str(&text[start..]).context("parsing fio JSON")
}

fn prefill(target: &Target, size: u64) -> anyhow::Result<()> {
    let mut cmd = Command::new("fio");
    cmd.args(["--name=prefill", "--rw=write", "--bs=1M", "--iodepth=8", "--output-format=terse"]);
    cmd.arg(format!("--size={size}"));
    match target {
        Target::File(p) => {
            cmd.args(["--ioengine=libaio", "--direct=1"]).arg(format!("--filename={}", p.display()));
        }
        Target::Nbd(uri) => {
            cmd.arg("--ioengine=nbd").arg(format!("--uri={uri}"));
        }
    }
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("fio prefill failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// CPU time (user + system) of a process, in microseconds.
fn cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let hz = rustix::param::clock_ticks_per_second();
    Some(ticks * 1_000_000 / hz)
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn measure(setup: &str, target: &Target, pids: &[u32], a: &Args, results: &mut Vec<Result_>) -> anyhow::Result<()> {
    let size = a.size.0;
    prefill(target, size)?;
    for w in WORKLOADS {
        let mut runs = Vec::new();
        for _ in 0..a.repeat.max(1) {
            let before: Option<u64> = pids.iter().map(|&p| cpu_us(p)).sum();
            let (iops, mbs, p50, p99, ios) = fio(target, w, size, a.runtime)?;
            let after: Option<u64> = pids.iter().map(|&p| cpu_us(p)).sum();
            let cpu = match (before, after, pids.is_empty()) {
                (Some(b), Some(af), false) if ios > 0 => Some((af - b) as f64 / ios as f64),
                _ => None,
            };
            runs.push((iops, mbs, p50, p99, cpu));
        }
        let r = Result_ {
            setup: setup.into(),
            workload: w.name.into(),
            iops: median(runs.iter().map(|r| r.0).collect()),
            mb_s: median(runs.iter().map(|r| r.1).collect()),
            p50_us: median(runs.iter().map(|r| r.2).collect()),
            p99_us: median(runs.iter().map(|r| r.3).collect()),
            cpu_us_per_io: runs.iter().map(|r| r.4).collect::<Option<Vec<f64>>>().map(median),
        };
        eprintln!("  {setup:<9} {:<18} {:>9.0} IOPS {:>8.1} MB/s", r.workload, r.iops, r.mb_s);
        results.push(r);
    }
    Ok(())
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_socket(p: &Path) -> anyhow::Result<()> {
    for _ in 0..200 {
        if p.exists() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("{} did not appear", p.display())
}

fn main() -> anyhow::Result<()> {
    let mut a = Args::parse();
    match a.cmd.take() {
        Some(Cmd::Agent(args)) => return common::agent::run_agent(*args),
        Some(Cmd::Resync) => a.setups = vec!["resync".into()],
        Some(Cmd::Multiwriter) => a.setups = vec!["multiwriter".into()],
        None => {}
    }
    let dir = a.dir.clone().unwrap_or_else(|| PathBuf::from(format!("/var/tmp/peersan-bench-{}", std::process::id())));
    std::fs::create_dir_all(&dir)?;
    let size = a.size.0;
    let mut results = Vec::new();
    let mut rss = BTreeMap::new();
    let mut resync_report = None;
    let mut multiwriter_report = None;
    if a.setups.iter().any(|s| s != "resync") {
        eprintln!(
            "peersan-bench: {} per target, {} s per job, {} run(s) each, in {}",
            size,
            a.runtime,
            a.repeat,
            dir.display()
        );
    }
    for setup in &a.setups {
        match setup.as_str() {
            "local" => {
                let f = dir.join("local.img");
                std::fs::File::create(&f)?.set_len(size)?;
                measure("local", &Target::File(f.clone()), &[], &a, &mut results)?;
                std::fs::remove_file(&f)?;
            }
            "qemu-nbd" => {
                let f = dir.join("qemu-nbd.img");
                std::fs::File::create(&f)?.set_len(size)?;
                let sock = dir.join("qemu-nbd.sock");
                let child = Command::new("qemu-nbd")
                    .args(["-f", "raw", "--persistent", "--shared=16", "--aio=threads", "--cache=writeback", "-k"])
                    .arg(&sock)
                    .arg(&f)
                    .stdout(Stdio::null())
                    .spawn()
                    .context("starting qemu-nbd (Debian: apt-get install qemu-utils)")?;
                let child = KillOnDrop(child);
                wait_for_socket(&sock)?;
                let pid = child.0.id();
                measure(
                    "qemu-nbd",
                    &Target::Nbd(format!("nbd+unix:///?socket={}", sock.display())),
                    &[pid],
                    &a,
                    &mut results,
                )?;
                if let Some(k) = peak_rss_kib(pid) {
                    rss.insert("qemu-nbd".to_string(), k);
                }
                drop(child);
                std::fs::remove_file(&f)?;
            }
            s @ ("1-way" | "2-way" | "3-way") => {
                let n: usize = s[..1].parse()?;
                let cdir = dir.join(s);
                let _ = std::fs::remove_dir_all(&cdir);
                let agent = std::env::current_exe()?;
                let mut c = LocalCluster::new(&cdir, &agent, n, vec![VolumeDef::new("bench", size, (0..n).collect())])?;
                c.agent_args = vec!["agent".into()];
                c.log_filter = "warn".into();
                c.start_all()?;
                c.wait_healthy(0, "bench", Duration::from_secs(30)).map_err(anyhow::Error::msg)?;
                let pids: Vec<u32> = (0..n).filter_map(|i| c.pid(i)).collect();
                measure(s, &Target::Nbd(c.members[0].nbd_uri("bench")), &pids, &a, &mut results)?;
                let v = c.volume(0, "bench").map_err(anyhow::Error::msg)?;
                if v.health != "healthy" {
                    bail!("{s}: volume became {} during the benchmark", v.health);
                }
                for (i, &p) in pids.iter().enumerate() {
                    if let Some(k) = peak_rss_kib(p) {
                        rss.insert(format!("{s} {}", c.members[i].name), k);
                    }
                }
                drop(c);
                let _ = std::fs::remove_dir_all(&cdir);
            }
            "fuse" => fuse::run(&dir, &a, &mut results)?,
            "resync" => {
                let o = resync::Options {
                    size: a.resync_size.0,
                    runtime: a.resync_runtime,
                    dirty_percent: a.resync_dirty_percent,
                    rate_during: a.resync_rate_during.map(|r| r.0),
                    repeat: a.repeat,
                };
                resync_report = Some(resync::run(&dir, &o)?);
            }
            "multiwriter" => {
                let o = multiwriter::Options {
                    size,
                    runtime: a.runtime,
                    repeat: a.repeat,
                    region: a.mw_region.map(|r| r.0),
                };
                multiwriter_report = Some(multiwriter::run(&dir, &o)?);
            }
            other => {
                bail!("unknown setup {other:?} (local, qemu-nbd, 1-way, 2-way, 3-way, fuse, resync, multiwriter)")
            }
        }
    }
    if !results.is_empty() {
        print_table(&results, &rss);
    }
    if let Some(r) = &resync_report {
        if !results.is_empty() {
            println!();
        }
        resync::print(r);
    }
    if let Some(r) = &multiwriter_report {
        if !results.is_empty() || resync_report.is_some() {
            println!();
        }
        multiwriter::print(r);
    }
    if let Some(p) = &a.json {
        let report = Report {
            size_bytes: size,
            runtime_s: a.runtime,
            repeat: a.repeat,
            results,
            peak_rss_kib: rss,
            resync: resync_report,
            multiwriter: multiwriter_report,
        };
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)?;
        eprintln!("results written to {}", p.display());
    }
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

fn print_table(results: &[Result_], rss: &BTreeMap<String, u64>) {
    let find = |setup: &str, w: &str| results.iter().find(|r| r.setup == setup && r.workload == w).map(|r| r.iops);
    println!(
        "{:<9} {:<18} {:>9} {:>9} {:>9} {:>9} {:>8} {:>9} {:>10}",
        "setup", "workload", "IOPS", "MB/s", "p50 us", "p99 us", "vs local", "vs qemu", "cpu us/IO"
    );
    for r in results {
        let ratio = |base: Option<f64>| {
            base.filter(|b| *b > 0.0).map(|b| format!("{:.0}%", 100.0 * r.iops / b)).unwrap_or("-".into())
        };
        println!(
            "{:<9} {:<18} {:>9.0} {:>9.1} {:>9.0} {:>9.0} {:>8} {:>9} {:>10}",
            r.setup,
            r.workload,
            r.iops,
            r.mb_s,
            r.p50_us,
            r.p99_us,
            ratio(find("local", &r.workload)),
            ratio(find("qemu-nbd", &r.workload)),
            r.cpu_us_per_io.map(|c| format!("{c:.1}")).unwrap_or("-".into())
        );
    }
    println!();
    for (k, v) in rss {
        println!("peak RSS {k:<16} {:>6.1} MiB", *v as f64 / 1024.0);
    }
    // The targets, as ratios in this run.
    let check = |label: &str, num: Option<f64>, den: Option<f64>, min: f64| {
        if let (Some(n), Some(d)) = (num, den) {
            let r = n / d;
            println!(
                "{:<52} {:>5.0}%  (target >= {:.0}%) {}",
                label,
                r * 100.0,
                min * 100.0,
                if r >= min { "met" } else { "MISSED" }
            );
        }
    };
    println!();
    for w in ["4k randwrite QD32", "4k randread QD32"] {
        check(&format!("1-way / qemu-nbd, {w}"), find("1-way", w), find("qemu-nbd", w), 1.0);
    }
    check(
        "2-way / qemu-nbd, 4k randwrite QD32",
        find("2-way", "4k randwrite QD32"),
        find("qemu-nbd", "4k randwrite QD32"),
        0.5,
    );
    check(
        "2-way / qemu-nbd, 1M seqwrite QD8",
        find("2-way", "1M seqwrite QD8"),
        find("qemu-nbd", "1M seqwrite QD8"),
        0.7,
    );
    // The FUSE + loop frontend: no target yet, the ratios are reported.
    let ratio = |label: &str, num: Option<f64>, den: Option<f64>| {
        if let (Some(n), Some(d)) = (num, den.filter(|d| *d > 0.0)) {
            println!("{label:<52} {:>5.0}%", 100.0 * n / d);
        }
    };
    for w in ["4k randwrite QD32", "4k randread QD32", "1M seqwrite QD8"] {
        ratio(&format!("fuse-loop / local, {w}"), find("fuse-loop", w), find("local", w));
        ratio(&format!("fuse-loop / nbd (same volume), {w}"), find("fuse-loop", w), find("nbd", w));
    }
}
