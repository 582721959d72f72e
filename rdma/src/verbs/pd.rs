//! Protection domains: the scope MRs and QPs share.

use std::fmt;
use std::sync::Arc;

use sideway::ibverbs::device_context::AllocateProtectionDomainErrorKind;
use sideway::ibverbs::protection_domain::ProtectionDomain;

use crate::backend::{CqBackend, MrBackend, MrRequest, PdBackend, QpBackend};
use crate::error::Result;
use crate::qp::QpCaps;

use super::device::DevInner;
use super::mr::VerbsMr;
use super::qp::VerbsQp;

/// `ibv_alloc_pd`; deallocated when the last MR, QP and handle are gone.
pub struct VerbsPd {
    pub(crate) dev: Arc<DevInner>,
    pub(crate) pd: Arc<ProtectionDomain>,
}

impl VerbsPd {
    pub(crate) fn new(dev: &Arc<DevInner>) -> Result<VerbsPd> {
        let pd = dev.ctx.alloc_pd().map_err(|e| {
            let errno = match &e.0 {
                AllocateProtectionDomainErrorKind::Ibverbs(io) => io.raw_os_error().unwrap_or(0),
                _ => 0,
            };
            dev.os_err("ibv_alloc_pd", errno, "")
        })?;
        Ok(VerbsPd {
            dev: Arc::clone(dev),
            pd,
        })
    }
}

impl fmt::Debug for VerbsPd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerbsPd")
            .field("device", &self.dev.name)
            .finish_non_exhaustive()
    }
}

impl PdBackend for VerbsPd {
    fn reg_mr(&self, req: &MrRequest<'_>) -> Result<Arc<dyn MrBackend>> {
        Ok(Arc::new(VerbsMr::register(self, req)?))
    }

    fn create_qp(
        &self,
        send_cq: &Arc<dyn CqBackend>,
        recv_cq: &Arc<dyn CqBackend>,
        caps: QpCaps,
    ) -> Result<Arc<dyn QpBackend>> {
        Ok(Arc::new(VerbsQp::create(self, send_cq, recv_cq, caps)?))
    }
}
