//! Names of the `coordination.k8s.io/v1` Leases of the policing protocol, and the fencing
//! epoch they carry. The namespace is the caller's (the one peersan is installed in).
//!
//! - Per volume, `peersan-vol-<volume>`: its `holderIdentity` is the node with write priority;
//!   the annotation [`EPOCH_ANNOTATION`] holds the fencing epoch, which rises at every change of
//!   holder. It changes only on attach and failover, never per I/O.
//! - Per node, `peersan-node-<node>`: the node agent's heartbeat, renewed by the agent; when it
//!   expires the node counts as offline.

use std::collections::BTreeMap;

use crate::Error;

/// Prefix of a volume's write-priority Lease.
pub const VOLUME_LEASE_PREFIX: &str = "peersan-vol-";
/// Prefix of a node agent's heartbeat Lease.
pub const NODE_LEASE_PREFIX: &str = "peersan-node-";
/// Annotation on a volume's Lease holding the fencing epoch, a decimal integer.
pub const EPOCH_ANNOTATION: &str = "peersan.io/epoch";
/// Longest object name the API server accepts (a DNS subdomain).
pub const MAX_NAME_LEN: usize = 253;

/// Name of the write-priority Lease of `volume` (a MirrorVolume name).
pub fn volume_lease_name(volume: &str) -> Result<String, Error> {
    lease_name(VOLUME_LEASE_PREFIX, volume)
}

/// Name of the heartbeat Lease of `node` (a Kubernetes node name).
pub fn node_lease_name(node: &str) -> Result<String, Error> {
    lease_name(NODE_LEASE_PREFIX, node)
}

/// The volume whose write-priority Lease is named `lease`, if it is one.
pub fn volume_of_lease(lease: &str) -> Option<&str> {
    lease.strip_prefix(VOLUME_LEASE_PREFIX).filter(|v| !v.is_empty())
}

/// The node whose heartbeat Lease is named `lease`, if it is one.
pub fn node_of_lease(lease: &str) -> Option<&str> {
    lease.strip_prefix(NODE_LEASE_PREFIX).filter(|n| !n.is_empty())
}

/// The fencing epoch as the annotation's value.
pub fn epoch_value(epoch: u64) -> String {
    epoch.to_string()
}

/// Parses the annotation's value: a decimal integer without sign, spaces or leading zeros,
/// so that every epoch has exactly one spelling.
pub fn parse_epoch(value: &str) -> Result<u64, Error> {
    let canonical =
        !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) && (value == "0" || !value.starts_with('0'));
    let invalid = || Error::InvalidEpoch { value: value.to_owned() };
    if !canonical {
        return Err(invalid());
    }
    value.parse().map_err(|_| invalid())
}

/// The fencing epoch in a Lease's annotations: `None` when the annotation is missing (a Lease
/// nobody has written an epoch to yet), an error when it is not a valid epoch.
pub fn epoch_of(annotations: Option<&BTreeMap<String, String>>) -> Result<Option<u64>, Error> {
    annotations.and_then(|a| a.get(EPOCH_ANNOTATION)).map(|v| parse_epoch(v)).transpose()
}

fn lease_name(prefix: &str, object: &str) -> Result<String, Error> {
    check_subdomain(object)?;
    let name = format!("{prefix}{object}");
    if name.len() > MAX_NAME_LEN {
        return Err(Error::InvalidName {
            name: object.to_owned(),
            reason: format!("the Lease name {prefix}… would be longer than {MAX_NAME_LEN} characters"),
        });
    }
    Ok(name)
}

/// Checks that `name` is a DNS subdomain (RFC 1123) as Kubernetes object names are: lowercase
/// letters, digits, `-` and `.`, starting and ending with a letter or digit, at most 253.
fn check_subdomain(name: &str) -> Result<(), Error> {
    let invalid = |reason: &str| Error::InvalidName { name: name.to_owned(), reason: reason.to_owned() };
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(invalid("must be 1 to 253 characters long"));
    }
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    for label in name.split('.') {
        let ok = label.chars().all(|c| alnum(c) || c == '-')
            && label.starts_with(alnum)
            && label.ends_with(alnum)
            && label.len() <= 63;
        if !ok {
            return Err(invalid(
                "must consist of lowercase letters, digits, '-' and '.', each dot-separated part \
                 starting and ending with a letter or digit",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_have_their_prefix_and_map_back() {
        let v = volume_lease_name("pvc-0f1e2d3c").unwrap();
        assert_eq!(v, "peersan-vol-pvc-0f1e2d3c");
        assert_eq!(volume_of_lease(&v), Some("pvc-0f1e2d3c"));
        assert_eq!(node_of_lease(&v), None);

        let n = node_lease_name("worker-1.example.com").unwrap();
        assert_eq!(n, "peersan-node-worker-1.example.com");
        assert_eq!(node_of_lease(&n), Some("worker-1.example.com"));
        assert_eq!(volume_of_lease(&n), None);

        assert_eq!(volume_of_lease("peersan-vol-"), None);
        assert_eq!(node_of_lease("kube-scheduler"), None);
    }

    #[test]
    fn invalid_object_names_are_refused() {
        for bad in ["", "Vol", "vol_1", "-vol", "vol-", "a..b", ".a", "a b"] {
            let e = volume_lease_name(bad).unwrap_err();
            assert!(matches!(e, Error::InvalidName { .. }), "{bad:?}: {e}");
        }
        // The longest valid node name does not leave room for the prefix.
        let long = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61)].join(".");
        assert_eq!(long.len(), 253);
        let e = node_lease_name(&long).unwrap_err().to_string();
        assert!(e.contains("longer than 253"), "{e}");
        let fits = &long[..MAX_NAME_LEN - NODE_LEASE_PREFIX.len()];
        assert_eq!(node_lease_name(fits).unwrap().len(), MAX_NAME_LEN);
    }

    #[test]
    fn epochs_have_one_spelling() {
        for e in [0, 1, 42, u64::MAX] {
            assert_eq!(parse_epoch(&epoch_value(e)).unwrap(), e);
        }
        for bad in ["", "-1", "+1", " 1", "1 ", "01", "1.0", "0x10", "18446744073709551616"] {
            assert!(matches!(parse_epoch(bad), Err(Error::InvalidEpoch { .. })), "{bad:?}");
        }
    }

    #[test]
    fn epoch_from_annotations() {
        assert_eq!(epoch_of(None).unwrap(), None);
        let mut a = BTreeMap::new();
        a.insert("other".to_owned(), "x".to_owned());
        assert_eq!(epoch_of(Some(&a)).unwrap(), None);
        a.insert(EPOCH_ANNOTATION.to_owned(), "7".to_owned());
        assert_eq!(epoch_of(Some(&a)).unwrap(), Some(7));
        a.insert(EPOCH_ANNOTATION.to_owned(), "seven".to_owned());
        assert!(epoch_of(Some(&a)).is_err());
    }
}
