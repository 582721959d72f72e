//! `dmaplane doctor`: what this machine offers the data path, one row per thing checked.
//!
//! Every check does the real thing once, small — list and open RDMA devices and register a
//! dma-buf MR, export a 4 KiB udmabuf and a 4 KiB dma-heap buffer, set up a 2-entry io_uring and
//! dmaplane-storage's ring, open a file in the working directory with O_DIRECT —
//! because "the device node exists" says little about whether it works. A row that is not ok
//! says why and what to do. Missing pieces are the report, not a failure: the command exits 0.
//!
//! Statuses: `ok` works; `missing` not there for this process (module not loaded, library not
//! installed, no device); `error` there but it refused or failed (permissions, a link down, an
//! unexpected errno); `unsupported` there but cannot do this (a provider without dma-buf MRs, a
//! binary built without the feature).

use std::fmt::Write as _;
use std::path::Path;

use dmaplane_core::dmabuf::{DMA_HEAP_DIR, DmaBufError, DmaHeapBuf, UDMABUF_PATH, UdmaBuf};
use rustix::io::Errno;
use serde::Serialize;

use crate::check::{Check, CheckStatus};

/// Size of every test buffer: one page, the smallest every exporter takes.
const TEST_SIZE: u64 = 4096;

#[derive(Debug, Serialize)]
pub struct Report {
    /// `uname -srm`.
    pub kernel: String,
    pub checks: Vec<Check>,
}

pub fn run(json: bool) -> anyhow::Result<()> {
    let report = Report {
        kernel: kernel(),
        checks: checks(),
    };
    let out = if json {
        let mut s = serde_json::to_string_pretty(&report)?;
        s.push('\n');
        s
    } else {
        render(&report)
    };
    print!("{out}");
    Ok(())
}

fn kernel() -> String {
    let u = rustix::system::uname();
    format!(
        "{} {} {}",
        u.sysname().to_string_lossy(),
        u.release().to_string_lossy(),
        u.machine().to_string_lossy()
    )
}

fn checks() -> Vec<Check> {
    let mut out = Vec::new();
    rdma(&mut out);
    out.push(udmabuf());
    out.push(dma_heap());
    out.push(io_uring());
    crate::storage_doctor::checks(&mut out);
    crate::gpu_doctor::checks(&mut out);
    out
}

/// Aligned columns, one line a row; the fix follows the detail on the same line.
fn render(r: &Report) -> String {
    let header = ["COMPONENT", "NAME", "STATUS"];
    let width = |i: usize, f: &dyn Fn(&Check) -> usize| {
        r.checks
            .iter()
            .map(f)
            .chain([header[i].len()])
            .max()
            .unwrap_or(0)
    };
    let wc = width(0, &|c| c.component.len());
    let wn = width(1, &|c| c.name.len());
    let ws = width(2, &|c| c.status.as_str().len());
    let mut s = format!("kernel  {}\n\n", r.kernel);
    let _ = writeln!(
        s,
        "{:<wc$}  {:<wn$}  {:<ws$}  DETAIL",
        header[0], header[1], header[2]
    );
    for c in &r.checks {
        let _ = write!(
            s,
            "{:<wc$}  {:<wn$}  {:<ws$}  {}",
            c.component,
            c.name,
            c.status.as_str(),
            c.detail
        );
        if let Some(fix) = &c.fix {
            let _ = write!(s, "; fix: {fix}");
        }
        s.push('\n');
    }
    s
}

// --- dma-buf exporters ---------------------------------------------------------------------------

fn udmabuf() -> Check {
    const C: &str = "udmabuf";
    match UdmaBuf::new("doctor", TEST_SIZE) {
        Ok(buf) => {
            let limit = read_trimmed("/sys/module/udmabuf/parameters/size_limit_mb")
                .map(|mb| format!(", size_limit_mb {mb}"))
                .unwrap_or_default();
            Check::ok(
                C,
                UDMABUF_PATH,
                format!(
                    "exported a {TEST_SIZE}-byte memfd as a dma-buf (inode {}){limit}",
                    buf.id().ino
                ),
            )
        }
        Err(e) => dmabuf_failure(C, UDMABUF_PATH, e),
    }
}

fn dma_heap() -> Check {
    const C: &str = "dma-heap";
    let name = dmaplane_core::dmabuf::DMA_HEAP_SYSTEM_PATH;
    match DmaHeapBuf::with_name("doctor", TEST_SIZE) {
        Ok(buf) => {
            let mut heaps: Vec<String> = std::fs::read_dir(DMA_HEAP_DIR)
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            heaps.sort();
            Check::ok(
                C,
                name,
                format!(
                    "allocated a {TEST_SIZE}-byte dma-buf (inode {}); heaps: {}",
                    buf.id().ino,
                    heaps.join(", ")
                ),
            )
        }
        Err(e) => dmabuf_failure(C, name, e),
    }
}

/// A failed export as a row: the error's own hint is the fix, except for permissions, where the
/// group that owns the node is named.
fn dmabuf_failure(component: &'static str, name: &str, e: DmaBufError) -> Check {
    match e {
        DmaBufError::NotPresent { path, hint } => {
            let detail = if Path::new(path).exists() {
                format!("{path} has no driver behind it")
            } else {
                format!("{path} absent")
            };
            // The library's hint covers every cause; the module tree, when there is one, says
            // which.
            let fix = match (path == UDMABUF_PATH, kernel_has_module("udmabuf")) {
                (true, Some(true)) => {
                    "modprobe udmabuf (in a container, pass /dev/udmabuf through)".to_string()
                }
                (true, Some(false)) => format!(
                    "this kernel ({}) has no udmabuf: it needs CONFIG_UDMABUF=y or m",
                    release()
                ),
                _ => hint.to_string(),
            };
            Check::not_ok(component, name, CheckStatus::Missing, detail, fix)
        }
        DmaBufError::PermissionDenied { path, hint, .. } => Check::not_ok(
            component,
            name,
            CheckStatus::Error,
            format!("permission denied on {path}"),
            permission_fix(path).unwrap_or_else(|| hint.to_string()),
        ),
        DmaBufError::Os { hint, .. } => {
            let fix = hint
                .unwrap_or("the kernel refused the export; `dmesg` may say why")
                .to_string();
            Check::not_ok(component, name, CheckStatus::Error, e.to_string(), fix)
        }
        other => Check::not_ok(
            component,
            name,
            CheckStatus::Error,
            other.to_string(),
            "unexpected: please report it with `DMAPLANE_LOG=debug dmaplane doctor`",
        ),
    }
}

/// "add yourself to group G" when a group other than root owns `path` and may write it.
fn permission_fix(path: &str) -> Option<String> {
    let st = rustix::fs::stat(path).ok()?;
    let group_rw = st.st_mode & 0o060 == 0o060;
    if st.st_gid == 0 || !group_rw {
        return None;
    }
    let group = group_name(st.st_gid).unwrap_or_else(|| st.st_gid.to_string());
    Some(format!(
        "{path} belongs to group {group}: add yourself to it (`sudo usermod -aG {group} $USER`, \
         then log in again), or run as root"
    ))
}

fn group_name(gid: u32) -> Option<String> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let id = f.nth(1)?.parse::<u32>().ok()?;
        (id == gid).then(|| name.to_string())
    })
}

fn release() -> String {
    rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned()
}

/// Whether this kernel has `module` (built in, or as a loadable `.ko`), from
/// `/lib/modules/<release>`; `None` when there is no module tree to ask (many VMs, containers).
fn kernel_has_module(module: &str) -> Option<bool> {
    if Path::new("/sys/module").join(module).exists() {
        return Some(true);
    }
    let dir = Path::new("/lib/modules").join(release());
    let needle = format!("/{module}.ko");
    let mut known = false;
    for f in ["modules.builtin", "modules.dep"] {
        if let Ok(list) = std::fs::read_to_string(dir.join(f)) {
            known = true;
            if list
                .lines()
                .any(|l| l.split(':').next().is_some_and(|p| p.contains(&needle)))
            {
                return Some(true);
            }
        }
    }
    known.then_some(false)
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

// --- io_uring ------------------------------------------------------------------------------------

fn io_uring() -> Check {
    const C: &str = "io_uring";
    const NAME: &str = "io_uring_setup";
    const ENTRIES: u32 = 2;
    let disabled = read_trimmed("/proc/sys/kernel/io_uring_disabled");
    let mut params = rustix::io_uring::io_uring_params::default();
    // SAFETY: no setup flags, so IORING_SETUP_ATTACH_WQ is unset and `wq_fd` is not read; the
    // ring fd is owned and closed on drop.
    let res = unsafe { rustix::io_uring::io_uring_setup(ENTRIES, &mut params) };
    match res {
        Ok(_ring) => {
            let note = match disabled.as_deref() {
                Some("1") => {
                    "; kernel.io_uring_disabled = 1: only root and kernel.io_uring_group may use it"
                }
                _ => "",
            };
            Check::ok(
                C,
                NAME,
                format!(
                    "set up a {ENTRIES}-entry ring (features {:#x}){note}",
                    params.features.bits()
                ),
            )
        }
        Err(Errno::NOSYS) => Check::not_ok(
            C,
            NAME,
            CheckStatus::Missing,
            "ENOSYS: this kernel has no io_uring",
            "a kernel built with CONFIG_IO_URING=y (Linux 5.1 or later); in a container, a \
             seccomp profile that allows io_uring_setup, io_uring_enter and io_uring_register",
        ),
        Err(Errno::PERM) => {
            let (detail, fix) = match disabled.as_deref() {
                Some("2") => (
                    "EPERM: io_uring is disabled (kernel.io_uring_disabled = 2)".to_string(),
                    "sysctl -w kernel.io_uring_disabled=0".to_string(),
                ),
                Some("1") => {
                    let group = read_trimmed("/proc/sys/kernel/io_uring_group")
                        .and_then(|g| g.parse::<i64>().ok())
                        .map(|g| match u32::try_from(g).ok().and_then(group_name) {
                            Some(n) => format!("group {n} (gid {g})"),
                            None => format!("gid {g}"),
                        })
                        .unwrap_or_else(|| "kernel.io_uring_group".into());
                    (
                        "EPERM: kernel.io_uring_disabled = 1 and this process is neither root \
                         nor in kernel.io_uring_group"
                            .to_string(),
                        format!("join {group}, or sysctl -w kernel.io_uring_disabled=0"),
                    )
                }
                _ => (
                    "EPERM although kernel.io_uring_disabled allows it: a seccomp filter \
                     (container runtime) blocks io_uring_setup"
                        .to_string(),
                    "allow io_uring_setup, io_uring_enter and io_uring_register in the \
                     container's seccomp profile"
                        .to_string(),
                ),
            };
            Check::not_ok(C, NAME, CheckStatus::Error, detail, fix)
        }
        Err(Errno::NOMEM) => Check::not_ok(
            C,
            NAME,
            CheckStatus::Error,
            "ENOMEM: the ring could not be allocated",
            "kernels before 5.12 charge rings to RLIMIT_MEMLOCK: raise it (`ulimit -l`)",
        ),
        Err(e) => Check::not_ok(
            C,
            NAME,
            CheckStatus::Error,
            format!("io_uring_setup({ENTRIES}) failed: {}", errno_text(e)),
            "unexpected errno: `dmesg` may say why",
        ),
    }
}

/// `Invalid argument (errno 22)`.
fn errno_text(e: Errno) -> String {
    let io = std::io::Error::from(e);
    let text = io.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text);
    format!("{text} (errno {})", e.raw_os_error())
}

// --- RDMA ----------------------------------------------------------------------------------------

const RDMA: &str = "rdma";

#[cfg(not(feature = "verbs"))]
fn rdma(out: &mut Vec<Check>) {
    out.push(Check::not_ok(
        RDMA,
        "verbs",
        CheckStatus::Unsupported,
        "this dmaplane binary was built without verbs support",
        "rebuild with `cargo build --release --features verbs` (needs cmake and libclang-dev; \
         libibverbs1 and ibverbs-providers to run)",
    ));
}

#[cfg(feature = "verbs")]
fn rdma(out: &mut Vec<Check>) {
    verbs::check(out);
}

#[cfg(feature = "verbs")]
mod verbs {
    use std::net::Ipv6Addr;
    use std::sync::Arc;

    use dmaplane_core::dmabuf::{DMABUF_GRANULE, DmaBufMemory, DmaHeapBuf, UdmaBuf};
    use dmaplane_core::{AddrList, AddrSpace, DmaRange, Hints};
    use dmaplane_rdma::backend::{DeviceBackend, MrRequest};
    use dmaplane_rdma::verbs::{PortSummary, VerbsDevice, library_status, list_devices};
    use dmaplane_rdma::{DmaBufMr, MrAccess, RdmaError};

    use super::{Check, CheckStatus, RDMA, TEST_SIZE};

    pub(super) fn check(out: &mut Vec<Check>) {
        if let Err(why) = library_status() {
            out.push(Check::not_ok(
                RDMA,
                "libibverbs",
                CheckStatus::Missing,
                format!("libibverbs not installed ({why})"),
                "install rdma-core's libibverbs1 and ibverbs-providers (Debian/Ubuntu: \
                 `apt-get install libibverbs1 ibverbs-providers`)",
            ));
            return;
        }
        let names = match list_devices() {
            Ok(n) => n,
            Err(e) => {
                out.push(Check::not_ok(
                    RDMA,
                    "devices",
                    CheckStatus::Missing,
                    e.to_string(),
                    no_device_fix(&kernel_devices()),
                ));
                return;
            }
        };
        if names.is_empty() {
            let kernel = kernel_devices();
            let detail = if kernel.is_empty() {
                "no RDMA device: libibverbs is installed but finds none".to_string()
            } else {
                format!(
                    "no RDMA device for libibverbs, although the kernel has {}",
                    kernel.join(", ")
                )
            };
            out.push(Check::not_ok(
                RDMA,
                "devices",
                CheckStatus::Missing,
                detail,
                no_device_fix(&kernel),
            ));
            return;
        }
        // One exporter for every device's dma-buf MR test.
        let exporter = test_exporter();
        for name in names {
            device(&name, exporter.as_ref(), out);
        }
    }

    /// `/sys/class/infiniband`: the devices the kernel has, whether or not libibverbs sees them.
    fn kernel_devices() -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir("/sys/class/infiniband")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn no_device_fix(kernel: &[String]) -> String {
        if !kernel.is_empty() {
            return "install ibverbs-providers (libibverbs has no provider for the kernel's \
                    devices), and make sure ib_uverbs is loaded"
                .into();
        }
        let netdev = default_netdev().unwrap_or_else(|| "eth0".into());
        let soft_roce = if super::kernel_has_module("rdma_rxe") == Some(false) {
            "Soft-RoCE needs a kernel with CONFIG_RDMA_RXE".to_string()
        } else {
            format!(
                "for Soft-RoCE: `modprobe rdma_rxe && rdma link add rxe0 type rxe netdev {netdev}`"
            )
        };
        format!("load the NIC's RDMA driver (e.g. mlx5_ib) and ib_uverbs; {soft_roce}")
    }

    /// The interface of the default IPv4 route (`/proc/net/route`), to name in the Soft-RoCE hint.
    fn default_netdev() -> Option<String> {
        let routes = std::fs::read_to_string("/proc/net/route").ok()?;
        routes.lines().skip(1).find_map(|l| {
            let mut f = l.split_whitespace();
            let iface = f.next()?;
            (f.next()? == "00000000").then(|| iface.to_string())
        })
    }

    /// A small dma-buf to register: udmabuf, else the system heap.
    fn test_exporter() -> Result<DmaBufMemory, String> {
        let udmabuf = match UdmaBuf::new("doctor-mr", TEST_SIZE) {
            Ok(b) => return Ok(b.into_memory()),
            Err(e) => e,
        };
        match DmaHeapBuf::with_name("doctor-mr", TEST_SIZE) {
            Ok(b) => Ok(b.into_memory()),
            Err(heap) => Err(format!("udmabuf: {udmabuf}; dma-heap: {heap}")),
        }
    }

    fn device(name: &str, exporter: Result<&DmaBufMemory, &String>, out: &mut Vec<Check>) {
        let dev = match VerbsDevice::open(Some(name)) {
            Ok(d) => d,
            Err(e) => {
                out.push(Check::not_ok(
                    RDMA,
                    name,
                    CheckStatus::Error,
                    format!("cannot open: {e}"),
                    "this user needs read-write access to /dev/infiniband/uverbs* (`ls -l \
                     /dev/infiniband`; often group rdma), and RLIMIT_MEMLOCK room (`ulimit -l`)",
                ));
                return;
            }
        };
        match dev.summary() {
            Ok(s) => {
                out.push(Check::ok(
                    RDMA,
                    name,
                    format!(
                        "node GUID {}, firmware {}, {} port(s)",
                        s.node_guid,
                        if s.firmware.is_empty() {
                            "-"
                        } else {
                            &s.firmware
                        },
                        s.ports.len()
                    ),
                ));
                for p in &s.ports {
                    out.push(port(name, p));
                }
            }
            Err(e) => out.push(Check::not_ok(
                RDMA,
                name,
                CheckStatus::Error,
                e.to_string(),
                "the device opened but does not answer queries: check `dmesg` and `ibv_devinfo`",
            )),
        }
        out.push(dmabuf_mr(&dev, exporter));
    }

    fn port(dev: &str, p: &PortSummary) -> Check {
        let name = format!("{dev} port {}", p.port);
        let detail = format!(
            "{}, {}, MTU {}, GID[{}] {} ({})",
            p.state,
            p.link_layer,
            p.active_mtu.bytes(),
            p.gid_index,
            Ipv6Addr::from(p.gid),
            p.gid_source
        );
        if p.state == "ACTIVE" {
            return Check::ok(RDMA, name, detail);
        }
        let fix = match (p.state, p.link_layer) {
            ("INIT", "InfiniBand") => {
                "the link is up but no subnet manager configured it: run opensm on the fabric"
            }
            (_, "InfiniBand") => "check the cable and the switch (`ibstat`)",
            _ => "bring the Ethernet interface up and check its link (`rdma link show`, `ip link`)",
        };
        Check::not_ok(RDMA, name, CheckStatus::Error, detail, fix)
    }

    /// Register a real dma-buf with `ibv_reg_dmabuf_mr`; the invalid-fd probe the device ran at
    /// open is only mentioned when there is no buffer to test with.
    fn dmabuf_mr(dev: &Arc<VerbsDevice>, exporter: Result<&DmaBufMemory, &String>) -> Check {
        let name = format!("{} dma-buf MR", dev.name());
        let buf = match exporter {
            Ok(b) => b,
            Err(why) => {
                let probe = match dev.info().dmabuf_mr {
                    DmaBufMr::Supported => "the provider accepts the call".to_string(),
                    DmaBufMr::Unsupported { why } => why,
                    DmaBufMr::Unknown => "inconclusive".to_string(),
                };
                return Check::not_ok(
                    RDMA,
                    name,
                    CheckStatus::Missing,
                    format!(
                        "could not test: no dma-buf exporter ({why}); probe with an invalid fd: \
                         {probe}"
                    ),
                    "load udmabuf (`modprobe udmabuf`) or enable dma-heaps, then run doctor again",
                );
            }
        };
        let err = |detail: String| {
            Check::not_ok(
                RDMA,
                name.clone(),
                CheckStatus::Error,
                detail,
                "unexpected: `dmesg` may say why; dmaplane falls back to ProcessVa",
            )
        };
        let list = match AddrList::single(
            AddrSpace::DmaBuf { id: buf.id() },
            Hints::HOST_MEMORY,
            DMABUF_GRANULE,
            DmaRange::new(0, buf.len()),
        ) {
            Ok(l) => l,
            Err(e) => return err(format!("building the test list: {e}")),
        };
        let pd = match dev.alloc_pd() {
            Ok(pd) => pd,
            Err(e) => return err(e.to_string()),
        };
        let req = MrRequest {
            list: &list,
            iova: 0,
            access: MrAccess::LOCAL_WRITE,
            dmabuf_fd: Some(buf.fd()),
        };
        match pd.reg_mr(&req) {
            // Dropping the MR deregisters it.
            Ok(_mr) => Check::ok(
                RDMA,
                name,
                format!(
                    "supported: registered a {}-byte {} buffer with ibv_reg_dmabuf_mr",
                    buf.len(),
                    buf.kind()
                ),
            ),
            Err(RdmaError::Unsupported { .. }) => Check::not_ok(
                RDMA,
                name,
                CheckStatus::Unsupported,
                "EOPNOTSUPP (provider refuses; dmaplane falls back to ProcessVa)",
                "nothing to do: dmaplane registers the buffer's mapping instead; native \
                 dma-buf MRs need a provider that implements them (e.g. mlx5) and rdma-core 34+",
            ),
            Err(e) => err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_that_is_not_ok_has_a_fix() {
        for c in checks() {
            assert!(!c.detail.is_empty(), "{c:?}");
            match c.status {
                CheckStatus::Ok => assert!(c.fix.is_none(), "{c:?}"),
                _ => assert!(c.fix.as_deref().is_some_and(|f| !f.is_empty()), "{c:?}"),
            }
        }
    }

    #[test]
    fn rows_are_aligned() {
        let r = Report {
            kernel: "Linux 6.1.0 x86_64".into(),
            checks: vec![
                Check::ok("rdma", "rxe0", "node GUID 1"),
                Check::not_ok(
                    "io_uring",
                    "io_uring_setup",
                    CheckStatus::Missing,
                    "ENOSYS",
                    "build it",
                ),
            ],
        };
        let s = render(&r);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "kernel  Linux 6.1.0 x86_64");
        let col = |l: &str, w: &str| l.find(w);
        assert_eq!(col(lines[2], "STATUS"), col(lines[3], "ok"));
        assert_eq!(col(lines[2], "STATUS"), col(lines[4], "missing"));
        assert_eq!(col(lines[2], "DETAIL"), col(lines[3], "node GUID"));
        assert!(lines[4].ends_with("ENOSYS; fix: build it"), "{}", lines[4]);
    }

    #[test]
    fn permission_fix_names_no_group_for_root_owned_nodes() {
        // /dev/null is root:root on every Linux system.
        assert_eq!(permission_fix("/dev/null"), None);
        assert_eq!(permission_fix("/nonexistent/dmaplane"), None);
    }

    #[test]
    fn json_statuses_are_lowercase() {
        let v = serde_json::to_value(CheckStatus::Unsupported).ok();
        assert_eq!(v, Some(serde_json::json!("unsupported")));
    }
}
