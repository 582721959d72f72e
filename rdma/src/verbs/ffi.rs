//! The thin layer over the C library: is libibverbs there at all, and errno spelled for humans.
//!
//! sideway links `rdma-mummy-sys`, whose C shim `dlopen`s `libibverbs.so.1` from a constructor
//! when the program starts and leaves every entry point answering `EOPNOTSUPP` when that failed.
//! So "library missing" never crashes anything, but it would read as "operation not supported";
//! [`check_library`] tells the two apart before the first verbs call.

use std::ffi::{CStr, CString};
use std::io;
use std::sync::OnceLock;

use crate::error::{RdmaError, Result};

/// The soname the shim loads.
pub(crate) const LIBIBVERBS: &str = "libibverbs.so.1";

/// What a person should install when the library is missing.
pub(crate) const INSTALL_HINT: &str = "install libibverbs1 and ibverbs-providers";

/// `Ok` when libibverbs was loaded into this process; otherwise the reason, once per process.
pub(crate) fn check_library() -> Result<()> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| probe_library(LIBIBVERBS))
        .clone()
        .map_err(|why| RdmaError::NoDevice { why })
}

/// `Ok` when libibverbs was loaded into this process; otherwise why not and what to install.
/// Every other entry point folds this into [`RdmaError::NoDevice`]; `dmaplane doctor` needs to
/// tell "library not installed" from "no device".
pub fn library_status() -> std::result::Result<(), String> {
    check_library().map_err(|e| match e {
        RdmaError::NoDevice { why } => why,
        other => other.to_string(),
    })
}

fn probe_library(soname: &str) -> Result<(), String> {
    let name = CString::new(soname).map_err(|e| e.to_string())?;
    // SAFETY: `name` is a valid NUL-terminated string; RTLD_NOLOAD only looks the library up
    // among those already loaded (by the shim's constructor) and takes a reference we drop below.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
    if !handle.is_null() {
        // SAFETY: `handle` came from the dlopen above and is closed exactly once.
        unsafe { libc::dlclose(handle) };
        return Ok(());
    }
    // Not loaded: ask the dynamic loader why, for the message. Whatever it says, the shim's
    // function pointers stay unset, so the library counts as missing even if this load works.
    // SAFETY: as above; a successful handle is closed at once.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
    let detail = if handle.is_null() {
        dl_error().unwrap_or_else(|| "dlopen failed".into())
    } else {
        // SAFETY: `handle` came from the dlopen above and is closed exactly once.
        unsafe { libc::dlclose(handle) };
        "it was not loadable when the program started".into()
    };
    Err(format!("{soname} not found: {INSTALL_HINT} ({detail})"))
}

fn dl_error() -> Option<String> {
    // SAFETY: dlerror returns NULL or a NUL-terminated string owned by the loader, valid until
    // the next dl* call on this thread; it is copied at once.
    let msg = unsafe { libc::dlerror() };
    if msg.is_null() {
        return None;
    }
    // SAFETY: non-null, NUL-terminated (see above).
    Some(
        unsafe { CStr::from_ptr(msg) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// Whether libibverbs exports `symbol` (e.g. `ibv_reg_dmabuf_mr` needs rdma-core ≥ 34).
pub(crate) fn has_symbol(symbol: &str) -> bool {
    let (Ok(name), Ok(sym)) = (CString::new(LIBIBVERBS), CString::new(symbol)) else {
        return false;
    };
    // SAFETY: valid C strings; RTLD_NOLOAD takes a reference only when already loaded.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
    if handle.is_null() {
        return false;
    }
    // SAFETY: `handle` is a live handle from dlopen; the symbol address is only compared.
    let found = !unsafe { libc::dlsym(handle, sym.as_ptr()) }.is_null();
    // SAFETY: `handle` came from the dlopen above and is closed exactly once.
    unsafe { libc::dlclose(handle) };
    found
}

/// The last OS error number (after a verbs call that returned NULL or -1).
pub(crate) fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Verbs calls return errno values, positive (the convention) or negative (some providers).
pub(crate) fn ret_errno(ret: i32) -> i32 {
    ret.checked_abs().unwrap_or(i32::MAX)
}

/// `EINVAL (22): Invalid argument`.
pub(crate) fn errno_text(errno: i32) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    let text = text
        .split(" (os error")
        .next()
        .map(str::to_string)
        .unwrap_or(text);
    format!("{} ({errno}): {text}", errno_name(errno))
}

/// The symbolic name of an errno value.
pub(crate) fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::E2BIG => "E2BIG",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENFILE => "ENFILE",
        libc::EMFILE => "EMFILE",
        libc::ENOSPC => "ENOSPC",
        libc::ERANGE => "ERANGE",
        libc::ENOSYS => "ENOSYS",
        libc::ENODATA => "ENODATA",
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        _ => "errno",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_is_spelled() {
        assert_eq!(
            errno_text(libc::EOPNOTSUPP),
            format!("EOPNOTSUPP ({}): Operation not supported", libc::EOPNOTSUPP)
        );
        assert!(errno_text(libc::EINVAL).starts_with("EINVAL (22): "));
        assert_eq!(ret_errno(-22), 22);
        assert_eq!(ret_errno(22), 22);
    }

    #[test]
    fn a_missing_library_is_named_with_what_to_install() {
        let why = probe_library("libibverbs-dmaplane-missing.so.1").unwrap_err();
        assert!(
            why.starts_with("libibverbs-dmaplane-missing.so.1 not found: install libibverbs1"),
            "{why}"
        );
        assert!(why.contains("cannot open shared object file"), "{why}");
    }

    #[test]
    fn library_probe_never_panics() {
        // On a machine without rdma-core this is the "not found" message; with it, Ok.
        match check_library() {
            Ok(()) => {
                assert!(has_symbol("ibv_get_device_list"));
                assert_eq!(library_status(), Ok(()));
            }
            Err(RdmaError::NoDevice { why }) => {
                assert!(why.contains("libibverbs.so.1 not found"), "{why}");
                assert!(why.contains(INSTALL_HINT), "{why}");
                assert!(!has_symbol("ibv_get_device_list"));
                assert_eq!(library_status(), Err(why));
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
}
