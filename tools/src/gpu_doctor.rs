//! `dmaplane doctor`'s GPU rows: the CUDA driver, each GPU (dma-buf support, BAR1), and for every
//! GPU/RDMA NIC pair the PCIe route (the model's rule, on a topology built from sysfs paths) and
//! the path a transfer would take.

use std::path::PathBuf;

use dmaplane_core::Route;
use dmaplane_core::topology::sysfs::{PciFunction, from_pci_paths};
use dmaplane_core::topology::{DeviceKind, Topology};
use dmaplane_gpu::DmaBufSupport;
use dmaplane_gpu::cuda::{self, CudaProbe};

use crate::check::{Check, CheckStatus};
use crate::units::bytes;

pub fn checks(out: &mut Vec<Check>) {
    let probe = cuda::probe();
    out.push(driver(&probe));
    let nics = rdma_nics();
    let places = Places::new(&probe, &nics);
    for g in &probe.devices {
        let dmabuf = matches!(g.dmabuf, DmaBufSupport::Supported);
        let bar1 = g
            .bar1_bytes
            .map_or("BAR1 size unknown".into(), |b| format!("BAR1 {}", bytes(b)));
        let name = format!("{} {}", g.name, g.pci.as_deref().unwrap_or("?"));
        let detail = format!(
            "{}, {} memory, {bar1}",
            g.description,
            bytes(g.memory_bytes)
        );
        out.push(match &g.dmabuf {
            DmaBufSupport::Supported => Check::ok("gpu", name, format!("{detail}, dma-buf export supported")),
            DmaBufSupport::Unsupported { why } => Check::not_ok(
                "gpu",
                name,
                CheckStatus::Unsupported,
                format!("{detail}, no dma-buf export: {why}"),
                "dma-buf export needs CUDA >= 11.7 with NVIDIA's open kernel modules \
                 (nvidia-open); until then transfers use peer-memory style (nvidia-peermem) or staging",
            ),
        });
        for (nic, _) in &nics {
            out.push(pair(&places, &g.name, dmabuf, nic));
        }
    }
    for e in &probe.device_errors {
        out.push(Check::not_ok(
            "gpu",
            "device",
            CheckStatus::Error,
            e.clone(),
            "check `nvidia-smi` and the kernel log (dmesg) for this GPU",
        ));
    }
}

fn driver(p: &CudaProbe) -> Check {
    if p.available() {
        Check::ok("cuda", "libcuda", p.summary_line())
    } else {
        Check::not_ok(
            "cuda",
            "libcuda",
            CheckStatus::Missing,
            p.summary_line(),
            "install the NVIDIA driver (libcuda.so.1) to use real GPUs; the simulated GPUs \
             (`dmaplane demo`, `bench p2p`) need nothing",
        )
    }
}

/// RDMA devices and their PCI functions' sysfs paths.
fn rdma_nics() -> Vec<(String, PathBuf)> {
    let Ok(dir) = std::fs::read_dir("/sys/class/infiniband") else {
        return Vec::new();
    };
    let mut v: Vec<(String, PathBuf)> = dir
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let dev = std::fs::canonicalize(e.path().join("device")).ok()?;
            Some((name, dev))
        })
        .collect();
    v.sort();
    v
}

/// Where the GPUs and RDMA NICs sit: the model built from their sysfs paths twice, with the
/// host bridges allowed to route peer to peer and without, since sysfs does not say which the
/// kernel decided.
struct Places {
    strict: Option<Topology>,
    allowed: Option<Topology>,
    /// Why the GPUs and NICs could not be placed.
    why: Option<String>,
    /// The kernel lets host bridges of this CPU route peer to peer (AMD Zen).
    kernel_allows: bool,
}

impl Places {
    fn new(probe: &CudaProbe, nics: &[(String, PathBuf)]) -> Places {
        let mut fns = Vec::new();
        let mut missing = Vec::new();
        for g in &probe.devices {
            match g
                .pci
                .as_deref()
                .and_then(|p| std::fs::canonicalize(format!("/sys/bus/pci/devices/{p}")).ok())
            {
                Some(path) => fns.push(PciFunction {
                    id: g.name.clone(),
                    kind: DeviceKind::Gpu,
                    path,
                }),
                None => missing.push(g.name.clone()),
            }
        }
        for (nic, path) in nics {
            fns.push(PciFunction {
                id: nic.clone(),
                kind: DeviceKind::Nic,
                path: path.clone(),
            });
        }
        let built = |allowed| from_pci_paths(&fns, allowed).map_err(|e| e.to_string());
        let (strict, allowed) = (built(false), built(true));
        let why = match (&strict, missing.is_empty()) {
            (Err(e), _) => Some(e.clone()),
            (Ok(_), false) => Some(format!(
                "the PCI function of {} is not in sysfs",
                missing.join(", ")
            )),
            _ => None,
        };
        Places {
            strict: strict.ok(),
            allowed: allowed.ok(),
            why,
            kernel_allows: amd_zen(),
        }
    }

    /// The route between `gpu` and `nic`, and a note when it depends on the kernel's allow-list.
    fn route(&self, gpu: &str, nic: &str) -> Result<(Route, Option<String>), String> {
        let (Some(strict), Some(allowed)) = (&self.strict, &self.allowed) else {
            return Err(self.why.clone().unwrap_or_else(|| "no topology".into()));
        };
        let r = strict.route_by_id(gpu, nic).map_err(|e| e.to_string())?;
        let open = allowed.route_by_id(gpu, nic).map_err(|e| e.to_string())?;
        if r == open {
            return Ok((r, None));
        }
        let bridge = strict
            .device_index(gpu)
            .ok()
            .and_then(|d| strict.host_bridge_of(d))
            .map_or("their host bridge".to_string(), |h| h.id.clone());
        Ok(if self.kernel_allows {
            (
                open,
                Some(format!(
                    "the kernel lets {bridge} route peer to peer on AMD Zen"
                )),
            )
        } else {
            (
                r,
                Some(format!(
                    "across root ports of {bridge}: thru-host-bridge only if the kernel's \
                     allow-list has this root complex (AMD Zen, some Intel Xeons); assumed not"
                )),
            )
        })
    }
}

/// Whether this is an AMD Zen host (family 17h or later), whose host bridges the kernel lets
/// route peer to peer.
fn amd_zen() -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return false;
    };
    let field = |key: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
    };
    field("vendor_id").as_deref() == Some("AuthenticAMD")
        && field("cpu family")
            .and_then(|f| f.parse::<u32>().ok())
            .is_some_and(|f| f >= 0x17)
}

fn pair(places: &Places, gpu: &str, dmabuf: bool, nic: &str) -> Check {
    let name = format!("{gpu} <-> {nic}");
    let (route, note) = match places.route(gpu, nic) {
        Ok(r) => r,
        Err(why) => {
            return Check::not_ok(
                "p2p",
                name,
                CheckStatus::Error,
                why,
                "run on the host, not in a container without /sys/bus/pci",
            );
        }
    };
    let peermem = std::path::Path::new("/sys/module/nvidia_peermem").exists();
    let (path, fix) = match route {
        Route::NotSupported => (
            "staged through host memory".to_string(),
            Some("place the job's GPU and NIC under one PCIe switch or root complex for zero-copy"),
        ),
        _ if dmabuf => ("dma-buf, zero-copy".to_string(), None),
        _ if peermem => (
            "peer-memory style (nvidia-peermem), zero-copy".to_string(),
            None,
        ),
        _ => (
            "staged: no dma-buf export and nvidia-peermem not loaded".to_string(),
            Some("install the open kernel modules for dma-buf, or `modprobe nvidia-peermem`"),
        ),
    };
    let mut detail = format!("route {}; path: {path}", route.as_str());
    if let Some(n) = note {
        detail.push_str(&format!(" ({n})"));
    }
    match fix {
        None => Check::ok("p2p", name, detail),
        Some(f) => Check::not_ok("p2p", name, CheckStatus::Unsupported, detail, f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn places(kernel_allows: bool) -> Places {
        let f = |id: &str, kind, path: &str| PciFunction {
            id: id.into(),
            kind,
            path: PathBuf::from(path),
        };
        let fns = [
            f(
                "cuda:0",
                DeviceKind::Gpu,
                "/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0/0000:03:00.0",
            ),
            f(
                "mlx5_0",
                DeviceKind::Nic,
                "/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:01.0/0000:04:00.0",
            ),
            f(
                "mlx5_1",
                DeviceKind::Nic,
                "/sys/devices/pci0000:00/0000:00:02.0/0000:05:00.0",
            ),
            f(
                "mlx5_2",
                DeviceKind::Nic,
                "/sys/devices/pci0000:80/0000:80:01.0/0000:81:00.0",
            ),
        ];
        Places {
            strict: from_pci_paths(&fns, false).ok(),
            allowed: from_pci_paths(&fns, true).ok(),
            why: None,
            kernel_allows,
        }
    }

    #[test]
    fn pairs_take_the_models_route_and_say_when_the_allow_list_decides() {
        for allows in [false, true] {
            let p = places(allows);
            assert_eq!(p.route("cuda:0", "mlx5_0"), Ok((Route::BusAddr, None)));
            assert_eq!(p.route("cuda:0", "mlx5_2"), Ok((Route::NotSupported, None)));
        }
        let (r, note) = places(false).route("cuda:0", "mlx5_1").unwrap();
        assert_eq!(r, Route::NotSupported);
        assert!(note.is_some_and(|n| n.contains("allow-list") && n.contains("pci0000:00")));
        let (r, note) = places(true).route("cuda:0", "mlx5_1").unwrap();
        assert_eq!(r, Route::ThruHostBridge);
        assert!(note.is_some_and(|n| n.contains("AMD Zen")));
        assert!(places(false).route("cuda:9", "mlx5_0").is_err());
    }
}
