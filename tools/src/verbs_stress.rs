//! `stress revoke --backend verbs`: the raw stress on a real RDMA device is the library's
//! ([`dmaplane::stress::run_verbs`], feature `verbs`); without the feature, a refusal that says
//! how to build it.

#[cfg(not(feature = "verbs"))]
pub fn run(
    _cfg: &dmaplane::stress::StressConfig,
    _device: Option<&str>,
    _progress: &(dyn Fn(u64) + Sync),
) -> anyhow::Result<dmaplane::stress::StressReport> {
    anyhow::bail!(
        "stress revoke --backend verbs needs the `verbs` feature, which this dmaplane was built \
         without: cargo build --release -p dmaplane-tools --features verbs (building needs cmake \
         and libclang-dev; running needs libibverbs1 and ibverbs-providers)"
    )
}

/// The raw stress on a real RDMA device.
#[cfg(feature = "verbs")]
pub fn run(
    cfg: &dmaplane::stress::StressConfig,
    device: Option<&str>,
    progress: &(dyn Fn(u64) + Sync),
) -> anyhow::Result<dmaplane::stress::StressReport> {
    Ok(dmaplane::stress::run_verbs(cfg, device, progress)?)
}
