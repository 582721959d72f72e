//! A Python object's memory lent to the agent through the buffer protocol: the object's buffer
//! export is held (`PyObject_GetBuffer`) for as long as the agent may reach the bytes, so the
//! object can be neither freed nor resized under a NIC — a NumPy array, a `bytearray`, a
//! `memoryview`, anything that exports a contiguous buffer. The export is released
//! (`PyBuffer_Release`) only when the agent drops the memory: after its free, which revokes
//! every importer first.
//!
//! The buffer API is part of the stable ABI from Python 3.11; on 3.9 and 3.10 the functions and
//! the `Py_buffer` layout are the same (unchanged since Python 3.3), so they are declared here
//! rather than taken from `pyo3::ffi`, which hides them under `abi3` before 3.11.

use std::ffi::{c_char, c_int, c_void};
use std::ptr::NonNull;

use pyo3::ffi;
use pyo3::prelude::*;

/// `Py_buffer`, as CPython lays it out (`Include/pybuffer.h`).
#[repr(C)]
struct RawBuffer {
    buf: *mut c_void,
    obj: *mut ffi::PyObject,
    len: isize,
    itemsize: isize,
    readonly: c_int,
    ndim: c_int,
    format: *mut c_char,
    shape: *mut isize,
    strides: *mut isize,
    suboffsets: *mut isize,
    internal: *mut c_void,
}

/// `PyBUF_STRIDES | PyBUF_FORMAT`, read-only allowed: the layout, to check contiguity here
/// and say why a buffer is refused.
const PYBUF_RECORDS_RO: c_int = 0x0010 | 0x0008 | 0x0004;

unsafe extern "C" {
    fn PyObject_GetBuffer(obj: *mut ffi::PyObject, view: *mut RawBuffer, flags: c_int) -> c_int;
    fn PyBuffer_Release(view: *mut RawBuffer);
}

/// A held buffer export: the bytes of one Python object, lent until this is dropped.
pub(crate) struct Exported {
    view: Box<RawBuffer>,
    len: usize,
    read_only: bool,
    ptr: NonNull<u8>,
}

// SAFETY: the view is only read (its fields never change after `PyObject_GetBuffer`) and is
// released under the GIL in `Drop`; the bytes it points to are touched only by the fabric's
// atomic copies and the NICs ([`dmaplane::Lent`]'s contract).
unsafe impl Send for Exported {}
// SAFETY: as above: no method hands out references into the bytes.
unsafe impl Sync for Exported {}

impl Exported {
    /// Hold `obj`'s buffer: refused, saying why and what to do, when it exports none, is not
    /// C-contiguous, or is empty.
    pub(crate) fn new(obj: &Bound<'_, PyAny>) -> PyResult<Exported> {
        Exported::get(obj)?.map_err(|why| {
            crate::errors::invalid(
                "obj",
                type_name(obj),
                &format!(
                    "it exports no buffer ({why}): register a NumPy array, a bytearray, a \
                     memoryview, a DLPack tensor or another buffer-protocol object"
                ),
            )
        })
    }

    /// As [`Exported::new`], with `Ok(Err(why))` when `obj` exports no buffer at all (so
    /// another protocol may be tried); a buffer that is refused is an `Err`.
    pub(crate) fn get(obj: &Bound<'_, PyAny>) -> PyResult<Result<Exported, String>> {
        let mut view = Box::new(RawBuffer {
            buf: std::ptr::null_mut(),
            obj: std::ptr::null_mut(),
            len: 0,
            itemsize: 0,
            readonly: 0,
            ndim: 0,
            format: std::ptr::null_mut(),
            shape: std::ptr::null_mut(),
            strides: std::ptr::null_mut(),
            suboffsets: std::ptr::null_mut(),
            internal: std::ptr::null_mut(),
        });
        // SAFETY: `obj` is a live object (the GIL is held: `Bound`), `view` a writable
        // `Py_buffer` that outlives the call; on failure nothing is held and an exception set.
        let rc = unsafe { PyObject_GetBuffer(obj.as_ptr(), &mut *view, PYBUF_RECORDS_RO) };
        if rc != 0 {
            let why = PyErr::take(obj.py()).map_or_else(String::new, |e| e.to_string());
            return Ok(Err(why));
        }
        // From here on `Drop` releases the export, whatever is refused below.
        let held = Exported {
            len: usize::try_from(view.len).unwrap_or(0),
            read_only: view.readonly != 0,
            ptr: NonNull::new(view.buf.cast::<u8>()).unwrap_or(NonNull::dangling()),
            view,
        };
        if !held.contiguous() {
            return Err(crate::errors::invalid(
                "obj",
                type_name(obj),
                "it is not C-contiguous (a slice with a step, a transposed array): a NIC \
                 moves one run of bytes; register numpy.ascontiguousarray(x) or a copy",
            ));
        }
        if held.len == 0 || held.view.buf.is_null() {
            return Err(crate::errors::invalid(
                "obj",
                type_name(obj),
                "it is empty: there is nothing to register",
            ));
        }
        Ok(Ok(held))
    }

    /// Whether the bytes are one C-ordered run: no suboffsets, and strides (when given) those
    /// of a C-contiguous array of this shape.
    fn contiguous(&self) -> bool {
        let v = &self.view;
        if !v.suboffsets.is_null() {
            return false;
        }
        if v.strides.is_null() || v.shape.is_null() || v.ndim <= 1 && v.strides.is_null() {
            return true;
        }
        let n = usize::try_from(v.ndim).unwrap_or(0);
        // SAFETY: a successful export with PyBUF_STRIDES gives `ndim` shapes and strides, valid
        // until the export is released (which is after `self`).
        let (shape, strides) = unsafe {
            (
                std::slice::from_raw_parts(v.shape, n),
                std::slice::from_raw_parts(v.strides, n),
            )
        };
        let mut expect = v.itemsize;
        for (dim, stride) in shape.iter().zip(strides).rev() {
            if *dim > 1 && *stride != expect {
                return false;
            }
            expect = expect.saturating_mul(*dim);
        }
        true
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map_or_else(|_| "object".into(), |n| n.to_string())
}

// SAFETY: `ptr`/`len` are the export's buffer, which the exporter keeps valid and in place
// (a bytearray refuses to resize, an array to free) until `PyBuffer_Release` in `Drop`; they
// never change; `Drop` takes the GIL, so it is sound on any thread.
unsafe impl dmaplane::Lent for Exported {
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

impl Drop for Exported {
    fn drop(&mut self) {
        Python::attach(|_py| {
            // SAFETY: the view was filled by a successful `PyObject_GetBuffer` and is released
            // exactly once, here, with the GIL held.
            unsafe { PyBuffer_Release(&mut *self.view) };
        });
    }
}
