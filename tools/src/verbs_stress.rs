//! `stress revoke --backend verbs`.

use anyhow::{Result, bail};
use dmaplane_bench::stress::{StressConfig, StressReport};

pub fn run(
    _cfg: &StressConfig,
    _device: Option<&str>,
    _progress: &(dyn Fn(u64) + Sync),
) -> Result<StressReport> {
    bail!(
        "stress revoke --backend verbs is not implemented yet (the verbs backend itself is; see issue 3): use --backend sim"
    )
}
