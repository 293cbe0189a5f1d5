//! Request logging with secrets stripped. Every RPC logs its request through [`request`];
//! the values of `secrets` maps are replaced, so that a log never holds a credential.

use std::fmt::Debug;

use crate::pb;

/// A request whose log form hides its secrets.
pub trait Redact: Debug + Clone {
    /// A copy with every secret value replaced by `<redacted>` (the keys stay, so the log
    /// still shows which secrets were passed).
    fn redacted(&self) -> Self;
}

fn strip(m: &mut std::collections::HashMap<String, String>) {
    for v in m.values_mut() {
        *v = "<redacted>".into();
    }
}

macro_rules! with_secrets {
    ($($t:ty),* $(,)?) => {$(
        impl Redact for $t {
            fn redacted(&self) -> Self {
                let mut r = self.clone();
                strip(&mut r.secrets);
                r
            }
        }
    )*};
}

macro_rules! without_secrets {
    ($($t:ty),* $(,)?) => {$(
        impl Redact for $t {
            fn redacted(&self) -> Self {
                self.clone()
            }
        }
    )*};
}

with_secrets!(
    pb::CreateVolumeRequest,
    pb::DeleteVolumeRequest,
    pb::ControllerPublishVolumeRequest,
    pb::ControllerUnpublishVolumeRequest,
    pb::ValidateVolumeCapabilitiesRequest,
    pb::ControllerExpandVolumeRequest,
    pb::NodeStageVolumeRequest,
    pb::NodePublishVolumeRequest,
    pb::NodeExpandVolumeRequest,
);

without_secrets!(
    pb::ListVolumesRequest,
    pb::GetCapacityRequest,
    pb::NodeUnstageVolumeRequest,
    pb::NodeUnpublishVolumeRequest,
    pb::NodeGetVolumeStatsRequest,
);

/// Logs an incoming request (at info level for calls that change state, debug for
/// queries) with its secrets stripped.
pub fn request<T: Redact>(rpc: &str, req: &T, changes_state: bool) {
    if changes_state {
        tracing::info!(request = ?req.redacted(), "{rpc}");
    } else {
        tracing::debug!(request = ?req.redacted(), "{rpc}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_reach_the_log_form() {
        let mut req = pb::NodeStageVolumeRequest { volume_id: "v".into(), ..Default::default() };
        req.secrets.insert("password".into(), "hunter2-very-secret".into());
        let shown = format!("{:?}", req.redacted());
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("password"), "{shown}");
        assert_eq!(req.secrets["password"], "hunter2-very-secret", "the request itself is untouched");
    }
}
