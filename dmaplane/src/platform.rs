//! What an agent runs on: the simulated testbed, real devices through verbs or TCP NICs, the fault
//! injected on its devices on purpose, and the CUDA GPUs it has opened.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use dmaplane_gpu::Gpu;
use dmaplane_rdma::Fault;

use crate::error::Result;
use crate::sync::lock;
use crate::testbed::Testbed;

/// The devices an agent's NICs and memory come from.
#[derive(Debug, Clone)]
pub(crate) enum Backend {
    /// The simulated testbed.
    Sim(Arc<Testbed>),
    /// Real RDMA devices through libibverbs.
    Verbs,
    /// Software RC NICs whose wire is TCP ([`dmaplane_rdma::tcp`]): hosts without RDMA.
    Tcp,
}

/// An agent's platform (see the module).
#[derive(Debug)]
pub(crate) struct Platform {
    backend: Backend,
    fault: Option<Fault>,
    /// CUDA GPUs opened so far, by ordinal: one handle each, so its allocations and the host
    /// memory it registers (bounce buffers) are known to the same copy engine.
    cuda: Mutex<HashMap<u32, Gpu>>,
}

impl Platform {
    pub(crate) fn new(backend: Backend, fault: Option<Fault>) -> Platform {
        Platform {
            backend,
            fault,
            cuda: Mutex::new(HashMap::new()),
        }
    }

    /// The simulated testbed, unless the agent runs on verbs.
    pub(crate) fn testbed(&self) -> Option<&Arc<Testbed>> {
        match &self.backend {
            Backend::Sim(t) => Some(t),
            Backend::Verbs | Backend::Tcp => None,
        }
    }

    /// Whether the agent runs on TCP NICs.
    pub(crate) fn is_tcp(&self) -> bool {
        matches!(self.backend, Backend::Tcp)
    }

    /// `sim` or `verbs`, as the metadata says it.
    pub(crate) fn kind(&self) -> &'static str {
        match self.backend {
            Backend::Sim(_) => "sim",
            Backend::Verbs => "verbs",
            Backend::Tcp => "tcp",
        }
    }

    /// The fault injected on every device of the agent (its drive's too).
    pub(crate) fn fault(&self) -> Option<Fault> {
        self.fault
    }

    /// CUDA GPU `ordinal`, opened on first use.
    pub(crate) fn cuda_gpu(&self, ordinal: u32) -> Result<Gpu> {
        let mut c = lock(&self.cuda);
        if let Some(g) = c.get(&ordinal) {
            return Ok(g.clone());
        }
        let g = dmaplane_gpu::cuda::CudaGpu::new(ordinal)?.into_gpu();
        c.insert(ordinal, g.clone());
        Ok(g)
    }
}
