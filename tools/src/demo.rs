//! `dmaplane demo`: GPU memory on one side of the built-in testbed → its NIC → the other NIC →
//! GPU memory on the other side, over every PCIe route the testbed has: zero-copy where the
//! route allows, staged through host memory where it does not, every byte verified. In the
//! middle of the first flow the receiving GPU frees its memory (a revoke): the NIC's queue pair
//! is stopped, its MR zapped and the sender's lease withdrawn before the free returns, the
//! transfer ends with a typed error naming the freed region, and it is sent again into new
//! memory — nothing lost, and the fabric's oracle sees nothing written after the ack.
//!
//! Every flow is two agents of the application library (`dmaplane::Agent`) on one testbed:
//! what a user's code does, and nothing more.

use anyhow::{Result, bail};
use clap::Args;
use dmaplane::flow::{
    FlowOptions, FlowReport, PathKind, SidePath, run_flow, testbed, testbed_flows,
};
use dmaplane_core::Route;
use serde::Serialize;

use crate::units::bytes;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Bytes each flow moves (a multiple of --chunk).
    #[arg(long, default_value_t = 32 << 20, value_parser = clap::value_parser!(u64).range(4096..=(4 << 30)))]
    size: u64,
    /// Bytes per RDMA WRITE (the agents' chunk).
    #[arg(long, default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(64..=(1 << 30)))]
    chunk: u64,
    /// Free the receiving GPU's memory of the first flow after this many WRITEs completed
    /// (default: a quarter of them).
    #[arg(long)]
    free_after: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct DemoReport {
    pub flows: Vec<FlowReport>,
    pub lost: u64,
    pub post_ack_accesses: u64,
    /// The fabric's oracle over the whole demo (every flow, the GPU free included).
    pub oracle: dmaplane_core::fabric::Verdict,
    pub bytes_verified: u64,
    pub verified: bool,
    pub seconds: f64,
}

pub fn run(a: &DemoArgs, json: bool) -> Result<()> {
    if !a.size.is_multiple_of(a.chunk) {
        bail!(
            "--size {} is not a multiple of --chunk {}: every request moves one whole chunk",
            a.size,
            a.chunk
        );
    }
    let chunks = a.size / a.chunk;
    let free_after = a.free_after.unwrap_or(chunks / 4);
    if free_after >= chunks {
        bail!("--free-after {free_after}: must be less than the {chunks} requests of a flow");
    }
    let start = std::time::Instant::now();
    let depth = u32::try_from(chunks.min(16)).unwrap_or(16);
    let tb = testbed(None)?;
    let mut flows = Vec::new();
    for (i, (_, flow)) in testbed_flows().into_iter().enumerate() {
        let o = FlowOptions {
            size: a.size,
            chunk: a.chunk,
            // Few requests in flight where the GPU frees its memory, so the free meets most of
            // the transfer still to come (posts refused) and a few requests under way.
            depth: if i == 0 { depth.min(4) } else { depth },
            free_after: (i == 0).then_some(free_after),
            force_staged: false,
        };
        flows.push(run_flow(&tb, &flow, &o)?);
    }
    let oracle = tb.fabric().oracle().verdict();
    let r = DemoReport {
        lost: flows.iter().map(|f| f.lost).sum(),
        post_ack_accesses: flows.iter().map(|f| f.post_ack_accesses).sum(),
        bytes_verified: flows.iter().map(|f| f.bytes_verified).sum(),
        verified: flows.iter().all(|f| f.is_clean()) && oracle.is_clean() && oracle.acks > 0,
        oracle,
        seconds: start.elapsed().as_secs_f64(),
        flows,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print_summary(&r);
    }
    if !r.verified {
        bail!(
            "verification failed: lost = {}, post_ack_accesses = {}, oracle: {}, {} of {} bytes \
             verified",
            r.lost,
            r.post_ack_accesses,
            r.oracle,
            r.bytes_verified,
            a.size * r.flows.len() as u64
        );
    }
    Ok(())
}

fn side(p: &SidePath) -> String {
    let how = match p.path {
        PathKind::Direct => "direct, zero-copy".to_string(),
        PathKind::Staged => format!(
            "staged through {}",
            p.staging.as_deref().unwrap_or("host memory")
        ),
    };
    format!("{}-{} {}: {how}", p.gpu, p.nic, p.route.as_str())
}

/// The first line of a negotiation or refusal, which is what a person needs.
fn why(p: &SidePath) -> String {
    if p.path == PathKind::Staged && p.route == Route::NotSupported {
        return format!(
            "no P2P route: {} and {} share no switch and no allow-listed host bridge, so {} \
             refused every offer (the full refusal is in --json)",
            p.gpu, p.nic, p.nic
        );
    }
    p.why.lines().next().unwrap_or_default().to_string()
}

fn print_summary(r: &DemoReport) {
    println!(
        "dmaplane demo: GPU memory -> NIC -> NIC -> GPU memory on the built-in testbed, one flow per PCIe route"
    );
    for (i, f) in r.flows.iter().enumerate() {
        println!(
            "\nflow {}  {}  ({} in {} WRITEs of {})",
            i + 1,
            f.flow,
            bytes(f.size),
            f.size / f.chunk,
            bytes(f.chunk)
        );
        println!("  sender    {}", side(&f.src));
        println!("            why: {}", why(&f.src));
        println!("  receiver  {}", side(&f.dst));
        println!("            why: {}", why(&f.dst));
        if let Some(fr) = &f.free {
            println!(
                "  GPU free  {} freed its memory after {} requests completed: {} importer(s) \
                 quiesced and acked in {} us",
                f.flow.dst_gpu, fr.after_completions, fr.importers_quiesced, fr.latency_us
            );
            if fr.attempts > 1 {
                println!(
                    "            (attempt {}: the earlier transfers ended before the free met them)",
                    fr.attempts
                );
            }
            println!("            the transfer ended with: {}", fr.transfer_error);
            println!(
                "            a WRITE to the freed region: {}",
                fr.post_after_free.lines().next().unwrap_or_default()
            );
            println!(
                "            sent again into new memory: {} requests",
                fr.resent
            );
        }
        println!(
            "  result    {} verified; {} posted, {} completed ({} flushed), lost = {}, oracle violations = {}{}",
            bytes(f.bytes_verified),
            f.posted,
            f.completed,
            f.flushed,
            f.lost,
            f.post_ack_accesses,
            if f.bytes_per_sec > 0.0 {
                format!(
                    ", {:.2} GiB/s ({} cop{} per byte)",
                    f.bytes_per_sec / (1u64 << 30) as f64,
                    f.copies,
                    if f.copies == 1 { "y" } else { "ies" }
                )
            } else {
                String::new()
            }
        );
    }
    println!(
        "\n{}: lost = {}, post_ack_accesses = {}, oracle: {}; {} verified in {:.2} s",
        if r.verified {
            "every byte verified"
        } else {
            "VERIFICATION FAILED"
        },
        r.lost,
        r.post_ack_accesses,
        r.oracle,
        bytes(r.bytes_verified),
        r.seconds
    );
}
