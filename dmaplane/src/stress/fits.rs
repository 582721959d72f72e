//! Whether a simulated run fits this machine's memory, checked before it starts.

use super::config::StressConfig;
use super::run_state::SNAPSHOTS;

/// Memory a simulated run holds at once: the source, the live target, the retired target whose
/// poison is checked at the next revoke, and the copies of the targets taken at their acks
/// (each `qps × depth × size`, page-rounded).
pub fn sim_memory_needed(cfg: &StressConfig) -> u64 {
    let region = (cfg.qps as u64)
        .saturating_mul(cfg.depth as u64)
        .saturating_mul(u64::from(cfg.size))
        .next_multiple_of(4096)
        .max(4096);
    region.saturating_mul(3 + SNAPSHOTS as u64)
}

/// Refuse at once a run that cannot fit this machine's memory (`available` bytes), saying what
/// it needs and the deepest queue that fits.
pub fn check_fits(cfg: &StressConfig, available: u64) -> Result<(), String> {
    let need = sim_memory_needed(cfg);
    // Leave a fifth for everything else the machine runs.
    let budget = available / 5 * 4;
    if need <= budget {
        return Ok(());
    }
    let per_depth = (3 + SNAPSHOTS as u64) * (cfg.qps as u64) * u64::from(cfg.size);
    let fits = budget.checked_div(per_depth).unwrap_or(0);
    Err(format!(
        "--qps {} × --depth {} × --size {} needs {} MiB (source, live target, retired target and \
         the copies taken at the acks), but only {} MiB are available ({} MiB usable): {}",
        cfg.qps,
        cfg.depth,
        cfg.size,
        need >> 20,
        available >> 20,
        budget >> 20,
        if fits > 0 {
            format!("at --size {} use --depth {} or less", cfg.size, fits)
        } else {
            "use fewer queue pairs or smaller WRITEs".into()
        }
    ))
}

/// `MemAvailable` from /proc/meminfo, in bytes.
pub fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::super::config::test_config as cfg;
    use super::*;

    #[test]
    fn a_run_that_cannot_fit_is_refused_with_what_it_needs_and_what_fits() {
        let gib = 1u64 << 30;
        // 64 x 128 x 1 MiB = 8 GiB a region, five regions, on a 24 GiB machine.
        let e = check_fits(&cfg(64, 128, 1 << 20), 24 * gib).unwrap_err();
        assert!(e.contains("needs 40960 MiB"), "{e}");
        assert!(e.contains("24576 MiB are available"), "{e}");
        assert!(e.contains("use --depth 61 or less"), "{e}");
        // What it proposes fits, and one more does not.
        assert!(check_fits(&cfg(64, 61, 1 << 20), 24 * gib).is_ok());
        assert!(check_fits(&cfg(64, 62, 1 << 20), 24 * gib).is_err());
        assert!(check_fits(&cfg(64, 128, 4096), 24 * gib).is_ok());
        // Nothing fits: say so instead of proposing depth 0.
        let e = check_fits(&cfg(4096, 1, 64 << 20), gib).unwrap_err();
        assert!(e.contains("fewer queue pairs or smaller WRITEs"), "{e}");
    }
}
