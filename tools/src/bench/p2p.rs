//! `dmaplane bench p2p`.

use anyhow::{Result, bail};
use dmaplane_bench::p2p::{BenchReport, bench};
use dmaplane_core::cpu::Placement;
use dmaplane_gpu::cuda;
use serde::Serialize;

use crate::report::say;
use crate::units::bytes;

/// Host<->device bandwidth of one CUDA GPU, ours and PyTorch's in the same run.
#[derive(Debug, Serialize)]
pub struct CudaRow {
    pub gpu: String,
    pub h2d_gib_s: f64,
    pub d2h_gib_s: f64,
    /// PyTorch's pinned-memory copy of the same size, or why it was not measured.
    pub torch_h2d_gib_s: Option<f64>,
    pub torch_d2h_gib_s: Option<f64>,
    pub torch_note: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub sim: BenchReport,
    /// One line on CUDA: the driver found, or why not.
    pub cuda: String,
    pub cuda_rows: Vec<CudaRow>,
}

const GIB: f64 = (1u64 << 30) as f64;

pub fn run(size: u64, chunk: u64, reps: u32, no_pin: bool, json: bool) -> Result<()> {
    if !size.is_multiple_of(chunk) {
        bail!("--size {size} is not a multiple of --chunk {chunk}");
    }
    let placement = if no_pin { None } else { Placement::auto() };
    let sim = bench(size, chunk, reps, placement)?;
    let probe = cuda::probe();
    let mut cuda_rows = Vec::new();
    if probe.available() {
        for g in cuda::CudaGpu::all()? {
            let (h2d, d2h) = cuda::host_copy_bandwidth(&g, size, reps.max(3))?;
            let (th, td, note) = torch(g.ordinal(), size, reps.max(3));
            cuda_rows.push(CudaRow {
                gpu: format!("cuda:{}", g.ordinal()),
                h2d_gib_s: h2d / GIB,
                d2h_gib_s: d2h / GIB,
                torch_h2d_gib_s: th,
                torch_d2h_gib_s: td,
                torch_note: note,
            });
        }
    }
    let r = Report {
        sim,
        cuda: probe.summary_line(),
        cuda_rows,
    };
    if json {
        say!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    say!(
        "simulated GPU -> NIC -> NIC -> GPU, {} transfers in {} WRITEs",
        bytes(r.sim.size),
        bytes(r.sim.chunk),
    );
    say!(
        "memcpy (same run): {:.2} GiB/s copying {} in {} pieces between fresh, touched private \
         buffers (a plain memcpy: the reference); {:.2} GiB/s repeated over the same buffers \
         (cache-hot, context)",
        r.sim.memcpy_gib_s,
        bytes(r.sim.size),
        bytes(r.sim.chunk),
        r.sim.memcpy_hot_gib_s
    );
    say!("placement: {}", r.sim.placement);
    say!(
        "{:<17} {:<16} {:>6} {:>9} {:>9} {:>10}  flow",
        "route",
        "path",
        "copies",
        "GiB/s",
        "of memcpy",
        "of copies"
    );
    for row in &r.sim.rows {
        say!(
            "{:<17} {:<16} {:>6} {:>9.2} {:>8.0}% {:>9.0}%  {}",
            row.route.as_str(),
            row.path,
            row.copies,
            row.gib_s,
            row.of_memcpy * 100.0,
            row.of_copies * 100.0,
            row.flow
        );
    }
    say!(
        "of copies = bandwidth / (memcpy / copies): 100% means a path costs exactly the copies it makes"
    );
    say!("\n{}", r.cuda);
    for c in &r.cuda_rows {
        let t = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.2}"));
        say!(
            "  {}: H2D {:.2} GiB/s (PyTorch pinned {}), D2H {:.2} GiB/s (PyTorch pinned {}); {}",
            c.gpu,
            c.h2d_gib_s,
            t(c.torch_h2d_gib_s),
            c.d2h_gib_s,
            t(c.torch_d2h_gib_s),
            c.torch_note
        );
    }
    Ok(())
}

/// PyTorch's pinned-memory copies of `size` bytes on GPU `ordinal`, best of `reps`.
fn torch(ordinal: u32, size: u64, reps: u32) -> (Option<f64>, Option<f64>, String) {
    let script = format!(
        "import torch,time\n\
         d=torch.device('cuda:{ordinal}')\n\
         h=torch.empty({size},dtype=torch.uint8).pin_memory()\n\
         g=torch.empty({size},dtype=torch.uint8,device=d)\n\
         def bw(f):\n\
         \x20 best=0\n\
         \x20 for _ in range({reps}):\n\
         \x20   torch.cuda.synchronize(d);t=time.perf_counter();f();torch.cuda.synchronize(d)\n\
         \x20   best=max(best,{size}/(time.perf_counter()-t))\n\
         \x20 return best\n\
         g.copy_(h);h.copy_(g)\n\
         print(bw(lambda:g.copy_(h,non_blocking=True)),bw(lambda:h.copy_(g,non_blocking=True)))\n"
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output();
    match out {
        Err(e) => (
            None,
            None,
            format!("PyTorch reference not measured: python3: {e}"),
        ),
        Ok(o) if !o.status.success() => {
            let err = String::from_utf8_lossy(&o.stderr);
            let last = err.lines().last().unwrap_or("no output").to_string();
            (
                None,
                None,
                format!("PyTorch reference not measured: {last}"),
            )
        }
        Ok(o) => {
            let s = String::from_utf8_lossy(&o.stdout);
            let v: Vec<f64> = s
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            match v[..] {
                [h, d] => (
                    Some(h / GIB),
                    Some(d / GIB),
                    "PyTorch measured in the same run".into(),
                ),
                _ => (
                    None,
                    None,
                    format!("PyTorch reference not measured: unexpected output {s:?}"),
                ),
            }
        }
    }
}
