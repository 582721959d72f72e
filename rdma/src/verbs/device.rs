//! Opening a device: enumeration, port and GID discovery, limits, the dma-buf probe.

use std::fmt;
use std::sync::Arc;

use dmaplane_core::{Accept, Access, SpaceKind};
use rdma_mummy_sys as sys;
use sideway::ibverbs::device::{DeviceInfo as _, DeviceList};
use sideway::ibverbs::device_context::DeviceContext;

use crate::backend::{
    AsyncEvent, BackendKind, CqBackend, DeviceBackend, DeviceInfo, DmaBufMr, PdBackend,
};
use crate::error::{RdmaError, Result};
use crate::qp::Mtu;

use super::cq::VerbsCq;
use super::events;
use super::ffi;
use super::pd::VerbsPd;

/// The port every object of this backend uses (RoCE and single-port NICs: the only one).
pub const PORT: u8 = 1;

/// Environment variable that forces the GID index (what `ibv_rc_pingpong -g` takes).
pub const GID_INDEX_ENV: &str = "DMAPLANE_GID_INDEX";

const LINK_LAYER_INFINIBAND: u8 = 1;
const LINK_LAYER_ETHERNET: u8 = 2;

/// `enum ibv_gid_type` (from `ibv_query_gid_ex`).
const GID_TYPE_IB: u32 = 0;
const GID_TYPE_ROCE_V1: u32 = 1;
const GID_TYPE_ROCE_V2: u32 = 2;

/// Device limits the backend checks requests against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub max_mr_size: u64,
    pub page_size_cap: u64,
    pub max_qp_wr: u32,
    pub max_sge: u32,
    pub max_cqe: u32,
    /// Most outstanding RDMA READs a QP may have as a responder (`max_qp_rd_atom`).
    pub max_qp_rd_atom: u8,
    /// ... and as an initiator (`max_qp_init_rd_atom`).
    pub max_qp_init_rd_atom: u8,
}

/// What every object created on the device shares.
pub(crate) struct DevInner {
    pub name: String,
    pub ctx: Arc<DeviceContext>,
    pub port: u8,
    pub gid_index: u8,
    pub gid: [u8; 16],
    /// How the GID was chosen, for `doctor`.
    pub gid_why: String,
    pub lid: u16,
    pub link_layer: u8,
    pub active_mtu: Mtu,
    pub limits: Limits,
    pub description: String,
    pub dmabuf_mr: DmaBufMr,
}

impl DevInner {
    /// A backend error on this device with the errno spelled out.
    pub fn os_err(&self, op: &'static str, errno: i32, context: impl fmt::Display) -> RdmaError {
        let context = context.to_string();
        let why = if context.is_empty() {
            ffi::errno_text(errno)
        } else {
            format!("{context}: {}", ffi::errno_text(errno))
        };
        RdmaError::Backend {
            device: self.name.clone(),
            op,
            why,
        }
    }

    pub fn raw_ctx(&self) -> *mut sys::ibv_context {
        // SAFETY: the accessor only hands out the pointer; `self.ctx` keeps the context open for
        // as long as `self` (and so every caller holding `&self`) lives.
        unsafe { self.ctx.context() }.as_ptr()
    }

    /// Port attributes, fresh (the state changes when links come and go).
    pub fn query_port(&self) -> Result<sys::ibv_port_attr> {
        query_port(&self.ctx, self.port).map_err(|e| self.os_err("ibv_query_port", e, ""))
    }
}

impl fmt::Debug for DevInner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerbsDevice")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("gid_index", &self.gid_index)
            .field("lid", &self.lid)
            .finish_non_exhaustive()
    }
}

/// A real RDMA device through libibverbs.
///
/// Opening never panics: a missing library, no device and an unknown name are errors that say
/// what to install or which devices exist.
#[derive(Debug)]
pub struct VerbsDevice {
    pub(crate) inner: Arc<DevInner>,
}

/// Names of the RDMA devices libibverbs sees (`rxe0`, `mlx5_0`, ...).
pub fn list_devices() -> Result<Vec<String>> {
    ffi::check_library()?;
    let list = device_list()?;
    Ok(list.iter().map(|d| d.name()).collect())
}

fn device_list() -> Result<DeviceList> {
    DeviceList::new().map_err(|e| {
        let errno = match &e.0 {
            sideway::ibverbs::device::GetDeviceListErrorKind::Ibverbs(io) => {
                io.raw_os_error().unwrap_or(0)
            }
            _ => 0,
        };
        let hint = match errno {
            libc::ENOSYS => {
                " (the kernel has no RDMA user-space support: is ib_uverbs loaded and \
                 /sys/class/infiniband present?)"
            }
            libc::EOPNOTSUPP => " (libibverbs lacks ibv_get_device_list)",
            _ => "",
        };
        RdmaError::NoDevice {
            why: format!(
                "ibv_get_device_list failed: {}{hint}",
                ffi::errno_text(errno)
            ),
        }
    })
}

impl VerbsDevice {
    /// Open `name`, or the first device when `None`.
    pub fn open(name: Option<&str>) -> Result<Arc<VerbsDevice>> {
        ffi::check_library()?;
        let list = device_list()?;
        let names: Vec<String> = list.iter().map(|d| d.name()).collect();
        if names.is_empty() {
            return Err(RdmaError::NoDevice {
                why: "libibverbs found no RDMA device (is ibverbs-providers installed, and the \
                      driver loaded? Soft-RoCE: `modprobe rdma_rxe; rdma link add rxe0 type rxe \
                      netdev eth0`)"
                    .into(),
            });
        }
        let index =
            match name {
                None => 0,
                Some(want) => names.iter().position(|n| n == want).ok_or_else(|| {
                    RdmaError::UnknownDevice {
                        name: want.to_string(),
                        available: names.join(", "),
                    }
                })?,
            };
        let dev = list.get(index).ok_or_else(|| RdmaError::NoDevice {
            why: format!("device {index} vanished from the list"),
        })?;
        let dev_name = names[index].clone();
        let guid = dev.guid();
        let ctx = dev.open().map_err(|e| {
            let errno = match &e.0 {
                sideway::ibverbs::device::OpenDeviceErrorKind::Ibverbs(io) => {
                    io.raw_os_error().unwrap_or(0)
                }
                _ => 0,
            };
            RdmaError::Backend {
                device: dev_name.clone(),
                op: "ibv_open_device",
                why: format!(
                    "{} (is /dev/infiniband/uverbs* accessible?)",
                    ffi::errno_text(errno)
                ),
            }
        })?;
        drop(list);
        Self::from_context(dev_name, guid.to_string(), ctx).map(Arc::new)
    }

    fn from_context(name: String, guid: String, ctx: Arc<DeviceContext>) -> Result<VerbsDevice> {
        let backend = |op: &'static str, errno: i32| RdmaError::Backend {
            device: name.clone(),
            op,
            why: ffi::errno_text(errno),
        };
        let attr = ctx.query_device().map_err(|e| {
            let errno = match &e.0 {
                sideway::ibverbs::device_context::QueryDeviceErrorKind::Ibverbs(io) => {
                    io.raw_os_error().unwrap_or(0)
                }
                _ => 0,
            };
            backend("ibv_query_device", errno)
        })?;
        let port = PORT;
        let pattr = query_port(&ctx, port).map_err(|e| backend("ibv_query_port", e))?;
        let clamp_u8 = |v: i32| u8::try_from(v.max(0)).unwrap_or(u8::MAX);
        let clamp_u32 = |v: i32| u32::try_from(v.max(0)).unwrap_or(0);
        let limits = Limits {
            max_mr_size: attr.max_mr_size(),
            page_size_cap: attr.page_size_cap(),
            max_qp_wr: clamp_u32(attr.max_qp_wr()),
            max_sge: clamp_u32(attr.max_sge()),
            max_cqe: clamp_u32(attr.max_cqe()),
            max_qp_rd_atom: clamp_u8(attr.max_qp_rd_atom()),
            max_qp_init_rd_atom: clamp_u8(attr.max_qp_init_rd_atom()),
        };
        let (gid_index, gid, gid_why) = choose_gid(&ctx, port, pattr.gid_tbl_len, pattr.link_layer);
        events::set_async_nonblocking(&ctx)
            .map_err(|e| backend("fcntl(async_fd, O_NONBLOCK)", e))?;
        let dmabuf_mr = probe_dmabuf(&ctx);
        let link = link_layer_name(pattr.link_layer);
        let description = format!(
            "libibverbs device {name}, fw {}, node GUID {guid}, vendor {:#x}:{:#x}, {link}, \
             GID index {gid_index} ({gid_why})",
            attr.firmware_version(),
            attr.vendor_id(),
            attr.vendor_part_id(),
        );
        let inner = DevInner {
            name,
            ctx,
            port,
            gid_index,
            gid,
            gid_why,
            lid: pattr.lid,
            link_layer: pattr.link_layer,
            active_mtu: mtu_from_ibv(pattr.active_mtu),
            limits,
            description,
            dmabuf_mr,
        };
        tracing::debug!(device = %inner.name, gid_index, "opened verbs device");
        Ok(VerbsDevice {
            inner: Arc::new(inner),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The port objects of this device use (1).
    pub fn port(&self) -> u8 {
        self.inner.port
    }

    /// The source GID index QPs use in their address vectors.
    pub fn gid_index(&self) -> u8 {
        self.inner.gid_index
    }

    /// How the GID index was chosen ("RoCE v2, IPv4-mapped", "forced by DMAPLANE_GID_INDEX", ...).
    pub fn gid_source(&self) -> &str {
        &self.inner.gid_why
    }

    /// The port's active MTU (what `INIT → RTR` should ask for at most).
    pub fn active_mtu(&self) -> Mtu {
        self.inner.active_mtu
    }

    /// Whether the port runs RoCE (Ethernet link layer): address vectors always need a GRH.
    pub fn is_roce(&self) -> bool {
        self.inner.link_layer == LINK_LAYER_ETHERNET
    }

    /// Largest `max_rd_atomic` / `max_dest_rd_atomic` the device allows (requests above are
    /// clamped by [`QpBackend::modify`](crate::backend::QpBackend::modify)).
    pub fn max_rd_atomic(&self) -> u8 {
        self.inner
            .limits
            .max_qp_init_rd_atom
            .min(self.inner.limits.max_qp_rd_atom)
    }
}

impl DeviceBackend for VerbsDevice {
    fn info(&self) -> DeviceInfo {
        let inner = &self.inner;
        let port_state = match inner.query_port() {
            Ok(p) => port_state_name(p.state).to_string(),
            Err(e) => format!("unknown ({e})"),
        };
        DeviceInfo {
            name: inner.name.clone(),
            kind: BackendKind::Verbs,
            description: inner.description.clone(),
            port: inner.port,
            port_state,
            gid: inner.gid,
            lid: inner.lid,
            max_mr_size: inner.limits.max_mr_size,
            page_size_cap: inner.limits.page_size_cap,
            max_qp_wr: inner.limits.max_qp_wr,
            max_sge: inner.limits.max_sge,
            dmabuf_mr: inner.dmabuf_mr.clone(),
        }
    }

    fn accepts(&self) -> Vec<Accept> {
        // dma-buf first — a GPU's BAR too (MMIO, write-combining, no-snoop: the NIC's DMA is
        // peer to peer, and the kernel's importer maps it); then this process's memory; then
        // a GPU's device VAs, which only a peer-memory client (nvidia-peermem) resolves:
        // without one the registration fails with EFAULT and says so.
        vec![
            Accept::new(SpaceKind::DmaBuf, Access::READ_WRITE).with_mmio(),
            Accept::new(SpaceKind::ProcessVa, Access::READ_WRITE),
            Accept::new(SpaceKind::DeviceVa, Access::READ_WRITE).with_mmio(),
        ]
    }

    fn alloc_pd(&self) -> Result<Arc<dyn PdBackend>> {
        Ok(Arc::new(VerbsPd::new(&self.inner)?))
    }

    fn create_cq(&self, depth: u32) -> Result<Arc<dyn CqBackend>> {
        Ok(Arc::new(VerbsCq::new(&self.inner, depth)?))
    }

    fn poll_async_event(&self) -> Option<AsyncEvent> {
        events::poll(&self.inner)
    }

    /// `ibv_modify_qp` and `ibv_dereg_mr` are system calls that wait for the NIC's firmware.
    fn calls_block(&self) -> bool {
        true
    }
}

/// One physical port, queried now (for `dmaplane doctor`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSummary {
    pub port: u8,
    /// `ACTIVE`, `DOWN`, `INIT`, ...
    pub state: &'static str,
    /// `Ethernet (RoCE)`, `InfiniBand`, ...
    pub link_layer: &'static str,
    pub active_mtu: Mtu,
    /// The GID this backend would pick on the port, its index, and why.
    pub gid_index: u8,
    pub gid: [u8; 16],
    pub gid_source: String,
}

/// What a device says about itself beyond [`DeviceInfo`]: every port, not only [`PORT`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSummary {
    /// `xxxx:xxxx:xxxx:xxxx`, as `ibv_devinfo` prints it.
    pub node_guid: String,
    pub firmware: String,
    pub ports: Vec<PortSummary>,
}

impl VerbsDevice {
    /// Node GUID, firmware and each physical port's state, link layer, MTU and GID, queried now.
    pub fn summary(&self) -> Result<DeviceSummary> {
        let ctx = &self.inner.ctx;
        let attr = ctx.query_device().map_err(|e| {
            let errno = match &e.0 {
                sideway::ibverbs::device_context::QueryDeviceErrorKind::Ibverbs(io) => {
                    io.raw_os_error().unwrap_or(0)
                }
                _ => 0,
            };
            self.inner.os_err("ibv_query_device", errno, "")
        })?;
        let ports = (1..=attr.phys_port_cnt())
            .map(|port| {
                let p = query_port(ctx, port).map_err(|e| {
                    self.inner
                        .os_err("ibv_query_port", e, format_args!("port {port}"))
                })?;
                let (gid_index, gid, gid_source) =
                    choose_gid(ctx, port, p.gid_tbl_len, p.link_layer);
                Ok(PortSummary {
                    port,
                    state: port_state_name(p.state),
                    link_layer: link_layer_name(p.link_layer),
                    active_mtu: mtu_from_ibv(p.active_mtu),
                    gid_index,
                    gid,
                    gid_source,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DeviceSummary {
            node_guid: attr.node_guid().to_string(),
            firmware: attr.firmware_version(),
            ports,
        })
    }
}

fn link_layer_name(link_layer: u8) -> &'static str {
    match link_layer {
        LINK_LAYER_ETHERNET => "Ethernet (RoCE)",
        LINK_LAYER_INFINIBAND => "InfiniBand",
        _ => "unspecified link layer",
    }
}

/// `ibv_query_port`; the errno on failure.
fn query_port(ctx: &DeviceContext, port: u8) -> Result<sys::ibv_port_attr, i32> {
    // SAFETY: ibv_port_attr is integers only; all-zero is a valid value.
    let mut attr: sys::ibv_port_attr = unsafe { std::mem::zeroed() };
    // SAFETY: the context pointer is live while `ctx` is borrowed; `attr` is a writable
    // ibv_port_attr of the size the inline wrapper passes on.
    let ret = unsafe { sys::ibv_query_port(ctx.context().as_ptr(), port, &mut attr) };
    if ret != 0 {
        return Err(ffi::ret_errno(ret));
    }
    Ok(attr)
}

pub(crate) fn port_state_name(state: u32) -> &'static str {
    match state {
        sys::ibv_port_state::IBV_PORT_NOP => "NOP",
        sys::ibv_port_state::IBV_PORT_DOWN => "DOWN",
        sys::ibv_port_state::IBV_PORT_INIT => "INIT",
        sys::ibv_port_state::IBV_PORT_ARMED => "ARMED",
        sys::ibv_port_state::IBV_PORT_ACTIVE => "ACTIVE",
        sys::ibv_port_state::IBV_PORT_ACTIVE_DEFER => "ACTIVE_DEFER",
        _ => "UNKNOWN",
    }
}

fn mtu_from_ibv(v: u32) -> Mtu {
    match v {
        1 => Mtu::Mtu256,
        2 => Mtu::Mtu512,
        3 => Mtu::Mtu1024,
        4 => Mtu::Mtu2048,
        5 => Mtu::Mtu4096,
        // An unknown value: the smallest MTU always works.
        _ => Mtu::Mtu256,
    }
}

/// One GID table entry: the GID and its type (`GID_TYPE_*`).
fn gid_entry(ctx: &DeviceContext, port: u8, index: u32) -> Option<([u8; 16], u32)> {
    let mut entry = sys::ibv_gid_entry {
        gid: sys::ibv_gid { raw: [0; 16] },
        gid_index: 0,
        port_num: 0,
        gid_type: 0,
        ndev_ifindex: 0,
    };
    // SAFETY: the context is live while `ctx` is borrowed; `entry` is a writable ibv_gid_entry
    // whose size the wrapper passes on.
    let ret = unsafe {
        sys::ibv_query_gid_ex(
            ctx.context().as_ptr(),
            u32::from(port),
            index,
            &mut entry,
            0,
        )
    };
    if ret == 0 {
        // SAFETY: every bit pattern is a valid [u8; 16]; the union is plain data.
        let raw = unsafe { entry.gid.raw };
        return Some((raw, entry.gid_type));
    }
    if ffi::ret_errno(ret) != libc::EOPNOTSUPP {
        // ENODATA: an empty slot (RoCE tables are sparse).
        return None;
    }
    // rdma-core < 32: the old calls, with the sysfs type (0: IB or RoCE v1, 1: RoCE v2).
    let mut gid = sys::ibv_gid { raw: [0; 16] };
    let idx = i32::try_from(index).ok()?;
    // SAFETY: live context, writable ibv_gid.
    let ret = unsafe { sys::ibv_query_gid(ctx.context().as_ptr(), port, idx, &mut gid) };
    if ret != 0 {
        return None;
    }
    // SAFETY: plain bytes, as above.
    let raw = unsafe { gid.raw };
    let mut sysfs_type: sys::ibv_gid_type_sysfs = 0;
    // SAFETY: live context, writable out-parameter.
    let ret =
        unsafe { sys::ibv_query_gid_type(ctx.context().as_ptr(), port, index, &mut sysfs_type) };
    let ty = if ret == 0 && sysfs_type == sys::IBV_GID_TYPE_SYSFS_ROCE_V2 {
        GID_TYPE_ROCE_V2
    } else {
        GID_TYPE_ROCE_V1
    };
    Some((raw, ty))
}

/// One usable GID table row: index, GID, `GID_TYPE_*`.
type GidRow = (u8, [u8; 16], u32);

fn is_ipv4_mapped(gid: &[u8; 16]) -> bool {
    gid[..10].iter().all(|&b| b == 0) && gid[10] == 0xff && gid[11] == 0xff
}

/// Pick the source GID: `DMAPLANE_GID_INDEX` when set; on InfiniBand index 0; on RoCE the first
/// RoCE v2 entry holding an IPv4-mapped address (what rxe and mlx5 put at index 1 for an IPv4
/// netdev), else the first RoCE v2 entry, else the first non-zero one.
fn choose_gid(
    ctx: &DeviceContext,
    port: u8,
    table_len: i32,
    link_layer: u8,
) -> (u8, [u8; 16], String) {
    let len = u32::try_from(table_len.clamp(0, 256)).unwrap_or(0);
    if let Some(forced) = std::env::var(GID_INDEX_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u8>().ok())
    {
        let gid = gid_entry(ctx, port, u32::from(forced))
            .map(|(g, _)| g)
            .unwrap_or([0; 16]);
        return (forced, gid, format!("forced by {GID_INDEX_ENV}"));
    }
    let entries: Vec<GidRow> = (0..len)
        .filter_map(|i| {
            let (gid, ty) = gid_entry(ctx, port, i)?;
            let i = u8::try_from(i).ok()?;
            (gid != [0; 16]).then_some((i, gid, ty))
        })
        .collect();
    let pick = |pred: &dyn Fn(&GidRow) -> bool, why: &str| {
        entries
            .iter()
            .find(|e| pred(e))
            .map(|&(i, g, _)| (i, g, why.to_string()))
    };
    let chosen = if link_layer == LINK_LAYER_INFINIBAND {
        pick(&|e| e.2 == GID_TYPE_IB, "InfiniBand port GID")
    } else {
        pick(
            &|e| e.2 == GID_TYPE_ROCE_V2 && is_ipv4_mapped(&e.1),
            "RoCE v2, IPv4-mapped",
        )
        .or_else(|| pick(&|e| e.2 == GID_TYPE_ROCE_V2, "RoCE v2"))
    };
    chosen
        .or_else(|| pick(&|_| true, "first non-zero GID"))
        .unwrap_or((0, [0; 16], "GID table empty: index 0".into()))
}

/// Does the provider register dma-buf MRs? Asked once, with an invalid fd: a provider without
/// support answers `EOPNOTSUPP` before looking at the fd (rxe does, in libibverbs itself); one
/// with support reaches the kernel, which rejects the fd with `EBADF`.
fn probe_dmabuf(ctx: &Arc<DeviceContext>) -> DmaBufMr {
    if !ffi::has_symbol("ibv_reg_dmabuf_mr") {
        return DmaBufMr::Unsupported {
            why: "libibverbs has no ibv_reg_dmabuf_mr (rdma-core < 34)".into(),
        };
    }
    let pd = match ctx.alloc_pd() {
        Ok(pd) => pd,
        Err(e) => {
            tracing::debug!("dma-buf probe: no PD: {e}");
            return DmaBufMr::Unknown;
        }
    };
    let access = sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 as i32;
    // SAFETY: the PD is live for this call; fd -1 is never a dma-buf, so nothing is registered
    // (and if a provider did register something, it is deregistered at once below).
    let mr = unsafe { sys::ibv_reg_dmabuf_mr(pd.pd().as_ptr(), 0, 4096, 0, -1, access) };
    if !mr.is_null() {
        // SAFETY: `mr` was just returned by ibv_reg_dmabuf_mr and is deregistered once.
        unsafe { sys::ibv_dereg_mr(mr) };
        return DmaBufMr::Supported;
    }
    match ffi::last_errno() {
        libc::EOPNOTSUPP | libc::ENOSYS | libc::EPROTONOSUPPORT => DmaBufMr::Unsupported {
            why: format!("ibv_reg_dmabuf_mr: {}", ffi::errno_text(libc::EOPNOTSUPP)),
        },
        libc::EBADF => DmaBufMr::Supported,
        other => {
            tracing::debug!(
                "dma-buf probe inconclusive: ibv_reg_dmabuf_mr(fd -1) gave {}",
                ffi::errno_text(other)
            );
            DmaBufMr::Unknown
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_mapped_gid() {
        let mut g = [0u8; 16];
        g[10] = 0xff;
        g[11] = 0xff;
        g[12..].copy_from_slice(&[10, 0, 2, 15]);
        assert!(is_ipv4_mapped(&g));
        g[0] = 0xfe;
        assert!(!is_ipv4_mapped(&g));
    }

    #[test]
    fn open_without_device_is_an_error_not_a_panic() {
        match VerbsDevice::open(None) {
            Ok(d) => assert!(!d.name().is_empty()),
            Err(RdmaError::NoDevice { why }) => assert!(!why.is_empty()),
            Err(e) => panic!("unexpected error: {e}"),
        }
        if let Ok(d) = VerbsDevice::open(None) {
            let s = d.summary().expect("a device that opened answers queries");
            assert!(!s.ports.is_empty(), "{s:?}");
            assert!(s.ports.iter().any(|p| p.port == PORT), "{s:?}");
        }
        match VerbsDevice::open(Some("no-such-device-0")) {
            Ok(_) => panic!("opened a device that does not exist"),
            Err(RdmaError::NoDevice { .. }) => {}
            Err(RdmaError::UnknownDevice { name, .. }) => assert_eq!(name, "no-such-device-0"),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}
