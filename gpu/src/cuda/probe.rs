//! What the machine offers the CUDA backend: the driver library, `cuInit`, the driver version
//! and every device's facts. Never panics: without the library nothing calls into it.

use cudarc::driver::result;
use serde::Serialize;

use super::device::{device_info, label};
use super::driver::{self, Library};
use crate::backend::{DmaBufSupport, GpuInfo};

/// How `cuInit(0)` went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum InitOutcome {
    /// Not called: no usable driver library.
    NotAttempted,
    Ok,
    Failed {
        why: String,
    },
}

/// What [`probe`] found.
#[derive(Debug, Clone, Serialize)]
pub struct CudaProbe {
    /// Whether a driver library (`libcuda`) could be loaded.
    pub library_found: bool,
    /// Where it was mapped from, when found.
    pub library_path: Option<String>,
    /// The library names searched, when none was found.
    pub searched: Vec<String>,
    /// Why the driver cannot be used (library missing or too old, `cuInit` failed, no devices).
    pub unavailable: Option<String>,
    pub init: InitOutcome,
    /// `cuDriverGetVersion` as `major.minor` ("12.8").
    pub driver_version: Option<String>,
    /// `cuDriverGetVersion` as the driver gives it (12080).
    pub driver_version_raw: Option<i32>,
    /// `cuDeviceGetCount`; 0 when the driver cannot be used.
    pub device_count: u32,
    /// The devices that could be queried, in ordinal order.
    pub devices: Vec<GpuInfo>,
    /// One line per device that could not be queried; with `devices`, one entry per device.
    pub device_errors: Vec<String>,
}

/// Look at the machine's CUDA driver and devices. Never panics.
pub fn probe() -> CudaProbe {
    let d = driver::driver();
    let mut p = CudaProbe {
        library_found: !matches!(d.library, Library::Missing { .. }),
        library_path: d.path().map(str::to_string),
        searched: match &d.library {
            Library::Missing { searched } => searched.clone(),
            _ => Vec::new(),
        },
        unavailable: d.unavailable(),
        init: match &d.init {
            None => InitOutcome::NotAttempted,
            Some(Ok(())) => InitOutcome::Ok,
            Some(Err(why)) => InitOutcome::Failed { why: why.clone() },
        },
        driver_version: d.version.map(driver::version_string),
        driver_version_raw: d.version,
        device_count: 0,
        devices: Vec::new(),
        device_errors: Vec::new(),
    };
    if p.unavailable.is_some() {
        return p;
    }
    let n = match result::device::get_count() {
        Ok(n) => u32::try_from(n).unwrap_or(0),
        Err(e) => {
            p.unavailable = Some(format!("cuDeviceGetCount failed: {}", driver::describe(e)));
            return p;
        }
    };
    p.device_count = n;
    if n == 0 {
        p.unavailable = Some("the CUDA driver reports 0 devices".into());
    }
    let version = d.version.unwrap_or(0);
    for ordinal in 0..n {
        match device_info(ordinal, version) {
            Ok(info) => p.devices.push(info),
            Err(e) => p.device_errors.push(format!("{}: {e}", label(ordinal))),
        }
    }
    p
}

impl CudaProbe {
    /// Whether the driver is usable and has at least one device.
    pub fn available(&self) -> bool {
        self.unavailable.is_none() && self.device_count > 0
    }

    /// One line: `CUDA: not available: <why>` or `CUDA driver 12.8, 1 device(s): ...`.
    pub fn summary_line(&self) -> String {
        if let Some(why) = &self.unavailable {
            return format!("CUDA: not available: {why}");
        }
        let mut line = format!(
            "CUDA driver {}, {} device(s)",
            self.driver_version
                .as_deref()
                .unwrap_or("(version unknown)"),
            self.device_count
        );
        let mut parts: Vec<String> = self
            .devices
            .iter()
            .map(|g| {
                let model = g.description.split(" (").next().unwrap_or(&g.description);
                let dmabuf = match g.dmabuf {
                    DmaBufSupport::Supported => "dma-buf",
                    DmaBufSupport::Unsupported { .. } => "no dma-buf",
                };
                format!("{} {model} ({dmabuf})", g.name)
            })
            .collect();
        parts.extend(self.device_errors.iter().cloned());
        if !parts.is_empty() {
            line.push_str(": ");
            line.push_str(&parts.join("; "));
        }
        // Every part is one line already; make sure of it.
        line.replace(['\n', '\r'], " ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_lines_are_one_line() {
        let p = CudaProbe {
            library_found: false,
            library_path: None,
            searched: vec!["libcuda.so".into(), "libcuda.so.1".into()],
            unavailable: Some("libcuda not found (searched: libcuda.so, libcuda.so.1)".into()),
            init: InitOutcome::NotAttempted,
            driver_version: None,
            driver_version_raw: None,
            device_count: 0,
            devices: Vec::new(),
            device_errors: Vec::new(),
        };
        assert_eq!(
            p.summary_line(),
            "CUDA: not available: libcuda not found (searched: libcuda.so, libcuda.so.1)"
        );
        assert!(!p.available());
        let p = CudaProbe {
            library_found: true,
            unavailable: None,
            init: InitOutcome::Ok,
            driver_version: Some("12.8".into()),
            driver_version_raw: Some(12080),
            device_count: 2,
            devices: vec![GpuInfo {
                name: "cuda:0".into(),
                backend: crate::BackendKind::Cuda,
                description: "NVIDIA H100 80GB HBM3 (compute 9.0, CUDA driver 12.8)".into(),
                pci: Some("0000:3b:00.0".into()),
                memory_bytes: 80 << 30,
                bar1_bytes: Some(128 << 30),
                bar1_mapped: 0,
                dmabuf: DmaBufSupport::Supported,
            }],
            device_errors: vec!["cuda:1: CUDA cuDeviceGetName on cuda:1: boom\nsecond".into()],
            ..p
        };
        assert!(p.available());
        assert_eq!(
            p.summary_line(),
            "CUDA driver 12.8, 2 device(s): cuda:0 NVIDIA H100 80GB HBM3 (dma-buf); \
             cuda:1: CUDA cuDeviceGetName on cuda:1: boom second"
        );
    }
}
