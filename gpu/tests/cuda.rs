//! The CUDA backend. Everywhere: the probe, and the clean "no CUDA" errors. With a CUDA device:
//! allocations, host registration and copies through the safe API, dma-buf export (or its
//! fallback), free as a revoke (clean, and with a lying importer), and allocation errors. GPU
//! tests skip, saying why, where `devices()` finds no device; where a C compiler is found,
//! `fake_driver_runs_every_gpu_test` runs them all again against a strict fake `libcuda`
//! (`src/cuda/fake_libcuda.c`), so the device paths are exercised on every machine.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dmaplane_core::Invalid;
use dmaplane_core::fabric::{DeviceId, Mapping};
use dmaplane_core::{
    Accept, Access, AddrList, AddrSpace, AttachError, Attachment, DmaBufId, DmaRange, Export,
    Hints, Importer, ImporterKind, Invalidation, MemKind, Offer, SpaceKind,
};
use dmaplane_gpu::cuda::{self, CudaGpu, InitOutcome};
use dmaplane_gpu::{BackendKind, DmaBufSupport, DmaClient, Gpu, GpuError, Loc, PeerMemory};

// ---------------------------------------------------------------------------------------------
// Everywhere.

#[test]
fn probe_never_panics_and_is_self_consistent() {
    let p = cuda::probe();
    let line = p.summary_line();
    eprintln!("{line}");
    assert!(!line.contains('\n'), "{line}");
    assert!(line.starts_with("CUDA"), "{line}");
    if p.library_found {
        assert!(p.searched.is_empty(), "{p:?}");
    } else {
        assert!(
            p.searched.iter().any(|n| n == "libcuda.so.1"),
            "searched {:?}",
            p.searched
        );
        assert_eq!(p.init, InitOutcome::NotAttempted);
        assert_eq!(p.driver_version, None);
        assert_eq!(p.library_path, None);
        let why = p.unavailable.as_deref().unwrap();
        assert!(why.starts_with("libcuda not found (searched: "), "{why}");
        assert!(
            line.starts_with("CUDA: not available: libcuda not found (searched: "),
            "{line}"
        );
    }
    if p.init != InitOutcome::Ok {
        assert_eq!(p.device_count, 0, "{p:?}");
        assert!(p.unavailable.is_some(), "{p:?}");
        assert!(line.starts_with("CUDA: not available: "), "{line}");
    }
    if let InitOutcome::Failed { why } = &p.init {
        assert!(line.contains(why.as_str()), "{line}");
    }
    assert_eq!(
        p.devices.len() + p.device_errors.len(),
        p.device_count as usize,
        "{p:?}"
    );
    assert_eq!(p.available(), p.unavailable.is_none() && p.device_count > 0);
    if p.available() {
        let v = p.driver_version.as_deref().unwrap();
        assert!(line.starts_with(&format!("CUDA driver {v}, {} device(s)", p.device_count)));
        assert!(p.driver_version_raw.unwrap() >= 11000, "{p:?}");
    }
    for (i, d) in p.devices.iter().enumerate() {
        assert_eq!(d.backend, BackendKind::Cuda);
        assert_eq!(d.name, format!("cuda:{i}"));
        assert!(d.memory_bytes > 0, "{d:?}");
        assert_eq!(d.bar1_mapped, 0);
        if let Some(pci) = &d.pci {
            assert_eq!(pci.len(), 12, "{pci}");
            assert_eq!(pci, &pci.to_lowercase());
        }
        if let DmaBufSupport::Unsupported { why } = &d.dmabuf {
            assert!(!why.is_empty());
        }
    }
    // Cached, and the same every time.
    assert_eq!(cuda::probe().summary_line(), line);
    fn serializable<T: serde::Serialize>(_: &T) {}
    serializable(&p);
}

#[test]
fn without_cuda_every_entry_point_is_a_one_line_unavailable() {
    let p = cuda::probe();
    if p.available() {
        let gpus = cuda::devices().unwrap();
        if p.device_errors.is_empty() {
            assert_eq!(gpus.len(), p.device_count as usize);
        }
        for (g, info) in gpus.iter().zip(&p.devices) {
            assert_eq!(g.name(), info.name);
        }
        let e = CudaGpu::new(p.device_count).unwrap_err();
        assert!(matches!(e, GpuError::NoDevice { .. }), "{e}");
        return;
    }
    let why = p.unavailable.clone().unwrap();
    for e in [cuda::devices().map(|_| ()), CudaGpu::new(0).map(|_| ())] {
        let e = e.unwrap_err();
        assert!(matches!(e, GpuError::CudaUnavailable { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.starts_with("CUDA unavailable: "), "{msg}");
        if !p.library_found {
            assert!(msg.contains("libcuda.so"), "{msg}");
            assert_eq!(msg, format!("CUDA unavailable: {why}"));
        }
    }
}

/// Every GPU test, run again in a child process against a fake driver built from
/// `src/cuda/fake_libcuda.c` with the system C compiler: the device paths get exercised on
/// machines without a GPU, under a driver that aborts on misuse (a copy outside every allocation
/// and registration, a double free, a context released too early) and reports at exit what is
/// still allocated.
#[cfg(target_os = "linux")]
#[test]
fn fake_driver_runs_every_gpu_test() {
    use std::process::Command;
    if std::env::var_os(FAKE_CHILD_ENV).is_some() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("dmaplane-fake-libcuda-{}", std::process::id()));
    let why = dmaplane_tests::build_fake_libcuda(&dir).err();
    if let Some(why) = why {
        // In CI a missing fake driver would drop every CUDA test silently: fail instead.
        assert!(std::env::var_os("CI").is_none(), "CI is set and {why}");
        eprintln!("skipping: {why}");
        return;
    }
    let library_path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", dir.display()),
        _ => dir.display().to_string(),
    };
    let exe = std::env::current_exe().unwrap();
    let run = |variant: &str, require: bool| {
        let mut cmd = Command::new(&exe);
        cmd.args(["--test-threads", "2", "--nocapture"])
            .env("LD_LIBRARY_PATH", &library_path)
            .env(FAKE_CHILD_ENV, "1");
        if require {
            cmd.env(REQUIRE_GPU_ENV, "1");
        }
        if !variant.is_empty() {
            cmd.env(variant, "1");
        }
        let out = cmd.output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(
            out.status.success() && stdout.contains("test result: ok"),
            "fake driver {variant:?}: {}\n{stdout}\n{stderr}",
            out.status
        );
        assert!(
            !stderr.contains("FAKE CUDA"),
            "fake driver {variant:?}:\n{stderr}"
        );
        stderr
    };
    for variant in ["", "FAKE_CUDA_NO_PCIE", "FAKE_CUDA_NO_DMABUF"] {
        let stderr = run(variant, true);
        // Exactly the two allocations the lying importers keep (gpu_free_with_a_lying_importer_
        // leaks_instead_of_freeing, gpu_release_is_refused_before_revoke_and_a_leak_is_sticky).
        assert!(
            stderr.contains("fake-cuda at exit: 2 allocation(s) live, 0 registration(s) live"),
            "fake driver {variant:?}:\n{stderr}"
        );
    }
    // A driver without devices: every GPU test skips, saying why.
    let stderr = run("FAKE_CUDA_NODEV", false);
    assert!(
        stderr.contains(
            "skipping: no CUDA device: CUDA unavailable: cuInit failed: CUDA_ERROR_NO_DEVICE"
        ),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Helpers for the GPU tests.

/// Set for the runs of this binary against the fake driver: GPU tests must find a device.
const REQUIRE_GPU_ENV: &str = "DMAPLANE_CUDA_TESTS_REQUIRE_GPU";
/// Set for the runs of this binary against the fake driver: they must not start runs of their own.
const FAKE_CHILD_ENV: &str = "DMAPLANE_CUDA_TESTS_FAKE_CHILD";

/// The first CUDA device, or `None` (having said why) where there is none.
fn gpu_or_skip() -> Option<Gpu> {
    let why = match cuda::devices() {
        Ok(mut gpus) if !gpus.is_empty() => return Some(gpus.swap_remove(0)),
        Ok(_) => "the CUDA driver reports no device".to_string(),
        Err(e) => format!("no CUDA device: {e}"),
    };
    assert!(
        std::env::var_os(REQUIRE_GPU_ENV).is_none(),
        "{REQUIRE_GPU_ENV} is set but {why}"
    );
    eprintln!("skipping: {why}");
    None
}

/// A byte pattern that differs at every offset within a page and between seeds.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ ((i >> 8) as u8) ^ seed)
        .collect()
}

fn first_mismatch(got: &[u8], want: &[u8]) -> Option<usize> {
    got.iter().zip(want).position(|(a, b)| a != b)
}

/// Host memory exported by address in this process, as a test exporter: one memfd mapping,
/// listed as its two halves in swapped order, so that a copy walks two pieces and byte `i` of the
/// import is byte `(i + len / 2) % len` of the buffer.
struct HostBuf {
    mem: Mapping,
    export: Export,
    mmio: bool,
}

impl HostBuf {
    fn new(name: &str, len: u64) -> HostBuf {
        assert!(len.is_multiple_of(8192));
        HostBuf {
            mem: Mapping::memfd(name, len).unwrap(),
            export: Export::new(name),
            mmio: false,
        }
    }

    fn len(&self) -> u64 {
        self.mem.len() as u64
    }

    /// Host offset of import offset `i`.
    fn host_offset(&self, i: u64) -> u64 {
        (i + self.len() / 2) % self.len()
    }

    fn attach(
        &self,
        importer: Arc<dyn Importer>,
        accepts: &[Accept],
    ) -> Result<Attachment, AttachError> {
        let hints = if self.mmio {
            Hints::device_bar(dmaplane_core::Route::BusAddr)
        } else {
            Hints::HOST_MEMORY
        };
        let offers = [Offer {
            space: AddrSpace::ProcessVa,
            hints,
        }];
        let (va, half) = (self.mem.process_va(), self.len() / 2);
        self.export.attach(importer, &offers, accepts, |n| {
            let list = AddrList::new(
                n.offer.space,
                n.offer.hints,
                4096,
                vec![DmaRange::new(va + half, half), DmaRange::new(va, half)],
            )
            .map_err(|e| AttachError::Exporter {
                export: self.export.name().to_string(),
                what: e.to_string(),
            })?;
            Ok((list, None))
        })
    }

    fn import(&self, gpu: &Gpu, name: &str) -> dmaplane_gpu::Result<PeerMemory> {
        gpu.import(name, ImporterKind::Pinned, |i, a| self.attach(i, a))
    }

    /// Import `[off, off + len)` of the buffer as one range.
    fn import_slice(
        &self,
        gpu: &Gpu,
        name: &str,
        off: u64,
        len: u64,
    ) -> dmaplane_gpu::Result<PeerMemory> {
        let va = self.mem.process_va() + off;
        gpu.import(name, ImporterKind::Pinned, |i, accepts| {
            let offers = [Offer {
                space: AddrSpace::ProcessVa,
                hints: Hints::HOST_MEMORY,
            }];
            self.export.attach(i, &offers, accepts, |n| {
                // Byte granule: the slices start and end mid-page.
                let list = AddrList::new(
                    n.offer.space,
                    n.offer.hints,
                    1,
                    vec![DmaRange::new(va, len)],
                )
                .map_err(|e| AttachError::Exporter {
                    export: self.export.name().to_string(),
                    what: e.to_string(),
                })?;
                Ok((list, None))
            })
        })
    }
}

/// An importer of device memory that signals its fence (or, lying, never does).
struct TestImporter {
    name: String,
    honest: bool,
    invalidations: AtomicU64,
}

impl TestImporter {
    fn new(name: &str, honest: bool) -> Arc<TestImporter> {
        Arc::new(TestImporter {
            name: name.to_string(),
            honest,
            invalidations: AtomicU64::new(0),
        })
    }
}

impl Importer for TestImporter {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> ImporterKind {
        ImporterKind::Pinned
    }

    fn invalidate(&self, inv: Invalidation) {
        self.invalidations.fetch_add(1, Ordering::SeqCst);
        if self.honest {
            inv.fence.signal();
        }
    }
}

/// What a verbs NIC accepts: a dma-buf first, else a device VA (peer memory), MMIO allowed.
fn nic_accepts() -> Vec<Accept> {
    vec![
        Accept::new(SpaceKind::DmaBuf, Access::READ_WRITE).with_mmio(),
        Accept::new(SpaceKind::DeviceVa, Access::READ_WRITE).with_mmio(),
    ]
}

const SECOND: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// With a CUDA device.

#[test]
fn gpu_alloc_write_read_round_trip() {
    let Some(gpu) = gpu_or_skip() else { return };
    let info = gpu.info();
    assert_eq!(info.backend, BackendKind::Cuda);
    assert!(gpu.name().starts_with("cuda:"));
    // Not a whole number of GPU pages: the padding must not show.
    let len = (1 << 20) + 4099;
    let mem = gpu.alloc("round-trip", len as u64).unwrap();
    assert_eq!(mem.len(), len as u64);
    assert_eq!(mem.gpu(), gpu.name());
    let data = pattern(len, 7);
    mem.write(0, &data).unwrap();
    let mut back = vec![0u8; len];
    mem.read(0, &mut back).unwrap();
    assert_eq!(first_mismatch(&back, &data), None);
    // Partial writes and reads at odd offsets, up to the last byte.
    let patch = pattern(5000, 99);
    mem.write(len as u64 - 5000, &patch).unwrap();
    let mut tail = vec![0u8; 5001];
    mem.read(len as u64 - 5001, &mut tail).unwrap();
    assert_eq!(tail[0], data[len - 5001]);
    assert_eq!(first_mismatch(&tail[1..], &patch), None);
    // One byte past the end is refused, and nothing is written.
    let e = mem.write(len as u64 - 1, &[1, 2]).unwrap_err();
    assert!(
        matches!(
            e,
            GpuError::Invalid(Invalid {
                field: "offset",
                ..
            })
        ),
        "{e}"
    );
    let e = mem.read(len as u64, &mut [0u8; 1]).unwrap_err();
    assert!(
        matches!(
            e,
            GpuError::Invalid(Invalid {
                field: "offset",
                ..
            })
        ),
        "{e}"
    );
    let report = mem.free(SECOND).unwrap();
    assert!(report.is_clean() && report.importers.is_empty(), "{report}");
}

#[test]
fn gpu_host_registration_and_copies_check_every_byte() {
    let Some(gpu) = gpu_or_skip() else { return };
    let len: u64 = 4 << 20;
    // Declared first: unmapped after every import of it is gone.
    let host = HostBuf::new("host", len);
    let host_bytes = pattern(len as usize, 3);
    assert!(host.mem.write(0, &host_bytes));
    let peer = host.import(&gpu, "host").unwrap();
    assert_eq!(peer.len(), len);
    assert!(
        peer.negotiation().contains("process-va"),
        "{}",
        peer.negotiation()
    );
    let mem = gpu.alloc("dev", len).unwrap();

    // H2D: all of it, through both pieces of the list.
    gpu.copy(Loc::Peer(&peer, 0), Loc::Mem(&mem, 0), len)
        .unwrap();
    let mut dev = vec![0u8; len as usize];
    mem.read(0, &mut dev).unwrap();
    let want: Vec<u8> = (0..len)
        .map(|i| host_bytes[host.host_offset(i) as usize])
        .collect();
    assert_eq!(first_mismatch(&dev, &want), None);

    // D2H: new device bytes back to the host, every byte checked through the mapping.
    let dev_bytes = pattern(len as usize, 200);
    mem.write(0, &dev_bytes).unwrap();
    gpu.copy(Loc::Mem(&mem, 0), Loc::Peer(&peer, 0), len)
        .unwrap();
    let mut now = vec![0u8; len as usize];
    assert!(host.mem.read(0, &mut now));
    let want: Vec<u8> = (0..len)
        .map(|h| dev_bytes[((h + len / 2) % len) as usize])
        .collect();
    assert_eq!(first_mismatch(&now, &want), None);

    // Unaligned pieces straddling the halves' boundary.
    let (off, n) = (len / 2 - 4099, 100_003u64);
    assert!(host.mem.write(0, &host_bytes));
    gpu.copy(Loc::Peer(&peer, off), Loc::Mem(&mem, 13), n)
        .unwrap();
    let mut got = vec![0u8; n as usize];
    mem.read(13, &mut got).unwrap();
    let want: Vec<u8> = (off..off + n)
        .map(|i| host_bytes[host.host_offset(i) as usize])
        .collect();
    assert_eq!(first_mismatch(&got, &want), None);

    // Past the end of the import is refused.
    let e = gpu
        .copy(Loc::Peer(&peer, len - 1), Loc::Mem(&mem, 0), 2)
        .unwrap_err();
    assert!(
        matches!(
            e,
            GpuError::Invalid(Invalid {
                field: "offset",
                ..
            })
        ),
        "{e}"
    );

    // The same buffer imported again shares the driver's registration; dropping one import
    // leaves the other working.
    let again = host.import(&gpu, "host-again").unwrap();
    drop(peer);
    gpu.copy(Loc::Mem(&mem, 0), Loc::Peer(&again, 0), 4096)
        .unwrap();

    // Revoked by its exporter: copies stop.
    let report = host.export.revoke(SECOND);
    assert!(report.is_clean(), "{report}");
    assert!(again.is_revoked());
    let e = gpu
        .copy(Loc::Mem(&mem, 0), Loc::Peer(&again, 0), 4096)
        .unwrap_err();
    assert!(matches!(e, GpuError::Revoked { .. }), "{e}");
    drop(again);
    mem.free(SECOND).unwrap();
}

/// Imports of overlapping slices of one buffer: the second registers only the pages the first
/// did not (the driver refuses any overlap), copies across the seam are cut at it, and the
/// shared registration outlives the import that made it. The fake driver aborts on a copy that
/// leaves one registration and on unregistering what is not registered.
#[test]
fn gpu_overlapping_imports_share_pages_and_register_only_the_gaps() {
    let Some(gpu) = gpu_or_skip() else { return };
    let mib: u64 = 1 << 20;
    let host = HostBuf::new("overlap", 4 * mib);
    let bytes = pattern((4 * mib) as usize, 9);
    assert!(host.mem.write(0, &bytes));
    let mem = gpu.alloc("overlap-dev", 3 * mib).unwrap();
    // Unaligned ends: the slices' pages overlap by a page more than their bytes do.
    let a = host
        .import_slice(&gpu, "first", 100, 3 * mib - 200)
        .unwrap();
    let b = host
        .import_slice(&gpu, "second", mib + 100, 3 * mib - 100)
        .unwrap();
    let check = |peer: &PeerMemory, off: u64| {
        let n = peer.len();
        gpu.copy(Loc::Peer(peer, 0), Loc::Mem(&mem, 0), n).unwrap();
        let mut got = vec![0u8; n as usize];
        mem.read(0, &mut got).unwrap();
        assert_eq!(
            first_mismatch(&got, &bytes[off as usize..(off + n) as usize]),
            None,
            "{}",
            peer.name()
        );
    };
    check(&a, 100);
    check(&b, mib + 100);
    // The first import's registration now serves only the second.
    drop(a);
    check(&b, mib + 100);
    // Device to host across the seam, every byte checked in the buffer.
    let dev = pattern((3 * mib) as usize, 77);
    mem.write(0, &dev).unwrap();
    gpu.copy(Loc::Mem(&mem, 0), Loc::Peer(&b, 0), b.len())
        .unwrap();
    let mut now = vec![0u8; (4 * mib) as usize];
    assert!(host.mem.read(0, &mut now));
    let landed = &now[(mib + 100) as usize..];
    assert_eq!(first_mismatch(landed, &dev[..landed.len()]), None);
    drop(b);
    mem.free(SECOND).unwrap();
}

#[test]
fn gpu_device_to_device_copy() {
    let Some(gpu) = gpu_or_skip() else { return };
    let len = 3 << 20;
    let a = gpu.alloc("a", len).unwrap();
    let b = gpu.alloc("b", len).unwrap();
    let data = pattern(len as usize, 42);
    a.write(0, &data).unwrap();
    b.write(0, &vec![0u8; len as usize]).unwrap();
    gpu.copy(Loc::Mem(&a, 0), Loc::Mem(&b, 0), len).unwrap();
    let mut got = vec![0u8; len as usize];
    b.read(0, &mut got).unwrap();
    assert_eq!(first_mismatch(&got, &data), None);
    // An unaligned window lands exactly where asked, and nothing around it moves.
    let zero = vec![0u8; len as usize];
    b.write(0, &zero).unwrap();
    gpu.copy(Loc::Mem(&a, 1001), Loc::Mem(&b, 77), 65_539)
        .unwrap();
    b.read(0, &mut got).unwrap();
    assert!(got[..77].iter().all(|&x| x == 0));
    assert_eq!(
        first_mismatch(&got[77..77 + 65_539], &data[1001..1001 + 65_539]),
        None
    );
    assert!(got[77 + 65_539..].iter().all(|&x| x == 0));
    // Overlapping source and destination (undefined for cuMemcpy) are refused.
    let e = gpu
        .copy(Loc::Mem(&a, 0), Loc::Mem(&a, 4096), 8192)
        .unwrap_err();
    assert!(
        matches!(e, GpuError::Invalid(Invalid { field: "dst", .. }))
            && e.to_string().contains("overlaps"),
        "{e}"
    );
    // The raw copy engine refuses addresses outside live allocations and registrations.
    let e = gpu.backend().copy(0x1000, 0x2000, 16).unwrap_err();
    assert!(
        matches!(e, GpuError::Invalid(Invalid { field: "src", .. })),
        "{e}"
    );
    a.free(SECOND).unwrap();
    b.free(SECOND).unwrap();
}

#[test]
fn gpu_registration_takes_process_va_only() {
    let Some(gpu) = gpu_or_skip() else { return };
    let list = AddrList::single(
        AddrSpace::CpuPhys,
        Hints::HOST_MEMORY,
        4096,
        DmaRange::new(0x1000_0000, 0x1000),
    )
    .unwrap();
    let e = gpu.backend().register("phys", &list).unwrap_err();
    match &e {
        GpuError::Invalid(Invalid {
            field, value, why, ..
        }) => {
            assert_eq!(*field, "list.space");
            assert_eq!(value, "cpu-phys");
            assert!(why.contains("process-va"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    // A host buffer offered as MMIO is registered with IOMEMORY, which ordinary memory is not:
    // the driver refuses, and the error says what IOMEMORY needs.
    let mut host = HostBuf::new("fake-mmio", 1 << 16);
    host.mmio = true;
    match host.import(&gpu, "fake-mmio") {
        Err(GpuError::Cuda { call, why, .. }) => {
            assert_eq!(call, "cuMemHostRegister");
            assert!(why.contains("IOMEMORY"), "{why}");
        }
        Err(other) => panic!("{other:?}"),
        Ok(p) => {
            // Some drivers accept IOMEMORY on ordinary pages; copies must then still work.
            eprintln!("note: the driver registered ordinary memory with IOMEMORY");
            let m = gpu.alloc("m", 1 << 16).unwrap();
            if let Err(e) = gpu.copy(Loc::Peer(&p, 0), Loc::Mem(&m, 0), 1 << 16) {
                eprintln!("note: and refused the copy: {e}");
            }
        }
    }
}

#[test]
fn gpu_dmabuf_export_or_peer_memory_fallback() {
    let Some(gpu) = gpu_or_skip() else { return };
    let ordinal: u32 = gpu.name().trim_start_matches("cuda:").parse().unwrap();
    let len = 2 << 20;
    let mem = gpu.alloc("export", len).unwrap();
    let offers = mem.offers(DmaClient::External);
    let note = mem.export_note();
    eprintln!("{note}");
    let device_va = AddrSpace::DeviceVa { device: ordinal };
    match gpu.info().dmabuf {
        DmaBufSupport::Supported => {
            assert_eq!(offers.len(), 2, "{offers:?}: {note}");
            let AddrSpace::DmaBuf { id } = offers[0].space else {
                panic!("first offer {:?}: {note}", offers[0]);
            };
            assert_eq!(offers[1].space, device_va);
            let fd = mem.dmabuf_fd().unwrap();
            let st = rustix::fs::fstat(fd).unwrap();
            assert_eq!(
                id,
                DmaBufId {
                    dev: st.st_dev,
                    ino: st.st_ino
                }
            );
            assert!(note.starts_with("dma-buf fd "), "{note}");
            // Made once and kept: the same fd on every call.
            let again = mem.dmabuf_fd().unwrap();
            assert_eq!(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                std::os::fd::AsRawFd::as_raw_fd(&again)
            );
            assert_eq!(gpu.info().bar1_mapped, len);
            // A dma-buf importer gets offsets [0, len).
            let nic = TestImporter::new("nic", true);
            let att = mem
                .attach(nic, DmaClient::External, &nic_accepts())
                .unwrap();
            let list = att.map().unwrap().list;
            assert_eq!(list.space(), offers[0].space);
            assert_eq!(list.ranges(), &[DmaRange::new(0, len)]);
            assert_eq!(list.hints().mem, MemKind::Mmio);
        }
        DmaBufSupport::Unsupported { why } => {
            assert_eq!(offers.len(), 1, "{offers:?}");
            assert_eq!(offers[0].space, device_va);
            assert!(mem.dmabuf_fd().is_none());
            assert!(note.starts_with("peer-memory style device VA"), "{note}");
            assert!(note.contains(&why), "{note} / {why}");
        }
    }
    // A peer-memory importer gets the device VAs of the whole allocation.
    let peermem = TestImporter::new("peermem", true);
    let accepts = [Accept::new(SpaceKind::DeviceVa, Access::READ_WRITE).with_mmio()];
    let att = mem.attach(peermem, DmaClient::External, &accepts).unwrap();
    let list = att.map().unwrap().list;
    assert_eq!(list.space(), device_va);
    assert_eq!(list.total_len(), len);
    assert_eq!(list.ranges()[0].addr % cuda::GPU_PAGE, 0, "{list:?}");
    assert_eq!(list.granule(), cuda::GPU_PAGE);
    // Nothing on the simulated fabric can reach it.
    assert!(mem.offers(DmaClient::Fabric(DeviceId(0))).is_empty());
    let e = mem
        .attach(
            TestImporter::new("sim", true),
            DmaClient::Fabric(DeviceId(0)),
            &nic_accepts(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("not supported by cuda"), "{e}");
    drop(att);
    let report = mem.free(SECOND).unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(gpu.info().bar1_mapped, 0);
}

#[test]
fn gpu_free_revokes_a_signalling_importer_first() {
    let Some(gpu) = gpu_or_skip() else { return };
    let mem = gpu.alloc("freed", 1 << 20).unwrap();
    let nic = TestImporter::new("nic-honest", true);
    let att = mem
        .attach(nic.clone(), DmaClient::External, &nic_accepts())
        .unwrap();
    att.map().unwrap();
    let report = mem.free(SECOND).unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.importers.len(), 1);
    assert_eq!(report.importers[0].importer, "nic-honest");
    assert_eq!(nic.invalidations.load(Ordering::SeqCst), 1);
    assert!(matches!(att.map(), Err(AttachError::Revoked { .. })));

    // Dropped without a free: revoked all the same.
    let mem = gpu.alloc("dropped", 1 << 20).unwrap();
    let nic = TestImporter::new("nic-dropped", true);
    let att = mem
        .attach(nic.clone(), DmaClient::External, &nic_accepts())
        .unwrap();
    drop(mem);
    assert_eq!(nic.invalidations.load(Ordering::SeqCst), 1);
    assert!(att.map().is_err());
}

#[test]
fn gpu_free_with_a_lying_importer_leaks_instead_of_freeing() {
    let Some(gpu) = gpu_or_skip() else { return };
    let mem = gpu.alloc("lied-to", 1 << 20).unwrap();
    mem.write(0, b"still here").unwrap();
    let liar = TestImporter::new("nic-liar", false);
    let honest = TestImporter::new("nic-ok", true);
    let _a = mem
        .attach(liar.clone(), DmaClient::External, &nic_accepts())
        .unwrap();
    let _b = mem
        .attach(honest.clone(), DmaClient::External, &nic_accepts())
        .unwrap();
    let start = Instant::now();
    let e = mem.free(Duration::from_millis(50)).unwrap_err();
    assert!(start.elapsed() >= Duration::from_millis(50));
    assert!(start.elapsed() < 10 * SECOND);
    match &e {
        GpuError::FreeTimedOut {
            gpu: g,
            alloc,
            importers,
            deadline_us,
            released,
            ..
        } => {
            assert_eq!(g, gpu.name());
            assert_eq!(alloc, "lied-to");
            assert_eq!(importers, &["nic-liar".to_string()]);
            assert_eq!(*deadline_us, 50_000);
            assert!(!released, "memory a liar may write must not be freed");
        }
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("nic-liar") && msg.contains("leaked"), "{msg}");
    assert_eq!(liar.invalidations.load(Ordering::SeqCst), 1);
    assert_eq!(honest.invalidations.load(Ordering::SeqCst), 1);
    // The GPU goes on working after the leak.
    let m = gpu.alloc("after", 4096).unwrap();
    m.write(0, b"ok").unwrap();
    m.free(SECOND).unwrap();
}

#[test]
fn gpu_release_is_refused_before_revoke_and_a_leak_is_sticky() {
    let Some(gpu) = gpu_or_skip() else { return };
    let a = gpu.backend().alloc("raw", 1 << 16).unwrap();
    let liar = TestImporter::new("raw-liar", false);
    let _att = a.attach(liar, DmaClient::External, &nic_accepts()).unwrap();
    let fake = a.revoke(Duration::ZERO);
    // A second backend, with nothing to revoke, gives a clean report to pass by mistake.
    let other = gpu.backend().alloc("other", 1 << 16).unwrap();
    let e = other.release(&fake).unwrap_err();
    assert!(
        matches!(
            e,
            GpuError::Invalid(Invalid {
                field: "report",
                ..
            })
        ),
        "{e}"
    );
    assert!(!fake.is_clean(), "{fake}");
    // Revoked again: "already revoked", nobody late; the liar is still remembered.
    let again = a.revoke(Duration::ZERO);
    assert!(again.already_revoked && again.is_clean(), "{again}");
    assert!(
        !a.release(&again).unwrap(),
        "freed memory a liar may still write"
    );
    assert!(!a.release(&fake).unwrap());
    assert!(a.export_note().starts_with("leaked"), "{}", a.export_note());
    assert!(matches!(a.write(0, b"x"), Err(GpuError::Freed { .. })));
    let clean = other.revoke(SECOND);
    assert!(other.release(&clean).unwrap());
    assert!(other.release(&clean).unwrap(), "release is idempotent");
    assert!(matches!(
        other.read(0, &mut [0u8; 1]),
        Err(GpuError::Freed { .. })
    ));
    assert!(other.offers(DmaClient::External).is_empty());
    assert!(other.dmabuf_fd().is_none());
}

#[test]
fn gpu_absurd_allocations_are_clean_errors_naming_the_size() {
    let Some(gpu) = gpu_or_skip() else { return };
    for size in [1u64 << 60, u64::MAX] {
        let e = gpu.alloc("absurd", size).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&size.to_string()), "{msg}");
        assert!(
            matches!(
                e,
                GpuError::OutOfMemory { .. }
                    | GpuError::Invalid(Invalid { field: "size", .. })
                    | GpuError::Cuda { .. }
            ),
            "{e:?}"
        );
    }
    // Zero is refused by the safe API before the backend.
    assert!(matches!(
        gpu.alloc("empty", 0),
        Err(GpuError::Invalid(Invalid { field: "size", .. }))
    ));
    // And the device still allocates.
    gpu.alloc("fine", 4096).unwrap().free(SECOND).unwrap();
}

#[test]
fn gpu_host_copy_bandwidth_is_positive() {
    let Some(_) = gpu_or_skip() else { return };
    let gpu = CudaGpu::new(0).unwrap();
    let (h2d, d2h) = cuda::host_copy_bandwidth(&gpu, 8 << 20, 4).unwrap();
    eprintln!("H2D {:.2} GB/s, D2H {:.2} GB/s", h2d / 1e9, d2h / 1e9);
    assert!(h2d.is_finite() && h2d > 1e6, "{h2d}");
    assert!(d2h.is_finite() && d2h > 1e6, "{d2h}");
    let e = cuda::host_copy_bandwidth(&gpu, 0, 4).unwrap_err();
    assert!(
        matches!(e, GpuError::Invalid(Invalid { field: "bytes", .. })),
        "{e}"
    );
    let e = cuda::host_copy_bandwidth(&gpu, 4096, 0).unwrap_err();
    assert!(
        matches!(e, GpuError::Invalid(Invalid { field: "iters", .. })),
        "{e}"
    );
}

/// Device memory this test allocates itself, as a framework would (`cuMemAlloc` in the primary
/// context), and gives back when dropped: the keeper of lent memory. `dropped` says when.
struct RawAlloc {
    ctx: usize,
    base: u64,
    dropped: Arc<std::sync::atomic::AtomicBool>,
}

impl RawAlloc {
    fn new(len: usize) -> RawAlloc {
        use cudarc::driver::result;
        result::init().unwrap();
        let dev = result::device::get(0).unwrap();
        // SAFETY: the primary context of device 0, retained for the life of the process.
        let ctx = unsafe { result::primary_ctx::retain(dev) }.unwrap();
        // SAFETY: `ctx` is live; the allocation is freed once, by `drop`.
        let base = unsafe {
            result::ctx::set_current(ctx).unwrap();
            result::malloc_sync(len)
        }
        .unwrap();
        RawAlloc {
            ctx: ctx as usize,
            base,
            dropped: Arc::default(),
        }
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        // SAFETY: the context is live; `[addr, addr + len)` lies in this allocation.
        unsafe {
            cudarc::driver::result::ctx::set_current(self.ctx as cudarc::driver::sys::CUcontext)
                .unwrap();
            cudarc::driver::result::memcpy_dtoh_sync(&mut out, addr).unwrap();
        }
        out
    }
}

impl Drop for RawAlloc {
    fn drop(&mut self) {
        // SAFETY: the context is live and `base` came from cuMemAlloc, freed once (here).
        unsafe {
            cudarc::driver::result::ctx::set_current(self.ctx as cudarc::driver::sys::CUcontext)
                .unwrap();
            cudarc::driver::result::free_sync(self.base).unwrap();
        }
        self.dropped.store(true, Ordering::SeqCst);
    }
}

#[test]
fn gpu_lent_memory_is_used_in_place_and_given_back_only_after_its_free() {
    let Some(gpu) = gpu_or_skip() else { return };
    let raw = RawAlloc::new(1 << 20);
    let dropped = raw.dropped.clone();
    // A tensor inside the allocation, not page aligned (as a caching allocator hands them out).
    let at = raw.base + 8192 + 512;
    let len = 64 << 10;
    assert_eq!(cuda::pointer_ordinal(at).unwrap(), Some(0));
    let host = vec![0u8; 4096];
    assert_eq!(cuda::pointer_ordinal(host.as_ptr() as u64).unwrap(), None);
    let base = raw.base;
    let data = pattern(len, 11);
    // SAFETY: the allocation lives until `raw` drops, which only the last free does.
    let mem = unsafe { gpu.lend("lent", at, len as u64, Box::new(())) }.unwrap();
    mem.write(0, &data).unwrap();
    let back = raw.read(at, len);
    // Written in place: the bytes are at the lent address, not in a copy.
    assert_eq!(first_mismatch(&back, &data), None);
    // A dma-buf over its host pages (inside the allocation) is offered, then the device VA.
    let offers = mem.offers(DmaClient::External);
    assert!(
        matches!(
            offers.first().map(|o| o.space),
            Some(AddrSpace::DmaBuf { .. })
        ) || mem.export_note().contains("no dma-buf"),
        "{offers:?}: {}",
        mem.export_note()
    );
    let report = mem.free(SECOND).unwrap();
    assert!(report.is_clean(), "{report}");
    // Refusals name the field: past the allocation's end, host memory.
    // SAFETY: the allocation lives until `raw` drops, which only the last free does.
    let e = unsafe { gpu.lend("too-long", base, (1 << 20) + 1, Box::new(())) }.unwrap_err();
    assert!(
        matches!(&e, GpuError::Invalid(Invalid { field: "len", .. })),
        "{e}"
    );
    // SAFETY: the allocation lives until `raw` drops, which only the last free does.
    let e = unsafe { gpu.lend("host", host.as_ptr() as u64, 4096, Box::new(())) }.unwrap_err();
    assert!(
        matches!(
            &e,
            GpuError::Invalid(Invalid {
                field: "address",
                ..
            })
        ),
        "{e}"
    );
    // The keeper: held until the free, dropped by it — and the memory is not freed by dmaplane
    // (the fake driver aborts on a cuMemFree of what is not an allocation's start, or twice).
    // SAFETY: the allocation lives until `raw` drops, which only the last free does.
    let mem = unsafe { gpu.lend("held", at, len as u64, Box::new(raw)) }.unwrap();
    assert!(
        !dropped.load(Ordering::SeqCst),
        "the keeper went before the free"
    );
    let report = mem.free(SECOND).unwrap();
    assert!(report.is_clean(), "{report}");
    assert!(
        dropped.load(Ordering::SeqCst),
        "the keeper was not given back by the free"
    );
}
