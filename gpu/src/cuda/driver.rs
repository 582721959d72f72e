//! The CUDA driver library: finding it (once per process), checking the symbols this backend
//! calls, `cuInit`, and the few driver calls cudarc's checked `result` layer lacks.
//!
//! cudarc panics when the library is missing (on the first call of any driver function) and when
//! a symbol is missing (on the first call of that function). So [`driver`] looks for the library
//! with cudarc's own search (`is_culib_present`), then looks up every symbol the backend uses
//! before anything calls one, and every entry point goes through [`ready`]: without the library,
//! or with a driver too old for a required symbol, the answer is
//! [`GpuError::CudaUnavailable`] with a one-line reason.

use std::ffi::{c_char, c_int, c_void};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::OnceLock;

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;

use crate::error::{GpuError, Result};

/// Every driver symbol this backend calls through cudarc (the names cudarc loads), except
/// [`DMABUF_SYMBOL`], which is optional.
const REQUIRED: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuGetErrorName",
    "cuGetErrorString",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceGetPCIBusId",
    "cuDeviceTotalMem_v2",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxPushCurrent_v2",
    "cuCtxPopCurrent_v2",
    "cuPointerSetAttribute",
    "cuPointerGetAttribute",
    "cuMemGetAddressRange_v2",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemGetInfo_v2",
    "cuMemcpy",
    "cuMemcpyHtoD_v2",
    "cuMemcpyDtoH_v2",
    "cuMemHostRegister_v2",
    "cuMemHostUnregister",
    "cuStreamSynchronize",
];

/// dma-buf export of device memory: CUDA 11.7 and later.
pub(super) const DMABUF_SYMBOL: &str = "cuMemGetHandleForAddressRange";

/// The first driver version with `cuMemGetHandleForAddressRange`.
pub(super) const DMABUF_MIN_VERSION: i32 = 11070;

/// What loading the driver found.
#[derive(Debug, Clone)]
pub(super) enum Library {
    /// No candidate name could be loaded.
    Missing {
        searched: Vec<String>,
    },
    /// Loaded, but without symbols the backend calls.
    Incomplete {
        path: Option<String>,
        missing: Vec<&'static str>,
    },
    Loaded {
        path: Option<String>,
    },
}

/// The process-wide driver state.
#[derive(Debug, Clone)]
pub(super) struct Driver {
    pub(super) library: Library,
    /// `cuInit(0)`: `None` when not attempted (no usable library).
    pub(super) init: Option<Result<(), String>>,
    /// `cuDriverGetVersion`, e.g. 12080.
    pub(super) version: Option<i32>,
    /// Whether [`DMABUF_SYMBOL`] is exported.
    pub(super) dmabuf_symbol: bool,
}

impl Driver {
    /// Why the driver cannot be used, in one line; `None` when it can.
    pub(super) fn unavailable(&self) -> Option<String> {
        match &self.library {
            Library::Missing { searched } => {
                // cudarc also tries the Windows name, nvcuda, with the same variants: say so
                // rather than doubling the line.
                let (cuda, nvcuda): (Vec<&str>, Vec<&str>) = searched
                    .iter()
                    .map(String::as_str)
                    .partition(|n| !n.contains("nvcuda"));
                let also = if nvcuda.is_empty() {
                    ""
                } else {
                    ", and the same names for nvcuda"
                };
                return Some(format!(
                    "libcuda not found (searched: {}{also}); install the NVIDIA driver or add the \
                     directory of libcuda.so.1 to LD_LIBRARY_PATH",
                    cuda.join(", ")
                ));
            }
            Library::Incomplete { path, missing } => {
                return Some(format!(
                    "{} lacks {}: the driver is older than this backend needs",
                    path.as_deref().unwrap_or("libcuda"),
                    missing.join(", ")
                ));
            }
            Library::Loaded { .. } => {}
        }
        match &self.init {
            Some(Err(why)) => Some(format!("cuInit failed: {why}")),
            Some(Ok(())) => None,
            None => Some("cuInit was not called".into()),
        }
    }

    pub(super) fn path(&self) -> Option<&str> {
        match &self.library {
            Library::Loaded { path } | Library::Incomplete { path, .. } => path.as_deref(),
            Library::Missing { .. } => None,
        }
    }
}

/// The driver, found and initialised on first use.
pub(super) fn driver() -> &'static Driver {
    static DRIVER: OnceLock<Driver> = OnceLock::new();
    DRIVER.get_or_init(load)
}

/// The driver version when the driver is usable, else [`GpuError::CudaUnavailable`].
pub(super) fn ready() -> Result<i32> {
    let d = driver();
    match d.unavailable() {
        Some(why) => Err(GpuError::CudaUnavailable { why }),
        None => Ok(d.version.unwrap_or(0)),
    }
}

fn load() -> Driver {
    // SAFETY: dlopen of the CUDA driver library under cudarc's candidate names (and dlclose of
    // it again); its initialisers are safe to run at any time, and this is the library this
    // backend exists to load.
    if !unsafe { sys::is_culib_present() } {
        let searched = candidates();
        tracing::debug!(?searched, "libcuda not found");
        return Driver {
            library: Library::Missing { searched },
            init: None,
            version: None,
            dmabuf_symbol: false,
        };
    }
    let missing: Vec<&'static str> = REQUIRED
        .iter()
        .copied()
        .filter(|s| !has_symbol(s))
        .collect();
    let dmabuf_symbol = has_symbol(DMABUF_SYMBOL);
    let path = loaded_path();
    if !missing.is_empty() {
        tracing::warn!(?path, ?missing, "libcuda lacks symbols this backend calls");
        return Driver {
            library: Library::Incomplete { path, missing },
            init: None,
            version: None,
            dmabuf_symbol,
        };
    }
    let version = driver_version().ok();
    let init = init();
    tracing::debug!(?path, ?version, ?init, dmabuf_symbol, "CUDA driver loaded");
    Driver {
        library: Library::Loaded { path },
        init: Some(init),
        version,
        dmabuf_symbol,
    }
}

/// `cuInit(0)`, called through its C signature rather than cudarc's: the first call is where a
/// driver newer than the bindings answers with a code the bindings' enum lacks (as 13.x's
/// `CUDA_ERROR_FABRIC_NOT_READY`), and an unknown value in a Rust enum is undefined behaviour.
/// The error names the code as the driver does.
fn init() -> std::result::Result<(), String> {
    type Init = unsafe extern "C" fn(u32) -> u32;
    type Name = unsafe extern "C" fn(u32, *mut *const c_char) -> u32;
    // SAFETY: only called after `is_culib_present` and the REQUIRED check found both symbols;
    // these are their C signatures (CUresult is a 32-bit C enum).
    let (init, name, string) = unsafe {
        let lib = sys::culib();
        match (
            lib.get::<Init>(b"cuInit"),
            lib.get::<Name>(b"cuGetErrorName"),
            lib.get::<Name>(b"cuGetErrorString"),
        ) {
            (Ok(i), Ok(n), Ok(s)) => (*i, *n, *s),
            _ => return Err("libcuda lacks cuInit or cuGetErrorName".into()),
        }
    };
    // SAFETY: cuInit takes flags 0 and may be called any number of times.
    let code = unsafe { init(0) };
    if code == 0 {
        return Ok(());
    }
    let text = |f: Name| {
        let mut p: *const c_char = std::ptr::null();
        // SAFETY: the driver stores a pointer to a static NUL-terminated string, or fails.
        if unsafe { f(code, &mut p) } != 0 || p.is_null() {
            return None;
        }
        // SAFETY: non-null and NUL-terminated, per the driver's contract; static storage.
        Some(
            unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned(),
        )
    };
    let mut why = match (text(name), text(string)) {
        (Some(n), Some(s)) => format!("{n} ({s})"),
        (Some(n), None) => n,
        _ => format!("CUresult {code}"),
    };
    if code == sys::CUresult::CUDA_ERROR_STUB_LIBRARY as u32 {
        why.push_str(&format!(
            "; {} is the CUDA toolkit's link-time stub, not the driver: take its directory \
             (.../stubs) out of LD_LIBRARY_PATH",
            loaded_path().as_deref().unwrap_or("the libcuda loaded")
        ));
    }
    Err(why)
}

/// The names cudarc tries, in its order, without repeats.
fn candidates() -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for lib in ["cuda", "nvcuda"] {
        for n in cudarc::get_lib_name_candidates(lib) {
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    names
}

/// Whether the loaded driver exports `name`.
fn has_symbol(name: &str) -> bool {
    // SAFETY: only called after `is_culib_present` found the library, so `culib` loads it rather
    // than panicking. The lookup is a dlsym: nothing in the library runs, and the symbol is only
    // tested for presence, never called through the type given here.
    unsafe {
        sys::culib()
            .get::<unsafe extern "C" fn()>(name.as_bytes())
            .is_ok()
    }
}

/// Where the driver library was mapped from, as `/proc/self/maps` says.
fn loaded_path() -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            p.rsplit('/')
                .next()
                .is_some_and(|f| f.starts_with("libcuda.so") || f.starts_with("libnvcuda"))
        })
        .map(str::to_string)
}

/// A driver error as its name and the driver's description:
/// `CUDA_ERROR_NOT_SUPPORTED (operation not supported)`.
pub(super) fn describe(e: DriverError) -> String {
    let name = format!("{:?}", e.0);
    match e.error_string() {
        Ok(s) => format!("{name} ({})", s.to_string_lossy()),
        Err(_) => name,
    }
}

/// A driver version as `major.minor` ("12.8" for 12080).
pub(super) fn version_string(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// `cuDriverGetVersion` (callable before `cuInit`).
fn driver_version() -> Result<i32, DriverError> {
    let mut v: c_int = 0;
    // SAFETY: the driver writes one int through a pointer to a live local.
    unsafe { sys::cuDriverGetVersion(&mut v) }.result()?;
    Ok(v)
}

/// A NUL-terminated string the driver wrote into `buf` (lossy UTF-8, all of `buf` if no NUL).
fn c_string(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// `cuDeviceGetName`.
pub(super) fn device_name(dev: sys::CUdevice) -> Result<String, DriverError> {
    let mut buf = [0u8; 256];
    // SAFETY: the driver writes at most `buf.len()` bytes (NUL included) into `buf`; an invalid
    // device is an error, not undefined behaviour.
    unsafe { sys::cuDeviceGetName(buf.as_mut_ptr().cast::<c_char>(), buf.len() as c_int, dev) }
        .result()?;
    Ok(c_string(&buf))
}

/// `cuDeviceGetPCIBusId`: `dddd:bb:dd.f` as the driver spells it (upper case, sometimes an
/// 8-digit domain).
pub(super) fn pci_bus_id(dev: sys::CUdevice) -> Result<String, DriverError> {
    let mut buf = [0u8; 64];
    // SAFETY: as in `device_name`: at most `buf.len()` bytes into `buf`.
    unsafe { sys::cuDeviceGetPCIBusId(buf.as_mut_ptr().cast::<c_char>(), buf.len() as c_int, dev) }
        .result()?;
    Ok(c_string(&buf))
}

/// `cuMemGetHandleForAddressRange(.., CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, flags)`: a new
/// dma-buf fd for `[dptr, dptr + size)` of device memory in the current context. Only call when
/// [`Driver::dmabuf_symbol`] is true (cudarc panics on a missing symbol).
pub(super) fn dmabuf_fd(dptr: u64, size: usize, flags: u64) -> Result<OwnedFd, DriverError> {
    let mut fd: c_int = -1;
    // SAFETY: the driver writes one int (the fd) through a pointer to a live local; it validates
    // the range against its allocations and fails on anything that is not device memory of the
    // current context.
    unsafe {
        sys::cuMemGetHandleForAddressRange(
            (&mut fd as *mut c_int).cast::<c_void>(),
            dptr,
            size,
            sys::CUmemRangeHandleType::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
            flags,
        )
    }
    .result()?;
    if fd < 0 {
        // A success without an fd: report it as the driver's "invalid handle".
        return Err(DriverError(sys::CUresult::CUDA_ERROR_INVALID_HANDLE));
    }
    // SAFETY: on success the driver returns a new open file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `cuCtxPushCurrent(ctx)`: make `ctx` current on this thread, above what was.
///
/// # Safety
/// `ctx` must be a live context (a retained primary context).
pub(super) unsafe fn ctx_push(ctx: sys::CUcontext) -> Result<(), DriverError> {
    // SAFETY: the caller guarantees `ctx` is live.
    unsafe { sys::cuCtxPushCurrent_v2(ctx) }.result()
}

/// `cuCtxPopCurrent`: back to the context that was current before the matching push.
pub(super) fn ctx_pop() -> Result<(), DriverError> {
    let mut popped: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: the driver writes one handle through a pointer to a live local; with nothing
    // pushed it fails rather than misbehaves.
    unsafe { sys::cuCtxPopCurrent_v2(&mut popped) }.result()
}

/// `cuMemGetAddressRange`: the allocation (base, bytes) holding device address `dptr`.
pub(super) fn address_range(dptr: u64) -> Result<(u64, usize), DriverError> {
    let (mut base, mut size): (sys::CUdeviceptr, usize) = (0, 0);
    // SAFETY: the driver writes one address and one size through pointers to live locals; it
    // fails on an address that is not in any allocation.
    unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, dptr) }.result()?;
    Ok((base, size))
}

/// The ordinal of the device whose memory `dptr` is, or `None` when it is not device memory
/// (`cuPointerGetAttribute`: `CU_POINTER_ATTRIBUTE_MEMORY_TYPE`, then `DEVICE_ORDINAL`).
pub(super) fn pointer_device(dptr: u64) -> Result<Option<i32>, DriverError> {
    let mut kind: u32 = 0;
    // SAFETY: the attribute is an unsigned int written through a pointer to a live local; the
    // driver fails on an address it does not know.
    unsafe {
        sys::cuPointerGetAttribute(
            (&mut kind as *mut u32).cast::<c_void>(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            dptr,
        )
    }
    .result()?;
    if kind != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 {
        return Ok(None);
    }
    let mut ordinal: c_int = -1;
    // SAFETY: as above; the ordinal is an int.
    unsafe {
        sys::cuPointerGetAttribute(
            (&mut ordinal as *mut c_int).cast::<c_void>(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            dptr,
        )
    }
    .result()?;
    Ok(Some(ordinal))
}

/// `cuPointerSetAttribute(1, CU_POINTER_ATTRIBUTE_SYNC_MEMOPS, dptr)`: every synchronous memory
/// operation on the allocation completes before it returns, which a NIC reading or writing it
/// through a dma-buf relies on (as GPUDirect RDMA's guidance asks). Needs a current context.
pub(super) fn set_sync_memops(dptr: u64) -> Result<(), DriverError> {
    let one: u32 = 1;
    // SAFETY: the attribute takes a pointer to an unsigned int, read during the call; the driver
    // fails on a pointer that is not device memory of the current context.
    unsafe {
        sys::cuPointerSetAttribute(
            (&one as *const u32).cast::<c_void>(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_SYNC_MEMOPS,
            dptr,
        )
    }
    .result()
}

/// `cuMemHostRegister(addr, len, flags)`: pin (or, with IOMEMORY, map) a range of this process's
/// address space for the copy engine. Needs a current context.
pub(super) fn host_register(addr: u64, len: usize, flags: u32) -> Result<(), DriverError> {
    // SAFETY: registration pins or maps the pages behind the range and touches no byte of it;
    // the driver checks that the range is mapped and fails otherwise. Copies into it are the
    // callers' (`memcpy`) concern.
    unsafe {
        sys::cuMemHostRegister_v2(
            std::ptr::with_exposed_provenance_mut::<c_void>(addr as usize),
            len,
            flags,
        )
    }
    .result()
}

/// `cuMemHostUnregister(addr)` of a range this process registered. Needs a current context.
pub(super) fn host_unregister(addr: u64) -> Result<(), DriverError> {
    // SAFETY: unpins a registration by its start address; the driver fails on an address that
    // starts no registration.
    unsafe {
        sys::cuMemHostUnregister(std::ptr::with_exposed_provenance_mut::<c_void>(
            addr as usize,
        ))
    }
    .result()
}

/// `cuMemcpy(dst, src, len)` under unified addressing, then a wait for the legacy stream it runs
/// on, so the copy has finished when this returns (device-to-device `cuMemcpy` alone may return
/// before it has).
///
/// # Safety
/// `[src, src + len)` and `[dst, dst + len)` must each lie in live device memory of the current
/// context or in host memory of this process that stays mapped during the call, and no Rust
/// reference may alias the destination bytes.
pub(super) unsafe fn memcpy(dst: u64, src: u64, len: usize) -> Result<(), DriverError> {
    // SAFETY: the caller guarantees both ranges are live and that no reference aliases `dst`.
    unsafe { sys::cuMemcpy(dst, src, len) }.result()?;
    sync()
}

/// Wait for everything queued on the legacy default stream (where the synchronous copies run)
/// in the current context.
pub(super) fn sync() -> Result<(), DriverError> {
    // SAFETY: the null stream is the context's legacy default stream, always valid while a
    // context is current (and an error, not undefined behaviour, when none is).
    unsafe { result::stream::synchronize(result::stream::null()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_read_as_major_minor() {
        assert_eq!(version_string(12080), "12.8");
        assert_eq!(version_string(11070), "11.7");
        assert_eq!(version_string(13000), "13.0");
    }

    #[test]
    fn c_strings_stop_at_the_nul() {
        assert_eq!(c_string(b"NVIDIA H100\0junk"), "NVIDIA H100");
        assert_eq!(c_string(b"no nul"), "no nul");
        assert_eq!(c_string(b"\0"), "");
    }

    #[test]
    fn candidates_are_cudarcs_without_repeats() {
        let c = candidates();
        assert!(c.iter().any(|n| n == "libcuda.so"), "{c:?}");
        assert!(c.iter().any(|n| n == "libcuda.so.1"), "{c:?}");
        let mut d = c.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), c.len(), "{c:?}");
    }

    #[test]
    fn a_missing_library_is_one_line_naming_the_names() {
        let d = Driver {
            library: Library::Missing {
                searched: candidates(),
            },
            init: None,
            version: None,
            dmabuf_symbol: false,
        };
        let why = d.unavailable().unwrap_or_default();
        assert!(
            why.starts_with("libcuda not found (searched: libcuda.so, "),
            "{why}"
        );
        assert!(
            why.contains("libcuda.so.1, and the same names for nvcuda)"),
            "{why}"
        );
        assert!(!why.contains("libnvcuda"), "{why}");
        assert!(!why.contains('\n'), "{why}");
        let d = Driver {
            library: Library::Incomplete {
                path: Some("/usr/lib/libcuda.so.1".into()),
                missing: vec!["cuMemcpy"],
            },
            ..d
        };
        assert_eq!(
            d.unavailable().as_deref(),
            Some(
                "/usr/lib/libcuda.so.1 lacks cuMemcpy: the driver is older than this backend needs"
            )
        );
    }
}
