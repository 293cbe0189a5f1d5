//! Judges what the nodes serve and what the replicas hold against the ledger.
//!
//! Every view (the volume read through one node's NBD export, or one replica's data area)
//! must hold, in every block, a value the ledger allows; and all views must be identical.
//! A block on which views differ although each holds an allowed value is divergent; when
//! the values they disagree on are writes that were in flight when the writer was killed,
//! the divergence is the known consequence of having no write-intent log and is counted
//! apart.

use std::collections::BTreeSet;

use super::ledger::{BLOCK, Content, Ledger, Verdict, decode_block};

pub struct View {
    pub label: String,
    pub data: Vec<u8>,
}

/// Blocks found wrong over the whole campaign (a block counts once per kind).
#[derive(Default)]
pub struct Findings {
    pub lost: BTreeSet<usize>,
    pub corrupt: BTreeSet<usize>,
    pub divergent: BTreeSet<usize>,
    pub inflight_divergent: BTreeSet<usize>,
    /// Views that could not be read, with why.
    pub unreadable: Vec<String>,
}

impl Findings {
    /// Findings that fail the campaign.
    pub fn failures(&self) -> usize {
        self.lost.len() + self.corrupt.len() + self.divergent.len() + self.unreadable.len()
    }
}

/// What one check found.
#[derive(Default)]
pub struct Report {
    pub lost: usize,
    pub corrupt: usize,
    pub divergent: usize,
    pub inflight_divergent: usize,
    /// Blocks whose unacknowledged writes were decided by this check.
    pub settled: usize,
    /// Details of the first wrong blocks.
    pub details: Vec<String>,
}

impl Report {
    pub fn clean(&self) -> bool {
        self.lost + self.corrupt + self.divergent == 0
    }
}

const MAX_DETAILS: usize = 8;

/// Checks `views` block by block against `ledger` (no write may be in flight). Blocks that
/// every view agrees on are settled in the ledger.
pub fn compare(ledger: &mut Ledger, views: &[View], f: &mut Findings) -> Report {
    let mut r = Report::default();
    let nblocks = ledger.blocks.len();
    for b in 0..nblocks {
        let at = b * BLOCK;
        fn slice(v: &View, at: usize) -> &[u8] {
            &v.data[at..at + BLOCK]
        }
        let first = slice(&views[0], at);
        let identical = views[1..].iter().all(|v| slice(v, at) == first);
        let contents: Vec<Content> = if identical {
            vec![decode_block(first, at as u64); views.len()]
        } else {
            views.iter().map(|v| decode_block(slice(v, at), at as u64)).collect()
        };
        let verdicts: Vec<Verdict> = contents.iter().map(|&c| ledger.judge(b, c)).collect();
        let lost = verdicts.contains(&Verdict::Lost);
        let corrupt = verdicts.contains(&Verdict::Corrupt);
        if identical && !lost && !corrupt {
            if !ledger.blocks[b].maybe.is_empty() {
                ledger.settle(b, contents[0]);
                r.settled += 1;
            }
            continue;
        }
        let mut kind = Vec::new();
        if lost {
            r.lost += 1;
            f.lost.insert(b);
            kind.push("LOST");
        }
        if corrupt {
            r.corrupt += 1;
            f.corrupt.insert(b);
            kind.push("CORRUPT");
        }
        if !identical {
            let seqs: Vec<u64> = contents
                .iter()
                .filter_map(|c| match c {
                    Content::Write(s) => Some(*s),
                    _ => None,
                })
                .collect();
            if !lost && !corrupt && ledger.maybes_from_writer_crash(b, &seqs) {
                r.inflight_divergent += 1;
                f.inflight_divergent.insert(b);
                kind.push("divergent (writes in flight when the writer was killed)");
            } else {
                r.divergent += 1;
                f.divergent.insert(b);
                kind.push("DIVERGENT");
            }
        }
        if r.details.len() < MAX_DETAILS {
            let seen: Vec<String> = views
                .iter()
                .zip(&contents)
                .zip(&verdicts)
                .map(|((v, c), verdict)| {
                    let mark = if *verdict == Verdict::Ok { String::new() } else { format!(" ({verdict:?})") };
                    format!("{}: {c}{mark}", v.label)
                })
                .collect();
            // The writes found that the ledger does not expect there, described.
            let mut strays: Vec<u64> = contents
                .iter()
                .zip(&verdicts)
                .filter_map(|(c, v)| match (c, v) {
                    (Content::Write(s), Verdict::Lost | Verdict::Corrupt) => Some(*s),
                    _ => None,
                })
                .collect();
            strays.sort_unstable();
            strays.dedup();
            let strays: Vec<String> = strays.iter().map(|&s| ledger.describe_write(s)).collect();
            r.details.push(format!(
                "block {b} (offset {at}) {}: {}; ledger: {}{}",
                kind.join(", "),
                seen.join("; "),
                ledger.describe(b),
                if strays.is_empty() { String::new() } else { format!("; found: {}", strays.join(", ")) }
            ));
        }
    }
    r
}
