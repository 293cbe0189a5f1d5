//! Exhaustive model of the multi-writer policing protocol described in
//! `node-agent/src/engine/POLICING.md`: per-region write priority granted by one arbiter per
//! volume (the holder of the volume's Lease), grants `(epoch, region, g)` carried by every
//! write and checked by every replica, handover with draining, reclaim with recovery from the
//! arbiter's replica, and the Lease moving to another node at a higher epoch.
//!
//! Every reachable state of a small configuration is visited (breadth first, a set of 128-bit
//! state fingerprints), with any delivery order, up to `losses` lost messages and up to one
//! crashed node. Invariants are checked in every state; convergence and the absence of
//! deadlock are checked over the whole graph. Broken variants of the protocol must be caught.
//!
//! The model needs nothing from the agent's code: it is a check of the design.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::time::Instant;

const MAXN: usize = 3;
const MAXR: usize = 2;
const MAXLOG: usize = 8;

/// Deliberately broken variants, each of which the checker must catch.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Bug {
    None,
    /// A holder answers a revocation at once, with its write still in flight.
    NoDrain,
    /// Replicas check the epoch but not the region's grant number.
    NoGrantCheck,
    /// A writer may drop the arbiter's replica from its in-sync set like any other peer.
    DropArbiter,
}

#[derive(Clone, Debug)]
struct Config {
    name: &'static str,
    nodes: usize,
    regions: usize,
    /// Per node, the writes its client issues in order, each a mask of the regions it covers.
    scripts: Vec<Vec<u8>>,
    losses: u8,
    crashes: u8,
    /// Grants expire in bounded time by every node's clock (the assumption of the design).
    /// Without it, a cut-off holder keeps believing its grant; data safety must still hold.
    bounded_clocks: bool,
    /// Check (c), at most one holder per region and epoch: claimed only with bounded clocks.
    single_holder: bool,
    bug: Bug,
}

/// `(epoch, grant number)`, ordered lexicographically.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
struct Tag {
    e: u8,
    g: u8,
}

/// The write ids a replica applied to one region, in order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
struct Log {
    len: u8,
    ids: [u8; MAXLOG],
}

impl Log {
    fn push(&mut self, id: u8) {
        assert!((self.len as usize) < MAXLOG, "log bound too small");
        self.ids[self.len as usize] = id;
        self.len += 1;
    }
    fn as_slice(&self) -> &[u8] {
        &self.ids[..self.len as usize]
    }
    fn contains(&self, id: u8) -> bool {
        self.as_slice().contains(&id)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
enum Msg {
    Acquire { from: u8, e: u8, r: u8 },
    Granted { to: u8, e: u8, r: u8, g: u8 },
    Revoke { to: u8, e: u8, r: u8, g: u8 },
    Released { from: u8, e: u8, r: u8, g: u8, dirty: bool },
    Write { from: u8, to: u8, e: u8, wid: u8, regs: u8, gs: [u8; MAXR] },
    WriteReply { from: u8, to: u8, wid: u8, ok: bool },
    Recover { from: u8, to: u8, e: u8, r: u8, g: u8, data: Log },
    RecoverReply { from: u8, to: u8, e: u8, r: u8, g: u8, ok: bool },
}

impl Msg {
    /// (sender, receiver)
    fn ends(&self) -> (u8, u8) {
        match *self {
            Msg::Acquire { from, e: _, .. } => (from, NOBODY),
            Msg::Granted { to, .. } | Msg::Revoke { to, .. } => (NOBODY, to),
            Msg::Released { from, .. } => (from, NOBODY),
            Msg::Write { from, to, .. }
            | Msg::WriteReply { from, to, .. }
            | Msg::Recover { from, to, .. }
            | Msg::RecoverReply { from, to, .. } => (from, to),
        }
    }
    fn epoch(&self) -> Option<u8> {
        match *self {
            Msg::Acquire { e, .. }
            | Msg::Granted { e, .. }
            | Msg::Revoke { e, .. }
            | Msg::Released { e, .. }
            | Msg::Write { e, .. }
            | Msg::Recover { e, .. }
            | Msg::RecoverReply { e, .. } => Some(e),
            Msg::WriteReply { .. } => None,
        }
    }
}

/// Placeholder in `Msg::ends` for "the arbiter of the message's epoch".
const NOBODY: u8 = 255;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Op {
    Idle,
    /// Taking the regions of the current write, in ascending order; `asked` is the region
    /// whose Acquire is outstanding.
    Acquiring {
        asked: Option<u8>,
    },
    Writing {
        e: u8,
        wid: u8,
        regs: u8,
        gs: [u8; MAXR],
        pending: u8,
        lost: u8,
        failed: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct NodeSt {
    alive: bool,
    epoch: u8,
    /// The link to the arbiter is broken (both ends know it; nothing more is read from it).
    cut: bool,
    held: [Option<u8>; MAXR],
    seen: [u8; MAXR],
    revoke: [Option<u8>; MAXR],
    tainted: [bool; MAXR],
    next: u8,
    op: Op,
    // The replica on this node.
    fence: [Tag; MAXR],
    log: [Log; MAXR],
    /// Ghost: the newest tag this replica applied per region (invariant b).
    applied: [Tag; MAXR],
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum RState {
    Free,
    Held(u8),
    Revoking(u8),
    /// May differ across replicas: recover it from the arbiter's replica before granting.
    Dirty,
    /// Recovery sent; waiting for these replicas.
    Recovering(u8),
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct RegSt {
    g: u8,
    st: RState,
    qlen: u8,
    queue: [u8; MAXN],
}

impl RegSt {
    fn queued(&self, n: u8) -> bool {
        self.queue[..self.qlen as usize].contains(&n)
    }
    fn push(&mut self, n: u8) {
        if !self.queued(n) {
            self.queue[self.qlen as usize] = n;
            self.qlen += 1;
        }
    }
    fn pop(&mut self) -> u8 {
        let h = self.queue[0];
        self.queue.copy_within(1..MAXN, 0);
        self.qlen -= 1;
        self.queue[self.qlen as usize] = 0;
        h
    }
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct State {
    /// The Lease's epoch; `lease[e]` holds it at epoch `e` (the arbiter).
    epoch: u8,
    lease: [u8; 2],
    table: [RegSt; MAXR],
    nodes: [NodeSt; MAXN],
    /// Per region, replicas recorded as having missed writes (out of sync).
    oos: [u8; MAXR],
    /// Ghost: per region, the writes acknowledged to their client.
    acked: [u16; MAXR],
    net: Vec<Msg>,
    losses: u8,
    crashes: u8,
    /// Ghost: a replica applied an older tag after a newer one (invariant b).
    older_applied: bool,
}

fn bit(n: u8) -> u8 {
    1 << n
}

fn wid_of(n: usize, k: usize) -> u8 {
    (n * 3 + k + 1) as u8
}

struct Model<'a> {
    cfg: &'a Config,
}

impl Model<'_> {
    fn initial(&self) -> State {
        let node = NodeSt {
            alive: true,
            epoch: 0,
            cut: false,
            held: [None; MAXR],
            seen: [0; MAXR],
            revoke: [None; MAXR],
            tainted: [false; MAXR],
            next: 0,
            op: Op::Idle,
            fence: [Tag::default(); MAXR],
            log: [Log::default(); MAXR],
            applied: [Tag::default(); MAXR],
        };
        let reg = RegSt { g: 0, st: RState::Free, qlen: 0, queue: [0; MAXN] };
        State {
            epoch: 0,
            lease: [0, 0],
            table: [reg; MAXR],
            nodes: [node; MAXN],
            oos: [0; MAXR],
            acked: [0; MAXR],
            net: Vec::new(),
            losses: 0,
            crashes: 0,
            older_applied: false,
        }
    }

    fn n(&self) -> u8 {
        self.cfg.nodes as u8
    }

    fn regions(&self, mask: u8) -> impl Iterator<Item = u8> + use<> {
        (0..MAXR as u8).filter(move |r| mask & bit(*r) != 0)
    }

    fn arb(s: &State) -> u8 {
        s.lease[s.epoch as usize]
    }

    fn arb_alive(s: &State) -> bool {
        s.nodes[Self::arb(s) as usize].alive
    }

    /// Resolves `NOBODY` (the arbiter of the message's epoch).
    fn ends(s: &State, m: &Msg) -> (u8, u8) {
        let (a, b) = m.ends();
        let arb = m.epoch().map(|e| s.lease[e as usize]).unwrap_or(NOBODY);
        (if a == NOBODY { arb } else { a }, if b == NOBODY { arb } else { b })
    }

    /// Whether the message travels on a broken node-arbiter link.
    fn on_cut_link(s: &State, m: &Msg) -> bool {
        let arb = Self::arb(s);
        let (a, b) = Self::ends(s, m);
        (a == arb && b != arb && s.nodes[b as usize].cut) || (b == arb && a != arb && s.nodes[a as usize].cut)
    }

    /// Grant traffic between a node and the arbiter travels on one connection per direction
    /// (TCP: in order); data traffic may be reordered freely.
    fn deliverable(s: &State, i: usize) -> bool {
        let control = |m: &Msg| {
            matches!(m, Msg::Acquire { .. } | Msg::Granted { .. } | Msg::Revoke { .. } | Msg::Released { .. })
        };
        let m = &s.net[i];
        if !control(m) {
            return true;
        }
        let ends = Self::ends(s, m);
        !s.net[..i].iter().any(|x| control(x) && Self::ends(s, x) == ends)
    }

    fn send(&self, s: &mut State, m: Msg) {
        let (_, to) = Self::ends(s, &m);
        if !s.nodes[to as usize].alive || Self::on_cut_link(s, &m) {
            self.lost(s, m);
        } else {
            s.net.push(m);
        }
    }

    /// What the loss of `m` (dropped, or sent into a dead or broken link) causes, as the
    /// timeouts of its ends would conclude.
    fn lost(&self, s: &mut State, m: Msg) {
        let arb = Self::arb(s);
        match m {
            Msg::Write { from, to, wid, .. } | Msg::WriteReply { from: to, to: from, wid, .. } => {
                // `from` is the writer, `to` the replica.
                let w = from as usize;
                if let Op::Writing { e, wid: cur, pending, .. } = s.nodes[w].op
                    && cur == wid
                    && pending & bit(to) != 0
                    && s.nodes[w].alive
                {
                    let write_arb = s.lease[e as usize];
                    if let Op::Writing { pending, lost, failed, .. } = &mut s.nodes[w].op {
                        *pending &= !bit(to);
                        if to == write_arb && self.cfg.bug != Bug::DropArbiter {
                            *failed = true;
                        } else {
                            *lost |= bit(to);
                        }
                    }
                    if from != arb && to == arb && s.nodes[arb as usize].alive {
                        self.cut(s, from);
                    }
                    if from == arb && to != arb {
                        self.cut(s, to);
                    }
                    self.maybe_complete(s, from);
                } else if from == arb && to != arb && s.nodes[to as usize].alive {
                    self.cut(s, to);
                } else if to == arb && from != arb && s.nodes[from as usize].alive {
                    self.cut(s, from);
                }
            }
            Msg::Acquire { from: n, e, .. } | Msg::Released { from: n, e, .. } => {
                if e == s.epoch && n != arb && s.nodes[n as usize].alive {
                    self.cut(s, n);
                }
            }
            Msg::Granted { to: n, e, .. } | Msg::Revoke { to: n, e, .. } => {
                if e == s.epoch && n != arb && s.nodes[n as usize].alive {
                    self.cut(s, n);
                }
            }
            Msg::Recover { to: p, e, r, g, .. } | Msg::RecoverReply { from: p, e, r, g, .. } => {
                if e == s.epoch && Self::arb_alive(s) {
                    let reg = &mut s.table[r as usize];
                    if let RState::Recovering(mask) = reg.st
                        && reg.g == g
                        && mask & bit(p) != 0
                    {
                        s.oos[r as usize] |= bit(p);
                        let left = mask & !bit(p);
                        reg.st = if left == 0 { RState::Free } else { RState::Recovering(left) };
                    }
                    if s.nodes[p as usize].alive && p != arb {
                        self.cut(s, p);
                    }
                }
            }
        }
    }

    /// The link between `n` and the arbiter breaks: nothing more travels on it.
    fn cut(&self, s: &mut State, n: u8) {
        if s.nodes[n as usize].cut || n == Self::arb(s) {
            return;
        }
        s.nodes[n as usize].cut = true;
        let mut i = 0;
        while i < s.net.len() {
            if Self::on_cut_link(s, &s.net[i]) {
                let m = s.net.remove(i);
                self.lost(s, m);
                i = 0;
            } else {
                i += 1;
            }
        }
    }

    fn adopt_epoch(&self, s: &mut State, n: u8, e: u8) {
        let nd = &mut s.nodes[n as usize];
        nd.epoch = e;
        nd.held = [None; MAXR];
        nd.seen = [0; MAXR];
        nd.revoke = [None; MAXR];
        nd.tainted = [false; MAXR];
        nd.cut = false;
        if let Op::Acquiring { asked } = &mut nd.op {
            *asked = None;
        }
    }

    /// Whether `r` is taken for `n`'s current write: written by it, or part of the prefix of
    /// its regions (ascending) that `n` already holds.
    fn in_use(&self, s: &State, n: u8, r: u8) -> bool {
        let nd = &s.nodes[n as usize];
        match nd.op {
            Op::Idle => false,
            Op::Writing { e, regs, .. } => e == nd.epoch && regs & bit(r) != 0,
            Op::Acquiring { .. } => {
                let regs = self.cfg.scripts[n as usize][nd.next as usize];
                for x in self.regions(regs) {
                    if nd.held[x as usize].is_none() {
                        return false;
                    }
                    if x == r {
                        return true;
                    }
                }
                false
            }
        }
    }

    /// The replica on `p` receives a write. Returns whether it executed it.
    fn replica_write(&self, s: &mut State, p: u8, e: u8, wid: u8, regs: u8, gs: [u8; MAXR]) -> bool {
        if e < s.nodes[p as usize].epoch {
            return false;
        }
        if e > s.nodes[p as usize].epoch {
            self.adopt_epoch(s, p, e);
        }
        let nd = &mut s.nodes[p as usize];
        if self.cfg.bug != Bug::NoGrantCheck {
            for r in self.regions(regs) {
                if (Tag { e, g: gs[r as usize] }) < nd.fence[r as usize] {
                    return false;
                }
            }
        }
        for r in self.regions(regs) {
            let t = Tag { e, g: gs[r as usize] };
            let r = r as usize;
            if t < nd.applied[r] {
                s.older_applied = true;
            }
            nd.applied[r] = nd.applied[r].max(t);
            nd.fence[r] = nd.fence[r].max(t);
            nd.log[r].push(wid);
        }
        true
    }

    /// The arbiter's side of a region being given back (`dirty`: its replicas may differ).
    fn arb_released(&self, s: &mut State, from: u8, r: u8, g: u8, dirty: bool) {
        if !Self::arb_alive(s) {
            return;
        }
        let reg = &mut s.table[r as usize];
        if matches!(reg.st, RState::Held(h) | RState::Revoking(h) if h == from) && reg.g == g {
            reg.st = if dirty { RState::Dirty } else { RState::Free };
        }
    }

    fn release(&self, s: &mut State, n: u8, r: u8, g: u8, dirty: bool) {
        let e = s.nodes[n as usize].epoch;
        if n == Self::arb(s) && e == s.epoch {
            self.arb_released(s, n, r, g, dirty);
        } else {
            self.send(s, Msg::Released { from: n, e, r, g, dirty });
        }
    }

    fn acquire(&self, s: &mut State, n: u8, r: u8) {
        let e = s.nodes[n as usize].epoch;
        if n == Self::arb(s) && e == s.epoch {
            self.arb_acquire(s, n, r);
        } else {
            self.send(s, Msg::Acquire { from: n, e, r });
        }
    }

    fn arb_acquire(&self, s: &mut State, n: u8, r: u8) {
        // A request from the holder itself (its grant still in flight, or given up by a
        // release still in flight) is queued like any other: it is revoked and granted again.
        s.table[r as usize].push(n);
    }

    fn maybe_complete(&self, s: &mut State, n: u8) {
        let Op::Writing { e, wid, regs, gs, pending, lost, failed, .. } = s.nodes[n as usize].op else {
            return;
        };
        if pending != 0 {
            return;
        }
        let current = e == s.nodes[n as usize].epoch;
        if !failed {
            for r in self.regions(regs) {
                s.oos[r as usize] |= lost;
                s.acked[r as usize] |= 1 << wid;
            }
        }
        s.nodes[n as usize].op = Op::Idle;
        s.nodes[n as usize].next += 1;
        if !current {
            return;
        }
        for r in self.regions(regs) {
            let ri = r as usize;
            let g = gs[ri];
            if failed {
                // The grant is given up (the one held now, which may be newer than the one
                // the write carried); the replicas may differ in r until it is recovered.
                let nd = &mut s.nodes[n as usize];
                let g = nd.held[ri].unwrap_or(g);
                nd.held[ri] = None;
                nd.tainted[ri] = true;
                nd.revoke[ri] = None;
                self.release(s, n, r, g, true);
            } else if let Some(rg) = s.nodes[n as usize].revoke[ri] {
                s.nodes[n as usize].revoke[ri] = None;
                if s.nodes[n as usize].held[ri] == Some(rg) {
                    s.nodes[n as usize].held[ri] = None;
                    self.release(s, n, r, rg, false);
                }
            }
        }
    }

    /// Node `n` makes what progress it can on its client's next write without waiting.
    fn advance(&self, s: &mut State, n: u8) {
        let ni = n as usize;
        if s.nodes[ni].op == Op::Idle && (s.nodes[ni].next as usize) < self.cfg.scripts[ni].len() {
            s.nodes[ni].op = Op::Acquiring { asked: None };
        }
        let Op::Acquiring { asked } = s.nodes[ni].op else { return };
        let regs = self.cfg.scripts[ni][s.nodes[ni].next as usize];
        let missing = self.regions(regs).find(|r| s.nodes[ni].held[*r as usize].is_none());
        match missing {
            Some(r) => {
                if asked != Some(r) && !s.nodes[ni].cut {
                    s.nodes[ni].op = Op::Acquiring { asked: Some(r) };
                    self.acquire(s, n, r);
                }
            }
            None => {
                if s.nodes[ni].cut && self.cfg.bounded_clocks {
                    return;
                }
                self.issue(s, n, regs);
            }
        }
    }

    fn issue(&self, s: &mut State, n: u8, regs: u8) {
        let ni = n as usize;
        let e = s.nodes[ni].epoch;
        let wid = wid_of(ni, s.nodes[ni].next as usize);
        let mut gs = [0u8; MAXR];
        for r in self.regions(regs) {
            gs[r as usize] = s.nodes[ni].held[r as usize].unwrap();
        }
        let mut skip = 0u8;
        for r in self.regions(regs) {
            skip |= s.oos[r as usize];
        }
        // A replica out of sync in one region of the write does not receive it, and is
        // recorded as having missed it in every region of the write.
        let skip = skip & ((1u8 << self.n()) - 1);
        let targets = ((1u8 << self.n()) - 1) & !skip;
        // Without the arbiter's replica (of the write's epoch) a write is never acknowledged.
        let failed = targets == 0 || (skip & bit(s.lease[e as usize]) != 0 && self.cfg.bug != Bug::DropArbiter);
        s.nodes[ni].op = Op::Writing { e, wid, regs, gs, pending: targets, lost: skip, failed };
        if targets & bit(n) != 0 {
            let ok = self.replica_write(s, n, e, wid, regs, gs);
            if let Op::Writing { pending, failed, .. } = &mut s.nodes[ni].op {
                *pending &= !bit(n);
                *failed |= !ok;
            }
        }
        for p in 0..self.n() {
            if p != n && targets & bit(p) != 0 {
                self.send(s, Msg::Write { from: n, to: p, e, wid, regs, gs });
            }
        }
        self.maybe_complete(s, n);
    }

    fn deliver(&self, s: &mut State, m: Msg) {
        match m {
            Msg::Acquire { from, e, r } => {
                if e == s.epoch && Self::arb_alive(s) {
                    self.arb_acquire(s, from, r);
                }
            }
            Msg::Granted { to, e, r, g } => {
                let nd = &mut s.nodes[to as usize];
                if nd.epoch == e && g > nd.seen[r as usize] {
                    nd.seen[r as usize] = g;
                    nd.held[r as usize] = Some(g);
                    nd.tainted[r as usize] = false;
                }
            }
            Msg::Revoke { to, e, r, g } => self.revoked(s, to, e, r, g),
            Msg::Released { from, e, r, g, dirty } => {
                if e == s.epoch {
                    self.arb_released(s, from, r, g, dirty);
                }
            }
            Msg::Write { from, to, e, wid, regs, gs } => {
                let ok = self.replica_write(s, to, e, wid, regs, gs);
                self.send(s, Msg::WriteReply { from: to, to: from, wid, ok });
            }
            Msg::WriteReply { from, to, wid, ok } => {
                if let Op::Writing { wid: cur, pending, failed, .. } = &mut s.nodes[to as usize].op
                    && *cur == wid
                    && *pending & bit(from) != 0
                {
                    *pending &= !bit(from);
                    *failed |= !ok;
                    self.maybe_complete(s, to);
                }
            }
            Msg::Recover { from, to, e, r, g, data } => {
                let ri = r as usize;
                let ok = e >= s.nodes[to as usize].epoch && Tag { e, g } >= s.nodes[to as usize].fence[ri];
                if ok {
                    if e > s.nodes[to as usize].epoch {
                        self.adopt_epoch(s, to, e);
                    }
                    let nd = &mut s.nodes[to as usize];
                    nd.fence[ri] = Tag { e, g };
                    nd.applied[ri] = nd.applied[ri].max(Tag { e, g });
                    nd.log[ri] = data;
                }
                self.send(s, Msg::RecoverReply { from: to, to: from, e, r, g, ok });
            }
            Msg::RecoverReply { from, e, r, g, ok, .. } => {
                if e == s.epoch && Self::arb_alive(s) {
                    let reg = &mut s.table[r as usize];
                    if let RState::Recovering(mask) = reg.st
                        && reg.g == g
                        && mask & bit(from) != 0
                    {
                        if !ok {
                            s.oos[r as usize] |= bit(from);
                        }
                        let left = mask & !bit(from);
                        reg.st = if left == 0 { RState::Free } else { RState::Recovering(left) };
                    }
                }
            }
        }
    }

    fn revoked(&self, s: &mut State, n: u8, e: u8, r: u8, g: u8) {
        let ri = r as usize;
        if s.nodes[n as usize].epoch != e || !s.nodes[n as usize].alive {
            return;
        }
        let in_use = self.in_use(s, n, r);
        let nd = &mut s.nodes[n as usize];
        nd.seen[ri] = nd.seen[ri].max(g);
        match nd.held[ri] {
            Some(h) if h == g => {
                if in_use && self.cfg.bug != Bug::NoDrain {
                    nd.revoke[ri] = Some(g);
                    if n == Self::arb(s) {
                        s.table[ri].st = RState::Revoking(n);
                    }
                } else {
                    nd.held[ri] = None;
                    self.release(s, n, r, g, false);
                }
            }
            Some(_) => {}
            None => {
                // Revoked before its grant arrived (the grant will be ignored): ask again.
                if nd.op == (Op::Acquiring { asked: Some(r) }) {
                    nd.op = Op::Acquiring { asked: None };
                }
                let dirty = nd.tainted[ri];
                self.release(s, n, r, g, dirty);
            }
        }
    }

    /// Every state reachable in one step, with whether the step is a fault (loss, crash).
    fn successors(&self, s: &State, out: &mut Vec<(State, bool)>) {
        out.clear();
        let cfg = self.cfg;
        // Deliver or lose any message in flight.
        for i in 0..s.net.len() {
            if s.net[..i].contains(&s.net[i]) || !Self::deliverable(s, i) {
                continue;
            }
            let mut t = s.clone();
            let m = t.net.remove(i);
            self.deliver(&mut t, m);
            assert!(t.table.iter().all(|r| r.g < 40), "grant numbers grow without bound");
            out.push((t, false));
            if s.losses < cfg.losses {
                let mut t = s.clone();
                let m = t.net.remove(i);
                t.losses += 1;
                self.lost(&mut t, m);
                out.push((t, true));
            }
        }
        let arb = Self::arb(s);
        for n in 0..self.n() {
            let ni = n as usize;
            let nd = &s.nodes[ni];
            if !nd.alive {
                if n != arb {
                    let mut t = s.clone();
                    self.restart(&mut t, n);
                    out.push((t, false));
                }
                continue;
            }
            // The client's next write.
            let mut t = s.clone();
            self.advance(&mut t, n);
            if t != *s {
                out.push((t, false));
            }
            if s.crashes < cfg.crashes {
                let mut t = s.clone();
                self.crash(&mut t, n);
                out.push((t, true));
            }
            if nd.epoch < s.epoch {
                let mut t = s.clone();
                self.adopt_epoch(&mut t, n, s.epoch);
                out.push((t, false));
            }
            if nd.cut && nd.epoch == s.epoch {
                if cfg.bounded_clocks {
                    for r in 0..cfg.regions {
                        if nd.held[r].is_some() {
                            let mut t = s.clone();
                            t.nodes[ni].held[r] = None;
                            t.nodes[ni].revoke[r] = None;
                            out.push((t, false));
                        }
                    }
                }
                let believes = nd.held.iter().any(Option::is_some);
                if Self::arb_alive(s) && !(cfg.bounded_clocks && believes) {
                    let mut t = s.clone();
                    self.reconnect(&mut t, n);
                    out.push((t, false));
                }
            }
        }
        if Self::arb_alive(s) {
            for r in 0..cfg.regions as u8 {
                if let Some(t) = self.arbiter_step(s, r)
                    && t != *s
                {
                    out.push((t, false));
                }
                if let Some(t) = self.reclaim(s, r) {
                    out.push((t, false));
                }
            }
        } else if s.epoch == 0 {
            // The Lease moves (operator failover) once every write of the old epoch has
            // ended, to a live node whose replica is in sync for every region.
            let writing =
                s.nodes.iter().take(cfg.nodes).any(|nd| nd.alive && matches!(nd.op, Op::Writing { e: 0, .. }));
            if !writing {
                for n in 0..self.n() {
                    let in_sync = s.oos.iter().all(|m| m & bit(n) == 0);
                    if s.nodes[n as usize].alive && in_sync {
                        let mut t = s.clone();
                        t.epoch = 1;
                        t.lease[1] = n;
                        for reg in t.table.iter_mut() {
                            *reg = RegSt { g: 0, st: RState::Dirty, qlen: 0, queue: [0; MAXN] };
                        }
                        self.adopt_epoch(&mut t, n, 1);
                        out.push((t, false));
                    }
                }
            }
        }
    }

    fn crash(&self, s: &mut State, x: u8) {
        s.crashes += 1;
        let xi = x as usize;
        let was_arb = x == Self::arb(s);
        {
            let nd = &mut s.nodes[xi];
            nd.alive = false;
            if nd.op != Op::Idle {
                nd.op = Op::Idle;
                nd.next += 1;
            }
            nd.held = [None; MAXR];
            nd.revoke = [None; MAXR];
            nd.cut = false;
        }
        // Messages to it are lost (their senders time out); its own may still arrive.
        let mut i = 0;
        while i < s.net.len() {
            let (_, to) = Self::ends(s, &s.net[i]);
            if to == x {
                let m = s.net.remove(i);
                self.lost(s, m);
                i = 0;
            } else {
                i += 1;
            }
        }
        // Writes waiting for it time out.
        for n in 0..self.n() {
            if let Op::Writing { pending, .. } = s.nodes[n as usize].op
                && pending & bit(x) != 0
            {
                self.lost(s, Msg::WriteReply { from: x, to: n, wid: self.wid_in_flight(s, n), ok: false });
            }
        }
        if was_arb {
            for n in 0..self.n() {
                if n != x && s.nodes[n as usize].alive {
                    s.nodes[n as usize].cut = true;
                }
            }
        } else if Self::arb_alive(s) {
            for r in 0..self.cfg.regions {
                if let RState::Recovering(mask) = s.table[r].st
                    && mask & bit(x) != 0
                {
                    let g = s.table[r].g;
                    self.lost(s, Msg::RecoverReply { from: x, to: Self::arb(s), e: s.epoch, r: r as u8, g, ok: false });
                }
            }
        }
    }

    fn wid_in_flight(&self, s: &State, n: u8) -> u8 {
        match s.nodes[n as usize].op {
            Op::Writing { wid, .. } => wid,
            _ => 0,
        }
    }

    /// A crashed node comes back: volatile state is gone, its replica is out of sync until
    /// it resynchronises (not modelled), it knows the current Lease.
    fn restart(&self, s: &mut State, n: u8) {
        let ni = n as usize;
        s.nodes[ni].alive = true;
        self.adopt_epoch(s, n, s.epoch);
        for r in 0..self.cfg.regions {
            s.oos[r] |= bit(n);
        }
        if Self::arb_alive(s) {
            for reg in s.table.iter_mut() {
                if matches!(reg.st, RState::Held(h) | RState::Revoking(h) if h == n) {
                    reg.st = RState::Dirty;
                }
            }
        }
    }

    /// A cut-off node connects to the arbiter again; the arbiter learns which grants it
    /// still holds and recovers the regions it gave up.
    fn reconnect(&self, s: &mut State, n: u8) {
        let ni = n as usize;
        s.nodes[ni].cut = false;
        if let Op::Acquiring { asked } = &mut s.nodes[ni].op {
            *asked = None;
        }
        for r in 0..self.cfg.regions {
            let reg = &mut s.table[r];
            if matches!(reg.st, RState::Held(h) | RState::Revoking(h) if h == n) {
                reg.st = if s.nodes[ni].held[r] == Some(reg.g) { RState::Held(n) } else { RState::Dirty };
            }
        }
    }

    /// The arbiter serves a request, revokes a grant, or starts a recovery.
    fn arbiter_step(&self, s: &State, r: u8) -> Option<State> {
        let arb = Self::arb(s);
        let ri = r as usize;
        let reg = s.table[ri];
        let mut t = s.clone();
        match reg.st {
            RState::Free if reg.qlen > 0 => {
                let h = t.table[ri].pop();
                t.table[ri].g += 1;
                let g = t.table[ri].g;
                t.table[ri].st = RState::Held(h);
                if h == arb {
                    let nd = &mut t.nodes[h as usize];
                    nd.held[ri] = Some(g);
                    nd.seen[ri] = g;
                    nd.tainted[ri] = false;
                } else {
                    self.send(&mut t, Msg::Granted { to: h, e: s.epoch, r, g });
                }
            }
            RState::Held(h) if reg.qlen > 0 => {
                if h == arb {
                    self.revoked(&mut t, h, s.epoch, r, reg.g);
                } else {
                    t.table[ri].st = RState::Revoking(h);
                    self.send(&mut t, Msg::Revoke { to: h, e: s.epoch, r, g: reg.g });
                }
            }
            RState::Dirty => {
                t.table[ri].g += 1;
                let g = t.table[ri].g;
                let e = s.epoch;
                let data = {
                    let a = &mut t.nodes[arb as usize];
                    a.fence[ri] = a.fence[ri].max(Tag { e, g });
                    a.applied[ri] = a.applied[ri].max(Tag { e, g });
                    a.log[ri]
                };
                let mut wait = 0u8;
                for p in 0..self.n() {
                    if p == arb || t.oos[ri] & bit(p) != 0 {
                        continue;
                    }
                    if !t.nodes[p as usize].alive || t.nodes[p as usize].cut {
                        t.oos[ri] |= bit(p);
                    } else {
                        wait |= bit(p);
                    }
                }
                t.table[ri].st = if wait == 0 { RState::Free } else { RState::Recovering(wait) };
                for p in 0..self.n() {
                    if wait & bit(p) != 0 {
                        self.send(&mut t, Msg::Recover { from: arb, to: p, e, r, g, data });
                    }
                }
            }
            _ => return None,
        }
        Some(t)
    }

    /// The arbiter takes back a region whose holder is dead, or cut off with its grant
    /// expired (by every clock, given bounded drift; or at once without that assumption).
    fn reclaim(&self, s: &State, r: u8) -> Option<State> {
        let ri = r as usize;
        let (RState::Held(h) | RState::Revoking(h)) = s.table[ri].st else { return None };
        if h == Self::arb(s) {
            return None;
        }
        let nd = &s.nodes[h as usize];
        let expired = !nd.alive || (nd.cut && (!self.cfg.bounded_clocks || nd.held[ri].is_none()));
        if !expired {
            return None;
        }
        let mut t = s.clone();
        t.table[ri].st = RState::Dirty;
        Some(t)
    }

    /// Every request served, nothing in flight, every region settled (or the volume is
    /// unavailable: its arbiter is dead and no live replica in sync can take the Lease).
    fn settled(&self, s: &State) -> bool {
        let cfg = self.cfg;
        if !Self::arb_alive(s) {
            return (0..self.n()).all(|n| !s.nodes[n as usize].alive || s.oos.iter().any(|m| m & bit(n) != 0))
                && s.net.is_empty();
        }
        if !s.net.is_empty() {
            return false;
        }
        for (ni, nd) in s.nodes.iter().enumerate().take(cfg.nodes) {
            if nd.alive
                && (nd.op != Op::Idle || (nd.next as usize) < cfg.scripts[ni].len() || nd.cut || nd.epoch != s.epoch)
            {
                return false;
            }
        }
        for r in 0..cfg.regions {
            let reg = &s.table[r];
            match reg.st {
                RState::Free => {}
                RState::Held(h) => {
                    if s.nodes[h as usize].held[r] != Some(reg.g) {
                        return false;
                    }
                }
                _ => return false,
            }
            if reg.qlen > 0 {
                return false;
            }
        }
        true
    }
}

// ---- invariants --------------------------------------------------------------------------

#[derive(Default, Debug)]
struct Checks {
    a: u64,
    b: u64,
    c: u64,
    d: u64,
    e: u64,
}

fn prefix_related(x: &[u8], y: &[u8]) -> bool {
    let k = x.len().min(y.len());
    x[..k] == y[..k]
}

/// The invariants of every state; `Err` names the first one broken.
fn check(m: &Model, s: &State, checks: &mut Checks) -> Result<(), String> {
    let cfg = m.cfg;
    let in_sync = |p: usize, r: usize| s.nodes[p].alive && s.oos[r] & bit(p as u8) == 0;
    for r in 0..cfg.regions {
        // (a) replicas in sync for r applied the same sequence (or one is a prefix).
        checks.a += 1;
        for p in 0..cfg.nodes {
            for q in p + 1..cfg.nodes {
                if in_sync(p, r)
                    && in_sync(q, r)
                    && !prefix_related(s.nodes[p].log[r].as_slice(), s.nodes[q].log[r].as_slice())
                {
                    return Err(format!(
                        "(a) region {r}: replica {p} applied {:?}, replica {q} applied {:?}",
                        s.nodes[p].log[r].as_slice(),
                        s.nodes[q].log[r].as_slice()
                    ));
                }
            }
        }
        // (c) at most one node believes it holds r at a given epoch.
        if cfg.single_holder {
            checks.c += 1;
            for e in 0..=s.epoch {
                let holders = (0..cfg.nodes)
                    .filter(|&p| s.nodes[p].alive && s.nodes[p].epoch == e && s.nodes[p].held[r].is_some())
                    .count();
                if holders > 1 {
                    return Err(format!("(c) region {r}: {holders} nodes hold a grant at epoch {e}"));
                }
            }
        }
        // (d) every acknowledged write is on every replica in sync.
        checks.d += 1;
        for w in 0..16u8 {
            if s.acked[r] & (1 << w) != 0 {
                for p in 0..cfg.nodes {
                    if in_sync(p, r) && !s.nodes[p].log[r].contains(w) {
                        return Err(format!("(d) region {r}: acknowledged write {w} missing on replica {p}"));
                    }
                }
            }
        }
    }
    // (b) no replica applied an older (epoch, grant) after a newer one.
    checks.b += 1;
    if s.older_applied {
        return Err("(b) a replica applied a write with an older (epoch, grant) after a newer one".into());
    }
    Ok(())
}

/// (e) in a settled state, the replicas in sync hold identical regions.
fn check_settled(m: &Model, s: &State, checks: &mut Checks) -> Result<(), String> {
    checks.e += 1;
    for r in 0..m.cfg.regions {
        let logs: Vec<&[u8]> = (0..m.cfg.nodes)
            .filter(|&p| s.nodes[p].alive && s.oos[r] & bit(p as u8) == 0)
            .map(|p| s.nodes[p].log[r].as_slice())
            .collect();
        if logs.windows(2).any(|w| w[0] != w[1]) {
            return Err(format!("(e) region {r}: settled replicas differ: {logs:?}"));
        }
    }
    Ok(())
}

fn fingerprint(s: &State) -> u128 {
    let mut h1 = DefaultHasher::new();
    s.hash(&mut h1);
    let mut h2 = DefaultHasher::new();
    0x5eed_u32.hash(&mut h2);
    s.hash(&mut h2);
    (u128::from(h1.finish()) << 64) | u128::from(h2.finish())
}

#[derive(Debug)]
struct Outcome {
    states: usize,
    settled: usize,
    checks: Checks,
    violation: Option<String>,
    /// States from which no settled state is reachable without further faults.
    stuck: usize,
}

fn explore(cfg: &Config, stop_at_violation: bool) -> Outcome {
    let m = Model { cfg };
    let mut index: HashMap<u128, u32> = HashMap::new();
    let mut queue: std::collections::VecDeque<(State, u32)> = Default::default();
    let mut edges: Vec<(u32, u32)> = Vec::new();
    let mut settled: Vec<u32> = Vec::new();
    let mut checks = Checks::default();
    let mut violation = None;
    let init = m.initial();
    // With POLICING_TRACE set, every state is kept so that a violation prints its path.
    let keep = std::env::var_os("POLICING_TRACE").is_some();
    let mut parent: Vec<u32> = vec![0];
    let mut kept: Vec<State> = if keep { vec![init.clone()] } else { Vec::new() };
    index.insert(fingerprint(&init), 0);
    queue.push_back((init, 0));
    let mut succ = Vec::new();
    while let Some((s, id)) = queue.pop_front() {
        let mut res = check(&m, &s, &mut checks);
        if res.is_ok() && m.settled(&s) {
            settled.push(id);
            res = check_settled(&m, &s, &mut checks);
        }
        if let Err(v) = res {
            if violation.is_none() {
                let mut path = String::new();
                if keep {
                    let mut ids = vec![id];
                    while *ids.last().unwrap() != 0 {
                        ids.push(parent[*ids.last().unwrap() as usize]);
                    }
                    for i in ids.iter().rev() {
                        path += &format!("\n  -> {:?}", kept[*i as usize]);
                    }
                }
                violation = Some(format!("{v}\n  in state {s:?}{path}"));
            }
            if stop_at_violation {
                break;
            }
        }
        m.successors(&s, &mut succ);
        assert!(index.len() < 20_000_000, "state space too large");
        for (t, fault) in succ.drain(..) {
            let next = index.len() as u32;
            let tid = *index.entry(fingerprint(&t)).or_insert(next);
            if tid == next {
                parent.push(id);
                if keep {
                    kept.push(t.clone());
                }
                queue.push_back((t, tid));
            }
            if !fault {
                edges.push((id, tid));
            }
        }
    }
    let states = index.len();
    // Liveness-lite: backwards from settled states over fault-free steps.
    let mut stuck = 0;
    if violation.is_none() {
        let mut start = vec![0u32; states + 1];
        for &(_, b) in &edges {
            start[b as usize + 1] += 1;
        }
        for i in 0..states {
            start[i + 1] += start[i];
        }
        let mut fill = start.clone();
        let mut rev = vec![0u32; edges.len()];
        for &(a, b) in &edges {
            rev[fill[b as usize] as usize] = a;
            fill[b as usize] += 1;
        }
        let mut good = vec![false; states];
        let mut stack: Vec<u32> = settled.clone();
        for &g in &settled {
            good[g as usize] = true;
        }
        while let Some(x) = stack.pop() {
            for &p in &rev[start[x as usize] as usize..start[x as usize + 1] as usize] {
                if !good[p as usize] {
                    good[p as usize] = true;
                    stack.push(p);
                }
            }
        }
        stuck = good.iter().filter(|g| !**g).count();
        if let Some(first) = good.iter().position(|g| !*g)
            && keep
        {
            let mut ids = vec![first as u32];
            while *ids.last().unwrap() != 0 {
                ids.push(parent[*ids.last().unwrap() as usize]);
            }
            for i in ids.iter().rev() {
                eprintln!("  -> {:?}", kept[*i as usize]);
            }
        }
    }
    Outcome { states, settled: settled.len(), checks, violation, stuck }
}

// ---- configurations and tests ------------------------------------------------------------

fn config(name: &'static str, scripts: &[&[u8]], regions: usize, losses: u8) -> Config {
    faults(name, scripts, regions, losses, 1)
}

fn faults(name: &'static str, scripts: &[&[u8]], regions: usize, losses: u8, crashes: u8) -> Config {
    Config {
        name,
        nodes: scripts.len(),
        regions,
        scripts: scripts.iter().map(|s| s.to_vec()).collect(),
        losses,
        crashes,
        bounded_clocks: true,
        single_holder: true,
        bug: Bug::None,
    }
}

/// Explores `cfg` completely and asserts every invariant held, every check ran, and a settled
/// state stays reachable from every state.
fn holds(cfg: Config) {
    let t0 = Instant::now();
    let out = explore(&cfg, true);
    println!(
        "{}: {} states, {} settled, {:.1} s, checks {:?}",
        cfg.name,
        out.states,
        out.settled,
        t0.elapsed().as_secs_f64(),
        out.checks
    );
    if let Some(v) = &out.violation {
        panic!("{}: invariant broken: {v}", cfg.name);
    }
    assert!(out.states > 1 && out.settled > 0, "{}: nothing explored", cfg.name);
    let c = &out.checks;
    assert!(c.a > 0 && c.b > 0 && c.d > 0 && c.e > 0, "{}: an invariant was never checked", cfg.name);
    assert!(c.c > 0 || !cfg.single_holder, "{}: (c) was never checked", cfg.name);
    assert_eq!(out.stuck, 0, "{}: states from which no settled state is reachable", cfg.name);
}

/// The broken variant must be caught; returns the violation found.
fn caught(mut cfg: Config, bug: Bug) -> String {
    cfg.bug = bug;
    let t0 = Instant::now();
    let out = explore(&cfg, true);
    let v = out.violation.unwrap_or_else(|| {
        panic!("{} with {bug:?}: not caught in {} states (stuck: {})", cfg.name, out.states, out.stuck)
    });
    println!(
        "{} with {bug:?}: caught after {} states, {:.1} s: {}",
        cfg.name,
        out.states,
        t0.elapsed().as_secs_f64(),
        v.lines().next().unwrap_or("")
    );
    v
}

#[test]
fn two_nodes_one_region() {
    holds(config("2 nodes, 1 region", &[&[1, 1], &[1, 1]], 1, 2));
}

#[test]
fn two_nodes_two_regions() {
    holds(config("2 nodes, 2 regions", &[&[3, 1], &[2, 3]], 2, 1));
}

/// Three nodes: one loss, or one crash (with the Lease move), not both in one run (the state
/// space of both together takes minutes in a debug build; two nodes check them together).
#[test]
fn three_nodes_one_region_loss() {
    holds(faults("3 nodes, 1 region, 1 loss", &[&[1], &[1], &[1]], 1, 1, 0));
}

#[test]
fn three_nodes_one_region_crash() {
    holds(faults("3 nodes, 1 region, 1 crash", &[&[1], &[1], &[1]], 1, 0, 1));
}

#[test]
fn three_nodes_two_regions() {
    holds(faults("3 nodes, 2 regions, 1 loss", &[&[3], &[2], &[1]], 2, 1, 0));
    holds(faults("3 nodes, 2 regions, 1 crash", &[&[3], &[2], &[1]], 2, 0, 1));
}

/// Without bounded clocks a cut-off holder keeps believing its grant while the arbiter gives
/// the region to another node: (c) is not claimed, and the data must still be safe.
#[test]
fn unbounded_clocks_keep_data_safe() {
    let mut cfg = config("2 nodes, 1 region, unbounded clocks", &[&[1, 1], &[1, 1]], 1, 2);
    cfg.bounded_clocks = false;
    cfg.single_holder = false;
    holds(cfg);
    for (name, losses, crashes) in
        [("3 nodes, 1 region, unbounded clocks, 1 loss", 1, 0), ("3 nodes, 1 region, unbounded clocks, 1 crash", 0, 1)]
    {
        let mut cfg3 = faults(name, &[&[1], &[1], &[1]], 1, losses, crashes);
        cfg3.bounded_clocks = false;
        cfg3.single_holder = false;
        holds(cfg3);
    }
}

#[test]
fn broken_variants_are_caught() {
    let two = config("2 nodes, 1 region", &[&[1, 1], &[1, 1]], 1, 1);
    let three = config("3 nodes, 1 region", &[&[1, 1], &[1], &[1]], 1, 1);
    let v = caught(two.clone(), Bug::NoDrain);
    assert!(v.starts_with("(a)"), "handover without draining: {v}");
    let v = caught(two, Bug::NoGrantCheck);
    assert!(v.starts_with("(a)") || v.starts_with("(b)"), "replicas not checking grants: {v}");
    let v = caught(three, Bug::DropArbiter);
    assert!(v.starts_with("(d)"), "writer dropping the arbiter's replica: {v}");
    // (c) rests on bounded clocks: without them two nodes may believe they hold a region.
    let mut unbounded = config("2 nodes, 1 region, unbounded clocks", &[&[1, 1], &[1, 1]], 1, 1);
    unbounded.bounded_clocks = false;
    let v = caught(unbounded, Bug::None);
    assert!(v.starts_with("(c)"), "single holder without bounded clocks: {v}");
}
