//! `peersan`: the command-line client of the node agent API, the demo, and the node agent
//! itself (`peersan agent`, the same as `peersan-node-agent`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use peersan_node_agent::api::{self, pb};
use peersan_node_agent::config::ByteSize;
use peersan_node_agent::localcluster::{LocalCluster, VolumeDef, read_replica_data};

#[derive(Parser, Debug)]
#[command(name = "peersan", version, about = "peersan: mirrored volumes from local disks")]
struct Cli {
    /// The node agent's API socket.
    #[arg(long, global = true, env = "PEERSAN_API_SOCKET", default_value = "/run/peersan/api.sock")]
    socket: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Manage volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Show the node the agent runs as.
    Node,
    /// Run a node agent (the same as `peersan-node-agent`).
    Agent(Box<common::agent::AgentArgs>),
    /// Run the CSI controller (the same as `peersan-csi-controller`).
    CsiController(peersan_csi_driver::run::ControllerArgs),
    /// Run the operator (the same as `peersan-operator`).
    Operator(peersan_operator::run::OperatorArgs),
    /// Run three agents on this machine and show mirroring, failover and resync.
    Demo {
        /// Keep the demo's directory (configs, logs, replicas) afterwards.
        #[arg(long)]
        keep: bool,
    },
}

#[derive(Subcommand, Debug)]
enum VolumeCmd {
    /// List the volumes of the node with the state of every replica.
    List,
    /// Show one volume.
    Show { name: String },
    /// Create a volume with a replica on each of the given nodes.
    Create {
        name: String,
        /// Size, e.g. 1GiB.
        #[arg(long, value_parser = ByteSize::parse)]
        size: ByteSize,
        /// Comma-separated node names (this node included).
        #[arg(long, value_delimiter = ',', required = true)]
        replicas: Vec<String>,
    },
    /// Delete a volume and its replicas.
    Delete { name: String },
    /// Grow this node's replica of a volume to SIZE, online (volumes created through the
    /// API only). Each replica node grows its own replica: run this against every replica
    /// node's agent (`--socket`); until all have grown, writes past the old end are marked
    /// for the replicas still smaller, which catch up once grown. Repeating it is harmless.
    Expand {
        name: String,
        /// New size, e.g. 2GiB: a multiple of 4096, not smaller than the current size.
        #[arg(value_parser = ByteSize::parse)]
        size: ByteSize,
    },
    /// Give this node write priority for the volume (a new fencing epoch); the previous
    /// writer's writes are refused from then on.
    Promote { name: String },
    /// Resolve a split brain: keep NODE's data; the other side's changes are discarded and
    /// it resynchronises from NODE.
    Resolve {
        name: String,
        #[arg(long, value_name = "NODE")]
        keep: String,
    },
    /// Follow a volume's resync with a progress bar until every replica is in sync.
    Watch {
        name: String,
        /// Give up after this many seconds (0 = never).
        #[arg(long, default_value_t = 0)]
        timeout: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Demo { keep } => demo(keep),
        Cmd::Agent(args) => common::agent::run_agent(*args),
        Cmd::CsiController(args) => peersan_csi_driver::run::run(args),
        Cmd::Operator(args) => peersan_operator::run::run(args),
        cmd => tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(client(&cli.socket, cmd)),
    }
}

async fn client(socket: &Path, cmd: Cmd) -> anyhow::Result<()> {
    let mut c = api::connect(socket).await.with_context(|| {
        format!("cannot reach the node agent at {} (set --socket or PEERSAN_API_SOCKET)", socket.display())
    })?;
    let status = |s: tonic::Status| anyhow::anyhow!("{}", s.message());
    match cmd {
        Cmd::Node => {
            let n = c.get_node(pb::GetNodeRequest {}).await.map_err(status)?.into_inner();
            println!("node {}  version {}\npeer {}\nnbd  {}", n.name, n.version, n.peer_address, n.nbd_unix_socket);
            println!(
                "pool {} capacity, {} allocated, {} free",
                human(n.capacity_bytes),
                human(n.allocated_bytes),
                human(n.free_bytes)
            );
        }
        Cmd::Volume(VolumeCmd::List) => {
            let vols = c.list_volumes(pb::ListVolumesRequest {}).await.map_err(status)?.into_inner().volumes;
            print!("{}", volume_table(&vols));
        }
        Cmd::Volume(VolumeCmd::Show { name }) => {
            let v = c.get_volume(pb::GetVolumeRequest { name }).await.map_err(status)?.into_inner();
            print!("{}", volume_table(std::slice::from_ref(&v)));
            println!("NBD: {}", v.nbd_uri);
        }
        Cmd::Volume(VolumeCmd::Create { name, size, replicas }) => {
            let v = c
                .create_volume(pb::CreateVolumeRequest { name, size_bytes: size.0, replicas })
                .await
                .map_err(status)?
                .into_inner();
            print!("{}", volume_table(std::slice::from_ref(&v)));
        }
        Cmd::Volume(VolumeCmd::Delete { name }) => {
            c.delete_volume(pb::DeleteVolumeRequest { name: name.clone() }).await.map_err(status)?;
            println!("volume {name} deleted");
        }
        Cmd::Volume(VolumeCmd::Expand { name, size }) => {
            let v = c
                .expand_volume(pb::ExpandVolumeRequest { name: name.clone(), size_bytes: size.0 })
                .await
                .map_err(status)?
                .into_inner();
            print!("{}", volume_table(std::slice::from_ref(&v)));
            let others: Vec<&str> = v.replicas.iter().filter(|r| !r.local).map(|r| r.node.as_str()).collect();
            if !others.is_empty() {
                println!(
                    "this node's replica has {} bytes; grow the replicas on {} too: peersan --socket <their agent's socket> volume expand {name} {}",
                    v.size_bytes,
                    others.join(", "),
                    size.0
                );
            }
        }
        Cmd::Volume(VolumeCmd::Promote { name }) => {
            let v = c.promote(pb::PromoteRequest { name }).await.map_err(status)?.into_inner();
            println!("{} holds write priority for {} at epoch {}", v.writer, v.name, v.epoch);
        }
        Cmd::Volume(VolumeCmd::Resolve { name, keep }) => {
            let v =
                c.resolve_split_brain(pb::ResolveSplitBrainRequest { name, keep }).await.map_err(status)?.into_inner();
            print!("{}", volume_table(std::slice::from_ref(&v)));
        }
        Cmd::Volume(VolumeCmd::Watch { name, timeout }) => {
            use std::io::{IsTerminal, Write};
            let tty = std::io::stdout().is_terminal();
            let t0 = Instant::now();
            let mut last = String::new();
            loop {
                let v = c.get_volume(pb::GetVolumeRequest { name: name.clone() }).await.map_err(status)?.into_inner();
                let line = progress_line(&v);
                if tty {
                    print!("\r\x1b[2K{line}");
                    std::io::stdout().flush()?;
                } else if line != last {
                    println!("{line}");
                }
                last = line;
                if v.health == "healthy" {
                    if tty {
                        println!();
                    }
                    break;
                }
                if timeout > 0 && t0.elapsed() > Duration::from_secs(timeout) {
                    if tty {
                        println!();
                    }
                    bail!("volume {name} is still {} after {timeout} s", v.health);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        Cmd::Demo { .. } | Cmd::Agent(_) | Cmd::CsiController(_) | Cmd::Operator(_) => unreachable!("handled in main"),
    }
    Ok(())
}

fn human(n: u64) -> String {
    peersan_node_agent::agent::human_bytes(n)
}

/// `[#####-----] 42% 1.2 GiB of 2.9 GiB at 110 MiB/s, ETA 15 s` for the replica being
/// resynchronised, or the volume's health.
fn progress_line(v: &pb::Volume) -> String {
    let Some(r) = v.replicas.iter().find(|r| r.resync_total_bytes > 0) else {
        return format!("{}: {}", v.name, v.health);
    };
    let frac = (r.resync_done_bytes as f64 / r.resync_total_bytes as f64).clamp(0.0, 1.0);
    const W: usize = 30;
    let filled = (frac * W as f64).round() as usize;
    let mut s = format!(
        "{} {}: [{}{}] {:>3.0}% {} of {}",
        v.name,
        r.node,
        "#".repeat(filled),
        "-".repeat(W - filled),
        frac * 100.0,
        human(r.resync_done_bytes),
        human(r.resync_total_bytes)
    );
    if r.resync_rate_bytes_per_sec > 0 {
        s += &format!(" at {}/s, ETA {} s", human(r.resync_rate_bytes_per_sec), r.resync_eta_seconds);
    }
    s
}

/// One row per replica: volume, size, health, writer, node, state, resync progress, detail.
fn volume_table(vols: &[pb::Volume]) -> String {
    let mut rows =
        vec![["VOLUME", "SIZE", "HEALTH", "WRITER", "NODE", "REPLICA", "RESYNC", "DETAIL"].map(String::from).to_vec()];
    for v in vols {
        for (k, r) in v.replicas.iter().enumerate() {
            let first = k == 0;
            let resync = if r.resync_total_bytes > 0 {
                let mut s = format!(
                    "{:.0}% of {}",
                    100.0 * r.resync_done_bytes as f64 / r.resync_total_bytes as f64,
                    human(r.resync_total_bytes)
                );
                if r.resync_rate_bytes_per_sec > 0 {
                    s += &format!(" at {}/s, ETA {} s", human(r.resync_rate_bytes_per_sec), r.resync_eta_seconds);
                }
                s
            } else if r.out_of_sync_bytes > 0 {
                format!("{} out of sync", human(r.out_of_sync_bytes))
            } else {
                "-".into()
            };
            rows.push(vec![
                if first { v.name.clone() } else { String::new() },
                if first { human(v.size_bytes) } else { String::new() },
                if first { v.health.clone() } else { String::new() },
                if first { format!("{} (epoch {})", v.writer, v.epoch) } else { String::new() },
                format!("{}{}", r.node, if r.local { " (local)" } else { "" }),
                r.state.clone(),
                resync,
                r.detail.clone(),
            ]);
        }
    }
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(s, w)| format!("{s:<w$}")).collect();
        out += line.join("  ").trim_end();
        out.push('\n');
    }
    out
}

// ---- demo ------------------------------------------------------------------------------

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn qemu_io(uri: &str, ops: &[String]) -> anyhow::Result<String> {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]).arg(uri);
    for op in ops {
        cmd.arg("-c").arg(op);
    }
    let out = run(&mut cmd)?;
    if out.contains("Pattern verification failed") || out.contains("failed") {
        bail!("qemu-io reported a failure: {out}");
    }
    Ok(out)
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn step(t0: Instant, msg: &str) {
    println!("[{:5.1}s] {msg}", t0.elapsed().as_secs_f64());
}

fn demo(keep: bool) -> anyhow::Result<()> {
    if Command::new("qemu-io").arg("--version").output().is_err() {
        bail!("the demo writes through NBD with qemu-io; install it first (Debian: apt-get install qemu-utils)");
    }
    let t0 = Instant::now();
    // The agents are this very program (`peersan agent`), so the demo needs no other binary.
    let agent = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("peersan-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    const MIB: u64 = 1 << 20;
    let vol = "demo";
    let mut cluster = LocalCluster::new(&dir, &agent, 3, vec![VolumeDef::new(vol, 64 * MIB, vec![0, 1, 2])])?;
    cluster.agent_args = vec!["agent".into()];
    step(t0, &format!("starting 3 node agents in {}", dir.display()));
    cluster.start_all()?;
    let v = cluster.wait_healthy(0, vol, Duration::from_secs(20)).map_err(anyhow::Error::msg)?;
    step(t0, "3-way volume `demo` (64 MiB) is in sync on every node:");
    print!("{}", volume_table(&[v]));

    let uri1 = cluster.members[0].nbd_uri(vol);
    let uri2 = cluster.members[1].nbd_uri(vol);
    step(t0, &format!("writing 16 MiB through NBD on node-1 with qemu-io ({uri1})"));
    let ops: Vec<String> = (0..16).map(|i| format!("write -P {} {}M 1M", 0x10 + i, i)).collect();
    qemu_io(&uri1, &ops)?;
    qemu_io(&uri1, &["flush".into()])?;

    step(t0, "kill -9 node-3");
    cluster.kill(2);
    step(t0, "node-2 takes write priority (a new fencing epoch; node-1's writes are refused from now on)");
    let v = cluster.promote(1, vol).map_err(anyhow::Error::msg)?;
    println!("{} holds write priority at epoch {}", v.writer, v.epoch);
    step(t0, "writing 8 MiB more through node-2 while node-3 is down");
    let ops: Vec<String> = (0..8).map(|i| format!("write -P {} {}M 1M", 0xa0 + i, 24 + i)).collect();
    qemu_io(&uri2, &ops)?;
    qemu_io(&uri2, &["flush".into()])?;
    let v =
        cluster.wait_for(1, vol, Duration::from_secs(15), |v| v.health == "degraded").map_err(anyhow::Error::msg)?;
    print!("{}", volume_table(&[v]));
    step(t0, "reading everything back through node-1 and checking every byte");
    let mut checks: Vec<String> = (0..16).map(|i| format!("read -P {} {}M 1M", 0x10 + i, i)).collect();
    checks.extend((0..8).map(|i| format!("read -P {} {}M 1M", 0xa0 + i, 24 + i)));
    qemu_io(&uri1, &checks)?;

    step(
        t0,
        "restarting node-3; it copies what it missed (and, after its kill -9, what its activity log covered) from an in-sync peer",
    );
    cluster.start(2)?;
    let v = cluster.wait_healthy(2, vol, Duration::from_secs(30)).map_err(anyhow::Error::msg)?;
    step(t0, "node-3 is back in sync:");
    print!("{}", volume_table(&[v]));
    qemu_io(&cluster.members[2].nbd_uri(vol), &checks)?;
    step(t0, "node-3 serves the same data");

    for i in 0..3 {
        cluster.stop(i);
    }
    step(t0, "stopped the agents; SHA-256 of each replica's data:");
    let mut sums = Vec::new();
    for m in &cluster.members {
        let sum = sha256_hex(&read_replica_data(&m.replica_path(vol))?);
        println!("  {}  {}  {}", m.name, sum, m.replica_path(vol).display());
        sums.push(sum);
    }
    let identical = sums.windows(2).all(|w| w[0] == w[1]);
    drop(cluster);
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if !identical {
        bail!("replicas differ");
    }
    step(t0, "all three replicas are identical");
    Ok(())
}
