//! `dmaplane doctor`'s GPU rows: the CUDA driver, each GPU (dma-buf support, BAR1), and for every
//! GPU/RDMA NIC pair the PCIe route (from sysfs) and the path a transfer would take.

use std::path::PathBuf;

use dmaplane_core::Route;
use dmaplane_gpu::DmaBufSupport;
use dmaplane_gpu::cuda::{self, CudaProbe};

use crate::bench::bytes;
use crate::doctor::{Check, Status};

pub fn checks(out: &mut Vec<Check>) {
    let probe = cuda::probe();
    out.push(driver(&probe));
    let nics = rdma_nics();
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
                Status::Unsupported,
                format!("{detail}, no dma-buf export: {why}"),
                "dma-buf export needs CUDA >= 11.7 with NVIDIA's open kernel modules \
                 (nvidia-open); until then transfers use peer-memory style (nvidia-peermem) or staging",
            ),
        });
        for (nic, nic_pci) in &nics {
            out.push(pair(&g.name, g.pci.as_deref(), dmabuf, nic, nic_pci));
        }
    }
    for e in &probe.device_errors {
        out.push(Check::not_ok(
            "gpu",
            "device",
            Status::Error,
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
            Status::Missing,
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

/// The route between two PCI functions from their sysfs paths, by the kernel's rule: a common
/// bridge below the root complex → bus-addr; the same root complex → through the host bridge
/// (if the kernel allow-lists it); otherwise not supported.
fn sysfs_route(a: &std::path::Path, b: &std::path::Path) -> Route {
    let (ca, cb): (Vec<_>, Vec<_>) = (a.components().collect(), b.components().collect());
    let common = ca.iter().zip(&cb).take_while(|(x, y)| x == y).count();
    // .../devices/pci0000:00/<root port>/<switch ports...>/<function>
    let Some(root) = ca
        .iter()
        .position(|c| c.as_os_str().to_string_lossy().starts_with("pci"))
    else {
        return Route::NotSupported;
    };
    if common > root + 1 && common < ca.len() && common < cb.len() {
        Route::BusAddr
    } else if common > root {
        Route::ThruHostBridge
    } else {
        Route::NotSupported
    }
}

fn pair(
    gpu: &str,
    gpu_pci: Option<&str>,
    dmabuf: bool,
    nic: &str,
    nic_dev: &std::path::Path,
) -> Check {
    let name = format!("{gpu} <-> {nic}");
    let Some(gdev) =
        gpu_pci.and_then(|p| std::fs::canonicalize(format!("/sys/bus/pci/devices/{p}")).ok())
    else {
        return Check::not_ok(
            "p2p",
            name,
            Status::Error,
            "the GPU's PCI function is not in sysfs",
            "run on the host, not in a container without /sys/bus/pci",
        );
    };
    let route = sysfs_route(&gdev, nic_dev);
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
    let detail = format!("route {}; path: {path}", route.as_str());
    match fix {
        None => Check::ok("p2p", name, detail),
        Some(f) => Check::not_ok("p2p", name, Status::Unsupported, detail, f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_from_sysfs_paths() {
        let p = |s: &str| PathBuf::from(s);
        let g = p("/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0/0000:03:00.0");
        let n = p("/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:01.0/0000:04:00.0");
        assert_eq!(sysfs_route(&g, &n), Route::BusAddr);
        let n2 = p("/sys/devices/pci0000:00/0000:00:02.0/0000:05:00.0");
        assert_eq!(sysfs_route(&g, &n2), Route::ThruHostBridge);
        let n3 = p("/sys/devices/pci0000:80/0000:80:01.0/0000:81:00.0");
        assert_eq!(sysfs_route(&g, &n3), Route::NotSupported);
    }
}
