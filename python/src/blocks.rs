//! Prepared block lists and prepared transfers: a pool split into blocks once, transfers by
//! block index, and a transfer checked, routed and split once to post again and again — what
//! a serving engine moving KV-cache blocks does per request (NIXL's `prep_xfer_dlist` +
//! `make_prepped_xfer` shape).

use pyo3::prelude::*;

use crate::desc::{Desc, RemoteDesc};
use crate::errors::{invalid, to_py};
use crate::transfer::Transfer;

/// This agent's blocks, in index order (`Region.blocks(size)`, or `LocalBlocks([desc, ...])`).
#[pyclass(module = "dmaplane._dmaplane", frozen, sequence)]
pub(crate) struct LocalBlocks {
    pub(crate) inner: dmaplane::LocalBlocks,
}

#[pymethods]
impl LocalBlocks {
    /// Blocks from descriptors of this agent's regions (any lengths, any regions).
    #[new]
    fn new(descs: Vec<PyRef<'_, Desc>>) -> LocalBlocks {
        LocalBlocks {
            inner: dmaplane::LocalBlocks::new(descs.iter().map(|d| d.inner).collect()),
        }
    }
    fn __len__(&self) -> usize {
        self.inner.len()
    }
    fn __getitem__(&self, i: isize) -> PyResult<Desc> {
        let d = self.inner.descs();
        let at = index(i, d.len(), "block")?;
        Ok(Desc { inner: d[at] })
    }
    fn __repr__(&self) -> String {
        format!("LocalBlocks({} blocks)", self.inner.len())
    }
}

/// A peer's blocks, in index order (`RemoteRegion.blocks(size)`, or
/// `RemoteBlocks([remote_desc, ...])`).
#[pyclass(module = "dmaplane._dmaplane", frozen, sequence)]
pub(crate) struct RemoteBlocks {
    pub(crate) inner: dmaplane::RemoteBlocks,
}

#[pymethods]
impl RemoteBlocks {
    /// Blocks from descriptors of one peer's regions.
    #[new]
    fn new(descs: Vec<PyRef<'_, RemoteDesc>>) -> RemoteBlocks {
        RemoteBlocks {
            inner: dmaplane::RemoteBlocks::new(descs.iter().map(|d| d.inner.clone()).collect()),
        }
    }
    fn __len__(&self) -> usize {
        self.inner.len()
    }
    fn __getitem__(&self, i: isize) -> PyResult<RemoteDesc> {
        let d = self.inner.descs();
        let at = index(i, d.len(), "block")?;
        Ok(RemoteDesc {
            inner: d[at].clone(),
        })
    }
    fn __repr__(&self) -> String {
        format!("RemoteBlocks({} blocks)", self.inner.len())
    }
}

/// A transfer checked, routed and split into requests once (`Agent.prepare_read` /
/// `prepare_write`): `post()` starts it, as often as wanted.
#[pyclass(module = "dmaplane._dmaplane", frozen)]
pub(crate) struct Prepared {
    pub(crate) inner: dmaplane::Prepared,
}

#[pymethods]
impl Prepared {
    /// Start it: a new `Transfer`. With `notify` (a tag, bytes, or `(tag, bytes)`), the peer
    /// gets it after every byte moved.
    #[pyo3(signature = (notify = None))]
    pub(crate) fn post(
        &self,
        py: Python<'_>,
        notify: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Transfer> {
        let n = crate::notify::notify_arg(notify)?;
        let p = &self.inner;
        let t = py.detach(|| p.post(n)).map_err(to_py)?;
        Ok(Transfer { inner: t })
    }
    /// Bytes each post moves.
    #[getter]
    fn bytes(&self) -> u64 {
        self.inner.bytes()
    }
    /// Requests each post is split into.
    #[getter]
    fn requests(&self) -> usize {
        self.inner.requests()
    }
    /// The peer's name.
    #[getter]
    fn peer(&self) -> String {
        self.inner.peer().to_string()
    }
    fn __repr__(&self) -> String {
        format!(
            "Prepared(peer={:?}, bytes={}, requests={})",
            self.inner.peer(),
            self.inner.bytes(),
            self.inner.requests()
        )
    }
}

/// `i` (negative from the end, as Python indexes) within `len`.
fn index(i: isize, len: usize, what: &str) -> PyResult<usize> {
    let n = isize::try_from(len).unwrap_or(isize::MAX);
    let at = if i < 0 { i + n } else { i };
    if at < 0 || at >= n {
        return Err(pyo3::exceptions::PyIndexError::new_err(format!(
            "{what} index {i} out of range ({len} blocks)"
        )));
    }
    Ok(at as usize)
}

/// Block indices from a list or a NumPy integer array (int32 or int64): each at least 0.
pub(crate) fn indices(obj: &Bound<'_, PyAny>, field: &str) -> PyResult<Vec<usize>> {
    // A list as it is (no attribute lookup: a failed one costs an exception); a NumPy array
    // (anything with `tolist`) becomes a list of Python ints in one C call.
    let list = if obj.is_instance_of::<pyo3::types::PyList>() {
        obj.clone()
    } else {
        match obj.getattr(pyo3::intern!(obj.py(), "tolist")) {
            Ok(f) => f.call0()?,
            Err(_) => obj.clone(),
        }
    };
    let raw: Vec<i64> = list.extract().map_err(|_| {
        invalid(
            field,
            obj.repr().map_or_else(|_| "?".into(), |r| r.to_string()),
            "a list of block indices (ints), or a NumPy int32/int64 array",
        )
    })?;
    raw.into_iter()
        .map(|i| usize::try_from(i).map_err(|_| invalid(field, i, "a block index is at least 0")))
        .collect()
}
