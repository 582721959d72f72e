//! Descriptors: `region[a:b]` of this agent's memory (`Desc`) or of a peer's (`RemoteDesc`,
//! usable only with that peer) — two classes, as in Rust, so the sides cannot be swapped.

use pyo3::prelude::*;
use pyo3::types::PySlice;

/// `len` bytes at `offset` into one of this agent's registrations (`region[offset:offset+len]`).
#[pyclass(module = "dmaplane._dmaplane", frozen, skip_from_py_object)]
#[derive(Clone)]
pub(crate) struct Desc {
    pub(crate) inner: dmaplane::Desc,
}

#[pymethods]
impl Desc {
    /// The registration id.
    #[getter]
    fn region(&self) -> u32 {
        self.inner.region
    }
    /// Byte offset into the registration.
    #[getter]
    fn offset(&self) -> u64 {
        self.inner.offset
    }
    fn __len__(&self) -> usize {
        usize::try_from(self.inner.len).unwrap_or(usize::MAX)
    }
    fn __repr__(&self) -> String {
        format!(
            "Desc(region={}, offset={}, len={})",
            self.inner.region, self.inner.offset, self.inner.len
        )
    }
}

/// `len` bytes at `offset` into a peer's registration (`remote_region[offset:offset+len]`).
#[pyclass(module = "dmaplane._dmaplane", frozen, skip_from_py_object)]
#[derive(Clone)]
pub(crate) struct RemoteDesc {
    pub(crate) inner: dmaplane::RemoteDesc,
}

#[pymethods]
impl RemoteDesc {
    /// The peer it belongs to.
    #[getter]
    fn peer(&self) -> String {
        self.inner.peer().to_string()
    }
    /// The peer's registration id.
    #[getter]
    fn region(&self) -> u32 {
        self.inner.region()
    }
    /// Byte offset into the peer's registration.
    #[getter]
    fn offset(&self) -> u64 {
        self.inner.offset()
    }
    fn __len__(&self) -> usize {
        usize::try_from(self.inner.len()).unwrap_or(usize::MAX)
    }
    fn __repr__(&self) -> String {
        format!(
            "RemoteDesc(peer={:?}, region={}, offset={}, len={})",
            self.inner.peer(),
            self.inner.region(),
            self.inner.offset(),
            self.inner.len()
        )
    }
}

/// `(offset, len)` of `key` — a slice with no step, or an index of one byte — within `len`
/// bytes; refused naming the key.
pub(crate) fn range(key: &Bound<'_, PyAny>, len: u64) -> PyResult<(u64, u64)> {
    if let Ok(s) = key.cast::<PySlice>() {
        let n =
            isize::try_from(len).map_err(|_| crate::errors::invalid("len", len, "too large"))?;
        let idx = s.indices(n)?;
        if idx.step != 1 {
            return Err(crate::errors::invalid(
                "slice step",
                idx.step,
                "a descriptor is one run of bytes: slice without a step",
            ));
        }
        if idx.slicelength == 0 {
            return Err(crate::errors::invalid(
                "slice",
                format!("[{}:{}]", idx.start, idx.stop),
                "empty: a descriptor covers at least one byte",
            ));
        }
        return Ok((idx.start as u64, idx.slicelength as u64));
    }
    Err(crate::errors::invalid(
        "key",
        key.repr().map_or_else(|_| "?".into(), |r| r.to_string()),
        "index a region with a slice of bytes: region[offset:offset + n]",
    ))
}

/// What `descs` wants in `local` of a transfer.
pub(crate) const LOCAL: &str = "a local descriptor (region[a:b] of this agent's Region) — a peer's RemoteDesc goes in `remote`";
/// What `descs` wants in `remote` of a transfer.
pub(crate) const REMOTE: &str =
    "a peer's descriptor (peer.region(name)[a:b]) — this agent's Desc goes in `local`";
/// What `local_descs` wants: this agent's file or memory descriptors.
const FILE_OR_MEMORY: &str =
    "a descriptor of this agent (region[a:b], file_region[a:b]) or a list of them";

/// Descriptors of one class (`Desc` or `RemoteDesc`): one, or a list of them; anything else
/// (a descriptor of the other class too) is refused naming `field`, the type given and `want`.
pub(crate) fn descs<
    T: pyo3::PyClass<Frozen = pyo3::pyclass::boolean_struct::True> + Sync + Clone,
>(
    obj: &Bound<'_, PyAny>,
    field: &str,
    want: &str,
) -> PyResult<Vec<T>> {
    if let Ok(one) = obj.cast::<T>() {
        return Ok(vec![one.get().clone()]);
    }
    let refuse = |item: &Bound<'_, PyAny>| {
        crate::errors::invalid(
            field,
            item.get_type()
                .name()
                .map_or_else(|_| "?".into(), |n| n.to_string()),
            want,
        )
    };
    let Ok(list) = obj.try_iter() else {
        return Err(refuse(obj));
    };
    list.map(|item| {
        let item = item?;
        item.cast::<T>()
            .map(|d| d.get().clone())
            .map_err(|_| refuse(&item))
    })
    .collect()
}

/// This agent's descriptors (file or memory) for files and `load`: one, or a list of them.
pub(crate) fn local_descs(obj: &Bound<'_, PyAny>, field: &str) -> PyResult<Vec<dmaplane::Desc>> {
    Ok(descs::<Desc>(obj, field, FILE_OR_MEMORY)?
        .into_iter()
        .map(|d| d.inner)
        .collect())
}
