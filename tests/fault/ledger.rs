//! Self-describing blocks and the ledger of what every block may hold.
//!
//! Each 4 KiB block a write carries starts with a header (magic, the write's sequence
//! number, the block's byte offset) followed by a filler derived from both, and a CRC32C
//! over the whole block: reading a block tells which write put it there and whether it is
//! intact. The ledger knows, per block, the last write that was acknowledged and the later
//! writes that may or may not have landed (their answer was an error, or the connection
//! died before it came).

use std::collections::HashMap;
use std::time::Instant;

pub const BLOCK: usize = 4096;
const MAGIC: u64 = u64::from_be_bytes(*b"PSANCAMP");
/// Byte range of the CRC32C inside a block; it covers every other byte.
const CRC_AT: usize = 24;

fn mix(mut z: u64) -> u64 {
    // splitmix64's finaliser.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn block_crc(buf: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&buf[..CRC_AT]), &buf[CRC_AT + 4..])
}

/// Fills `buf` (one block) with the content write `seq` gives the block at byte `off`.
pub fn fill_block(buf: &mut [u8], seq: u64, off: u64) {
    buf[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
    buf[16..24].copy_from_slice(&off.to_le_bytes());
    let mut x = mix(seq ^ off.rotate_left(32));
    let mut words = buf[CRC_AT + 4..].chunks_exact_mut(8);
    for w in &mut words {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        w.copy_from_slice(&x.to_le_bytes());
    }
    let rest = words.into_remainder();
    let n = rest.len();
    rest.copy_from_slice(&mix(x).to_le_bytes()[..n]);
    let crc = block_crc(buf);
    buf[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
}

/// What a block read back holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// Never written (all zeros).
    Zero,
    /// Intact data of this write.
    Write(u64),
    /// A block of this write, but written for another offset.
    Misplaced { seq: u64, off: u64 },
    /// Neither zeros nor an intact block.
    Garbage,
}

impl std::fmt::Display for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Content::Zero => write!(f, "zeros"),
            Content::Write(s) => write!(f, "write #{s}"),
            Content::Misplaced { seq, off } => write!(f, "write #{seq}'s block for offset {off}"),
            Content::Garbage => write!(f, "garbage"),
        }
    }
}

/// Decodes the block at byte offset `off`.
pub fn decode_block(buf: &[u8], off: u64) -> Content {
    let word = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().unwrap());
    if word(0) != MAGIC {
        return if buf.iter().all(|&b| b == 0) { Content::Zero } else { Content::Garbage };
    }
    let crc = u32::from_le_bytes(buf[CRC_AT..CRC_AT + 4].try_into().unwrap());
    if block_crc(buf) != crc {
        return Content::Garbage;
    }
    let (seq, at) = (word(8), word(16));
    if at != off { Content::Misplaced { seq, off: at } } else { Content::Write(seq) }
}

/// How a write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    InFlight,
    Acked,
    /// No acknowledgement; the index names the event in [`Ledger::causes`].
    Unknown(usize),
}

#[derive(Debug, Clone)]
pub struct WriteRec {
    pub off: u64,
    pub len: u32,
    /// CRC32C of the whole write's data.
    pub crc: u32,
    pub fua: bool,
    /// Seconds since the campaign started.
    pub issued: f64,
    pub done: f64,
    pub outcome: Outcome,
    /// The phase (see [`Ledger::phases`]) it was issued in.
    pub phase: usize,
}

/// Why writes ended without an acknowledgement.
#[derive(Debug, Clone)]
pub struct Cause {
    /// The phase it happened in.
    pub phase: usize,
    pub error: String,
    /// The writer was killed (-9) while these writes were in flight: without a write-intent
    /// log, replicas may legitimately disagree on them.
    pub writer_crash: bool,
}

#[derive(Debug, Clone, Default)]
pub struct BlockEntry {
    /// Last acknowledged write (0: none).
    pub acked: u64,
    /// Writes issued after it, not acknowledged: they may have landed.
    pub maybe: Vec<u64>,
}

/// A block judged against the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// The last acknowledged write is gone: older data or zeros.
    Lost,
    /// Data no write could have put there.
    Corrupt,
}

pub struct Ledger {
    pub start: Instant,
    pub blocks: Vec<BlockEntry>,
    writes: HashMap<u64, WriteRec>,
    pub causes: Vec<Cause>,
    /// What was going on, in order: each fault and the recovery from it. The last is now.
    pub phases: Vec<String>,
    /// The phase now is a crash of the writer.
    pub writer_crash: bool,
    pub next_seq: u64,
    pub acked: u64,
    pub unknown: u64,
}

impl Ledger {
    pub fn new(size: u64) -> Ledger {
        Ledger {
            start: Instant::now(),
            blocks: vec![BlockEntry::default(); (size / BLOCK as u64) as usize],
            writes: HashMap::new(),
            causes: Vec::new(),
            phases: vec!["start".into()],
            writer_crash: false,
            next_seq: 1,
            acked: 0,
            unknown: 0,
        }
    }

    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn span(off: u64, len: u32) -> std::ops::Range<usize> {
        (off / BLOCK as u64) as usize..((off + u64::from(len)) / BLOCK as u64) as usize
    }

    /// Records a new write and returns its sequence number (its data must be built with it).
    pub fn issue(&mut self, off: u64, len: u32, fua: bool) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        for b in Self::span(off, len) {
            self.blocks[b].maybe.push(seq);
        }
        let rec = WriteRec {
            off,
            len,
            crc: 0,
            fua,
            issued: self.now(),
            done: 0.0,
            outcome: Outcome::InFlight,
            phase: self.phases.len() - 1,
        };
        self.writes.insert(seq, rec);
        seq
    }

    pub fn set_crc(&mut self, seq: u64, crc: u32) {
        if let Some(w) = self.writes.get_mut(&seq) {
            w.crc = crc;
        }
    }

    pub fn ack(&mut self, seq: u64) {
        let now = self.now();
        let w = self.writes.get_mut(&seq).unwrap();
        w.outcome = Outcome::Acked;
        w.done = now;
        let (off, len) = (w.off, w.len);
        for b in Self::span(off, len) {
            let e = &mut self.blocks[b];
            // Overlapping writes are never in flight together, so nothing older is pending.
            e.acked = seq;
            e.maybe.retain(|&m| m > seq);
        }
        self.acked += 1;
    }

    /// A write ended without an acknowledgement: it stays possible on its blocks.
    pub fn unknown(&mut self, seq: u64, error: String) {
        let phase = self.phases.len() - 1;
        let cause = match self.causes.last() {
            Some(c) if c.phase == phase && c.error == error && c.writer_crash == self.writer_crash => {
                self.causes.len() - 1
            }
            _ => {
                self.causes.push(Cause { phase, error, writer_crash: self.writer_crash });
                self.causes.len() - 1
            }
        };
        let now = self.now();
        let w = self.writes.get_mut(&seq).unwrap();
        w.outcome = Outcome::Unknown(cause);
        w.done = now;
        self.unknown += 1;
    }

    /// Starts a new phase (a fault, or the recovery from one).
    pub fn set_phase(&mut self, what: String, writer_crash: bool) {
        self.phases.push(what);
        self.writer_crash = writer_crash;
    }

    pub fn phase(&self) -> &str {
        self.phases.last().unwrap()
    }

    /// Whether `content` is a value block `b` may hold.
    pub fn judge(&self, b: usize, content: Content) -> Verdict {
        let e = &self.blocks[b];
        match content {
            Content::Zero if e.acked == 0 => Verdict::Ok,
            Content::Zero => Verdict::Lost,
            Content::Write(s) if s == e.acked || e.maybe.contains(&s) => Verdict::Ok,
            // An older write of this very block (the offset in the block says so).
            Content::Write(s) if s < e.acked => Verdict::Lost,
            Content::Write(_) | Content::Misplaced { .. } | Content::Garbage => Verdict::Corrupt,
        }
    }

    /// Whether every write that may be on block `b` other than its last acknowledged one
    /// is unknown because the writer crashed.
    pub fn maybes_from_writer_crash(&self, b: usize, seqs: &[u64]) -> bool {
        seqs.iter().filter(|&&s| s != self.blocks[b].acked).all(|s| {
            matches!(self.writes.get(s).map(|w| w.outcome), Some(Outcome::Unknown(c)) if self.causes[c].writer_crash)
        })
    }

    /// Every replica and every node agree that block `b` holds `content` (a valid value)
    /// while no write is in flight: that is now its value, and the writes that did not
    /// land there never will.
    pub fn settle(&mut self, b: usize, content: Content) {
        let e = &mut self.blocks[b];
        match content {
            Content::Write(s) => e.acked = s,
            Content::Zero => debug_assert_eq!(e.acked, 0),
            _ => return,
        }
        e.maybe.clear();
    }

    /// A readable account of write `seq`.
    pub fn describe_write(&self, seq: u64) -> String {
        let Some(w) = self.writes.get(&seq) else { return format!("#{seq} (unknown)") };
        let outcome = match w.outcome {
            Outcome::InFlight => "in flight".to_string(),
            Outcome::Acked => format!("acked at {:.3}s", w.done),
            Outcome::Unknown(c) => {
                let c = &self.causes[c];
                format!("unacknowledged at {:.3}s ({}, during {})", w.done, c.error, self.phases[c.phase])
            }
        };
        format!(
            "#{seq} [off {} len {} crc {:08x}{}, issued at {:.3}s during {}, {outcome}]",
            w.off,
            w.len,
            w.crc,
            if w.fua { " fua" } else { "" },
            w.issued,
            self.phases[w.phase]
        )
    }

    /// A readable account of block `b` in the ledger.
    pub fn describe(&self, b: usize) -> String {
        let e = &self.blocks[b];
        let maybes: Vec<String> = e.maybe.iter().map(|&s| self.describe_write(s)).collect();
        format!(
            "last acked: {}; may also hold: [{}]",
            if e.acked == 0 { "none (zeros)".into() } else { self.describe_write(e.acked) },
            maybes.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_decode_to_their_write() {
        let mut b = vec![0u8; BLOCK];
        assert_eq!(decode_block(&b, 0), Content::Zero);
        fill_block(&mut b, 42, 8192);
        assert_eq!(decode_block(&b, 8192), Content::Write(42));
        assert_eq!(decode_block(&b, 4096), Content::Misplaced { seq: 42, off: 8192 });
        b[1000] ^= 1;
        assert_eq!(decode_block(&b, 8192), Content::Garbage);
    }

    #[test]
    fn ledger_keeps_unacknowledged_writes_possible() {
        let mut l = Ledger::new(16 * BLOCK as u64);
        let a = l.issue(0, 8192, false);
        l.ack(a);
        let b = l.issue(4096, 4096, false);
        l.unknown(b, "connection lost".into());
        assert_eq!(l.judge(0, Content::Write(a)), Verdict::Ok);
        assert_eq!(l.judge(1, Content::Write(a)), Verdict::Ok);
        assert_eq!(l.judge(1, Content::Write(b)), Verdict::Ok);
        assert_eq!(l.judge(0, Content::Write(b)), Verdict::Corrupt);
        assert_eq!(l.judge(0, Content::Zero), Verdict::Lost);
        assert_eq!(l.judge(2, Content::Zero), Verdict::Ok);
        let c = l.issue(4096, 4096, false);
        l.ack(c);
        assert_eq!(l.judge(1, Content::Write(b)), Verdict::Lost);
        assert_eq!(l.judge(1, Content::Write(a)), Verdict::Lost);
    }
}
