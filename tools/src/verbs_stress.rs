//! `stress revoke --backend verbs`.

use anyhow::{Result, bail};
use dmaplane_bench::stress::{StressConfig, StressReport};

pub fn run(
    _cfg: &StressConfig,
    _device: Option<&str>,
    _progress: &(dyn Fn(u64) + Sync),
) -> Result<StressReport> {
    bail!("this dmaplane was built without the `verbs` feature: rebuild with `--features verbs`")
}
