//! Replica states as one node sees them, and the rules that decide them.
//!
//! Every transition of a replica's state goes through [`decide`] (what a freshly learnt
//! peer state means for the link to that peer and for the local replica) or through the
//! engine's explicit events (I/O error, disconnect, resync finished), listed in
//! `engine::Volume`.

use std::fmt;

use crate::peer::proto::ReplicaStateMsg;

/// State of one replica of a volume, as seen by one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    /// Holds every acknowledged write; reads may be served from it.
    InSync,
    /// Receives every new write and is being resynchronised; never read.
    CatchingUp,
    /// Known to have missed writes and not (yet) resynchronising.
    Outdated,
    /// Its disk failed or is missing: the node serves the volume from its peers; the replica
    /// is neither read nor written.
    Diskless,
    /// No connection (peers only).
    Disconnected,
    /// Both sides accepted writes the other missed; never merged automatically.
    SplitBrain,
}

impl ReplicaState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::InSync => "in-sync",
            ReplicaState::CatchingUp => "catching-up",
            ReplicaState::Outdated => "outdated",
            ReplicaState::Diskless => "diskless",
            ReplicaState::Disconnected => "disconnected",
            ReplicaState::SplitBrain => "split-brain",
        }
    }

    /// Whether new writes are sent to a replica in this state.
    pub fn receives_writes(self) -> bool {
        matches!(self, ReplicaState::InSync | ReplicaState::CatchingUp | ReplicaState::Outdated)
    }
}

impl fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an exchange of states between this node (`me`) and a peer means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// State of the link to the peer (as a target of writes and a source of reads).
    pub peer: ReplicaState,
    /// The local replica is out of date and must be resynchronised from an in-sync peer.
    pub local_outdated: bool,
    /// This node's record that the peer missed writes is stale (the peer is newer).
    pub stale_record: bool,
}

/// The rules, applied identically on both ends of a connection:
/// - each side records which replicas missed its acknowledged writes (`outdated_peers`,
///   "strong"); a replica named there, one that is not `consistent`, and an empty
///   never-written replica facing a written one, are out of date and pull from the other;
/// - two replicas that each name the other are in split brain, unless both did so under
///   the same epoch (one writer), where the one with the higher generation is current;
/// - out-of-sync bits that are not known to be missed writes (`dirty_peers`, "weak": the
///   activity log after a crash, a write refused by fencing) mean the two may differ in those
///   regions only where neither acknowledged a write; the holder of write priority (`holder`,
///   the same on both sides once epochs are exchanged) is the source, otherwise the replica
///   whose name sorts first;
/// - in a multi-writer volume (`multi_writer`), two writers that are not the holder may each
///   name the other under one epoch (each missed some of the other's writes): neither is
///   current, but the holder's replica received every write of the epoch, so both drop their
///   records and pull what they marked from the holder.
pub fn decide(
    me_name: &str,
    mine: &ReplicaStateMsg,
    peer_name: &str,
    theirs: &ReplicaStateMsg,
    holder: &str,
    multi_writer: bool,
) -> Decision {
    let i_flag_them = mine.outdated_peers.iter().any(|p| p == peer_name);
    let they_flag_me = theirs.outdated_peers.iter().any(|p| p == me_name);
    if i_flag_them && they_flag_me && mine.consistent && theirs.consistent {
        if multi_writer
            && mine.flag_epoch == theirs.flag_epoch
            && holder != me_name
            && holder != peer_name
            && mine.local_ok
            && theirs.local_ok
        {
            return Decision { peer: ReplicaState::Outdated, local_outdated: true, stale_record: true };
        }
        // Recorded under one epoch, the writes each missed came from one writer: the replica
        // that recorded later (higher generation) has them all; the other's record is stale.
        let one_writer = mine.flag_epoch == theirs.flag_epoch && mine.generation != theirs.generation;
        if !one_writer || !mine.local_ok || !theirs.local_ok {
            return Decision { peer: ReplicaState::SplitBrain, local_outdated: false, stale_record: false };
        }
        return if mine.generation > theirs.generation {
            Decision { peer: ReplicaState::Outdated, local_outdated: false, stale_record: false }
        } else {
            Decision { peer: ReplicaState::InSync, local_outdated: true, stale_record: true }
        };
    }
    let weak = mine.dirty_peers.iter().any(|p| p == peer_name) || theirs.dirty_peers.iter().any(|p| p == me_name);
    let they_win = if holder == peer_name {
        true
    } else if holder == me_name {
        false
    } else {
        peer_name < me_name
    };
    let both_ok = mine.local_ok && theirs.local_ok;
    let local_outdated = both_ok
        && theirs.consistent
        && !i_flag_them
        && (!mine.consistent || they_flag_me || (mine.generation == 0 && theirs.generation > 0) || (weak && they_win));
    let peer = if !theirs.local_ok {
        ReplicaState::Diskless
    } else if !theirs.consistent {
        ReplicaState::CatchingUp
    } else if i_flag_them
        || (theirs.generation == 0 && mine.generation > 0 && mine.consistent && mine.local_ok)
        || (weak && mine.consistent && mine.local_ok && !they_win && !they_flag_me)
    {
        ReplicaState::Outdated
    } else {
        ReplicaState::InSync
    };
    Decision { peer, local_outdated, stale_record: false }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide_sw(me: &str, mine: &ReplicaStateMsg, peer: &str, theirs: &ReplicaStateMsg, holder: &str) -> Decision {
        decide(me, mine, peer, theirs, holder, false)
    }

    #[test]
    fn multi_writer_peers_that_missed_each_others_writes_both_pull_from_the_holder() {
        let d = decide("b", &st(true, 5, &["c"]), "c", &st(true, 4, &["b"]), "a", true);
        assert_eq!(d, Decision { peer: ReplicaState::Outdated, local_outdated: true, stale_record: true });
        let d = decide("c", &st(true, 4, &["b"]), "b", &st(true, 5, &["c"]), "a", true);
        assert_eq!(d, Decision { peer: ReplicaState::Outdated, local_outdated: true, stale_record: true });
        // Single-writer volumes: the later record wins.
        let d = decide("c", &st(true, 4, &["b"]), "b", &st(true, 5, &["c"]), "a", false);
        assert_eq!(d, Decision { peer: ReplicaState::InSync, local_outdated: true, stale_record: true });
        // The holder is one of them, or the records are of different epochs: as before.
        let d = decide("a", &st(true, 4, &["b"]), "b", &st(true, 5, &["a"]), "a", true);
        assert_eq!(d, Decision { peer: ReplicaState::InSync, local_outdated: true, stale_record: true });
        let mut older = st(true, 5, &["c"]);
        older.flag_epoch = 0;
        assert_eq!(decide("c", &st(true, 4, &["b"]), "b", &older, "a", true).peer, ReplicaState::SplitBrain);
    }

    fn st(consistent: bool, generation: u64, outdated: &[&str]) -> ReplicaStateMsg {
        ReplicaStateMsg {
            consistent,
            generation,
            size: 4096,
            outdated_peers: outdated.iter().map(|s| s.to_string()).collect(),
            local_ok: true,
            epoch: 1,
            holder: "a".into(),
            dirty_peers: vec![],
            flag_epoch: 1,
        }
    }

    fn dirty(mut s: ReplicaStateMsg, peers: &[&str]) -> ReplicaStateMsg {
        s.dirty_peers = peers.iter().map(|s| s.to_string()).collect();
        s
    }

    #[test]
    fn rules() {
        // Both clean: in sync.
        let d = decide_sw("a", &st(true, 1, &[]), "b", &st(true, 1, &[]), "a");
        assert_eq!(d, Decision { peer: ReplicaState::InSync, local_outdated: false, stale_record: false });
        // b missed writes of a.
        let d = decide_sw("a", &st(true, 2, &["b"]), "b", &st(true, 1, &[]), "a");
        assert_eq!(d, Decision { peer: ReplicaState::Outdated, local_outdated: false, stale_record: false });
        let d = decide_sw("b", &st(true, 1, &[]), "a", &st(true, 2, &["b"]), "a");
        assert_eq!(d, Decision { peer: ReplicaState::InSync, local_outdated: true, stale_record: false });
        // Split brain: each recorded the other under different epochs (two writers) ...
        let mut other_epoch = st(true, 3, &["a"]);
        other_epoch.flag_epoch = 2;
        let d = decide_sw("a", &st(true, 2, &["b"]), "b", &other_epoch, "b");
        assert_eq!(d.peer, ReplicaState::SplitBrain);
        // ... or under one epoch with nothing to order them.
        let d = decide_sw("a", &st(true, 2, &["b"]), "b", &st(true, 2, &["a"]), "a");
        assert_eq!(d.peer, ReplicaState::SplitBrain);
        // One writer, A down then B down: the later record (higher generation) wins.
        let d = decide_sw("b", &st(true, 4, &["c"]), "c", &st(true, 2, &["b"]), "a");
        assert_eq!(d, Decision { peer: ReplicaState::Outdated, local_outdated: false, stale_record: false });
        let d = decide_sw("c", &st(true, 2, &["b"]), "b", &st(true, 4, &["c"]), "a");
        assert_eq!(d, Decision { peer: ReplicaState::InSync, local_outdated: true, stale_record: true });
        // New empty replica faces a written one.
        let d = decide_sw("c", &st(true, 0, &[]), "a", &st(true, 3, &[]), "a");
        assert!(d.local_outdated);
        let d = decide_sw("a", &st(true, 3, &[]), "c", &st(true, 0, &[]), "a");
        assert_eq!(d.peer, ReplicaState::Outdated);
        // Inconsistent peer is catching up; an inconsistent peer is never a source.
        let d = decide_sw("a", &st(false, 3, &[]), "b", &st(false, 3, &[]), "a");
        assert_eq!(d, Decision { peer: ReplicaState::CatchingUp, local_outdated: false, stale_record: false });
        // Weak differences: the holder is the source, whichever side recorded them.
        let d = decide_sw("b", &dirty(st(true, 2, &[]), &["a"]), "a", &st(true, 2, &[]), "a");
        assert_eq!(d, Decision { peer: ReplicaState::InSync, local_outdated: true, stale_record: false });
        let d = decide_sw("a", &st(true, 2, &[]), "b", &dirty(st(true, 2, &[]), &["a"]), "a");
        assert_eq!(d, Decision { peer: ReplicaState::Outdated, local_outdated: false, stale_record: false });
        // Without a holder among the two, the first name is the source.
        let d = decide_sw("c", &dirty(st(true, 2, &[]), &["b"]), "b", &st(true, 2, &[]), "a");
        assert!(d.local_outdated);
        let d = decide_sw("b", &st(true, 2, &[]), "c", &dirty(st(true, 2, &[]), &["b"]), "a");
        assert_eq!(d, Decision { peer: ReplicaState::Outdated, local_outdated: false, stale_record: false });
        // A strong record beats a weak one: b missed a's acknowledged writes.
        let d = decide_sw("b", &dirty(st(true, 2, &[]), &["a"]), "a", &st(true, 3, &["b"]), "b");
        assert!(d.local_outdated);
    }
}
