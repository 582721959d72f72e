//! How the drive reaches memory: imported once per memory and export epoch, through the same
//! negotiation as a NIC's, directly or through a host bounce buffer.

use std::sync::Arc;

use dmaplane_core::Route;
use dmaplane_gpu::DmaClient;
use dmaplane_storage::StorageError;

use super::{AttachFn, Drive, Import};
use crate::error::{Error, Result};
use crate::file::StoragePath;
use crate::memory::{Backing, Memory};
use crate::sync::lock;

impl Drive {
    /// The drive's import of `memory`, made on first use or after a revoke moved its epoch.
    pub(super) fn import(&self, memory: &Memory) -> Result<Import> {
        let _one = lock(&self.importing);
        let epoch = memory.with_backing(|b| Ok(b.epoch()))?;
        {
            let mut st = lock(&self.st);
            if let Some(i) = st.imports.get(&memory.id()) {
                if i.epoch == epoch {
                    return Ok(i.clone());
                }
                if let Some(b) = i.buf {
                    st.releases.push((b, None));
                }
                st.imports.remove(&memory.id());
            }
        }
        let device = memory.location().device().to_string();
        let route = match &self.testbed {
            Some(tb) if !self.is_kernel() => Some(
                tb.topology()
                    .route_by_id(&device, &self.name)
                    .map_err(|e| Error::setup(&self.agent, e.to_string()))?,
            ),
            _ => None,
        };
        let name = memory.name().to_string();
        let is_gpu = matches!(memory.location(), crate::Location::Gpu(_));
        let imported = if is_gpu && self.force_bounce {
            Err(format!(
                "agent {} stages all GPU memory (force_staging)",
                self.agent
            ))
        } else if is_gpu && self.is_kernel() {
            Err(
                "the kernel's O_DIRECT reads into host memory: GPU memory goes through a host \
                 bounce buffer and the GPU's copy engine"
                    .to_string(),
            )
        } else {
            let mem = memory.clone();
            let dev = self.dev;
            let attach: AttachFn = Box::new(move |i, a| {
                mem.with_backing(|b| Ok(attach_backing(b, dev, i, a)))
                    .unwrap_or_else(|e| {
                        Err(dmaplane_core::AttachError::Exporter {
                            export: mem.name().to_string(),
                            what: e.to_string(),
                        })
                    })
            });
            self.attach(&name, attach).map_err(|e| match e {
                StorageError::Import { why, .. } => why,
                other => other.to_string(),
            })
        };
        let import = match imported {
            Ok(buf) => Import {
                epoch,
                buf: Some(buf),
                path: StoragePath::Direct {
                    drive: self.name.clone(),
                    route: route.map_or_else(
                        || "the kernel's (O_DIRECT into the memory's process address)".into(),
                        |r| format!("{r:?}"),
                    ),
                },
            },
            Err(why) if is_gpu => {
                let through = self.testbed.as_ref().map_or_else(
                    || "this process's host memory, registered with cuMemHostRegister".to_string(),
                    |tb| {
                        let topo = tb.topology();
                        topo.numa_of(&device)
                            .ok()
                            .and_then(|n| topo.host_memory_for_numa(n))
                            .map_or_else(|| "host memory".to_string(), |d| d.id.clone())
                    },
                );
                Import {
                    epoch,
                    buf: None,
                    path: StoragePath::Bounced {
                        drive: self.name.clone(),
                        through,
                        why,
                    },
                }
            }
            Err(why) => {
                return Err(Error::invalid(
                    format!("file I/O on {}", memory.name()),
                    "memory",
                    memory.location(),
                    format!("drive {} cannot reach it: {why}", self.name),
                ));
            }
        };
        if route == Some(Route::NotSupported) && import.buf.is_some() {
            tracing::debug!(memory = %name, drive = %self.name, "imported though the topology has no P2P route");
        }
        let mut st = lock(&self.st);
        if let Some(old) = st.imports.insert(memory.id(), import.clone())
            && let Some(b) = old.buf
        {
            st.releases.push((b, None));
        }
        Ok(import)
    }
}

/// Attach a backing to the drive's engine: by bus address for the simulated drive (`dev` is
/// the drive), by process address for the kernel's ring (which asks for `ProcessVa` only).
pub(super) fn attach_backing(
    b: &Backing,
    dev: Option<dmaplane_core::fabric::DeviceId>,
    i: Arc<dyn dmaplane_core::revoke::Importer>,
    a: &[dmaplane_core::Accept],
) -> std::result::Result<dmaplane_core::Attachment, dmaplane_core::AttachError> {
    let refuse = |why: &str| {
        Err(dmaplane_core::AttachError::Exporter {
            export: String::new(),
            what: why.to_string(),
        })
    };
    match (b, dev) {
        (Backing::Host(h), Some(dev)) => h.attach(i, dev, a),
        (Backing::Gpu(g), Some(dev)) => g.attach(i, DmaClient::Fabric(dev), a),
        #[cfg(feature = "verbs")]
        (Backing::DmaBuf(m), _) => m.attach(i, a),
        (Backing::User(u), _) => u.attach(i, a),
        #[allow(unreachable_patterns)]
        _ => refuse("this memory does not reach the drive"),
    }
}
