//! Per-volume concurrency guard: a second operation on a volume while one is in progress
//! gets ABORTED (the CSI spec's answer; the caller retries with backoff). Operations on
//! different volumes never wait for each other.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::error::CsiError;

#[derive(Default, Clone)]
pub struct VolumeGuards {
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Held while an operation runs on a volume; releases it when dropped.
#[must_use = "the volume is released when the guard is dropped"]
pub struct VolumeGuard {
    busy: Arc<Mutex<HashSet<String>>>,
    volume: String,
}

impl VolumeGuards {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the volume, or fails with ABORTED when another operation holds it.
    pub fn try_lock(&self, volume: &str, op: &str) -> Result<VolumeGuard, CsiError> {
        if !self.busy.lock().unwrap().insert(volume.to_owned()) {
            return Err(CsiError::Aborted(format!(
                "{op}: another operation on volume {volume} is in progress; retry later"
            )));
        }
        Ok(VolumeGuard { busy: self.busy.clone(), volume: volume.to_owned() })
    }
}

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        self.busy.lock().unwrap().remove(&self.volume);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_operation_on_a_volume_is_aborted_until_the_first_ends() {
        let g = VolumeGuards::new();
        let a = g.try_lock("v1", "CreateVolume").unwrap();
        let err = g.try_lock("v1", "DeleteVolume").err().unwrap();
        assert_eq!(err.code(), tonic::Code::Aborted);
        assert!(err.to_string().contains("v1"));
        let _b = g.try_lock("v2", "CreateVolume").unwrap();
        drop(a);
        let _c = g.try_lock("v1", "DeleteVolume").unwrap();
    }
}
