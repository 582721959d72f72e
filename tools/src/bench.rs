//! `dmaplane bench`: the macro benchmark harness.

use anyhow::{Result, bail};
use clap::Subcommand;
use dmaplane_bench::sgl::{Row, Scenario, measure};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Address list vs scatterlist model: build + map time, metadata bytes, translation entries.
    Sgl {
        /// Registrations timed per side (the median is reported).
        #[arg(long, default_value_t = 5)]
        iters: u32,
        /// Only these scenarios (bar-1g-contiguous, bar-64g-contiguous, host-1g-2m-hugepages,
        /// host-1g-4k-fragmented); default: all.
        #[arg(long, value_delimiter = ',')]
        scenario: Vec<String>,
    },
}

pub fn run(cmd: &BenchCmd, json: bool) -> Result<()> {
    match cmd {
        BenchCmd::Sgl { iters, scenario } => sgl(*iters, scenario, json),
    }
}

fn sgl(iters: u32, names: &[String], json: bool) -> Result<()> {
    if iters == 0 {
        bail!("--iters 0: at least one registration per side is needed");
    }
    let mut scenarios = Vec::new();
    for n in names {
        match Scenario::parse(n) {
            Some(s) => scenarios.push(s),
            None => bail!(
                "--scenario {n:?} is not a scenario (known: {})",
                Scenario::ALL.map(|s| s.name()).join(", ")
            ),
        }
    }
    if scenarios.is_empty() {
        scenarios = Scenario::ALL.to_vec();
    }
    let bar = ProgressBar::new(scenarios.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rows = Vec::new();
    for s in scenarios {
        bar.set_message(s.name());
        rows.push(measure(s, iters));
        bar.inc(1);
    }
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows);
    }
    Ok(())
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<22} {:>12} {:>12} {:>9} {:>11} {:>11} {:>9} {:>10} {:>10}",
        "scenario",
        "addrlist",
        "sgtable",
        "faster",
        "addrl meta",
        "sgt meta",
        "smaller",
        "addrl xlat",
        "sgt xlat"
    );
    for r in rows {
        println!(
            "{:<22} {:>12} {:>12} {:>8.1}x {:>11} {:>11} {:>8.1}x {:>10} {:>10}",
            r.scenario,
            ns(r.addrlist_ns),
            ns(r.sgtable_ns),
            r.time_ratio,
            bytes(r.addrlist_bytes),
            bytes(r.sgtable_bytes),
            r.bytes_ratio,
            format!("{}x{}", r.addrlist_entries, bytes(r.addrlist_page_size)),
            format!("{}x{}", r.sgtable_entries, bytes(r.sgtable_page_size)),
        );
    }
    println!(
        "\nmedian of {} registrations each way; xlat = MR translation entries x page size; a BAR's \
         ZONE_DEVICE page map is counted in sgt meta (built once per BAR: {} for the largest here)",
        rows.first().map_or(0, |r| r.iterations),
        ns(rows.iter().map(|r| r.pagemap_ns).max().unwrap_or(0))
    );
}

fn ns(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} ns"),
        1_000..1_000_000 => format!("{:.1} us", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} ms", n as f64 / 1e6),
        _ => format!("{:.2} s", n as f64 / 1e9),
    }
}

pub fn bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 && (v / 1024.0).fract() == 0.0
        || (v >= 1024.0 * 10.0 && i < U.len() - 1)
    {
        v /= 1024.0;
        i += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0}{}", U[i])
    } else {
        format!("{v:.1}{}", U[i])
    }
}
