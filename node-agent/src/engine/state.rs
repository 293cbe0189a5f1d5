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
}

/// The rules, applied identically on both ends of a connection:
/// - each side records which replicas missed its acknowledged writes (`outdated_peers`,
///   "strong"); a replica named there, one that is not `consistent`, and an empty
///   never-written replica facing a written one, are out of date and pull from the other;
/// - two replicas that each name the other are in split brain;
/// - out-of-sync bits that are not known to be missed writes (`dirty_peers`, "weak": the
///   activity log after a crash, a write refused by fencing) mean the two may differ in those
///   regions only where neither acknowledged a write; the holder of write priority (`holder`,
///   the same on both sides once epochs are exchanged) is the source, otherwise the replica
///   whose name sorts first.
pub fn decide(
    me_name: &str,
    mine: &ReplicaStateMsg,
    peer_name: &str,
    theirs: &ReplicaStateMsg,
    holder: &str,
) -> Decision {
    let i_flag_them = mine.outdated_peers.iter().any(|p| p == peer_name);
    let they_flag_me = theirs.outdated_peers.iter().any(|p| p == me_name);
    if i_flag_them && they_flag_me && mine.consistent && theirs.consistent {
        return Decision { peer: ReplicaState::SplitBrain, local_outdated: false };
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
        && (!mine.consistent
            || they_flag_me
            || (mine.generation == 0 && theirs.generation > 0)
            || (weak && mine.consistent && they_win));
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
    Decision { peer, local_outdated }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        }
    }

    fn dirty(mut s: ReplicaStateMsg, peers: &[&str]) -> ReplicaStateMsg {
        s.dirty_peers = peers.iter().map(|s| s.to_string()).collect();
        s
    }

    #[test]
    fn rules() {
        // Both clean: in sync.
        let d = decide("a", &st(true, 1, &[]), "b", &st(true, 1, &[]), "a");
        assert_eq!(d, Decision { peer: ReplicaState::InSync, local_outdated: false });
        // b missed writes of a.
        let d = decide("a", &st(true, 2, &["b"]), "b", &st(true, 1, &[]), "a");
        assert_eq!(d, Decision { peer: ReplicaState::Outdated, local_outdated: false });
        let d = decide("b", &st(true, 1, &[]), "a", &st(true, 2, &["b"]), "a");
        assert_eq!(d, Decision { peer: ReplicaState::InSync, local_outdated: true });
        // Split brain.
        let d = decide("a", &st(true, 2, &["b"]), "b", &st(true, 2, &["a"]), "a");
        assert_eq!(d.peer, ReplicaState::SplitBrain);
        // New empty replica faces a written one.
        let d = decide("c", &st(true, 0, &[]), "a", &st(true, 3, &[]), "a");
        assert!(d.local_outdated);
        let d = decide("a", &st(true, 3, &[]), "c", &st(true, 0, &[]), "a");
        assert_eq!(d.peer, ReplicaState::Outdated);
        // Inconsistent peer is catching up; an inconsistent peer is never a source.
        let d = decide("a", &st(false, 3, &[]), "b", &st(false, 3, &[]), "a");
        assert_eq!(d, Decision { peer: ReplicaState::CatchingUp, local_outdated: false });
        // Weak differences: the holder is the source, whichever side recorded them.
        let d = decide("b", &dirty(st(true, 2, &[]), &["a"]), "a", &st(true, 2, &[]), "a");
        assert_eq!(d, Decision { peer: ReplicaState::InSync, local_outdated: true });
        let d = decide("a", &st(true, 2, &[]), "b", &dirty(st(true, 2, &[]), &["a"]), "a");
        assert_eq!(d, Decision { peer: ReplicaState::Outdated, local_outdated: false });
        // Without a holder among the two, the first name is the source.
        let d = decide("c", &dirty(st(true, 2, &[]), &["b"]), "b", &st(true, 2, &[]), "a");
        assert!(d.local_outdated);
        let d = decide("b", &st(true, 2, &[]), "c", &dirty(st(true, 2, &[]), &["b"]), "a");
        assert_eq!(d, Decision { peer: ReplicaState::Outdated, local_outdated: false });
        // A strong record beats a weak one: b missed a's acknowledged writes.
        let d = decide("b", &dirty(st(true, 2, &[]), &["a"]), "a", &st(true, 3, &["b"]), "b");
        assert!(d.local_outdated);
    }
}
