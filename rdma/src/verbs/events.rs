//! Asynchronous events (`ibv_get_async_event`), read without blocking.
//!
//! The context's async fd is switched to `O_NONBLOCK` when the device opens, so
//! [`poll`] returns at once when nothing is pending. Each event is acknowledged right after it is
//! read: `ibv_destroy_qp`/`ibv_destroy_cq` wait for every event they were told about to be acked,
//! and an event the program never reads is dropped by the kernel when its object goes away.

use std::os::raw::c_int;

use rdma_mummy_sys as sys;
use sideway::ibverbs::device_context::DeviceContext;

use crate::backend::AsyncEvent;

use super::device::DevInner;
use super::ffi;

/// `struct ibv_async_event` with the event type read as a plain integer: the generated binding
/// types it as a Rust enum, which a value from a newer kernel would make undefined behaviour.
#[repr(C)]
struct RawAsyncEvent {
    element: RawElement,
    event_type: u32,
}

/// The union `{ cq, qp, srq, wq, port_num }`.
#[repr(C)]
#[derive(Clone, Copy)]
union RawElement {
    ptr: *mut std::ffi::c_void,
    port_num: c_int,
}

const _: () = assert!(
    std::mem::size_of::<RawAsyncEvent>() == std::mem::size_of::<sys::ibv_async_event>()
        && std::mem::align_of::<RawAsyncEvent>() == std::mem::align_of::<sys::ibv_async_event>()
);

/// Set `O_NONBLOCK` on the context's async fd; the errno on failure.
pub(crate) fn set_async_nonblocking(ctx: &DeviceContext) -> Result<(), i32> {
    // SAFETY: the context is live while `ctx` is borrowed; `async_fd` is a plain field.
    let fd: c_int = unsafe { (*ctx.context().as_ptr()).async_fd };
    // SAFETY: fcntl on an fd the context owns; F_GETFL/F_SETFL only change its status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(ffi::last_errno());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(ffi::last_errno());
    }
    Ok(())
}

/// The `IBV_EVENT_*` name without the prefix, and whether the element is a QP, CQ, port, ...
fn describe(event_type: u32) -> (&'static str, Element) {
    use Element::*;
    match event_type {
        0 => ("CQ_ERR", Cq),
        1 => ("QP_FATAL", Qp),
        2 => ("QP_REQ_ERR", Qp),
        3 => ("QP_ACCESS_ERR", Qp),
        4 => ("COMM_EST", Qp),
        5 => ("SQ_DRAINED", Qp),
        6 => ("PATH_MIG", Qp),
        7 => ("PATH_MIG_ERR", Qp),
        8 => ("DEVICE_FATAL", Nothing),
        9 => ("PORT_ACTIVE", Port),
        10 => ("PORT_ERR", Port),
        11 => ("LID_CHANGE", Port),
        12 => ("PKEY_CHANGE", Port),
        13 => ("SM_CHANGE", Port),
        14 => ("SRQ_ERR", Srq),
        15 => ("SRQ_LIMIT_REACHED", Srq),
        16 => ("QP_LAST_WQE_REACHED", Qp),
        17 => ("CLIENT_REREGISTER", Port),
        18 => ("GID_CHANGE", Port),
        19 => ("WQ_FATAL", Nothing),
        20 => ("DEVICE_SPEED_CHANGE", Port),
        _ => ("UNKNOWN", Nothing),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Element {
    Qp,
    Cq,
    Srq,
    Port,
    Nothing,
}

/// Next pending event, or `None` (nothing pending, or the read failed: logged).
pub(crate) fn poll(dev: &DevInner) -> Option<AsyncEvent> {
    let mut raw = RawAsyncEvent {
        element: RawElement {
            ptr: std::ptr::null_mut(),
        },
        event_type: 0,
    };
    // SAFETY: the context is live (held by `dev`); `raw` has the layout of ibv_async_event
    // (checked at compile time above) and is written by the call. The fd is non-blocking.
    let ret =
        unsafe { sys::ibv_get_async_event(dev.raw_ctx(), (&mut raw as *mut RawAsyncEvent).cast()) };
    if ret != 0 {
        let errno = ffi::last_errno();
        if errno != libc::EAGAIN && errno != libc::EINTR {
            tracing::debug!(device = %dev.name, "ibv_get_async_event: {}", ffi::errno_text(errno));
        }
        return None;
    }
    let (kind, element) = describe(raw.event_type);
    let (qpn, detail) = match element {
        Element::Qp => {
            // SAFETY: for QP events libibverbs stores the `struct ibv_qp *` in the union.
            let qp = unsafe { raw.element.ptr }.cast::<sys::ibv_qp>();
            if qp.is_null() {
                (None, "QP (unknown)".to_string())
            } else {
                // SAFETY: the pointer names one of this context's QPs, valid until the event is
                // acked below (ibv_destroy_qp waits for that).
                let qpn = unsafe { (*qp).qp_num };
                (Some(qpn), format!("QP {qpn:#x}"))
            }
        }
        Element::Cq => (None, "a completion queue overran or failed".to_string()),
        Element::Srq => (None, "a shared receive queue".to_string()),
        Element::Port => {
            // SAFETY: for port events libibverbs stores the port number in the union.
            let port = unsafe { raw.element.port_num };
            (None, format!("port {port}"))
        }
        _ => (None, format!("event type {}", raw.event_type)),
    };
    // SAFETY: `raw` was filled by ibv_get_async_event above and is acked exactly once.
    unsafe { sys::ibv_ack_async_event((&mut raw as *mut RawAsyncEvent).cast()) };
    tracing::warn!(device = %dev.name, event = kind, %detail, "RDMA asynchronous event");
    Some(AsyncEvent {
        kind: kind.to_string(),
        qpn,
        detail: format!("{kind} on {}: {detail}", dev.name),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_match_the_abi() {
        assert_eq!(describe(1).0, "QP_FATAL");
        assert_eq!(describe(3).0, "QP_ACCESS_ERR");
        assert_eq!(describe(5).0, "SQ_DRAINED");
        assert_eq!(describe(9).0, "PORT_ACTIVE");
        assert_eq!(describe(10).0, "PORT_ERR");
        assert_eq!(describe(99).0, "UNKNOWN");
        assert_eq!(
            sys::ibv_event_type::IBV_EVENT_SQ_DRAINED as u32,
            5,
            "binding and table agree"
        );
        assert_eq!(
            sys::ibv_event_type::IBV_EVENT_DEVICE_SPEED_CHANGE as u32,
            20
        );
    }
}
