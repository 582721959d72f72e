//! A notification received, as Python sees it.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::invalid;

/// A notification: who sent it, its tag, its bytes, and the sender's transfer id when it came
/// with a transfer (`None` for one sent on its own).
#[pyclass(module = "dmaplane._dmaplane", frozen, get_all)]
pub(crate) struct Notification {
    /// The sending agent's name.
    sender: String,
    /// The sender's tag.
    tag: String,
    /// The bytes it carries.
    data: Py<PyBytes>,
    /// The sender's transfer id, if it came with one.
    transfer: Option<u64>,
}

impl Notification {
    pub(crate) fn new(py: Python<'_>, n: dmaplane::Notification) -> Notification {
        Notification {
            sender: n.from,
            tag: n.tag,
            data: PyBytes::new(py, &n.bytes).unbind(),
            transfer: n.transfer,
        }
    }
}

#[pymethods]
impl Notification {
    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Notification(sender={:?}, tag={:?}, data={} bytes, transfer={:?})",
            self.sender,
            self.tag,
            self.data.bind(py).as_bytes().len(),
            self.transfer
        )
    }
}

/// `notify`: `None`, a tag (`str`), bytes (tag ""), or `(tag, bytes)`.
pub(crate) fn notify_arg(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<dmaplane::Notify>> {
    let Some(obj) = obj else { return Ok(None) };
    if obj.is_none() {
        return Ok(None);
    }
    if let Ok(tag) = obj.extract::<String>() {
        return Ok(Some(dmaplane::Notify::tag_only(tag)));
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Some(dmaplane::Notify::new("", b.as_bytes().to_vec())));
    }
    if let Ok((tag, data)) = obj.extract::<(String, Vec<u8>)>() {
        return Ok(Some(dmaplane::Notify::new(tag, data)));
    }
    Err(invalid(
        "notify",
        obj.repr().map_or_else(|_| "?".into(), |r| r.to_string()),
        "a tag (str), bytes, or a (tag, bytes) pair",
    ))
}
