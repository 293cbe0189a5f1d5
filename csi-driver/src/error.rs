//! The one place where CSI errors become gRPC status codes, and where the node agent API's
//! codes become CSI errors.

use tonic::{Code, Status};

/// An error of a CSI call. The variant is the gRPC code the caller gets; the message says
/// what is wrong in words an operator can act on (never a debug dump).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsiError {
    /// A required field is missing or a value is malformed or unsupported.
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume (or node, or path) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A volume with this name exists with incompatible properties.
    #[error("{0}")]
    AlreadyExists(String),
    /// The call is valid but the system is not in a state to execute it (the volume is
    /// published elsewhere, not staged, in use, ...).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A requested size cannot be honoured.
    #[error("{0}")]
    OutOfRange(String),
    /// Not enough capacity (or nodes) to place the volume.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Another operation on the same volume is in progress, or a pagination token is stale.
    #[error("{0}")]
    Aborted(String),
    /// A node agent cannot be reached; retrying later may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// Something failed on this side (a command, the kernel, a bug).
    #[error("{0}")]
    Internal(String),
}

impl CsiError {
    pub fn code(&self) -> Code {
        match self {
            CsiError::InvalidArgument(_) => Code::InvalidArgument,
            CsiError::NotFound(_) => Code::NotFound,
            CsiError::AlreadyExists(_) => Code::AlreadyExists,
            CsiError::FailedPrecondition(_) => Code::FailedPrecondition,
            CsiError::OutOfRange(_) => Code::OutOfRange,
            CsiError::ResourceExhausted(_) => Code::ResourceExhausted,
            CsiError::Aborted(_) => Code::Aborted,
            CsiError::Unavailable(_) => Code::Unavailable,
            CsiError::Internal(_) => Code::Internal,
        }
    }

    /// A node agent's answer, as a CSI error. `what` says which call on which node, so that
    /// the message tells the operator where to look. The agent's codes carry over, except
    /// that transport failures and timeouts become UNAVAILABLE, and codes the CSI caller
    /// cannot act on become INTERNAL.
    pub fn from_agent(what: &str, s: &Status) -> CsiError {
        let msg = format!("{what}: {}", s.message());
        match s.code() {
            Code::InvalidArgument => CsiError::InvalidArgument(msg),
            Code::NotFound => CsiError::NotFound(msg),
            Code::AlreadyExists => CsiError::AlreadyExists(msg),
            Code::FailedPrecondition => CsiError::FailedPrecondition(msg),
            Code::OutOfRange => CsiError::OutOfRange(msg),
            Code::ResourceExhausted => CsiError::ResourceExhausted(msg),
            Code::Aborted => CsiError::Aborted(msg),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => CsiError::Unavailable(msg),
            _ => CsiError::Internal(msg),
        }
    }
}

impl From<CsiError> for Status {
    fn from(e: CsiError) -> Status {
        let code = e.code();
        Status::new(code, e.to_string())
    }
}

pub type CsiResult<T> = Result<T, CsiError>;

/// INVALID_ARGUMENT unless `value` is non-empty; `field` names the request field.
pub fn require<'a>(field: &str, value: &'a str) -> CsiResult<&'a str> {
    if value.is_empty() {
        return Err(CsiError::InvalidArgument(format!("{field} is required")));
    }
    Ok(value)
}

/// INVALID_ARGUMENT unless the optional message is present.
pub fn require_some<'a, T>(field: &str, value: &'a Option<T>) -> CsiResult<&'a T> {
    value.as_ref().ok_or_else(|| CsiError::InvalidArgument(format!("{field} is required")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_codes_map_by_code_not_text() {
        let e = CsiError::from_agent("CreateVolume on node-a", &Status::unavailable("not found"));
        assert_eq!(e.code(), Code::Unavailable);
        let e = CsiError::from_agent("GetVolume on node-a", &Status::not_found("x"));
        assert_eq!(e.code(), Code::NotFound);
        assert_eq!(e.to_string(), "GetVolume on node-a: x");
        let e = CsiError::from_agent("x", &Status::data_loss("y"));
        assert_eq!(e.code(), Code::Internal);
    }

    #[test]
    fn require_names_the_field() {
        assert_eq!(require("volume_id", "").unwrap_err().to_string(), "volume_id is required");
        assert_eq!(require("volume_id", "v").unwrap(), "v");
        assert_eq!(require_some::<u8>("volume_capability", &None).unwrap_err().code(), Code::InvalidArgument);
    }
}
