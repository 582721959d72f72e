//! The same loops `python/bench.py` runs from Python, run here in Rust on the same agents in
//! the same process: the reference each Python number is reported against (a ratio measured in
//! one run, never a timed assertion).

use std::time::{Duration, Instant};

use pyo3::prelude::*;

use crate::agent::Agent;
use crate::blocks::Prepared;
use crate::desc::{Desc, RemoteDesc};
use crate::errors::to_py;
use crate::peer::Peer;

/// `n` transfers of `local` → `remote` (WRITE, or READ with `write=False`), each posted and
/// waited for in turn, through the Rust API with the GIL released: seconds taken.
#[pyfunction]
#[pyo3(signature = (agent, peer, local, remote, n, write = true))]
pub(crate) fn rust_transfer_loop(
    py: Python<'_>,
    agent: PyRef<'_, Agent>,
    peer: PyRef<'_, Peer>,
    local: PyRef<'_, Desc>,
    remote: PyRef<'_, RemoteDesc>,
    n: u64,
    write: bool,
) -> PyResult<f64> {
    let a = agent.agent()?;
    let (p, l, r) = (peer.inner.clone(), [local.inner], [remote.inner.clone()]);
    py.detach(|| {
        let t0 = Instant::now();
        for _ in 0..n {
            let t = if write {
                a.write(&p, &l, &r, None)?
            } else {
                a.read(&p, &l, &r, None)?
            };
            t.wait(Duration::from_secs(30))?;
        }
        Ok(t0.elapsed().as_secs_f64())
    })
    .map_err(to_py)
}

/// `n` posts of a prepared transfer, each waited for in turn (polling it, which drives the
/// engine, as a NIXL caller polls), through the Rust API with the GIL released: seconds taken.
#[pyfunction]
pub(crate) fn rust_prepared_loop(
    py: Python<'_>,
    prepared: PyRef<'_, Prepared>,
    n: u64,
) -> PyResult<f64> {
    let p = &prepared.inner;
    py.detach(|| {
        let t0 = Instant::now();
        for _ in 0..n {
            let t = p.post(None)?;
            loop {
                match t.poll() {
                    dmaplane::Status::InProgress { .. } => std::hint::spin_loop(),
                    dmaplane::Status::Done => break,
                    dmaplane::Status::Failed(e) => return Err(e),
                }
            }
        }
        Ok(t0.elapsed().as_secs_f64())
    })
    .map_err(to_py)
}
