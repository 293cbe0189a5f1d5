//! The background workload: seeded random writes of 4 KiB .. 64 KiB (4 KiB aligned), a few
//! verifying reads and flushes, many in flight, never two overlapping requests at once, every write
//! recorded in the [`Ledger`]. When the connection breaks it reconnects with back-off and
//! goes on. It runs on a thread of its own with its own runtime; the campaign pauses it
//! (waiting until nothing is in flight) to check the replicas.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

use super::ledger::{BLOCK, Content, Ledger, Verdict, decode_block, fill_block};
use super::nbd_client::{NbdClient, NbdError};

#[derive(Debug, Clone)]
pub struct Config {
    pub export: String,
    pub size: u64,
    /// Requests in flight.
    pub depth: usize,
    pub seed: u64,
    /// Share of requests that are reads, in percent.
    pub read_percent: u32,
    /// Largest request, in blocks.
    pub max_blocks: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub connects: u64,
    pub connect_failures: u64,
    pub last_connect_error: String,
    /// Writes answered with an error by the server.
    pub write_errors: u64,
    /// Requests that died with their connection.
    pub disconnected: u64,
    pub reads: u64,
    pub read_errors: u64,
    pub flushes: u64,
    pub flush_errors: u64,
    /// Reads that returned data the ledger does not allow, with the details.
    pub bad_reads: Vec<String>,
    /// Error replies from the server (the first ones), with when and what.
    pub error_replies: Vec<String>,
    pub in_flight: usize,
    pub connected: bool,
}

#[derive(Debug, Clone)]
struct Cmd {
    run: bool,
    stop: bool,
    /// Bumped by every pause; the workload echoes it once drained.
    epoch: u64,
    target: PathBuf,
}

struct Status {
    drained_epoch: u64,
    stats: Stats,
}

pub struct Shared {
    pub ledger: Mutex<Ledger>,
    status: Mutex<Status>,
    cv: Condvar,
}

pub struct Workload {
    pub shared: Arc<Shared>,
    cmd: watch::Sender<Cmd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Workload {
    /// Starts the workload against the NBD socket `target`, paused.
    pub fn start(cfg: Config, target: PathBuf) -> Workload {
        let shared = Arc::new(Shared {
            ledger: Mutex::new(Ledger::new(cfg.size)),
            status: Mutex::new(Status { drained_epoch: 0, stats: Stats::default() }),
            cv: Condvar::new(),
        });
        let (tx, rx) = watch::channel(Cmd { run: false, stop: false, epoch: 0, target });
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("workload".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(run(cfg, sh, rx));
            })
            .unwrap();
        Workload { shared, cmd: tx, thread: Some(thread) }
    }

    pub fn resume(&self) {
        self.cmd.send_modify(|c| c.run = true);
    }

    /// Stops issuing requests and waits until none is in flight.
    pub fn pause(&self, max: Duration) -> Result<(), String> {
        if self.thread.is_none() {
            // Stopped, hence drained.
            return Ok(());
        }
        let mut epoch = 0;
        self.cmd.send_modify(|c| {
            c.run = false;
            c.epoch += 1;
            epoch = c.epoch;
        });
        let st = self.shared.status.lock().unwrap();
        let (st, timeout) = self.shared.cv.wait_timeout_while(st, max, |s| s.drained_epoch < epoch).unwrap();
        if timeout.timed_out() {
            return Err(format!(
                "the workload did not drain within {max:?}: {} requests still in flight (connected: {})",
                st.stats.in_flight, st.stats.connected
            ));
        }
        Ok(())
    }

    /// Sends the next requests to another node's NBD socket.
    #[allow(dead_code)]
    pub fn set_target(&self, target: PathBuf) {
        self.cmd.send_modify(|c| c.target = target);
    }

    pub fn stats(&self) -> Stats {
        self.shared.status.lock().unwrap().stats.clone()
    }

    /// Drains and ends the workload.
    pub fn stop(&mut self) {
        self.cmd.send_modify(|c| {
            c.run = false;
            c.stop = true;
        });
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        // Not joined: during a panic the agents it waits on may be gone.
        self.cmd.send_modify(|c| {
            c.run = false;
            c.stop = true;
        });
    }
}

enum Done {
    Write { seq: u64, off: u64, len: u32, r: Result<(), NbdError> },
    Read { off: u64, len: u32, r: Result<Vec<u8>, NbdError> },
    Flush { r: Result<(), NbdError> },
}

type Op = Pin<Box<dyn Future<Output = Done>>>;

async fn run(cfg: Config, shared: Arc<Shared>, mut rx: watch::Receiver<Cmd>) {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let nblocks = cfg.size / BLOCK as u64;
    let mut conn: Option<(Arc<NbdClient>, PathBuf)> = None;
    let mut inflight: FuturesUnordered<Op> = FuturesUnordered::new();
    // Byte ranges of the requests in flight.
    let mut busy: Vec<(u64, u64)> = Vec::new();
    let mut backoff = Duration::from_millis(50);
    let stat = |f: &mut dyn FnMut(&mut Stats)| f(&mut shared.status.lock().unwrap().stats);
    loop {
        let cmd = rx.borrow_and_update().clone();
        if let Some((c, t)) = &conn
            && (c.is_dead() || *t != cmd.target)
            && inflight.is_empty()
        {
            conn = None;
            stat(&mut |s| s.connected = false);
        }
        if inflight.is_empty() && (!cmd.run || cmd.stop) {
            {
                let mut st = shared.status.lock().unwrap();
                st.drained_epoch = cmd.epoch;
                st.stats.in_flight = 0;
            }
            shared.cv.notify_all();
            if cmd.stop || rx.changed().await.is_err() {
                return;
            }
            continue;
        }
        if conn.is_none() {
            match tokio::time::timeout(Duration::from_secs(3), NbdClient::connect(&cmd.target, &cfg.export)).await {
                Ok(Ok(c)) => {
                    conn = Some((Arc::new(c), cmd.target.clone()));
                    backoff = Duration::from_millis(50);
                    stat(&mut |s| {
                        s.connects += 1;
                        s.connected = true;
                    });
                }
                r => {
                    let why = match r {
                        Ok(Err(e)) => e.to_string(),
                        _ => "handshake timed out".into(),
                    };
                    stat(&mut |s| {
                        s.connect_failures += 1;
                        s.last_connect_error = why.clone();
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = rx.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            }
        }
        let client = conn.as_ref().unwrap().0.clone();
        while cmd.run && !cmd.stop && !client.is_dead() && inflight.len() < cfg.depth {
            if rng.random_range(0..100) < 2 {
                let c = client.clone();
                inflight.push(Box::pin(async move { Done::Flush { r: c.flush().await } }));
                continue;
            }
            let blocks = rng.random_range(1..=cfg.max_blocks);
            let off = rng.random_range(0..=nblocks - blocks) * BLOCK as u64;
            let len = blocks * BLOCK as u64;
            let is_read = rng.random_range(0..100) < cfg.read_percent;
            if busy.iter().any(|&(o, l)| off < o + l && o < off + len) {
                // Try another range next time round; the sequence stays seeded.
                break;
            }
            busy.push((off, len));
            let c = client.clone();
            if is_read {
                inflight.push(Box::pin(async move {
                    let r = c.read(off, len as u32).await;
                    Done::Read { off, len: len as u32, r }
                }));
                continue;
            }
            let fua = rng.random_range(0..8) == 0;
            let seq = shared.ledger.lock().unwrap().issue(off, len as u32, fua);
            let mut data = vec![0u8; len as usize];
            for (k, b) in data.chunks_exact_mut(BLOCK).enumerate() {
                fill_block(b, seq, off + (k * BLOCK) as u64);
            }
            shared.ledger.lock().unwrap().set_crc(seq, crc32c::crc32c(&data));
            inflight.push(Box::pin(async move {
                let r = c.write(off, &data, fua).await;
                Done::Write { seq, off, len: len as u32, r }
            }));
        }
        stat(&mut |s| s.in_flight = inflight.len());
        tokio::select! {
            Some(done) = inflight.next(), if !inflight.is_empty() => {
                if let Done::Write { off, len, .. } | Done::Read { off, len, .. } = &done {
                    let range = (*off, u64::from(*len));
                    busy.retain(|&r| r != range);
                }
                complete(&shared, done);
            }
            r = rx.changed() => {
                if r.is_err() {
                    return;
                }
            }
        }
    }
}

fn complete(shared: &Shared, done: Done) {
    match done {
        Done::Write { seq, r, .. } => {
            let mut l = shared.ledger.lock().unwrap();
            match r {
                Ok(()) => l.ack(seq),
                Err(NbdError::Server(e)) => {
                    l.unknown(seq, format!("error reply {e}"));
                    let what = format!("write {} got error {e}", l.describe_write(seq));
                    drop(l);
                    let mut st = shared.status.lock().unwrap();
                    st.stats.write_errors += 1;
                    note_error(&mut st.stats, what);
                }
                Err(NbdError::Disconnected(_)) => {
                    l.unknown(seq, "connection lost".into());
                    drop(l);
                    shared.status.lock().unwrap().stats.disconnected += 1;
                }
            }
        }
        Done::Read { off, len, r } => {
            let l = shared.ledger.lock().unwrap();
            let mut st = shared.status.lock().unwrap();
            st.stats.reads += 1;
            match r {
                Ok(data) => {
                    for (k, b) in data.chunks_exact(BLOCK).enumerate() {
                        let at = off + (k * BLOCK) as u64;
                        let blk = (at / BLOCK as u64) as usize;
                        let got = decode_block(b, at);
                        let v = l.judge(blk, got);
                        if v != Verdict::Ok {
                            let found = match got {
                                Content::Write(s) => format!(": {}", l.describe_write(s)),
                                _ => String::new(),
                            };
                            st.stats.bad_reads.push(format!(
                                "read of {len} bytes at {off} ({:.3}s, during {}): block {blk} holds {got}{found} \
                                 ({v:?}); ledger: {}",
                                l.start.elapsed().as_secs_f64(),
                                l.phase(),
                                l.describe(blk)
                            ));
                        }
                    }
                }
                Err(NbdError::Server(e)) => {
                    st.stats.read_errors += 1;
                    let what = format!("read of {len} bytes at {off} got error {e} (during {})", l.phase());
                    note_error(&mut st.stats, what);
                }
                Err(NbdError::Disconnected(_)) => st.stats.disconnected += 1,
            }
        }
        Done::Flush { r } => {
            let l = shared.ledger.lock().unwrap();
            let mut st = shared.status.lock().unwrap();
            st.stats.flushes += 1;
            match r {
                Ok(()) => {}
                Err(NbdError::Server(e)) => {
                    st.stats.flush_errors += 1;
                    note_error(&mut st.stats, format!("flush got error {e} (during {})", l.phase()));
                }
                Err(NbdError::Disconnected(_)) => st.stats.disconnected += 1,
            }
        }
    }
}

fn note_error(stats: &mut Stats, what: String) {
    const KEEP: usize = 100;
    if stats.error_replies.len() < KEEP {
        stats.error_replies.push(what);
    }
}
