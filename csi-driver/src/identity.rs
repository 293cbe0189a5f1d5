//! The CSI Identity service, served by the controller binary and by every node agent.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::error::CsiError;
use crate::pb;
use crate::pb::identity_server::Identity;
use crate::pb::plugin_capability::{Service, VolumeExpansion, service, volume_expansion};

/// What Probe asks: is the plugin able to serve calls right now?
#[tonic::async_trait]
pub trait Readiness: Send + Sync + 'static {
    /// `Ok(true)` when ready, `Ok(false)` while initialising, an error when unhealthy (the
    /// message says why).
    async fn ready(&self) -> Result<bool, CsiError>;
}

pub struct IdentityService {
    readiness: Arc<dyn Readiness>,
}

impl IdentityService {
    pub fn new(readiness: Arc<dyn Readiness>) -> Self {
        Self { readiness }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    /// Name `csi.peersan.io` and the version of this build. No side effects.
    async fn get_plugin_info(
        &self,
        _: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        Ok(Response::new(pb::GetPluginInfoResponse {
            name: crate::CSI_DRIVER_NAME.into(),
            vendor_version: crate::VERSION.into(),
            manifest: Default::default(),
        }))
    }

    /// CONTROLLER_SERVICE, VOLUME_ACCESSIBILITY_CONSTRAINTS (a volume is reachable on the
    /// nodes holding its replicas) and ONLINE volume expansion.
    async fn get_plugin_capabilities(
        &self,
        _: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        let svc = |t: service::Type| pb::PluginCapability {
            r#type: Some(pb::plugin_capability::Type::Service(Service { r#type: t as i32 })),
        };
        let capabilities = vec![
            svc(service::Type::ControllerService),
            svc(service::Type::VolumeAccessibilityConstraints),
            pb::PluginCapability {
                r#type: Some(pb::plugin_capability::Type::VolumeExpansion(VolumeExpansion {
                    r#type: volume_expansion::Type::Online as i32,
                })),
            },
        ];
        Ok(Response::new(pb::GetPluginCapabilitiesResponse { capabilities }))
    }

    /// Ready when the plugin can serve calls: for the node plugin, its agent has opened
    /// its volumes; for the controller, at least one node agent answers. An unhealthy
    /// plugin gets an error (FAILED_PRECONDITION / UNAVAILABLE) naming the cause.
    async fn probe(&self, _: Request<pb::ProbeRequest>) -> Result<Response<pb::ProbeResponse>, Status> {
        let ready = self.readiness.ready().await?;
        Ok(Response::new(pb::ProbeResponse { ready: Some(ready) }))
    }
}
