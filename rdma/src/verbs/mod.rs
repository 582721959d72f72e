//! The `verbs` backend: real RDMA devices through libibverbs (feature `verbs`).
//!
//! Object lifetimes come from [sideway] (device list, context, PD, completion channel, CQ, RC QP);
//! what sideway does not wrap, or wraps in a way this crate cannot use, is called directly through
//! `rdma-mummy-sys`, each call in an `unsafe` block with its reasoning:
//!
//! | need | how |
//! | --- | --- |
//! | library missing ≠ "not supported" | `dlopen(RTLD_NOLOAD)` of `libibverbs.so.1` |
//! | port attributes, GID table with types | `ibv_query_port`, `ibv_query_gid_ex` (sideway's converters panic on unknown values) |
//! | every `QpAttr` field, SQD and its async notify | `ibv_modify_qp` with a hand-built mask |
//! | chains of send/receive requests with SGE lists | `ibv_post_send` / `ibv_post_recv` |
//! | completions with `qp_num` and `wc_flags` | `ibv_poll_cq` |
//! | blocking wait | `ibv_req_notify_cq`, `poll(2)` on the channel fd, `ibv_get_cq_event` / `ibv_ack_cq_events` |
//! | MR with an IOVA, dma-buf MR, deregistration while the object lives | `ibv_reg_mr(_iova)`, `ibv_reg_dmabuf_mr`, `ibv_dereg_mr` |
//! | asynchronous events | `ibv_get_async_event` on the O_NONBLOCK async fd, `ibv_ack_async_event` |
//!
//! Run-time needs: `libibverbs1` and `ibverbs-providers` (rdma-core). Without them every entry
//! point returns [`RdmaError::NoDevice`](crate::RdmaError::NoDevice) saying so; nothing panics.

mod cq;
mod device;
mod events;
mod ffi;
mod mr;
mod pd;
mod qp;
mod track;

pub use cq::VerbsCq;
pub use device::{DeviceSummary, GID_INDEX_ENV, PORT, PortSummary, VerbsDevice, list_devices};
pub use ffi::library_status;
pub use mr::{PAGE_SIZE, VerbsMr};
pub use pd::VerbsPd;
pub use qp::VerbsQp;
