//! Writers for the multi-writer tests: one per node, each on its own NBD connection to
//! that node's export, with many seeded random writes of self-describing blocks in flight,
//! every write recorded in a shared [`History`]. Overlapping writes may be in flight at once,
//! from one writer or several: the checker allows either order, as a disk does.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

use super::history::{History, Outcome};
use super::ledger::BLOCK;
use super::nbd_client::{NbdClient, NbdError};

const B: u64 = BLOCK as u64;

#[derive(Debug, Clone)]
pub struct Config {
    /// Index of the node whose export this writer uses (recorded with each write).
    pub node: usize,
    pub socket: PathBuf,
    pub export: String,
    /// Writes in flight.
    pub depth: usize,
    pub seed: u64,
    /// Byte ranges (4 KiB aligned) the writes go to, with their weights.
    pub areas: Vec<(Range<u64>, u32)>,
    /// The volume's region size: a share of the writes straddles a region boundary.
    pub region: u64,
}

/// What a writer saw, apart from the history.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// The first errors (when, what).
    pub errors: Vec<String>,
    /// Why the connection ended, if it did before the writer was stopped.
    pub disconnected: Option<String>,
}

pub struct Writer {
    pub node: usize,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<Result<Stats, String>>>,
}

impl Writer {
    /// Connects to the node's export and starts writing on `rt`.
    pub fn start(rt: &tokio::runtime::Runtime, cfg: Config, history: Arc<Mutex<History>>) -> Result<Writer, String> {
        let client = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), NbdClient::connect(&cfg.socket, &cfg.export)).await
        });
        let client = match client {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(format!("node-{}: NBD connect: {e}", cfg.node + 1)),
            Err(_) => return Err(format!("node-{}: NBD handshake timed out", cfg.node + 1)),
        };
        let (stop, rx) = watch::channel(false);
        let node = cfg.node;
        let task = rt.spawn(run(cfg, client, history, rx));
        Ok(Writer { node, stop, task: Some(task) })
    }

    /// Stops issuing writes, waits until every write has completed and closes the
    /// connection.
    pub fn stop(&mut self, rt: &tokio::runtime::Runtime, max: Duration) -> Result<Stats, String> {
        let _ = self.stop.send(true);
        let task = self.task.take().ok_or("stopped twice")?;
        match rt.block_on(async { tokio::time::timeout(max, task).await }) {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(format!("node-{} writer: {e}", self.node + 1)),
            Err(_) => {
                Err(format!("node-{}: writes still in flight {max:?} after the writer was stopped", self.node + 1))
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Picks the next write: 4 KiB to 256 KiB, some straddling a region boundary.
pub fn pick(rng: &mut StdRng, areas: &[(Range<u64>, u32)], region: u64) -> (u64, u64) {
    let total: u32 = areas.iter().map(|a| a.1).sum();
    let mut x = rng.random_range(0..total);
    let area = areas
        .iter()
        .find(|(_, w)| {
            if x < *w {
                true
            } else {
                x -= w;
                false
            }
        })
        .map(|a| a.0.clone())
        .expect("weights add up");
    let blocks_in_area = (area.end - area.start) / B;
    let class = rng.random_range(0..100);
    let blocks = match class {
        0..40 => 1,
        40..70 => rng.random_range(2..=16),
        70..85 => rng.random_range(17..=64),
        _ => rng.random_range(2..=64.min(2 * region / B).max(2)),
    }
    .min(blocks_in_area);
    // Region boundaries strictly inside the area, where a write can straddle one.
    let first_boundary = (area.start / region + 1) * region;
    if class >= 85 && blocks >= 2 && first_boundary < area.end {
        let boundaries = (area.end - 1 - first_boundary) / region + 1;
        let boundary = first_boundary + rng.random_range(0..boundaries) * region;
        let before = rng.random_range(1..blocks) * B;
        let off = boundary.saturating_sub(before).max(area.start).min(area.end - blocks * B);
        return (off, blocks * B);
    }
    let off = area.start + rng.random_range(0..=blocks_in_area - blocks) * B;
    (off, blocks * B)
}

enum Done {
    Ok,
    Error(u32),
    Lost(String),
}

async fn run(
    cfg: Config,
    client: NbdClient,
    history: Arc<Mutex<History>>,
    mut stop: watch::Receiver<bool>,
) -> Result<Stats, String> {
    let client = Arc::new(client);
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut inflight = FuturesUnordered::new();
    let mut stats = Stats::default();
    // After an error reply, a short pause before the next writes, so that a node that
    // refuses writes for a while does not fill the history with failures.
    let mut hold_until: Option<tokio::time::Instant> = None;
    loop {
        let stopping = *stop.borrow_and_update();
        let holding = hold_until.is_some_and(|t| tokio::time::Instant::now() < t);
        while !stopping && !holding && !client.is_dead() && inflight.len() < cfg.depth {
            let (off, len) = pick(&mut rng, &cfg.areas, cfg.region);
            let seq = history.lock().unwrap().issue(cfg.node, off, len);
            let data = History::data(seq, off, len);
            let (c, h) = (client.clone(), history.clone());
            inflight.push(async move {
                h.lock().unwrap().sent(seq);
                let r = c.write(off, &data, false).await;
                let done = match r {
                    Ok(()) => Done::Ok,
                    Err(NbdError::Server(e)) => Done::Error(e),
                    Err(NbdError::Disconnected(why)) => Done::Lost(why),
                };
                let outcome = match &done {
                    Done::Ok => Outcome::Acked,
                    Done::Error(e) => Outcome::Failed(format!("error reply {e}")),
                    Done::Lost(why) => Outcome::Failed(format!("connection lost: {why}")),
                };
                let mut h = h.lock().unwrap();
                h.complete(seq, outcome);
                (seq, done, h.now())
            });
        }
        if inflight.is_empty() && (stopping || client.is_dead()) {
            if client.is_dead() && !stopping {
                stats.disconnected.get_or_insert_with(|| "connection lost".into());
            }
            return Ok(stats);
        }
        let hold = async {
            match hold_until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some((seq, done, at)) = inflight.next(), if !inflight.is_empty() => {
                match done {
                    Done::Ok => {}
                    Done::Error(e) => {
                        if stats.errors.len() < 20 {
                            let what = history.lock().unwrap().describe(seq);
                            stats.errors.push(format!("{:.3}s: error {e} for {what}", at.as_secs_f64()));
                        }
                        hold_until = Some(tokio::time::Instant::now() + Duration::from_millis(20));
                    }
                    Done::Lost(why) => {
                        stats.disconnected.get_or_insert(why);
                    }
                }
            }
            _ = hold, if holding => hold_until = None,
            // A closed channel also means stop (the test is gone): the writer only drains.
            _ = stop.changed(), if !stopping => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_stay_in_their_areas_and_some_straddle_regions() {
        let region = 64 << 10;
        let areas = vec![(0..(1 << 20), 1), ((4 << 20)..(6 << 20), 2)];
        let mut rng = StdRng::seed_from_u64(7);
        let mut straddling = 0;
        for _ in 0..10_000 {
            let (off, len) = pick(&mut rng, &areas, region);
            assert!(off.is_multiple_of(B) && len.is_multiple_of(B) && (B..=64 * B).contains(&len));
            assert!(areas.iter().any(|(a, _)| a.start <= off && off + len <= a.end), "{off}+{len}");
            if off / region != (off + len - 1) / region {
                straddling += 1;
            }
        }
        assert!(straddling > 1500, "{straddling} writes straddle a region boundary");
    }
}
