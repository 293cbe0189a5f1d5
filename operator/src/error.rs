//! The operator's errors, and their kind: what `error_policy` backs off by.

use std::time::Duration;

/// Errors of a reconciliation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request to the API server failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The VirtualSAN asks for something its schema cannot refuse but that cannot be done
    /// (more replicas than members, exceptions for nodes that are not members, a node that
    /// another VirtualSAN already has). The status says what.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// The VirtualSAN is being deleted but still has volumes.
    #[error("deletion blocked: {0}")]
    DeletionBlocked(String),
    /// A name that cannot be part of a Lease name, or an unreadable fencing epoch.
    #[error(transparent)]
    Crds(#[from] peersan_crds::Error),
    /// A watch's local cache stopped before it was filled (the operator is shutting down).
    #[error("the cache of {0} is not available")]
    CacheUnavailable(&'static str),
    /// Adding or removing the finalizer failed.
    #[error("finalizer {action}: {source}")]
    Finalizer {
        /// What was done (`add`, `remove`).
        action: &'static str,
        /// The API error.
        source: kube::Error,
    },
    /// An object without a name (never sent by an API server).
    #[error("an object without a name")]
    Unnamed,
}

/// What kind of failure an [`Error`] is: how soon the reconciliation is tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Someone else changed the object meanwhile (HTTP 409): retry soon, with fresh data.
    Conflict,
    /// The spec cannot be carried out: nothing changes until it is edited.
    InvalidSpec,
    /// Deletion waits for the SAN's volumes to go.
    Blocked,
    /// The API server failed or was unreachable: retry with exponential backoff.
    Transient,
}

impl ErrorKind {
    /// Label value in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Conflict => "conflict",
            ErrorKind::InvalidSpec => "invalid_spec",
            ErrorKind::Blocked => "blocked",
            ErrorKind::Transient => "transient",
        }
    }
}

/// Delay before retrying after a conflict.
pub const CONFLICT_RETRY: Duration = Duration::from_secs(1);
/// Delay before looking again at an invalid spec (an edit triggers a reconciliation earlier).
pub const INVALID_SPEC_RETRY: Duration = Duration::from_secs(300);
/// Delay between checks of a deletion that waits for volumes.
pub const BLOCKED_RETRY: Duration = Duration::from_secs(15);
/// First delay of the exponential backoff after a transient error.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest delay of the exponential backoff.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

impl Error {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Kube(e) | Error::Finalizer { source: e, .. } => kube_kind(e),
            Error::InvalidSpec(_) | Error::Crds(_) => ErrorKind::InvalidSpec,
            Error::DeletionBlocked(_) => ErrorKind::Blocked,
            Error::CacheUnavailable(_) | Error::Unnamed => ErrorKind::Transient,
        }
    }

    /// Whether this is the API server's 404 Not Found.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Kube(kube::Error::Api(s)) if s.code == 404)
    }

    /// Flattens the errors of `kube::runtime::finalizer`.
    pub fn from_finalizer(e: kube::runtime::finalizer::Error<Error>) -> Error {
        use kube::runtime::finalizer::Error as F;
        match e {
            F::ApplyFailed(e) | F::CleanupFailed(e) => e,
            F::AddFinalizer(source) => Error::Finalizer { action: "add", source },
            F::RemoveFinalizer(source) => Error::Finalizer { action: "remove", source },
            F::UnnamedObject | F::InvalidFinalizer => Error::Unnamed,
        }
    }
}

fn kube_kind(e: &kube::Error) -> ErrorKind {
    match e {
        kube::Error::Api(status) if status.code == 409 => ErrorKind::Conflict,
        _ => ErrorKind::Transient,
    }
}

/// Whether an API error is a 404 Not Found.
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Whether an API error is a 409 Conflict (or AlreadyExists).
pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// The next delay of an exponential backoff that had `previous` (none: the first).
pub fn next_backoff(previous: Option<Duration>) -> Duration {
    match previous {
        None => BACKOFF_MIN,
        Some(d) => (d * 2).clamp(BACKOFF_MIN, BACKOFF_MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> Error {
        let status = kube::core::Status::failure("x", "y").with_code(code);
        Error::Kube(kube::Error::Api(Box::new(status)))
    }

    #[test]
    fn kinds() {
        assert_eq!(api_error(409).kind(), ErrorKind::Conflict);
        assert_eq!(api_error(500).kind(), ErrorKind::Transient);
        assert_eq!(api_error(422).kind(), ErrorKind::Transient);
        assert!(api_error(404).is_not_found());
        assert_eq!(Error::InvalidSpec("x".into()).kind(), ErrorKind::InvalidSpec);
        assert_eq!(Error::DeletionBlocked("x".into()).kind(), ErrorKind::Blocked);
    }

    #[test]
    fn backoff_doubles_up_to_the_limit() {
        let mut d = None;
        let mut seen = vec![];
        for _ in 0..12 {
            let next = next_backoff(d);
            seen.push(next.as_secs());
            d = Some(next);
        }
        assert_eq!(seen, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
    }
}
