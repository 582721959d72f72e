//! What `Agent.register` lends the agent: a buffer-protocol export ([`crate::buffer`]), a
//! DLPack tensor (through `dlpark`), or an address range on the caller's word
//! ([`crate::raw`]) — held until the registration's memory is freed.
//!
//! A DLPack producer (a torch tensor, a JAX or CuPy array, a NumPy array) is asked for its
//! capsule (`__dlpack__`, versioned where the producer supports it); the consumed capsule's
//! managed tensor is held, and with it the producer object, until the memory goes — then the
//! producer's deleter runs, with the GIL. Host memory (`kDLCPU`, `kDLCUDAHost`) is lent as
//! host memory; CUDA memory (`__cuda_array_interface__`, `kDLCUDA`) as CUDA memory
//! ([`crate::cuda`]); other devices are refused saying so.

use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use dlpark::prelude::{SafeManagedTensor, SafeManagedTensorVersioned, TensorView};
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyTuple};

use crate::buffer::Exported;
use crate::errors::invalid;

/// Memory lent to the agent, whatever holds it, and a flag set once the agent let it go.
pub(crate) struct Held {
    lent: Box<dyn dmaplane::Lent>,
    released: Arc<AtomicBool>,
}

impl Held {
    pub(crate) fn new(lent: Box<dyn dmaplane::Lent>) -> Held {
        Held {
            lent,
            released: Arc::new(AtomicBool::new(false)),
        }
    }
    /// Where the bytes are in this process.
    pub(crate) fn address(&self) -> usize {
        self.lent.ptr().as_ptr() as usize
    }
    /// Set once the agent dropped what it was lent (the object is let go).
    pub(crate) fn released(&self) -> Arc<AtomicBool> {
        self.released.clone()
    }
    pub(crate) fn boxed(self) -> Box<dyn dmaplane::Lent> {
        Box::new(Tracked {
            lent: Some(self.lent),
            released: self.released,
        })
    }
}

/// What the agent holds: the lent memory, and the flag its drop sets.
struct Tracked {
    lent: Option<Box<dyn dmaplane::Lent>>,
    released: Arc<AtomicBool>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        drop(self.lent.take());
        self.released.store(true, Ordering::Release);
    }
}

// SAFETY: forwards to the lent memory it holds, unchanged, until it drops it.
unsafe impl dmaplane::Lent for Tracked {
    fn ptr(&self) -> NonNull<u8> {
        self.lent.as_ref().map_or(NonNull::dangling(), |l| l.ptr())
    }
    fn len(&self) -> usize {
        self.lent.as_ref().map_or(0, |l| l.len())
    }
    fn read_only(&self) -> bool {
        self.lent.as_ref().is_none_or(|l| l.read_only())
    }
}

/// What an object lends the agent.
pub(crate) enum Lending {
    /// Host memory.
    Host(Held),
    /// CUDA device memory.
    Cuda(crate::cuda::Lent),
}

impl Lending {
    /// Where the bytes are (a host address, or a CUDA device address).
    pub(crate) fn address(&self) -> usize {
        match self {
            Lending::Host(h) => h.address(),
            Lending::Cuda(c) => c.addr as usize,
        }
    }
}

/// Hold `obj`'s memory: its CUDA array interface, its buffer export, else its DLPack tensor;
/// refused, saying why and what to do, when it has none, is not contiguous, is empty or is on
/// a device other than the host or a CUDA GPU.
pub(crate) fn lend(obj: &Bound<'_, PyAny>) -> PyResult<Lending> {
    if !obj.hasattr("__array_interface__")?
        && let Ok(cai) = obj.getattr("__cuda_array_interface__")
    {
        return crate::cuda::from_interface(obj, &cai).map(Lending::Cuda);
    }
    match Exported::get(obj)? {
        Ok(e) => Ok(Lending::Host(Held::new(Box::new(e)))),
        Err(_) if obj.hasattr("__dlpack__")? => Tensor::lend(obj),
        Err(_) => Exported::new(obj).map(|e| Lending::Host(Held::new(Box::new(e)))),
    }
}

/// The address of `obj`'s memory (`dmaplane._dmaplane.address_of`; a CUDA device address for
/// CUDA memory): for code that must name memory by address (NIXL's descriptors).
#[pyfunction]
pub(crate) fn address_of(obj: &Bound<'_, PyAny>) -> PyResult<usize> {
    Ok(lend(obj)?.address())
}

enum Managed {
    Legacy(SafeManagedTensor),
    Versioned(SafeManagedTensorVersioned),
}

/// A consumed DLPack capsule's tensor, and its producer.
struct Tensor {
    managed: Option<Managed>,
    _producer: Py<PyAny>,
    ptr: NonNull<u8>,
    len: usize,
    read_only: bool,
}

// SAFETY: the managed tensor is only read (its fields never change once consumed) and its
// deleter runs in `Drop` with the GIL held; the bytes are touched only by the fabric's atomic
// copies and the NICs ([`dmaplane::Lent`]'s contract).
unsafe impl Send for Tensor {}
// SAFETY: as above: no method hands out references into the bytes.
unsafe impl Sync for Tensor {}

impl Tensor {
    /// `obj`'s DLPack tensor: host memory as a [`Tensor`], CUDA memory as [`crate::cuda::Lent`].
    fn lend(obj: &Bound<'_, PyAny>) -> PyResult<Lending> {
        let py = obj.py();
        let name = type_name(obj);
        // Where it lives, before asking for the capsule (no capsule is made for a refusal).
        if let Ok(dev) = obj.call_method0("__dlpack_device__")
            && let Ok((kind, index)) = dev.extract::<(i64, i64)>()
            && kind != 1
            && kind != 2
            && kind != 3
        {
            return Err(not_host(obj, &device_name(kind, index)));
        }
        let kwargs = [("max_version", PyTuple::new(py, [1u32, 0])?)].into_py_dict(py)?;
        let capsule = match obj.call_method("__dlpack__", (), Some(&kwargs)) {
            Ok(c) => c,
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyTypeError>(py) => {
                obj.call_method0("__dlpack__")?
            }
            Err(e) => return Err(e),
        };
        let cap = capsule.cast::<PyCapsule>().map_err(|_| {
            invalid(
                "obj",
                &name,
                "its __dlpack__() returned something other than a capsule",
            )
        })?;
        let cname = cap
            .name()?
            .map(|n| {
                // SAFETY: the capsule is alive (held by `capsule`) and its name a C string.
                unsafe { n.as_cstr() }.to_bytes().to_vec()
            })
            .unwrap_or_default();
        let managed = match cname.as_slice() {
            b"dltensor_versioned" => Managed::Versioned(capsule.extract()?),
            b"dltensor" => Managed::Legacy(capsule.extract()?),
            other => {
                return Err(invalid(
                    "obj",
                    &name,
                    &format!(
                        "its DLPack capsule is named {:?}, not \"dltensor\": consumed already?",
                        String::from_utf8_lossy(other)
                    ),
                ));
            }
        };
        let (facts, read_only) = match &managed {
            Managed::Legacy(t) => (Facts::of(t), false),
            Managed::Versioned(t) => (Facts::of(t), t.read_only()),
        };
        if facts.kind != 1 && facts.kind != 2 && facts.kind != 3 {
            return Err(not_host(obj, &device_name(facts.kind, facts.index)));
        }
        if !facts.contiguous {
            return Err(invalid(
                "obj",
                &name,
                "it is not contiguous (a slice with a step, a transposed view): a NIC moves \
                 one run of bytes; register tensor.contiguous() or a copy",
            ));
        }
        let len = facts.len;
        let ptr = match NonNull::new(facts.first) {
            Some(p) if len > 0 => p,
            _ => {
                return Err(invalid(
                    "obj",
                    &name,
                    "it is empty: there is nothing to register",
                ));
            }
        };
        if facts.kind == 2 {
            if read_only {
                return Err(invalid(
                    "obj",
                    &name,
                    "its DLPack tensor is read-only: read-only CUDA memory is not lent (a peer \
                     could READ into it); register a writable tensor",
                ));
            }
            return Ok(Lending::Cuda(crate::cuda::Lent {
                addr: ptr.as_ptr() as u64,
                len: len as u64,
                keeper: crate::cuda::Keeper::new(
                    Some(obj.clone().unbind()),
                    Some(Box::new(managed)),
                ),
            }));
        }
        Ok(Lending::Host(Held::new(Box::new(Tensor {
            managed: Some(managed),
            _producer: obj.clone().unbind(),
            ptr,
            len,
            read_only,
        }))))
    }
}

/// What a consumed DLPack tensor says of its memory.
struct Facts {
    kind: i64,
    index: i64,
    contiguous: bool,
    first: *mut u8,
    len: usize,
}

impl Facts {
    fn of<T: TensorView>(t: &T) -> Facts {
        let dev = t.device();
        Facts {
            kind: dev.device_type as i64,
            index: dev.device_id as i64,
            contiguous: t.memory_order().is_contiguous(),
            // DLPack's `data + byte_offset` is the first element, inside the producer's
            // allocation (the producer's contract); only the address is computed here.
            first: t.data_ptr().cast::<u8>().wrapping_add(t.byte_offset()),
            len: t.num_bytes(),
        }
    }
}

// SAFETY: `ptr`/`len` are the tensor's bytes, which its producer keeps valid and in place until
// the managed tensor's deleter runs (in `Drop`, the last use); they never change.
unsafe impl dmaplane::Lent for Tensor {
    fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
}

impl Drop for Tensor {
    fn drop(&mut self) {
        let managed = self.managed.take();
        // The producer's deleter may touch Python objects: run it with the GIL.
        Python::attach(|_py| drop(managed));
    }
}

fn not_host(obj: &Bound<'_, PyAny>, device: &str) -> PyErr {
    invalid(
        "obj",
        type_name(obj),
        &format!(
            "its memory is on {device}: dmaplane lends host memory and CUDA memory \
             (register a CPU or CUDA tensor or array)"
        ),
    )
}

fn device_name(kind: i64, index: i64) -> String {
    let k = match kind {
        2 => "cuda",
        4 => "opencl",
        7 => "vulkan",
        8 => "metal",
        10 => "rocm",
        13 => "cuda-managed",
        14 => "oneapi",
        _ => "device",
    };
    format!("{k}:{index} (DLPack device type {kind})")
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map_or_else(|_| "object".into(), |n| n.to_string())
}

use pyo3::types::IntoPyDict;
