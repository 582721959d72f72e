//! A connected peer, and its regions found by name.

use std::time::Duration;

use pyo3::prelude::*;

use crate::desc::{RemoteDesc, range};
use crate::errors::to_py;

/// A connected peer agent (`Agent.connect`).
#[pyclass(module = "dmaplane._dmaplane", frozen)]
pub(crate) struct Peer {
    pub(crate) inner: dmaplane::Peer,
}

#[pymethods]
impl Peer {
    /// The peer agent's name.
    #[getter]
    fn name(&self) -> String {
        self.inner.name().to_string()
    }

    /// The peer's region registered under `name` (the newest), waiting up to `timeout`
    /// seconds for it to be announced. Raises `InvalidArgument` when it does not come in
    /// time, `PeerLostError` when the peer goes.
    #[pyo3(signature = (name, timeout = 5.0))]
    fn region(&self, py: Python<'_>, name: &str, timeout: f64) -> PyResult<RemoteRegion> {
        let deadline = crate::deadline(Some(timeout))?;
        let peer = self.inner.clone();
        let got =
            crate::wait_releasing(py, deadline, |slice| match peer.wait_region(name, slice) {
                Ok(info) => Some(Ok(info)),
                Err(dmaplane::Error::Invalid(_)) => None,
                Err(e) => Some(Err(e)),
            })?;
        match got {
            Some(r) => Ok(RemoteRegion {
                peer: self.inner.clone(),
                info: r.map_err(to_py)?,
            }),
            // One last look: announced at the deadline, or the answer names what the peer did
            // announce.
            None => match self.inner.wait_region(name, Duration::ZERO) {
                Ok(info) => Ok(RemoteRegion {
                    peer: self.inner.clone(),
                    info,
                }),
                Err(e) => Err(to_py(e)),
            },
        }
    }

    /// Every region of the peer this agent knows of.
    fn regions(&self) -> Vec<RemoteRegion> {
        self.inner
            .regions()
            .into_iter()
            .map(|info| RemoteRegion {
                peer: self.inner.clone(),
                info,
            })
            .collect()
    }

    /// Why the peer was lost, or `None`.
    fn lost(&self) -> Option<String> {
        self.inner.lost()
    }

    fn __repr__(&self) -> String {
        format!("Peer({:?})", self.inner.name())
    }
}

/// A peer's registration: slice it for descriptors (`remote[offset:offset + n]`).
#[pyclass(module = "dmaplane._dmaplane", frozen)]
pub(crate) struct RemoteRegion {
    peer: dmaplane::Peer,
    info: dmaplane::RegionInfo,
}

#[pymethods]
impl RemoteRegion {
    /// The peer's registration id.
    #[getter]
    fn id(&self) -> u32 {
        self.info.id
    }
    /// The name of the memory it registers.
    #[getter]
    fn name(&self) -> String {
        self.info.name.clone()
    }
    fn __len__(&self) -> usize {
        usize::try_from(self.info.len).unwrap_or(usize::MAX)
    }
    fn __getitem__(&self, key: &Bound<'_, PyAny>) -> PyResult<RemoteDesc> {
        let (offset, len) = range(key, self.info.len)?;
        Ok(RemoteDesc {
            inner: self.peer.desc(self.info.id, offset, len).map_err(to_py)?,
        })
    }
    /// The whole region as one descriptor.
    fn all(&self) -> PyResult<RemoteDesc> {
        Ok(RemoteDesc {
            inner: self
                .peer
                .desc(self.info.id, 0, self.info.len)
                .map_err(to_py)?,
        })
    }
    /// The region split into blocks of `size` bytes (block `i` at `i * size`), for transfers
    /// by index.
    fn blocks(&self, size: u64) -> PyResult<crate::blocks::RemoteBlocks> {
        Ok(crate::blocks::RemoteBlocks {
            inner: self.peer.blocks(self.info.id, size).map_err(to_py)?,
        })
    }
    fn __repr__(&self) -> String {
        format!(
            "RemoteRegion(peer={:?}, id={}, name={:?}, len={})",
            self.peer.name(),
            self.info.id,
            self.info.name,
            self.info.len
        )
    }
}
