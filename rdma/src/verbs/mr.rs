//! Memory regions: `ibv_reg_mr` for process-VA lists, `ibv_reg_dmabuf_mr` for dma-buf lists.
//!
//! A verbs MR maps ONE contiguous range (of virtual addresses, or of offsets into a dma-buf), so
//! a list of several ranges is refused by name; the layer above registers each range on its own
//! or bounces.
//!
//! # `zap` and key reuse
//!
//! [`MrBackend::zap`] deregisters the MR (`ibv_dereg_mr`): the kernel waits for the NIC to stop
//! using the translation, unpins the pages (which is what lets the exporter free or move them)
//! and invalidates both keys; from then on, local use of the lkey fails with a protection error
//! and remote use of the rkey with `REM_ACCESS_ERR`. The object itself stays, keeps reporting
//! the keys it had, and later zaps do nothing.
//!
//! Deregistering gives the key's index back to the provider, which may hand it to a later
//! registration while this object still lives. That is acceptable here because:
//! - zap runs only after the quiesce protocol stopped and drained (or flushed) every QP that
//!   used the region, and the safe layer above refuses any new work request naming a revoked
//!   key, so this process never issues one;
//! - a remote peer still holding the old rkey hits a fresh key: providers rotate the low 8 bits
//!   ("key" / variant byte) of the rkey on every registration (rxe draws it at random, mlx5
//!   increments it), so the stale rkey faults with a remote access error rather than reaching the
//!   new region unless index and variant both collide;
//! - keeping the registration alive instead (for example re-registering it into a dead PD) would
//!   keep the pages pinned after a revoke, which is exactly what revoke must not do.

use std::fmt;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

use dmaplane_core::AddrSpace;
use dmaplane_core::pgsz::num_blocks;
use rdma_mummy_sys as sys;
use sideway::ibverbs::protection_domain::ProtectionDomain;

use crate::access::MrAccess;
use crate::backend::{MrBackend, MrKeys, MrRequest, Translation};
use crate::error::{RdmaError, Result};

use super::device::DevInner;
use super::ffi;
use super::pd::VerbsPd;

/// The translation granule the backend reports: the CPU page (the NIC's real choice is the
/// kernel's and not visible from user space).
pub const PAGE_SIZE: u64 = 4096;

/// `IBV_ACCESS_*` for an [`MrAccess`].
pub(crate) fn ibv_access(a: MrAccess) -> u32 {
    let mut bits = 0;
    if a.contains(MrAccess::LOCAL_WRITE) {
        bits |= sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
    }
    if a.contains(MrAccess::REMOTE_WRITE) {
        bits |= sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
    }
    if a.contains(MrAccess::REMOTE_READ) {
        bits |= sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
    }
    bits
}

/// The registered `struct ibv_mr`.
struct RawMr(NonNull<sys::ibv_mr>);

// SAFETY: an ibv_mr may be used and deregistered from any thread (libibverbs objects are not
// tied to the creating thread); this handle is only touched under the MR's mutex.
unsafe impl Send for RawMr {}

enum MrState {
    Registered(RawMr),
    Zapped,
}

/// One registration.
pub struct VerbsMr {
    dev: Arc<DevInner>,
    state: Mutex<MrState>,
    keys: MrKeys,
    translation: Translation,
    /// `ibv_reg_mr` or `ibv_reg_dmabuf_mr`.
    op: &'static str,
    /// Keeps the PD allocated while the MR is (the MR is deregistered in `Drop` first).
    _pd: Arc<ProtectionDomain>,
}

fn invalid(field: &'static str, value: impl fmt::Display, why: impl Into<String>) -> RdmaError {
    RdmaError::InvalidRegistration {
        field,
        value: value.to_string(),
        why: why.into(),
    }
}

impl VerbsMr {
    pub(crate) fn register(pd: &VerbsPd, req: &MrRequest<'_>) -> Result<VerbsMr> {
        let dev = &pd.dev;
        req.access
            .validate()
            .map_err(|why| invalid("access", req.access, why))?;
        let list = req.list;
        let ranges = list.ranges();
        let [range] = ranges else {
            return Err(invalid(
                "list.ranges",
                format_args!("{} ranges", ranges.len()),
                "a verbs MR maps one contiguous range (of virtual addresses or dma-buf offsets); \
                 register each range on its own",
            ));
        };
        let len = range.len;
        if len > dev.limits.max_mr_size {
            return Err(invalid(
                "list",
                format_args!("{len:#x} bytes"),
                format!(
                    "larger than {}'s max_mr_size {:#x}",
                    dev.name, dev.limits.max_mr_size
                ),
            ));
        }
        let length = usize::try_from(len)
            .map_err(|_| invalid("list", format_args!("{len:#x} bytes"), "exceeds usize"))?;
        let access = ibv_access(req.access) as i32;
        // SAFETY: only the pointer is taken; `pd.pd` keeps the PD alive across the calls below.
        let raw_pd = unsafe { pd.pd.pd() }.as_ptr();
        let (mr, op, context) = match list.space() {
            AddrSpace::ProcessVa => {
                if req.dmabuf_fd.is_some() {
                    tracing::debug!("process-va registration ignores the dma-buf fd it was given");
                }
                let addr = range.addr as usize as *mut std::ffi::c_void;
                let mr = if req.iova == range.addr {
                    // SAFETY: the PD is live. The kernel pins and validates [addr, addr+len) of
                    // this process (EFAULT when unmapped); nothing in this process is touched.
                    // The caller's list says the range is memory it lets the NIC access.
                    unsafe { sys::ibv_reg_mr(raw_pd, addr, length, access) }
                } else {
                    // SAFETY: as above, with the NIC-side address `iova`.
                    unsafe { sys::ibv_reg_mr_iova(raw_pd, addr, length, req.iova, access) }
                };
                let op = if req.iova == range.addr {
                    "ibv_reg_mr"
                } else {
                    "ibv_reg_mr_iova"
                };
                (
                    mr,
                    op,
                    format!(
                        "addr {:#x}, length {len:#x}, iova {:#x}, access {}",
                        range.addr, req.iova, req.access
                    ),
                )
            }
            AddrSpace::DeviceVa { device } => {
                let addr = range.addr as usize as *mut std::ffi::c_void;
                // SAFETY: the PD is live. The range is a GPU's device VAs, not memory of this
                // process: the kernel hands them to a peer-memory client (nvidia-peermem),
                // which pins the GPU pages and validates [addr, addr+len); without one the
                // call fails (EFAULT). Nothing in this process is read or written.
                let mr = unsafe { sys::ibv_reg_mr_iova(raw_pd, addr, length, req.iova, access) };
                (
                    mr,
                    "ibv_reg_mr (GPU device VA, through a peer-memory client such as nvidia-peermem)",
                    format!(
                        "device {device}, va {:#x}, length {len:#x}, iova {:#x}, access {}",
                        range.addr, req.iova, req.access
                    ),
                )
            }
            AddrSpace::DmaBuf { .. } => {
                let fd = req.dmabuf_fd.ok_or_else(|| {
                    invalid(
                        "dmabuf_fd",
                        "None",
                        "a dma-buf list is registered through the dma-buf's fd",
                    )
                })?;
                // SAFETY: the PD is live; `fd` is borrowed for the call (the kernel takes its own
                // reference on the dma-buf). Offsets and length are checked by the kernel.
                let mr = unsafe {
                    sys::ibv_reg_dmabuf_mr(
                        raw_pd,
                        range.addr,
                        length,
                        req.iova,
                        fd.as_raw_fd(),
                        access,
                    )
                };
                (
                    mr,
                    "ibv_reg_dmabuf_mr",
                    format!(
                        "fd {}, offset {:#x}, length {len:#x}, iova {:#x}, access {}",
                        fd.as_raw_fd(),
                        range.addr,
                        req.iova,
                        req.access
                    ),
                )
            }
            other => {
                return Err(invalid(
                    "list.space",
                    other,
                    "verbs registers process-va, dma-buf and GPU device-va lists only",
                ));
            }
        };
        let Some(mr) = NonNull::new(mr) else {
            let errno = ffi::last_errno();
            return Err(reg_error(dev, op, errno, &context));
        };
        // SAFETY: `mr` was just returned by libibverbs and is live; the key fields are plain data.
        let (lkey, rkey) = unsafe { ((*mr.as_ptr()).lkey, (*mr.as_ptr()).rkey) };
        Ok(VerbsMr {
            dev: Arc::clone(dev),
            state: Mutex::new(MrState::Registered(RawMr(mr))),
            keys: MrKeys {
                lkey,
                rkey,
                iova: req.iova,
                len,
                access: req.access,
            },
            translation: Translation {
                page_size: PAGE_SIZE,
                entries: num_blocks(req.iova, len, PAGE_SIZE),
            },
            op,
            _pd: Arc::clone(&pd.pd),
        })
    }

    fn lock(&self) -> MutexGuard<'_, MrState> {
        crate::sync::lock(&self.state)
    }

    /// Whether [`MrBackend::zap`] ran.
    pub fn is_zapped(&self) -> bool {
        matches!(*self.lock(), MrState::Zapped)
    }
}

fn reg_error(dev: &DevInner, op: &'static str, errno: i32, context: &str) -> RdmaError {
    if errno == libc::EOPNOTSUPP || errno == libc::ENOTSUP {
        let why = if op == "ibv_reg_dmabuf_mr" {
            format!(
                "{}; {context} (the provider has no dma-buf MRs: register the dma-buf's mmap as \
                 process-va instead)",
                ffi::errno_text(errno)
            )
        } else {
            format!("{}; {context}", ffi::errno_text(errno))
        };
        return RdmaError::Unsupported {
            device: dev.name.clone(),
            op,
            why,
        };
    }
    let hint = match errno {
        libc::ENOMEM => " (is RLIMIT_MEMLOCK large enough? see `ulimit -l`)",
        libc::EFAULT => {
            " (the range is not mapped in this process, or is mapped VM_PFNMAP/VM_IO — a \
             dma-buf's or a device's own mapping, e.g. udmabuf or the system heap — which the \
             kernel cannot pin)"
        }
        libc::EBADF => " (not a dma-buf fd)",
        _ => "",
    };
    dev.os_err(op, errno, format_args!("{context}{hint}"))
}

impl fmt::Debug for VerbsMr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerbsMr")
            .field("device", &self.dev.name)
            .field("op", &self.op)
            .field("keys", &self.keys)
            .field("zapped", &self.is_zapped())
            .finish()
    }
}

impl MrBackend for VerbsMr {
    fn keys(&self) -> MrKeys {
        self.keys
    }

    fn translation(&self) -> Translation {
        self.translation
    }

    fn zap(&self) -> Result<()> {
        let mut state = self.lock();
        let MrState::Registered(raw) = &*state else {
            return Ok(());
        };
        // SAFETY: the MR is registered (state says so, under the lock) and deregistered once:
        // the state becomes Zapped on success, so neither a later zap nor Drop touches it again.
        let ret = unsafe { sys::ibv_dereg_mr(raw.0.as_ptr()) };
        if ret != 0 {
            return Err(self.dev.os_err(
                "ibv_dereg_mr",
                ffi::ret_errno(ret),
                format_args!("zap of MR lkey {:#x}", self.keys.lkey),
            ));
        }
        *state = MrState::Zapped;
        tracing::debug!(device = %self.dev.name, lkey = self.keys.lkey, "MR zapped (deregistered)");
        Ok(())
    }
}

impl Drop for VerbsMr {
    fn drop(&mut self) {
        let state = std::mem::replace(crate::sync::get_mut(&mut self.state), MrState::Zapped);
        if let MrState::Registered(raw) = state {
            // SAFETY: still registered (never zapped) and deregistered exactly once, here.
            let ret = unsafe { sys::ibv_dereg_mr(raw.0.as_ptr()) };
            if ret != 0 {
                tracing::warn!(
                    device = %self.dev.name,
                    lkey = self.keys.lkey,
                    "ibv_dereg_mr at drop failed: {}",
                    ffi::errno_text(ffi::ret_errno(ret))
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_bits_are_the_verbs_ones() {
        assert_eq!(ibv_access(MrAccess::NONE), 0);
        assert_eq!(ibv_access(MrAccess::LOCAL_WRITE), 1);
        assert_eq!(
            ibv_access(MrAccess::LOCAL_WRITE | MrAccess::REMOTE_WRITE | MrAccess::REMOTE_READ),
            1 | 2 | 4
        );
    }
}
