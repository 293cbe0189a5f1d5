//! The history of a volume written by several nodes at once, and its checker.
//!
//! Every write carries self-describing 4 KiB blocks ([`super::ledger::fill_block`]) tagged
//! with a sequence number unique across all writers, and is recorded with the times it
//! started (before its request was sent) and completed (after its reply was received),
//! both on one monotonic clock of the test process. A recorded start is therefore never
//! later, and a recorded completion never earlier, than the real event: every real-time
//! order the checker derives from the record also held in reality.
//!
//! The checker takes the final content of the volume (any number of views: each node's
//! NBD export, each replica's data area) and decides whether it is the outcome of some
//! serial execution of the writes that respects real time, in which every acknowledged
//! write took effect whole and unacknowledged writes took effect or not (a write that
//! failed may have been applied in part, like on a disk):
//!
//! * every view holds the same bytes (**divergent** otherwise);
//! * every block holds zeros or one write's whole block for that offset (**torn**
//!   otherwise: a mix of writes, a block of another offset, garbage);
//! * a block holds zeros only if no acknowledged write covers it (**lost**), and a write's
//!   data only if that write exists and covers it (**phantom**);
//! * a block does not hold write `w1` if an acknowledged write `w2` covering it started
//!   after `w1` completed (**stale**: `w2` is lost under older data);
//! * **order**: the writes can be put in one order that respects real time (`w1` before
//!   `w2` when `w1` completed before `w2` started) in which, for every block, the write it
//!   holds comes after every acknowledged write that covers it. The check builds that
//!   precedence graph (real-time edges through a chain of time points, so it stays linear in
//!   size) and looks for a cycle. It catches what no block alone shows: two overlapping writes
//!   applied in different orders on different blocks (a write not applied whole), and
//!   longer chains of contradictions. The stale rule is its two-write case. Where writes
//!   are whole only within aligned pieces ([`History::atomic_unit`]), each piece is a
//!   write of its own in that order.

#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::ledger::{BLOCK, Content, decode_block, fill_block};

/// How a write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    InFlight,
    Acked,
    /// No acknowledgement: an error reply or a lost connection (why). It may have been
    /// applied, in whole or in part.
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct WriteRec {
    /// The node whose NBD export received it.
    pub node: usize,
    pub off: u64,
    pub len: u64,
    /// Since the history's origin: taken before the request was sent.
    pub start: Duration,
    /// Since the history's origin: taken after the reply arrived.
    pub end: Option<Duration>,
    pub outcome: Outcome,
}

impl WriteRec {
    fn blocks(&self) -> std::ops::Range<usize> {
        (self.off / BLOCK as u64) as usize..((self.off + self.len) / BLOCK as u64) as usize
    }
    pub fn covers(&self, b: usize) -> bool {
        self.blocks().contains(&b)
    }
}

/// Every write issued to the volume, by any node. Sequence numbers start at 1 (0 is never
/// written) and index `writes`.
pub struct History {
    pub origin: Instant,
    pub size: u64,
    /// The unit of atomicity: a write is applied whole within each aligned piece of this
    /// many bytes, and its pieces may be ordered differently against another write (a
    /// multi-writer engine cuts a write at multiples of 64 regions). None: writes are whole.
    pub atomic_unit: Option<u64>,
    writes: Vec<WriteRec>,
}

impl History {
    pub fn new(size: u64) -> History {
        History { origin: Instant::now(), size, atomic_unit: None, writes: Vec::new() }
    }

    pub fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// Records a write that starts now; returns its sequence number.
    pub fn issue(&mut self, node: usize, off: u64, len: u64) -> u64 {
        let start = self.now();
        self.issue_at(node, off, len, start)
    }

    pub fn issue_at(&mut self, node: usize, off: u64, len: u64, start: Duration) -> u64 {
        assert!(off.is_multiple_of(BLOCK as u64) && len.is_multiple_of(BLOCK as u64) && len > 0);
        assert!(off + len <= self.size, "write at {off}+{len} beyond the volume's {} bytes", self.size);
        self.writes.push(WriteRec { node, off, len, start, end: None, outcome: Outcome::InFlight });
        self.writes.len() as u64
    }

    /// Moves the start of write `seq` to now: call it just before the request is sent, so
    /// that the time spent building the data does not count.
    pub fn sent(&mut self, seq: u64) {
        let now = self.now();
        let w = &mut self.writes[seq as usize - 1];
        assert_eq!(w.outcome, Outcome::InFlight, "write #{seq} sent after it completed");
        w.start = now;
    }

    /// Writes by `node` that started at or after `since` and were acknowledged.
    pub fn acked_since(&self, node: usize, since: Duration) -> usize {
        self.writes.iter().filter(|w| w.node == node && w.start >= since && w.outcome == Outcome::Acked).count()
    }

    /// Writes by `node` that failed, with the first few described.
    pub fn failures(&self, node: usize) -> (usize, Vec<String>) {
        let failed: Vec<u64> = self
            .writes()
            .filter(|(_, w)| w.node == node && matches!(w.outcome, Outcome::Failed(_)))
            .map(|(s, _)| s)
            .collect();
        (failed.len(), failed.iter().take(5).map(|&s| self.describe(s)).collect())
    }

    /// The longest time one of `node`'s writes took (None: it made none).
    pub fn max_latency(&self, node: usize) -> Option<Duration> {
        self.writes.iter().filter(|w| w.node == node).filter_map(|w| w.end.map(|e| e.saturating_sub(w.start))).max()
    }

    /// How many writes ran at the same time as a write of another node to the same region
    /// (`region` bytes): the contention the policing protocol had to arbitrate.
    pub fn contended(&self, region: u64) -> usize {
        // Per region, the writes touching it: (start, end, node, index).
        let mut per_region: HashMap<u64, Vec<(Duration, Duration, usize, usize)>> = HashMap::new();
        for (i, w) in self.writes.iter().enumerate() {
            let Some(end) = w.end else { continue };
            for r in w.off / region..=(w.off + w.len - 1) / region {
                per_region.entry(r).or_default().push((w.start, end, w.node, i));
            }
        }
        let mut contended = vec![false; self.writes.len()];
        for list in per_region.values_mut() {
            list.sort_unstable();
            // Writes still running at the current start, by node.
            let mut active: Vec<(Duration, usize, usize)> = Vec::new();
            for &(start, end, node, i) in list.iter() {
                active.retain(|&(e, _, _)| e > start);
                for &(_, n, j) in &active {
                    if n != node {
                        contended[i] = true;
                        contended[j] = true;
                    }
                }
                active.push((end, node, i));
            }
        }
        contended.iter().filter(|&&c| c).count()
    }

    /// The write's data: one self-describing block per 4 KiB.
    pub fn data(seq: u64, off: u64, len: u64) -> Vec<u8> {
        let mut data = vec![0u8; len as usize];
        for (k, b) in data.chunks_exact_mut(BLOCK).enumerate() {
            fill_block(b, seq, off + (k * BLOCK) as u64);
        }
        data
    }

    /// Records the end of write `seq` now.
    pub fn complete(&mut self, seq: u64, outcome: Outcome) {
        let end = self.now();
        self.complete_at(seq, outcome, end);
    }

    pub fn complete_at(&mut self, seq: u64, outcome: Outcome, end: Duration) {
        let w = &mut self.writes[seq as usize - 1];
        assert_eq!(w.outcome, Outcome::InFlight, "write #{seq} completed twice");
        assert!(outcome != Outcome::InFlight);
        w.end = Some(end);
        w.outcome = outcome;
    }

    pub fn get(&self, seq: u64) -> Option<&WriteRec> {
        seq.checked_sub(1).and_then(|i| self.writes.get(i as usize))
    }

    pub fn writes(&self) -> impl Iterator<Item = (u64, &WriteRec)> {
        self.writes.iter().enumerate().map(|(i, w)| (i as u64 + 1, w))
    }

    pub fn len(&self) -> usize {
        self.writes.len()
    }

    pub fn in_flight(&self) -> usize {
        self.writes.iter().filter(|w| w.outcome == Outcome::InFlight).count()
    }

    /// A readable account of write `seq`.
    pub fn describe(&self, seq: u64) -> String {
        let Some(w) = self.get(seq) else { return format!("#{seq} (never issued)") };
        let end = w.end.map(|e| format!("{:.6}s", e.as_secs_f64())).unwrap_or("-".into());
        let outcome = match &w.outcome {
            Outcome::InFlight => "in flight".to_string(),
            Outcome::Acked => "acked".to_string(),
            Outcome::Failed(why) => format!("failed: {why}"),
        };
        format!(
            "#{seq} [node-{} off {} len {} (blocks {}..{}), {:.6}s..{end}, {outcome}]",
            w.node + 1,
            w.off,
            w.len,
            w.off / BLOCK as u64,
            (w.off + w.len) / BLOCK as u64,
            w.start.as_secs_f64()
        )
    }
}

/// One way of seeing the volume's content: a node's NBD export or a replica's data area.
pub struct View {
    pub label: String,
    pub data: Vec<u8>,
}

/// What the checker found; every list holds block numbers (or, for `order`, one account
/// of a cycle), with readable details of the first few in `details`.
#[derive(Default, Debug)]
pub struct Report {
    pub divergent: BTreeSet<usize>,
    pub torn: BTreeSet<usize>,
    pub lost: BTreeSet<usize>,
    pub phantom: BTreeSet<usize>,
    pub stale: BTreeSet<usize>,
    /// Views whose content admits no serial order of the writes (one account per view).
    pub order: Vec<String>,
    /// Views that could not be checked (wrong size).
    pub unreadable: Vec<String>,
    pub details: Vec<String>,
    /// Blocks holding an acknowledged / a failed write's data, in the first view.
    pub blocks_acked: usize,
    pub blocks_failed: usize,
}

const MAX_DETAILS: usize = 12;

impl Report {
    pub fn clean(&self) -> bool {
        self.divergent.is_empty()
            && self.torn.is_empty()
            && self.lost.is_empty()
            && self.phantom.is_empty()
            && self.stale.is_empty()
            && self.order.is_empty()
            && self.unreadable.is_empty()
    }

    fn detail(&mut self, d: String) {
        if self.details.len() < MAX_DETAILS {
            self.details.push(d);
        }
    }

    pub fn summary(&self) -> String {
        format!(
            "divergent={} torn={} lost={} phantom={} stale={} order={} unreadable={}",
            self.divergent.len(),
            self.torn.len(),
            self.lost.len(),
            self.phantom.len(),
            self.stale.len(),
            self.order.len(),
            self.unreadable.len()
        )
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.summary())?;
        for d in &self.details {
            write!(f, "\n  {d}")?;
        }
        for u in &self.unreadable {
            write!(f, "\n  unreadable: {u}")?;
        }
        Ok(())
    }
}

/// Checks the final content of the volume, as seen by `views`, against `h` (no write may
/// be in flight).
pub fn check(h: &History, views: &[View]) -> Report {
    let mut r = Report::default();
    assert_eq!(h.in_flight(), 0, "the history has writes in flight: check only once every write has completed");
    let views: Vec<&View> = views
        .iter()
        .filter(|v| {
            let ok = v.data.len() as u64 == h.size;
            if !ok {
                r.unreadable.push(format!("{}: {} bytes instead of {}", v.label, v.data.len(), h.size));
            }
            ok
        })
        .collect();
    if views.is_empty() {
        return r;
    }
    let nblocks = (h.size / BLOCK as u64) as usize;

    // Divergence, block by block.
    for b in 0..nblocks {
        let at = b * BLOCK;
        let first = &views[0].data[at..at + BLOCK];
        if views[1..].iter().all(|v| &v.data[at..at + BLOCK] == first) {
            continue;
        }
        r.divergent.insert(b);
        let seen: Vec<String> = views
            .iter()
            .map(|v| format!("{}: {}", v.label, describe_content(h, decode_block(&v.data[at..at + BLOCK], at as u64))))
            .collect();
        r.detail(format!("block {b} DIVERGENT: {}", seen.join("; ")));
    }

    // Each distinct view against the history.
    let mut distinct: Vec<&View> = Vec::new();
    for v in &views {
        if !distinct.iter().any(|d| d.data == v.data) {
            distinct.push(v);
        }
    }
    // Per block, the latest start of an acknowledged write covering it (for `stale`).
    let mut latest_acked_start: Vec<Option<(Duration, u64)>> = vec![None; nblocks];
    for (seq, w) in h.writes() {
        if w.outcome != Outcome::Acked {
            continue;
        }
        for b in w.blocks() {
            if latest_acked_start[b].is_none_or(|(s, _)| w.start > s) {
                latest_acked_start[b] = Some((w.start, seq));
            }
        }
    }
    for (k, v) in distinct.iter().enumerate() {
        let label = if distinct.len() == 1 { "every view".to_string() } else { v.label.clone() };
        let finals = check_blocks(h, v, &label, &latest_acked_start, &mut r);
        if k == 0 {
            for s in &finals {
                match s.and_then(|s| h.get(s)).map(|w| &w.outcome) {
                    Some(Outcome::Acked) => r.blocks_acked += 1,
                    Some(Outcome::Failed(_)) => r.blocks_failed += 1,
                    _ => {}
                }
            }
        }
        if let Some(cycle) = find_order_cycle(h, &finals) {
            let d = format!("{label}: ORDER: no serial order of the writes gives this content: {cycle}");
            r.detail(d.clone());
            r.order.push(d);
        }
    }
    r
}

fn describe_content(h: &History, c: Content) -> String {
    match c {
        Content::Write(s) => h.describe(s),
        other => other.to_string(),
    }
}

/// Checks every block of one view on its own; returns, per block, the write it holds (None:
/// zeros, or a block the order check cannot use).
fn check_blocks(
    h: &History,
    v: &View,
    label: &str,
    latest_acked_start: &[Option<(Duration, u64)>],
    r: &mut Report,
) -> Vec<Option<u64>> {
    let nblocks = latest_acked_start.len();
    let mut finals = vec![None; nblocks];
    for (b, fin) in finals.iter_mut().enumerate() {
        let at = b * BLOCK;
        let content = decode_block(&v.data[at..at + BLOCK], at as u64);
        match content {
            Content::Zero => {
                if let Some((_, seq)) = latest_acked_start[b] {
                    r.lost.insert(b);
                    r.detail(format!("{label}: block {b} LOST: zeros, but acknowledged {} covers it", h.describe(seq)));
                }
            }
            Content::Garbage | Content::Misplaced { .. } => {
                r.torn.insert(b);
                if r.details.len() < MAX_DETAILS {
                    r.detail(format!(
                        "{label}: block {b} TORN: {content} (not one write's whole block for this offset){}",
                        torn_hint(h, b, &v.data[at..at + BLOCK])
                    ));
                }
            }
            Content::Write(s) => match h.get(s) {
                Some(w) if w.covers(b) => {
                    *fin = Some(s);
                    let end = w.end.expect("no write in flight");
                    if let Some((start, later)) = latest_acked_start[b]
                        && start > end
                    {
                        r.stale.insert(b);
                        r.detail(format!(
                            "{label}: block {b} STALE: holds {}, but acknowledged {} covering it started {:.6}s after \
                             that completed",
                            h.describe(s),
                            h.describe(later),
                            (start - end).as_secs_f64()
                        ));
                    }
                }
                _ => {
                    r.phantom.insert(b);
                    r.detail(format!("{label}: block {b} PHANTOM: holds data of {}", h.describe(s)));
                }
            },
        }
    }
    finals
}

/// For a torn block: which write each 512-byte sector of it belongs to, among the writes
/// that cover it.
fn torn_hint(h: &History, b: usize, block: &[u8]) -> String {
    const SECTOR: usize = 512;
    let mut expected = vec![0u8; BLOCK];
    let mut owner: Vec<Option<u64>> = vec![None; BLOCK / SECTOR];
    for (seq, w) in h.writes() {
        if !w.covers(b) {
            continue;
        }
        fill_block(&mut expected, seq, (b * BLOCK) as u64);
        for (k, o) in owner.iter_mut().enumerate() {
            if o.is_none() && block[k * SECTOR..(k + 1) * SECTOR] == expected[k * SECTOR..(k + 1) * SECTOR] {
                *o = Some(seq);
            }
        }
    }
    let names: Vec<String> = owner
        .iter()
        .enumerate()
        .map(|(k, o)| match o {
            Some(seq) => format!("{k}:#{seq}"),
            None if block[k * SECTOR..(k + 1) * SECTOR].iter().all(|&x| x == 0) => format!("{k}:zeros"),
            None => format!("{k}:?"),
        })
        .collect();
    format!("; its 512-byte sectors: {}", names.join(" "))
}

/// Node of the precedence graph: the parts of the writes (see [`History::atomic_unit`]),
/// then time points.
struct Graph {
    succ: Vec<Vec<u32>>,
}

impl Graph {
    fn edge(&mut self, a: usize, b: usize) {
        self.succ[a].push(b as u32);
    }
}

/// The parts of the writes: graph node numbers, and which write and part a node is.
struct Parts {
    /// Blocks per atomic unit (None: writes are whole).
    unit: Option<usize>,
    /// Per write (sequence number - 1), its first node.
    first: Vec<usize>,
    /// Per node, (sequence number, part index).
    of: Vec<(u64, usize)>,
}

impl Parts {
    fn new(h: &History) -> Parts {
        let unit = h.atomic_unit.map(|u| (u / BLOCK as u64) as usize);
        let mut first = Vec::with_capacity(h.len());
        let mut of = Vec::with_capacity(h.len());
        for (seq, w) in h.writes() {
            first.push(of.len());
            let blocks = w.blocks();
            let count = match unit {
                Some(u) => (blocks.end - 1) / u - blocks.start / u + 1,
                None => 1,
            };
            of.extend((0..count).map(|k| (seq, k)));
        }
        Parts { unit, first, of }
    }

    /// The node of write `seq`'s part that covers block `b`.
    fn node(&self, h: &History, seq: u64, b: usize) -> usize {
        let base = self.first[seq as usize - 1];
        match self.unit {
            Some(u) => base + b / u - h.get(seq).unwrap().blocks().start / u,
            None => base,
        }
    }

    fn describe(&self, h: &History, node: usize) -> String {
        let (seq, k) = self.of[node];
        let parts = self.of[self.first[seq as usize - 1]..].iter().take_while(|(s, _)| *s == seq).count();
        if parts > 1 { format!("part {k} of {}", h.describe(seq)) } else { h.describe(seq) }
    }
}

/// Builds the precedence graph of the writes for the final content `finals` and returns a
/// readable account of a cycle, if there is one.
fn find_order_cycle(h: &History, finals: &[Option<u64>]) -> Option<String> {
    let parts = Parts::new(h);
    let n = parts.of.len();
    // Time points: the distinct completion times, ascending.
    let mut ends: Vec<Duration> = h.writes().filter_map(|(_, w)| w.end).collect();
    ends.sort_unstable();
    ends.dedup();
    let mut g = Graph { succ: vec![Vec::new(); n + ends.len()] };
    for i in 1..ends.len() {
        g.edge(n + i - 1, n + i);
    }
    for (node, &(seq, _)) in parts.of.iter().enumerate() {
        let w = h.get(seq).unwrap();
        if let Some(e) = w.end {
            // The write completed at time point p: w -> p.
            let p = ends.binary_search(&e).unwrap();
            g.edge(node, n + p);
        }
        // The last time point strictly before the write started: p -> w.
        let p = ends.partition_point(|&e| e < w.start);
        if p > 0 {
            g.edge(n + p - 1, node);
        }
    }
    // Final content: an acknowledged write that covers a block comes before the write the
    // block holds (their parts that cover it).
    for (seq, w) in h.writes() {
        if w.outcome != Outcome::Acked {
            continue;
        }
        let mut edges: Vec<(usize, usize)> = w
            .blocks()
            .filter_map(|b| finals[b].map(|f| (parts.node(h, seq, b), parts.node(h, f, b))))
            .filter(|(from, to)| from != to)
            .collect();
        edges.sort_unstable();
        edges.dedup();
        for (from, to) in edges {
            g.edge(from, to);
        }
    }
    let cycle = cycle_in(&g)?;
    Some(explain_cycle(h, &parts, finals, &cycle))
}

/// A cycle of `g` (its nodes in order), if any: Kahn's algorithm, then a walk backwards
/// through the nodes it could not remove.
fn cycle_in(g: &Graph) -> Option<Vec<usize>> {
    let total = g.succ.len();
    let mut indeg = vec![0u32; total];
    for s in &g.succ {
        for &t in s {
            indeg[t as usize] += 1;
        }
    }
    let mut queue: Vec<usize> = (0..total).filter(|&v| indeg[v] == 0).collect();
    let mut removed = vec![false; total];
    while let Some(v) = queue.pop() {
        removed[v] = true;
        for &t in &g.succ[v] {
            indeg[t as usize] -= 1;
            if indeg[t as usize] == 0 {
                queue.push(t as usize);
            }
        }
    }
    let start = (0..total).find(|&v| !removed[v])?;
    // Every node left has a predecessor left: walk predecessors until one repeats.
    let mut pred: Vec<Option<usize>> = vec![None; total];
    for (v, s) in g.succ.iter().enumerate() {
        if removed[v] {
            continue;
        }
        for &t in s {
            if !removed[t as usize] && pred[t as usize].is_none() {
                pred[t as usize] = Some(v);
            }
        }
    }
    let mut seen: HashMap<usize, usize> = HashMap::new();
    let mut walk = Vec::new();
    let mut v = start;
    while !seen.contains_key(&v) {
        seen.insert(v, walk.len());
        walk.push(v);
        v = pred[v].expect("a node left by Kahn's algorithm has a predecessor left");
    }
    let mut cycle: Vec<usize> = walk[seen[&v]..].to_vec();
    // The walk went backwards.
    cycle.reverse();
    Some(cycle)
}

/// Says why each write (part) of the cycle must come before the next.
fn explain_cycle(h: &History, parts: &Parts, finals: &[Option<u64>], cycle: &[usize]) -> String {
    let n = parts.of.len();
    // Rotate so that it starts at a write; time points between two writes make a
    // real-time edge.
    let first = cycle.iter().position(|&v| v < n).expect("a cycle holds a write");
    let rotated: Vec<usize> = cycle[first..].iter().chain(&cycle[..first]).copied().collect();
    let mut s = String::new();
    let mut k = 0;
    while k < rotated.len() {
        let a = rotated[k];
        let mut j = k + 1;
        while j < rotated.len() && rotated[j] >= n {
            j += 1;
        }
        let b = rotated[j % rotated.len()];
        let (sa, sb) = (parts.of[a].0, parts.of[b].0);
        let wa = h.get(sa).unwrap();
        let why = if j > k + 1 {
            format!("#{sa} completed before #{sb} started")
        } else {
            let blk = wa
                .blocks()
                .find(|&blk| finals[blk] == Some(sb) && parts.node(h, sa, blk) == a && parts.node(h, sb, blk) == b)
                .unwrap();
            format!("block {blk} holds #{sb} although acknowledged #{sa} covers it")
        };
        let _ = write!(s, "\n    {} must precede #{sb}: {why}", parts.describe(h, a));
        k = j;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 16 * BLOCK as u64;
    const B: u64 = BLOCK as u64;

    fn ms(t: u64) -> Duration {
        Duration::from_millis(t)
    }

    /// Records a write of `blocks` by node 0 from `start` to `end` (ms) with `outcome`.
    fn w(h: &mut History, first: u64, blocks: u64, start: u64, end: u64, outcome: Outcome) -> u64 {
        let s = h.issue_at(0, first * B, blocks * B, ms(start));
        h.complete_at(s, outcome, ms(end));
        s
    }

    fn acked(h: &mut History, first: u64, blocks: u64, start: u64, end: u64) -> u64 {
        w(h, first, blocks, start, end, Outcome::Acked)
    }

    /// A volume image where block `b` holds write `seq`'s data for it (0: zeros).
    fn image(content: &[(u64, u64)]) -> Vec<u8> {
        let mut d = vec![0u8; SIZE as usize];
        for &(b, seq) in content {
            if seq != 0 {
                fill_block(&mut d[(b * B) as usize..((b + 1) * B) as usize], seq, b * B);
            }
        }
        d
    }

    fn view(label: &str, data: Vec<u8>) -> View {
        View { label: label.into(), data }
    }

    fn one(h: &History, data: Vec<u8>) -> Report {
        check(h, &[view("a", data)])
    }

    #[test]
    fn concurrent_overlapping_writes_may_land_in_either_order() {
        for winner in [0, 1] {
            let mut h = History::new(SIZE);
            let a = acked(&mut h, 0, 4, 0, 10);
            let b = acked(&mut h, 2, 4, 5, 15);
            let top = [a, b][winner];
            let img = image(&[(0, a), (1, a), (2, top), (3, top), (4, b), (5, b)]);
            let r = check(&h, &[view("a", img.clone()), view("b", img)]);
            assert!(r.clean(), "winner {winner}: {r}");
            assert_eq!(r.blocks_acked, 6);
        }
    }

    #[test]
    fn an_older_write_over_a_newer_one_is_stale() {
        let mut h = History::new(SIZE);
        let a = acked(&mut h, 0, 2, 0, 10);
        let b = acked(&mut h, 1, 2, 11, 20);
        let r = one(&h, image(&[(0, a), (1, a), (2, b)]));
        assert_eq!(r.stale, BTreeSet::from([1]), "{r}");
        // One block alone shows it; the order check finds the same contradiction.
        assert_eq!(r.order.len(), 1, "{r}");
        // The same content is fine if b started before a completed.
        let mut h = History::new(SIZE);
        let a = acked(&mut h, 0, 2, 0, 10);
        let b = acked(&mut h, 1, 2, 9, 20);
        assert!(one(&h, image(&[(0, a), (1, a), (2, b)])).clean());
    }

    #[test]
    fn zeros_under_an_acknowledged_write_are_lost() {
        let mut h = History::new(SIZE);
        let a = acked(&mut h, 0, 3, 0, 10);
        let r = one(&h, image(&[(0, a), (2, a)]));
        assert_eq!(r.lost, BTreeSet::from([1]), "{r}");
        // Zeros where only a failed write went are fine.
        let mut h = History::new(SIZE);
        let a = acked(&mut h, 0, 1, 0, 10);
        w(&mut h, 1, 2, 0, 10, Outcome::Failed("error reply 5".into()));
        assert!(one(&h, image(&[(0, a)])).clean());
    }

    #[test]
    fn a_block_mixing_two_writes_is_torn() {
        let mut h = History::new(SIZE);
        let a = acked(&mut h, 0, 1, 0, 10);
        let b = acked(&mut h, 0, 1, 5, 15);
        let mut img = image(&[(0, a)]);
        let other = image(&[(0, b)]);
        img[2048..4096].copy_from_slice(&other[2048..4096]);
        let r = one(&h, img);
        assert_eq!(r.torn, BTreeSet::from([0]), "{r}");
        assert!(r.details[0].contains(&format!("#{a}")), "{r}");
        // A block written for another offset, and garbage.
        let mut img = image(&[(1, a)]);
        let (lo, hi) = img.split_at_mut(BLOCK);
        lo.copy_from_slice(&hi[..BLOCK]);
        img[BLOCK + 100] = 1;
        let r = one(&h, img);
        assert_eq!(r.torn, BTreeSet::from([0, 1]), "{r}");
    }

    #[test]
    fn data_of_a_write_that_never_covered_the_block_is_phantom() {
        let mut h = History::new(SIZE);
        let a = acked(&mut h, 0, 1, 0, 10);
        // A block tagged with write a for offset 1 (a only covers block 0), and a write
        // that was never issued.
        let r = one(&h, image(&[(0, a), (1, a), (2, 99)]));
        assert_eq!(r.phantom, BTreeSet::from([1, 2]), "{r}");
    }

    #[test]
    fn views_that_differ_are_divergent() {
        let mut h = History::new(SIZE);
        let a = acked(&mut h, 0, 1, 0, 10);
        let b = acked(&mut h, 0, 1, 5, 15);
        // Both values are allowed, but the replicas must agree.
        let r = check(&h, &[view("a", image(&[(0, a)])), view("b", image(&[(0, b)])), view("c", image(&[(0, a)]))]);
        assert_eq!(r.divergent, BTreeSet::from([0]), "{r}");
        assert!(r.stale.is_empty() && r.order.is_empty(), "{r}");
    }

    #[test]
    fn a_write_applied_in_different_orders_on_two_blocks_is_not_whole() {
        // a and b both cover blocks 0 and 1 and ran at the same time: either may win, but
        // the same one on both blocks.
        let mut h = History::new(SIZE);
        let a = acked(&mut h, 0, 2, 0, 10);
        let b = acked(&mut h, 0, 2, 1, 11);
        let r = one(&h, image(&[(0, a), (1, b)]));
        assert!(r.stale.is_empty(), "no block alone shows it: {r}");
        assert_eq!(r.order.len(), 1, "{r}");
        assert!(r.order[0].contains(&format!("block 0 holds #{a}")), "{r}");
        assert!(one(&h, image(&[(0, b), (1, b)])).clean());
    }

    #[test]
    fn a_cycle_through_real_time_is_found() {
        // a {0,1} and b {1,2} run concurrently; block 1 holds a, so b precedes a. c {2,3}
        // starts after a completed, so a precedes c; block 2 holds b although c covers it,
        // so c precedes b: b -> a -> c -> b. Every block on its own is possible.
        let mut h = History::new(SIZE);
        let a = acked(&mut h, 0, 2, 0, 10);
        let b = acked(&mut h, 1, 2, 0, 30);
        let c = acked(&mut h, 2, 2, 15, 20);
        let r = one(&h, image(&[(0, a), (1, a), (2, b), (3, c)]));
        assert!(r.stale.is_empty(), "every block on its own is possible: {r}");
        assert_eq!(r.order.len(), 1, "{r}");
        let o = &r.order[0];
        assert!(o.contains(&format!("#{a} completed before #{c} started")), "{r}");
        assert!(o.contains(&format!("block 1 holds #{a}")), "{r}");
        assert!(o.contains(&format!("block 2 holds #{b}")), "{r}");
        // With c started before a completed, there is an order: c, b, a.
        let mut h = History::new(SIZE);
        let a = acked(&mut h, 0, 2, 0, 10);
        let b = acked(&mut h, 1, 2, 0, 30);
        let c = acked(&mut h, 2, 2, 5, 20);
        assert!(one(&h, image(&[(0, a), (1, a), (2, b), (3, c)])).clean());
    }

    #[test]
    fn three_concurrent_writes_in_inconsistent_orders_are_found() {
        // a covers blocks 1..=3, b 3..=5, c 1..=5, all concurrent. Blocks 1, 2 and 4 hold c
        // (a and b before c), block 3 holds a (c before a), block 5 holds b: c and a are
        // ordered both ways, on blocks that each look fine alone.
        let mut h = History::new(SIZE);
        let a = acked(&mut h, 1, 3, 0, 10);
        let b = acked(&mut h, 3, 3, 0, 10);
        let c = acked(&mut h, 1, 5, 0, 10);
        let r = one(&h, image(&[(1, c), (2, c), (3, a), (4, c), (5, b)]));
        assert!(r.stale.is_empty() && r.lost.is_empty(), "{r}");
        assert_eq!(r.order.len(), 1, "{r}");
        // c last everywhere it covers is an order: a, b, c.
        assert!(one(&h, image(&[(1, c), (2, c), (3, c), (4, c), (5, c)])).clean());
    }

    #[test]
    fn writes_cut_into_atomic_units_may_be_ordered_per_unit() {
        // a and b both cover blocks 1..=2, concurrently; block 1 holds a, block 2 holds b.
        // Whole writes cannot do that; writes cut at every 2 blocks (blocks 0-1, 2-3) can.
        let mut h = History::new(SIZE);
        let a = acked(&mut h, 1, 2, 0, 10);
        let b = acked(&mut h, 1, 2, 1, 11);
        let img = image(&[(1, a), (2, b)]);
        assert_eq!(one(&h, img.clone()).order.len(), 1);
        h.atomic_unit = Some(2 * B);
        let r = one(&h, img);
        assert!(r.clean(), "{r}");
        // Within one unit a write stays whole: a and b cover blocks 1..=3 (parts: block 1,
        // blocks 2-3); blocks 2 and 3 may not disagree.
        let mut h = History::new(SIZE);
        h.atomic_unit = Some(2 * B);
        let a = acked(&mut h, 1, 3, 0, 10);
        let b = acked(&mut h, 1, 3, 1, 11);
        let r = one(&h, image(&[(1, b), (2, a), (3, b)]));
        assert_eq!(r.order.len(), 1, "{r}");
        assert!(r.order[0].contains("part 1 of"), "{r}");
        assert!(one(&h, image(&[(1, b), (2, a), (3, a)])).clean());
    }

    #[test]
    fn failed_writes_may_land_in_part_but_not_after_newer_acknowledged_ones() {
        let mut h = History::new(SIZE);
        let a = acked(&mut h, 0, 2, 0, 10);
        let f = w(&mut h, 0, 2, 12, 20, Outcome::Failed("connection lost".into()));
        // Applied on block 0 only: allowed.
        assert!(one(&h, image(&[(0, f), (1, a)])).clean());
        // A later acknowledged write started after the failure was reported: the failed
        // write's data must not be over it.
        let b = acked(&mut h, 0, 1, 21, 30);
        let r = one(&h, image(&[(0, f), (1, a)]));
        assert_eq!(r.stale, BTreeSet::from([0]), "{r}");
        assert!(one(&h, image(&[(0, b), (1, f)])).clean());
    }

    #[test]
    fn contention_counts_overlaps_in_time_and_region_across_nodes() {
        let mut h = History::new(SIZE);
        let region = 4 * B;
        // Node 0 and node 1 in region 0 at the same time: both count.
        acked(&mut h, 0, 1, 0, 10);
        let s = h.issue_at(1, 3 * B, B, ms(5));
        h.complete_at(s, Outcome::Acked, ms(15));
        // Node 1 in region 0 afterwards, node 0 in region 1 at the same time as it, one node
        // twice at once in region 2: none counts.
        let s = h.issue_at(1, 0, B, ms(20));
        h.complete_at(s, Outcome::Acked, ms(30));
        acked(&mut h, 4, 1, 20, 30);
        acked(&mut h, 8, 1, 40, 50);
        acked(&mut h, 9, 1, 40, 50);
        assert_eq!(h.contended(region), 2);
        // A write straddling regions 1 and 2 of node 1 while node 0 writes region 2.
        let s = h.issue_at(1, 7 * B, 2 * B, ms(45));
        h.complete_at(s, Outcome::Acked, ms(60));
        assert_eq!(h.contended(region), 5);
    }

    #[test]
    fn a_view_of_the_wrong_size_is_unreadable() {
        let h = History::new(SIZE);
        let r = check(&h, &[view("short", vec![0; BLOCK])]);
        assert_eq!(r.unreadable.len(), 1, "{r}");
        assert!(!r.clean());
    }

    #[test]
    fn real_time_edges_stay_linear() {
        // Many sequential writes to one block: real-time order is a chain, the last one
        // holds the block. A quadratic construction would show here.
        let mut h = History::new(SIZE);
        let mut last = 0;
        for k in 0..20_000u64 {
            last = acked(&mut h, k % 16, 1, 2 * k, 2 * k + 1);
        }
        let mut content: Vec<(u64, u64)> = Vec::new();
        for b in 0..16 {
            // The last write to each block.
            content.push((b, 20_000 - 16 + b + 1));
        }
        assert_eq!(last, 20_000);
        assert!(one(&h, image(&content)).clean());
        content[3].1 -= 16;
        let r = one(&h, image(&content));
        assert_eq!(r.stale, BTreeSet::from([3]), "{r}");
    }
}
