//! CUDA memory from Python: an object with `__cuda_array_interface__` (a CuPy array, a torch
//! CUDA tensor, Numba's device arrays) or a DLPack tensor on a CUDA device, lent to the agent
//! in place ([`dmaplane::Agent::lend_cuda`]) — the producer held until the registration's
//! memory is freed, after every importer quiesced.
//!
//! dmaplane does not synchronise the producer's streams: as with NIXL, finish the kernels that
//! write a tensor before a transfer reads it (`torch.cuda.synchronize()`, or the stream's
//! event), and wait for a READ into it before a kernel reads it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::invalid;

/// CUDA memory to lend: where it is, and what keeps it allocated.
pub(crate) struct Lent {
    pub(crate) addr: u64,
    pub(crate) len: u64,
    pub(crate) keeper: Keeper,
}

/// What keeps lent CUDA memory allocated — the producer object, and its DLPack tensor when
/// it came as one — and the flag set once the agent let it go.
pub(crate) struct Keeper {
    producer: Option<Py<PyAny>>,
    /// A consumed DLPack capsule's tensor (its deleter runs, with the GIL, on drop).
    tensor: Option<Box<dyn std::any::Any>>,
    released: Arc<AtomicBool>,
}

// SAFETY: the producer is a `Py` (Send + Sync); the DLPack tensor is never touched after it
// was consumed, only dropped, and that with the GIL held.
unsafe impl Send for Keeper {}
// SAFETY: as above: nothing is read through a shared reference.
unsafe impl Sync for Keeper {}

impl Keeper {
    pub(crate) fn new(
        producer: Option<Py<PyAny>>,
        tensor: Option<Box<dyn std::any::Any>>,
    ) -> Keeper {
        Keeper {
            producer,
            tensor,
            released: Arc::new(AtomicBool::new(false)),
        }
    }
    /// Set once the agent dropped it (the object is let go).
    pub(crate) fn released(&self) -> Arc<AtomicBool> {
        self.released.clone()
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        let (producer, tensor) = (self.producer.take(), self.tensor.take());
        if producer.is_some() || tensor.is_some() {
            // A DLPack deleter may touch Python objects, and dropping the producer may free
            // it: with the GIL.
            Python::attach(|_py| {
                drop(tensor);
                drop(producer);
            });
        }
        self.released.store(true, Ordering::Release);
    }
}

/// `obj.__cuda_array_interface__` (version 2 or 3) as memory to lend: one contiguous run of
/// writable bytes, the object held. Refused, naming the field, otherwise.
pub(crate) fn from_interface(obj: &Bound<'_, PyAny>, cai: &Bound<'_, PyAny>) -> PyResult<Lent> {
    let name = obj
        .get_type()
        .name()
        .map_or_else(|_| "object".into(), |n| n.to_string());
    let refuse = |field: &str, value: String, why: &str| {
        invalid(
            &format!("__cuda_array_interface__[{field:?}]"),
            value,
            &format!("{name}: {why}"),
        )
    };
    let d = cai.cast::<PyDict>().map_err(|_| {
        refuse(
            "",
            repr(cai),
            "a dict, as the CUDA Array Interface defines it",
        )
    })?;
    let item = |key: &str| -> PyResult<Bound<'_, PyAny>> {
        d.get_item(key)?
            .ok_or_else(|| refuse(key, "missing".into(), "the interface requires it"))
    };
    let data = item("data")?;
    let (ptr, read_only): (u64, bool) = data
        .extract()
        .map_err(|_| refuse("data", repr(&data), "(address, read_only)"))?;
    if read_only {
        return Err(refuse(
            "data",
            repr(&data),
            "read-only CUDA memory is not lent (a peer could READ into it): register a \
             writable array",
        ));
    }
    let shape: Vec<u64> = item("shape")?
        .extract()
        .map_err(|_| refuse("shape", "?".into(), "a tuple of ints"))?;
    let typestr: String = item("typestr")?
        .extract()
        .map_err(|_| refuse("typestr", "?".into(), "a string such as \"<f4\""))?;
    let itemsize: u64 = typestr
        .get(2..)
        .and_then(|s| s.parse().ok())
        .filter(|n| *n > 0)
        .ok_or_else(|| refuse("typestr", typestr.clone(), "an array-interface type string"))?;
    if let Some(mask) = d.get_item("mask")?
        && !mask.is_none()
    {
        return Err(refuse("mask", repr(&mask), "masked arrays are not lent"));
    }
    let len = shape
        .iter()
        .try_fold(itemsize, |n, d| n.checked_mul(*d))
        .ok_or_else(|| refuse("shape", format!("{shape:?}"), "its size overflows"))?;
    if let Some(strides) = d.get_item("strides")?
        && !strides.is_none()
    {
        let strides: Vec<i64> = strides
            .extract()
            .map_err(|_| refuse("strides", repr(&strides), "None or a tuple of ints"))?;
        if !c_contiguous(&shape, &strides, itemsize) {
            return Err(refuse(
                "strides",
                format!("{strides:?}"),
                "it is not contiguous (a slice with a step, a transposed view): a NIC moves \
                 one run of bytes; register a contiguous copy",
            ));
        }
    }
    if len == 0 || ptr == 0 {
        return Err(refuse(
            "shape",
            format!("{shape:?}"),
            "it is empty: there is nothing to register",
        ));
    }
    Ok(Lent {
        addr: ptr,
        len,
        keeper: Keeper::new(Some(obj.clone().unbind()), None),
    })
}

/// Whether `strides` (bytes) are those of a C-contiguous array of `shape` (dimensions of one
/// element may have any stride).
fn c_contiguous(shape: &[u64], strides: &[i64], itemsize: u64) -> bool {
    if shape.len() != strides.len() {
        return false;
    }
    let mut want = itemsize as i64;
    for (d, s) in shape.iter().zip(strides).rev() {
        if *d != 1 && *s != want {
            return false;
        }
        want = want.saturating_mul(*d as i64);
    }
    true
}

fn repr(o: &Bound<'_, PyAny>) -> String {
    o.repr().map_or_else(|_| "?".into(), |r| r.to_string())
}

#[cfg(test)]
mod tests {
    use super::c_contiguous;

    #[test]
    fn contiguity_follows_the_shape() {
        assert!(c_contiguous(&[4, 3], &[12, 4], 4));
        assert!(!c_contiguous(&[4, 3], &[4, 16], 4));
        assert!(c_contiguous(&[1, 3], &[999, 4], 4));
        assert!(!c_contiguous(&[8], &[2], 1));
        assert!(!c_contiguous(&[8], &[], 1));
    }
}
